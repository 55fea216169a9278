"""The per-word cache in its simplest form, to tell how hard a corpus is for the idea itself.

    python benchmarks/preprocess_prototype.py --input docs50.jsonl --model bpe32k.model --workers 2

DESIGN.md's figures come from a prototype like this one: ``str.split()``, an unbounded dictionary
per process, missed words encoded per document, 200-line chunks over a process pool. It writes
only the ``.bin`` (token bytes, EOD after each non-empty document), which for the default
normalizer equals the tool's ``.bin`` (``--compare`` checks). Prints wall time and hit rate.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import time
from multiprocessing import Pool

import numpy as np
import sentencepiece as spm

_sp = None
_cache: dict = {}
_eod = b""


def _init(model: str) -> None:
    global _sp, _eod
    _sp = spm.SentencePieceProcessor(model_file=model)
    _eod = np.array([_sp.eos_id()], np.uint16).tobytes()


def _encode(lines: list) -> tuple[bytes, int, int]:
    out, lookups, misses = [], 0, 0
    for line in lines:
        words = json.loads(line)["text"].split()
        new = [w for w in set(words) if w not in _cache]
        lookups += len(words)
        misses += len(new)
        for w, ids in zip(new, _sp.encode(new)):
            _cache[w] = np.array(ids, np.uint16).tobytes()
        doc = b"".join([_cache[w] for w in words])
        out.append(doc + _eod if doc else doc)
    return b"".join(out), lookups, misses


def _chunks(path: str, n: int = 200):
    with open(path, encoding="utf-8") as f:
        buf = []
        for line in f:
            buf.append(line)
            if len(buf) == n:
                yield buf
                buf = []
        if buf:
            yield buf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--output", default="/tmp/preprocess_prototype.bin")
    ap.add_argument("--compare", help="a .bin written by the tool for the same input and model")
    args = ap.parse_args()
    t0 = time.perf_counter()
    lookups = misses = 0
    with Pool(args.workers, initializer=_init, initargs=(args.model,)) as pool, open(args.output, "wb") as out:
        for data, n, m in pool.imap(_encode, _chunks(args.input)):
            out.write(data)
            lookups += n
            misses += m
    wall = time.perf_counter() - t0
    print(f"prototype: {wall:.2f} s wall, {lookups:,} look-ups, hit rate {1 - misses / max(lookups, 1):.4f}")
    if args.compare:
        print("identical .bin:", filecmp.cmp(args.output, args.compare, shallow=False))


if __name__ == "__main__":
    main()
