"""The preprocessing job: inputs -> (train tokenizer) -> parallel ordered encoding -> dataset + manifest."""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Iterator, Optional, Sequence

import numpy as np

from megatron_plugin.data.indexed import IndexedDatasetWriter, optimal_dtype

from . import manifest as mf
from .encoder import DEFAULT_CACHE_WORDS, EncodingPlan, plan_encoding, word_separators
from .errors import EMPTY, HOW_TO_SKIP, PreprocessError
from .readers import Chunk, InputFile, check_readable, expand_inputs, iter_chunks, parse_chunk, shard_files
from .tokenizer import TokenizerInfo, TrainerOptions, describe, require_eod, train_sentencepiece
from .worker import ChunkResult, Worker, WorkerConfig, init_worker, run_chunk


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@dataclass
class PreprocessOptions:
    inputs: list
    output_prefix: str
    tokenizer_model: Optional[str] = None
    train_tokenizer: bool = False
    # Tokenizer training defaults are the trainer's own (a dataclass field's class attribute is its default).
    vocab_size: int = TrainerOptions.vocab_size
    tokenizer_sample: int = TrainerOptions.sample_sentences  # lines of text sampled for tokenizer training
    normalization: str = TrainerOptions.normalization  # "identity" (layout kept) | "nmt_nfkc"
    json_keys: tuple = ("text",)
    append_eod: bool = False
    workers: int = 0  # 0: all cores
    text_unit: str = "line"
    on_error: str = "stop"  # "stop" | "skip"
    empty_documents: str = "keep"  # "keep" (as Megatron-LM) | "skip" | "error"
    verify: int = 0
    num_shards: int = 1
    shard_index: Optional[int] = None  # None with num_shards > 1: every shard here, then merge
    chunk_bytes: int = 1 << 20
    cache_words: int = DEFAULT_CACHE_WORDS
    encoder: str = "auto"  # "auto" (per-word cache where exact) | "plain"
    overwrite: bool = False
    progress: bool = True
    seed: int = TrainerOptions.seed

    def output_options(self) -> dict:
        """Options that change the output bytes (part of the resume fingerprint)."""
        return {
            "json_keys": list(self.json_keys),
            "append_eod": self.append_eod,
            "text_unit": self.text_unit,
            "on_error": self.on_error,
            "empty_documents": self.empty_documents,
        }


def dataset_prefix(output_prefix: str, key: str, num_shards: int = 1, shard_index: Optional[int] = None) -> str:
    """Megatron-LM's naming (``{prefix}_{key}_document``), plus a shard suffix for shard outputs."""
    base = f"{output_prefix}_{key}_document"
    if num_shards > 1 and shard_index is not None:
        base += f"-shard-{shard_index:05d}-of-{num_shards:05d}"
    return base


@dataclass
class PreprocessResult:
    prefixes: dict  # key -> dataset prefix
    manifests: dict  # key -> manifest dict
    tokenizer_model: str
    skipped_existing: bool = False

    @property
    def tokens(self) -> int:
        return sum(m["tokens"] for m in self.manifests.values())

    @property
    def prefix(self) -> str:
        return next(iter(self.prefixes.values()))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _input_records(files: Sequence[InputFile]) -> list:
    return [[f.path, f.size, f.mtime_ns] for f in files]


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _iter_texts(files: Sequence[InputFile], opts: PreprocessOptions) -> Iterator[str]:
    bad: list = []
    for chunk in iter_chunks(files, opts.chunk_bytes, opts.text_unit, opts.on_error, bad):
        parsed = parse_chunk(chunk, opts.json_keys)
        if parsed.bad and opts.on_error != "skip":
            raise PreprocessError(parsed.bad[0].message() + "; " + HOW_TO_SKIP)
        for _, texts in parsed.docs:
            yield from texts


