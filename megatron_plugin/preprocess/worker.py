"""Worker side: parse a chunk, encode its documents, optionally verify some against plain encoding."""
from __future__ import annotations

import gc
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import sentencepiece as spm

from .encoder import DEFAULT_CACHE_WORDS, EncodingPlan, make_encoder
from .errors import EMPTY, INVALID_UTF8, BadRecord
from .manifest import DocumentCounts
from .readers import Chunk, parse_chunk


# What SentencePiece raises on text it cannot take (lone surrogates from JSON "\ud800" escapes).
ENCODE_ERRORS = (UnicodeEncodeError, TypeError, RuntimeError)


@dataclass(frozen=True)
class WorkerConfig:
    model_path: str
    keys: tuple[str, ...]
    dtype: str
    append_eod: bool
    eod_id: int
    empty_documents: str  # "keep" | "skip" | "error"
    plan: EncodingPlan
    cache_words: int = DEFAULT_CACHE_WORDS


@dataclass
class ChunkResult:
    index: int
    data: list  # per key: token bytes of the chunk's written documents
    lengths: list  # per key: int32 array, tokens per written document (0 = empty document)
    raw_bytes: int
    documents: DocumentCounts = field(default_factory=DocumentCounts)
    bad: list = field(default_factory=list)  # BadRecord, in input order
    verified: int = 0
    mismatches: list = field(default_factory=list)  # messages
    lookups: int = 0
    misses: int = 0


class Worker:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.sp = spm.SentencePieceProcessor(model_file=cfg.model_path)
        dtype = np.dtype(cfg.dtype)
        self.encoder = make_encoder(self.sp, dtype, cfg.plan, cfg.model_path, cfg.cache_words)
        self.eod = np.array([cfg.eod_id], dtype=dtype).tobytes() if cfg.append_eod else b""
        self.itemsize = dtype.itemsize

    def process(self, chunk: Chunk) -> ChunkResult:
        # A chunk allocates tens of thousands of lists (words and look-ups per document, ids per
        # missed word) and no reference cycles. With the cyclic collector on, each of its dozens
        # of young-generation passes per chunk walks every live list: about 10% of a worker's time.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._process(chunk)
        finally:
            if collecting:
                gc.enable()

    def _process(self, chunk: Chunk) -> ChunkResult:
        cfg = self.cfg
        nkeys = len(cfg.keys)
        parsed = parse_chunk(chunk, cfg.keys)
        res = ChunkResult(chunk.index, [b""] * nkeys, [None] * nkeys, chunk.raw_bytes)
        counts = res.documents
        counts.blank_lines_ignored = parsed.blank_lines
        bad = list(parsed.bad)
        outs: list[list[bytes]] = [[] for _ in range(nkeys)]
        lens: list[list[int]] = [[] for _ in range(nkeys)]
        lookups0, misses0 = self.encoder.lookups, self.encoder.misses
        encode = self.encoder.encode
        encoded_docs = self._encode_chunk(parsed.docs, nkeys)
        eod = self.eod
        isz = self.itemsize
        keep_empty = cfg.empty_documents == "keep"
        verify_idx = self._verify_picks(chunk, len(parsed.docs))
        for di, (lineno, texts) in enumerate(parsed.docs):
            if encoded_docs is not None:
                encoded = [col[di] for col in encoded_docs]
            else:
                try:
                    encoded = [encode(t) for t in texts]
                except ENCODE_ERRORS as exc:
                    bad.append(BadRecord(INVALID_UTF8, chunk.path, lineno, f"text is not valid Unicode ({exc})"))
                    continue
            if any(not e for e in encoded):
                counts.empty += 1
                if not keep_empty:
                    bad.append(BadRecord(EMPTY, chunk.path, lineno,
                                         "empty document (no tokens after normalization); "
                                         "--empty-documents keep writes it as Megatron-LM does"))
                    continue
            for k, e in enumerate(encoded):
                if e and eod:
                    e += eod  # Megatron-LM appends EOD only to non-empty documents
                outs[k].append(e)
                lens[k].append(len(e) // isz)
            counts.written += 1
            if verify_idx and di in verify_idx:
                self._verify(chunk.path, lineno, texts, [outs[k][-1] for k in range(nkeys)], res)
        counts.read = len(parsed.docs) + len(bad)
        for rec in bad:
            counts.skipped[rec.reason] += 1
        bad.sort(key=lambda r: r.line)
        res.bad = bad[:20]  # counts are complete; a few examples are enough for messages
        for k in range(nkeys):
            res.data[k] = b"".join(outs[k])
            res.lengths[k] = np.array(lens[k], dtype=np.int32)
        res.lookups = self.encoder.lookups - lookups0
        res.misses = self.encoder.misses - misses0
        return res

    def _encode_chunk(self, docs: list, nkeys: int) -> Optional[list]:
        """Every document of the chunk at once, per key; None if one fails (then one at a time)."""
        try:
            return [self.encoder.encode_many([texts[k] for _, texts in docs]) for k in range(nkeys)]
        except ENCODE_ERRORS:
            return None

    def _verify_picks(self, chunk: Chunk, ndocs: int) -> Optional[set]:
        if chunk.verify <= 0 or ndocs == 0:
            return None
        rng = random.Random(chunk.index * 1_000_003 + 17)
        return set(rng.sample(range(ndocs), min(ndocs, chunk.verify)))

    def _verify(self, path: str, lineno: int, texts: Sequence[str], written: Sequence[bytes], res: ChunkResult) -> None:
        dtype = np.dtype(self.cfg.dtype)
        for key, text, got in zip(self.cfg.keys, texts, written):
            ids = self.sp.encode(text)
            if ids and self.cfg.append_eod:
                ids.append(self.cfg.eod_id)
            want = np.array(ids, dtype=dtype).tobytes()
            res.verified += 1
            if want != got:
                g = np.frombuffer(got, dtype=dtype)
                w = np.frombuffer(want, dtype=dtype)
                n = min(g.size, w.size)
                pos = int(np.argmax(g[:n] != w[:n])) if n and (g[:n] != w[:n]).any() else n
                res.mismatches.append(
                    f"{path}:{lineno} key {key!r}: written tokens differ from plain SentencePiece "
                    f"encoding at token {pos} (written {g.size} tokens, expected {w.size})"
                )


# Process-global worker for multiprocessing.Pool (set by the initializer).
_WORKER: Optional[Worker] = None


def init_worker(cfg: WorkerConfig) -> None:
    global _WORKER
    _WORKER = Worker(cfg)


def run_chunk(chunk: Chunk) -> ChunkResult:
    assert _WORKER is not None
    return _WORKER.process(chunk)
