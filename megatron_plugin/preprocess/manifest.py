"""The manifest ``PREFIX.json`` written beside each dataset, and the resume check built on it.

``tokens`` (top level) is the number of tokens in ``PREFIX.bin`` (EOD tokens included): the
figure training plans use for epochs.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from megatron_plugin.data.indexed import WrittenDataset, bin_path, check_dataset, idx_path

from megatron_plugin.files import file_sha256

FORMAT = "megatron_plugin.preprocess.manifest/1"


def manifest_path(prefix: str) -> str:
    return f"{prefix}.json"


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("megatron_plugin", "sentencepiece", "numpy", "megatron-core"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def fingerprint(inputs: list, tokenizer_sha: str, options: dict) -> str:
    """What decides the output bytes: input files (path, size, mtime), tokenizer, options."""
    blob = json.dumps({"inputs": inputs, "tokenizer": tokenizer_sha, "options": options}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_manifest(prefix: str, data: dict) -> str:
    path = manifest_path(prefix)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_manifest(prefix: str) -> Optional[dict]:
    try:
        with open(manifest_path(prefix)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_complete(prefix: str, expected_fingerprint: Optional[str]) -> tuple[bool, str]:
    """Whether ``prefix`` holds a finished dataset for this fingerprint, checked against its files."""
    m = read_manifest(prefix)
    if m is None:
        return False, "no manifest"
    if not m.get("complete"):
        return False, "manifest not marked complete"
    if expected_fingerprint is not None and m.get("fingerprint") != expected_fingerprint:
        return False, "inputs, tokenizer or options changed"
    out = m.get("output", {})
    try:
        if os.path.getsize(bin_path(prefix)) != out.get("bin_bytes"):
            return False, ".bin size differs from the manifest"
        if os.path.getsize(idx_path(prefix)) != out.get("idx_bytes"):
            return False, ".idx size differs from the manifest"
        check_dataset(prefix)
    except (OSError, ValueError) as exc:
        return False, f"dataset check failed: {exc}"
    if file_sha256(idx_path(prefix)) != out.get("idx_sha256"):
        return False, ".idx checksum differs from the manifest"
    return True, "complete and verified"


def summary_line(m: dict) -> str:
    d = m["documents"]
    t = m.get("throughput", {})
    return (
        f"{m['output']['prefix']}: {d['written']:,} documents ({d['empty']:,} empty), "
        f"{sum(d['skipped'].values()):,} skipped, {m['tokens']:,} tokens, {m['output']['dtype']}, "
        f"{m.get('duration_s', 0):.1f} s, {t.get('tokens_per_s', 0):,.0f} tokens/s, "
        f"{t.get('input_mb_per_s', 0):.1f} MB/s"
    )


def base_manifest() -> dict[str, Any]:
    return {"format": FORMAT, "complete": False, "versions": versions(), "argv": sys.argv}


@dataclass
class DocumentCounts:
    """The manifest's ``documents`` section; a chunk's counts add up to a run's, a run's to a merge's."""

    read: int = 0
    written: int = 0
    empty: int = 0
    blank_lines_ignored: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> records

    def add(self, other: "DocumentCounts") -> "DocumentCounts":
        self.read += other.read
        self.written += other.written
        self.empty += other.empty
        self.blank_lines_ignored += other.blank_lines_ignored
        self.skipped.update(other.skipped)
        return self

    def __add__(self, other: "DocumentCounts") -> "DocumentCounts":
        return DocumentCounts().add(self).add(other)

    def as_dict(self) -> dict:
        return {
            "read": self.read,
            "written": self.written,
            "empty": self.empty,
            "skipped": dict(sorted(self.skipped.items())),
            "blank_lines_ignored": self.blank_lines_ignored,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DocumentCounts":
        return cls(read=d.get("read", 0), written=d.get("written", 0), empty=d.get("empty", 0),
                   blank_lines_ignored=d.get("blank_lines_ignored", 0), skipped=Counter(d.get("skipped", {})))


def throughput_section(tokens: int, documents: int, input_bytes: int, duration_s: float, workers: int) -> dict:
    d = max(duration_s, 1e-9)
    return {
        "tokens_per_s": round(tokens / d, 1),
        "tokens_per_s_per_worker": round(tokens / d / workers, 1),
        "documents_per_s": round(documents / d, 1),
        "input_mb_per_s": round(input_bytes / 1e6 / d, 2),
    }


@dataclass
class Manifest:
    """A finished dataset's manifest, as an encoding run or a merge writes it."""

    output: WrittenDataset
    fingerprint: Optional[str]  # None for a merge: it is not resumed, its parts are
    inputs: list  # InputFile.as_dict() of every input file
    documents: DocumentCounts
    tokenizer: Optional[dict]
    options: Optional[dict]
    duration_s: float
    throughput: dict
    encoder: Optional[dict] = None  # which encoding path ran and why; a merge ran none
    merged_from: Optional[list] = None  # absolute prefixes of a merge's parts

    def to_dict(self) -> dict[str, Any]:
        m = base_manifest()
        m.update({
            "complete": True,
            "fingerprint": self.fingerprint,
            "output": asdict(self.output),
            "tokens": self.output.tokens,
            "inputs": self.inputs,
            "input_bytes": sum(i.get("bytes", 0) for i in self.inputs),
            "documents": self.documents.as_dict(),
            "tokenizer": self.tokenizer,
        })
        if self.encoder is not None:
            m["encoder"] = self.encoder
        m["options"] = self.options
        if self.merged_from is not None:
            m["merged_from"] = self.merged_from
        m["duration_s"] = round(self.duration_s, 3)
        m["throughput"] = self.throughput
        return m

    def write(self, prefix: str) -> dict[str, Any]:
        """Write ``prefix.json``; returns the manifest as written."""
        m = self.to_dict()
        write_manifest(prefix, m)
        return m