def ensure_tokenizer(files: Sequence[InputFile], opts: PreprocessOptions) -> str:
    if opts.tokenizer_model and not opts.train_tokenizer:
        return opts.tokenizer_model
    if not opts.train_tokenizer:
        raise PreprocessError("no tokenizer: pass --tokenizer-model PATH.model, or --train-tokenizer")
    model_prefix = opts.tokenizer_model[: -len(".model")] if (opts.tokenizer_model or "").endswith(".model") else opts.output_prefix
    model = model_prefix + ".model"
    trainer = TrainerOptions(vocab_size=opts.vocab_size, sample_sentences=opts.tokenizer_sample,
                             normalization=opts.normalization, seed=opts.seed,
                             threads=opts.workers or default_workers())
    key = mf.fingerprint(_input_records(files), "",
                         {"trainer": asdict(trainer), **opts.output_options()})
    stamp = model_prefix + ".tokenizer.json"
    if os.path.exists(model) and not opts.overwrite:
        import json
        try:
            with open(stamp) as f:
                if json.load(f).get("fingerprint") == key:
                    _log(f"tokenizer: reusing {model} (trained on the same inputs and options)")
                    return model
        except (OSError, ValueError):
            pass
    t0 = time.time()
    _log(f"tokenizer: training BPE ({opts.normalization} normalization), vocab {opts.vocab_size}, "
         f"on up to {opts.tokenizer_sample:,} sampled lines")
    train_sentencepiece(_iter_texts(files, opts), model_prefix, trainer)
    import json
    with open(stamp, "w") as f:
        json.dump({"fingerprint": key, "model": os.path.abspath(model), "trainer": asdict(trainer),
                   "duration_s": round(time.time() - t0, 3)}, f, indent=2)
    _log(f"tokenizer: wrote {model} in {time.time() - t0:.1f} s")
    return model


