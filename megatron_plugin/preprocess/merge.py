"""``merge``: join dataset prefixes (e.g. the shards of one corpus) into one dataset + manifest."""
from __future__ import annotations

import glob
import os
import time
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
    present = [m for m in parts if m]
    documents = sum((mf.DocumentCounts.from_dict(m["documents"]) for m in present), mf.DocumentCounts())
    first = present[0] if present else {}
    return mf.Manifest(
        output=ds,
        fingerprint=None,
        inputs=[i for m in present for i in m.get("inputs", [])],
        documents=documents,
        tokenizer=first.get("tokenizer"),
        options=first.get("options"),
        merged_from=[os.path.abspath(p) for p in prefixes],
        duration_s=time.time() - t0,
        throughput={},
    ).write(output_prefix)
