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
from typing import Any, Optional

from megatron_plugin.data.indexed import check_dataset, idx_path, bin_path

from .tokenizer import file_sha256

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