def train_tokenizer(
    inputs: Sequence[str],
    model_prefix: str,
    vocab_size: int = PreprocessOptions.vocab_size,
    json_keys: Sequence[str] = PreprocessOptions.json_keys,
    sample_lines: int = PreprocessOptions.tokenizer_sample,
    text_unit: str = PreprocessOptions.text_unit,
    seed: int = PreprocessOptions.seed,
    workers: int = PreprocessOptions.workers,
    normalization: str = PreprocessOptions.normalization,
    **trainer_extra,
) -> str:
    """Train a BPE SentencePiece model (byte fallback) on a bounded sample; returns ``PREFIX.model``.

    ``normalization="identity"`` (default): Llama 2's settings, newlines, indentation and repeated
    spaces survive; ``"nmt_nfkc"``: SentencePiece's default, NFKC and whitespace collapsed.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(i) for i in inputs]
    model_prefix = os.fspath(model_prefix)
    files = expand_inputs(inputs)
    opts = PreprocessOptions(inputs=inputs, output_prefix=model_prefix, json_keys=tuple(json_keys),
                             text_unit=text_unit, seed=seed, workers=workers)
    trainer = TrainerOptions(vocab_size=vocab_size, sample_sentences=sample_lines, seed=seed,
                             normalization=normalization, threads=workers or default_workers(),
                             extra=dict(trainer_extra))
    return train_sentencepiece(_iter_texts(files, opts), model_prefix, trainer)


# ----------------------------------------------------------------------------------------------
# Encoding


class _Progress:
    """The tqdm bar over input bytes, or nothing without ``progress``."""

    def __init__(self, total: Optional[int], enabled: bool, desc: str, t0: float) -> None:
        self.t0 = t0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                            dynamic_ncols=True, smoothing=0.1, mininterval=0.5, file=sys.stderr)

    def update(self, raw_bytes: int, tally: "_Tally") -> None:
        if self.bar is None:
            return
        self.bar.update(raw_bytes)
        el = max(time.time() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{tally.documents.written:,} docs, {tally.tokens / el / 1e6:.2f}M tok/s",
                                 refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _with_verify(chunks: Iterator[Chunk], n: int, total_bytes: int) -> Iterator[Chunk]:
    """Spread ``n`` verified documents over the chunks in proportion to their input bytes."""
    if n <= 0:
        yield from chunks
        return
    owed = 0.0
    total = max(total_bytes, 1)
    prev = None
    for c in chunks:
        if prev is not None:
            owed += n * prev.raw_bytes / total
            prev.verify = int(owed)
            owed -= prev.verify
            yield prev
        prev = c
    if prev is not None:
        prev.verify = int(round(owed + n * prev.raw_bytes / total))
        yield prev


def _ordered_results(chunks: Iterator[Chunk], workers: int, cfg: WorkerConfig) -> Iterator[ChunkResult]:
    """Results in input order with a bounded number of chunks in flight (flat memory)."""
    if workers <= 1:
        w = Worker(cfg)
        for c in chunks:
            yield w.process(c)
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    pool = ctx.Pool(workers, initializer=init_worker, initargs=(cfg,))
    try:
        pending: deque = deque()
        limit = 2 * workers + 1
        for c in chunks:
            pending.append(pool.apply_async(run_chunk, (c,)))
            if len(pending) >= limit:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


@dataclass
class _Tally:
    """What the chunk results of one run add up to."""

    documents: mf.DocumentCounts = field(default_factory=mf.DocumentCounts)
    tokens: int = 0  # of the first key; for the progress bar
    verified: int = 0
    lookups: int = 0
    misses: int = 0

    def add(self, res: ChunkResult, itemsize: int) -> None:
        self.documents.add(res.documents)
        self.tokens += len(res.data[0]) // itemsize
        self.verified += res.verified
        self.lookups += res.lookups
        self.misses += res.misses

    @property
    def cache_hit_rate(self) -> Optional[float]:
        return round(1 - self.misses / self.lookups, 4) if self.lookups else None


def _encoding_plan(info: TokenizerInfo, opts: PreprocessOptions) -> EncodingPlan:
    plan = plan_encoding(info.spec)
    if opts.encoder == "plain":
        return EncodingPlan("plain", f"--encoder plain (auto would use: {plan.label}; {plan.why})")
    if plan.mode == "words":
        return replace(plan, separators=word_separators(info.path, info.sha256, info.spec.normalization,
                                                        info.spec.has_rule_tsv))
    return plan


def _worker_config(info: TokenizerInfo, opts: PreprocessOptions, plan: EncodingPlan) -> WorkerConfig:
    return WorkerConfig(
        model_path=info.path, keys=tuple(opts.json_keys), dtype=str(optimal_dtype(info.vocab_size)),
        append_eod=opts.append_eod, eod_id=require_eod(info) if opts.append_eod else -1,
        empty_documents=opts.empty_documents, plan=plan, cache_words=opts.cache_words,
    )


def _require_readable(files: Sequence[InputFile], opts: PreprocessOptions) -> None:
    """Without ``--on-error skip``, fail on an unreadable file before any encoding work."""
    if opts.on_error == "skip":
        return
    unreadable = check_readable(files)
    if unreadable:
        raise PreprocessError(unreadable[0].message() + "; fix the permissions or " + HOW_TO_SKIP)


def _check_chunk(res: ChunkResult, opts: PreprocessOptions, why: str) -> None:
    """Stop on the chunk's first record that the options make fatal, or on a --verify difference."""
    for rec in res.bad:  # in input order: the first fatal record stops the run
        if rec.reason == EMPTY:
            if opts.empty_documents == "error":
                raise PreprocessError(rec.message() + " (--empty-documents error)")
        elif opts.on_error != "skip":
            raise PreprocessError(rec.message() + "; " + HOW_TO_SKIP)
    if res.mismatches:
        raise PreprocessError(
            "--verify found a difference from plain SentencePiece encoding: " + res.mismatches[0]
            + f"; rerun with --encoder plain (encoder in use: {why})"
        )


