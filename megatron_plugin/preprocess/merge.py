"""``merge``: join dataset prefixes (e.g. the shards of one corpus) into one dataset + manifest."""
from __future__ import annotations

import glob
import os
import time
from collections import Counter
from dataclasses import asdict
from typing import Sequence

from megatron_plugin.data.indexed import merge_datasets

from . import manifest as mf
from .errors import PreprocessError


def expand_prefixes(specs: Sequence[str]) -> list[str]:
    """Prefixes as given; a glob matches ``*.idx`` files and is sorted (shard order)."""
    out: list[str] = []
    for s in specs:
        if os.path.exists(s + ".idx"):
            out.append(s)
            continue
        pat = s if s.endswith(".idx") else s + ".idx"
        matched = sorted(glob.glob(pat))
        if not matched:
            raise PreprocessError(f"{s}: no dataset ({s}.idx) and no matching prefixes")
        out.extend(m[: -len(".idx")] for m in matched)
    return out


def merge_prefixes(prefixes: Sequence[str], output_prefix: str) -> dict:
    """Merge in order, write ``output_prefix.json``; returns the manifest."""
    prefixes = list(prefixes)
    if output_prefix in prefixes:
        raise PreprocessError("the merge output prefix must differ from its inputs")
    parts = [mf.read_manifest(p) for p in prefixes]
    shas = {p["tokenizer"]["sha256"] for p in parts if p}
    if len(shas) > 1:
        raise PreprocessError("cannot merge datasets encoded with different tokenizers: " +
                              ", ".join(f"{p}" for p, m in zip(prefixes, parts) if m))
    t0 = time.time()
    try:
        ds = merge_datasets(prefixes, output_prefix)
    except ValueError as exc:
        raise PreprocessError(f"merge failed: {exc}") from exc
    docs = Counter()
    skipped: Counter = Counter()
    inputs = []
    for m in parts:
        if not m:
            continue
        for k in ("read", "written", "empty", "blank_lines_ignored"):
            docs[k] += m["documents"].get(k, 0)
        skipped.update(m["documents"].get("skipped", {}))
        inputs.extend(m.get("inputs", []))
    m = mf.base_manifest()
    first = next((p for p in parts if p), {})
    m.update({
        "complete": True,
        "fingerprint": None,
        "output": asdict(ds),
        "tokens": ds.tokens,
        "inputs": inputs,
        "input_bytes": sum(i.get("bytes", 0) for i in inputs),
        "documents": {**{k: docs[k] for k in ("read", "written", "empty", "blank_lines_ignored")},
                      "skipped": dict(sorted(skipped.items()))},
        "tokenizer": first.get("tokenizer"),
        "options": first.get("options"),
        "merged_from": [os.path.abspath(p) for p in prefixes],
        "duration_s": round(time.time() - t0, 3),
        "throughput": {},
    })
    mf.write_manifest(output_prefix, m)
    return m
