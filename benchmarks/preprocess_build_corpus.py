"""Build a JSONL corpus of real English technical text from Debian documentation packages.

    apt-get install python3.11-doc postgresql-doc-15 git-doc perl-doc rust-doc
    python benchmarks/preprocess_build_corpus.py --out /work/bench-data/docs.jsonl --max-mb 100

One document per source file: reStructuredText sources and plain text as they are, POD as is,
HTML reduced to its text (scripts, styles and navigation dropped). Files are taken in sorted order,
so the same packages always give the same corpus. The corpus is never committed.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
from html.parser import HTMLParser

ROOTS = [
    "/usr/share/doc/python3.11/html/_sources",
    "/usr/share/perl",
    "/usr/share/doc/git-doc",
    "/usr/share/doc/postgresql-doc-15/html",
    "/usr/share/doc/rust-doc/html",
]
TEXT_EXT = (".txt", ".rst", ".pod", ".adoc")


class _Text(HTMLParser):
    SKIP = {"script", "style", "nav", "head", "header", "footer"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in ("p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "pre", "section"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skip:
            self.skip -= 1

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_text(raw: str) -> str:
    p = _Text()
    p.feed(raw)
    text = html.unescape("".join(p.parts))
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def iter_docs(roots):
    for root in roots:
        for dirpath, dirs, names in os.walk(root):
            dirs.sort()
            for n in sorted(names):
                path = os.path.join(dirpath, n)
                low = n.lower()
                try:
                    if low.endswith((".html", ".htm")):
                        with open(path, encoding="utf-8", errors="replace") as f:
                            text = html_text(f.read())
                    elif low.endswith(TEXT_EXT) or low.endswith(".rst.txt"):
                        with open(path, encoding="utf-8", errors="replace") as f:
                            text = f.read()
                    else:
                        continue
                except OSError:
                    continue
                if len(text) > 200:
                    yield path, text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-mb", type=float, default=100.0)
    ap.add_argument("--roots", nargs="*", default=ROOTS)
    args = ap.parse_args()
    limit = int(args.max_mb * 1e6)
    size = docs = 0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as out:
        for path, text in iter_docs(args.roots):
            line = json.dumps({"text": text, "source": path}, ensure_ascii=False) + "\n"
            out.write(line)
            size += len(line.encode("utf-8"))
            docs += 1
            if size >= limit:
                break
    print(f"{args.out}: {docs} documents, {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