def _write_datasets(files: Sequence[InputFile], prefixes: dict, cfg: WorkerConfig, workers: int,
                    opts: PreprocessOptions, desc: str, t0: float) -> tuple[dict, _Tally]:
    """Encode every chunk, in input order, into one writer per key; returns (key -> WrittenDataset,
    tally). On any failure the writers are aborted, so no final name is touched."""
    itemsize = np.dtype(cfg.dtype).itemsize
    total_bytes = sum(f.size for f in files)
    writers = {k: IndexedDatasetWriter(p, cfg.dtype) for k, p in prefixes.items()}
    bar = _Progress(total_bytes or None, opts.progress, desc, t0)
    tally = _Tally()
    bad_files: list = []
    try:
        chunks = _with_verify(iter_chunks(files, opts.chunk_bytes, opts.text_unit, opts.on_error, bad_files),
                              opts.verify, total_bytes)
        for res in _ordered_results(chunks, workers, cfg):
            _check_chunk(res, opts, cfg.plan.why)
            for k, key in enumerate(opts.json_keys):
                writers[key].add_chunk(res.data[k], res.lengths[k])
            tally.add(res, itemsize)
            bar.update(res.raw_bytes, tally)
        bar.close()
        written = {k: w.finalize() for k, w in writers.items()}
    except BaseException:
        bar.close()
        for w in writers.values():
            if not w.closed:
                w.abort()
        raise
    for rec in bad_files:  # files skipped whole under --on-error skip
        tally.documents.skipped[rec.reason] += 1
    return written, tally


def _write_manifests(files: Sequence[InputFile], prefixes: dict, written: dict, tally: _Tally,
                     info: TokenizerInfo, plan: EncodingPlan, workers: int, opts: PreprocessOptions,
                     fp: str, duration: float) -> dict:
    total_bytes = sum(f.size for f in files)
    manifests = {}
    for key, ds in written.items():
        manifests[key] = mf.Manifest(
            output=ds,
            fingerprint=fp,
            inputs=[f.as_dict() for f in files],
            documents=tally.documents,
            tokenizer=info.as_dict(),
            encoder={"mode": plan.label, "why": plan.why, "cache_words": opts.cache_words,
                     "cache_hit_rate": tally.cache_hit_rate, "verified_documents": tally.verified},
            options={**opts.output_options(), "workers": workers, "num_shards": opts.num_shards,
                     "shard_index": opts.shard_index, "verify": opts.verify, "json_key": key},
            duration_s=duration,
            throughput=mf.throughput_section(ds.tokens, tally.documents.written, total_bytes, duration, workers),
        ).write(prefixes[key])
    return manifests


def _encode_files(files: Sequence[InputFile], prefixes: dict, info: TokenizerInfo, opts: PreprocessOptions,
                  fp: str, desc: str) -> dict:
    """Encode ``files`` into the datasets ``prefixes`` (one per key) and write their manifests."""
    workers = opts.workers or default_workers()
    plan = _encoding_plan(info, opts)
    cfg = _worker_config(info, opts, plan)
    t0 = time.time()
    _require_readable(files, opts)
    written, tally = _write_datasets(files, prefixes, cfg, workers, opts, desc, t0)
    return _write_manifests(files, prefixes, written, tally, info, plan, workers, opts, fp, time.time() - t0)


def _run_one(files: Sequence[InputFile], prefixes: dict, info: TokenizerInfo, opts: PreprocessOptions,
             desc: str) -> tuple[dict, bool]:
    fp = mf.fingerprint(_input_records(files), info.sha256, opts.output_options())
    if not opts.overwrite:
        states = {k: mf.is_complete(p, fp) for k, p in prefixes.items()}
        if all(ok for ok, _ in states.values()):
            _log(f"{desc}: already complete and verified, skipping ({', '.join(prefixes.values())})")
            return {k: mf.read_manifest(p) for k, p in prefixes.items()}, True
    manifests = _encode_files(files, prefixes, info, opts, fp, desc)
    return manifests, False


