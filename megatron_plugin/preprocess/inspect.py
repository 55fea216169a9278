"""``inspect PREFIX``: counts, dtype, document length statistics, the first documents decoded."""
from __future__ import annotations

from typing import Optional

import numpy as np

from megatron_plugin.data.indexed import check_dataset, document_lengths, read_document, read_index

from . import manifest as mf


def inspect_dataset(prefix: str, tokenizer_model: Optional[str] = None, show: int = 3, max_chars: int = 400) -> str:
    header = check_dataset(prefix)
    arrays = read_index(prefix)
    lens = document_lengths(prefix)
    lines = [
        f"dataset   {prefix}",
        f"dtype     {header.dtype} ({header.dtype.itemsize} bytes/token)",
        f"documents {header.documents:,} ({int((lens == 0).sum()):,} empty)",
        f"sequences {header.sequence_count:,}",
        f"tokens    {int(lens.sum()):,}",
    ]
    nz = lens[lens > 0]
    if nz.size:
        q = np.percentile(nz, [50, 90, 99])
        lines.append(
            f"doc length (non-empty): min {int(nz.min())}  mean {nz.mean():.1f}  median {q[0]:.0f}  "
            f"p90 {q[1]:.0f}  p99 {q[2]:.0f}  max {int(nz.max())}"
        )
    m = mf.read_manifest(prefix)
    if m:
        lines.append(f"manifest  {mf.manifest_path(prefix)}: tokens={m.get('tokens'):,}, "
                     f"skipped={m['documents'].get('skipped')}")
        tokenizer_model = tokenizer_model or (m.get("tokenizer") or {}).get("model")
    sp = None
    if tokenizer_model:
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
        except Exception as exc:
            lines.append(f"(cannot load tokenizer {tokenizer_model}: {exc}; showing ids)")
    for i in range(min(show, header.documents)):
        toks = read_document(prefix, i, arrays)
        if sp is not None:
            body = repr(sp.decode(toks.tolist()))
        else:
            body = str(toks[:64].tolist())
        if len(body) > max_chars:
            body = body[:max_chars] + "..."
        lines.append(f"[doc {i}] {toks.size} tokens: {body}")
    return "\n".join(lines)