def preprocess(opts: PreprocessOptions) -> PreprocessResult:
    """Run the whole job for one output prefix (one shard, every shard, or no sharding)."""
    if not opts.json_keys:
        raise PreprocessError("--json-keys needs at least one key")
    if opts.encoder not in ("auto", "plain"):
        raise PreprocessError(f"encoder must be 'auto' or 'plain', got {opts.encoder!r}")
    files = expand_inputs(opts.inputs)
    if opts.num_shards > 1 and opts.train_tokenizer and opts.shard_index is not None:
        raise PreprocessError(
            "--train-tokenizer with --shard-index would train a different tokenizer per machine: "
            "train it once (python -m megatron_plugin.preprocess train-tokenizer ...) and pass "
            "--tokenizer-model to every shard"
        )
    model = ensure_tokenizer(files, opts)
    info = describe(model)
    if opts.append_eod:
        require_eod(info)
    keys = list(opts.json_keys)
    if opts.num_shards <= 1:
        prefixes = {k: dataset_prefix(opts.output_prefix, k) for k in keys}
        manifests, skipped = _run_one(files, prefixes, info, opts, "encode")
        _summary(manifests)
        return PreprocessResult(prefixes, manifests, model, skipped)
    if opts.shard_index is not None:
        if not 0 <= opts.shard_index < opts.num_shards:
            raise PreprocessError(f"--shard-index must be in 0..{opts.num_shards - 1}, got {opts.shard_index}")
        part = shard_files(files, opts.num_shards, opts.shard_index)
        prefixes = {k: dataset_prefix(opts.output_prefix, k, opts.num_shards, opts.shard_index) for k in keys}
        manifests, skipped = _run_one(part, prefixes, info, opts,
                                      f"shard {opts.shard_index}/{opts.num_shards}")
        _summary(manifests)
        return PreprocessResult(prefixes, manifests, model, skipped)
    # Every shard on this machine, each resumable on its own, then one merged dataset.
    from .merge import merge_prefixes

    shard_prefixes: dict = {k: [] for k in keys}
    for i in range(opts.num_shards):
        part = shard_files(files, opts.num_shards, i)
        prefixes = {k: dataset_prefix(opts.output_prefix, k, opts.num_shards, i) for k in keys}
        _run_one(part, prefixes, info, opts, f"shard {i}/{opts.num_shards}")
        for k in keys:
            shard_prefixes[k].append(prefixes[k])
    final = {k: dataset_prefix(opts.output_prefix, k) for k in keys}
    manifests = {k: merge_prefixes(shard_prefixes[k], final[k]) for k in keys}
    _summary(manifests)
    return PreprocessResult(final, manifests, model, False)


def _summary(manifests: dict) -> None:
    for m in manifests.values():
        _log(mf.summary_line(m))


def preprocess_files(
    inputs: Sequence[str] | str,
    output_prefix: str,
    tokenizer_model: Optional[str] = None,
    *,
    train_tokenizer: bool = False,
    vocab_size: int = PreprocessOptions.vocab_size,
    json_keys: Sequence[str] = PreprocessOptions.json_keys,
    append_eod: bool = True,
    workers: int = PreprocessOptions.workers,
    progress: bool = False,
    **options,
) -> PreprocessResult:
    """Python entry point: the CLI's default job. Returns dataset prefix(es), manifests, tokenizer."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [str(inputs)]
    opts = PreprocessOptions(
        inputs=[os.fspath(i) for i in inputs], output_prefix=os.fspath(output_prefix),
        tokenizer_model=os.fspath(tokenizer_model) if tokenizer_model else None,
        train_tokenizer=train_tokenizer, vocab_size=vocab_size, json_keys=tuple(json_keys),
        append_eod=append_eod, workers=workers, progress=progress, **options,
    )
    return preprocess(opts)
