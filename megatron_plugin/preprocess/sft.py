"""Chat data -> SFT dataset: conversations as token ids plus a loss mask (see docs/sft.md).

``python -m megatron_plugin.preprocess sft --input chats.jsonl --output-prefix P --tokenizer-model M``

Records are read with the pretraining readers (files, folders, globs, ``.gz``/``.zst``, Parquet,
``file:line`` positions), turned into a list of messages from any of the formats in `FORMATS`,
encoded with the chat template (`megatron_plugin.chat.template`) and written as two indexed
datasets with identical lengths (`megatron_plugin.data.sft_dataset`). One process: encoding a
conversation is a few SentencePiece calls, and SFT corpora are small next to pretraining ones.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from megatron_plugin.chat.template import (
    TEMPLATE_ID,
    TEMPLATE_VERSION,
    WRONG_TYPE,
    ChatTokenizer,
    ConversationError,
    check_messages,
)
from megatron_plugin.data.indexed import IndexedDatasetWriter, optimal_dtype
from megatron_plugin.data.sft_dataset import LOSS_MASK_DTYPE, loss_mask_prefix, tokens_prefix

from . import manifest as mf
from .errors import HOW_TO_SKIP, MALFORMED_JSON, MISSING_KEY, BadRecord, PreprocessError
from .readers import Chunk, InputFile, _decode_record, check_readable, expand_inputs, iter_chunks
from .tokenizer import describe

DEFAULT_MAX_LENGTH = 4096
TOO_LONG_POLICIES = ("truncate", "drop")
FORMATS = ("messages", "sharegpt", "prompt_completion")

# Reasons of the SFT job beyond the readers' and the template's (the manifest counts each).
NO_ASSISTANT = "no_assistant_turn"
TOO_LONG = "too_long"  # --too-long drop
TOO_LONG_NO_ASSISTANT = "too_long_no_assistant"  # --too-long truncate left no assistant turn

# ShareGPT's speaker names; role/content messages use the template's roles as they are.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant"}


@dataclass
class SFTOptions:
    inputs: list
    output_prefix: str
    tokenizer_model: str
    max_length: int = DEFAULT_MAX_LENGTH
    too_long: str = "truncate"  # "truncate" (drop the last turns that do not fit) | "drop"
    on_error: str = "stop"  # "stop" | "skip"
    chunk_bytes: int = 1 << 20
    overwrite: bool = False
    progress: bool = True

    def output_options(self) -> dict:
        """Options that change the output bytes (part of the resume fingerprint)."""
        return {"template": f"{TEMPLATE_ID}/{TEMPLATE_VERSION}", "max_length": self.max_length,
                "too_long": self.too_long, "on_error": self.on_error}


@dataclass
class SFTResult:
    output_prefix: str
    tokens_prefix: str
    loss_mask_prefix: str
    manifest: dict
    skipped_existing: bool = False

    @property
    def conversations(self) -> int:
        return self.manifest["documents"]["written"]

    @property
    def tokens(self) -> int:
        return self.manifest["tokens"]


# ----------------------------------------------------------------------------------------------
# Records -> messages


def _as_messages(items: Any, key: str, roles: Optional[dict]) -> list[dict]:
    if not isinstance(items, list):
        raise ConversationError(WRONG_TYPE, f"{key!r} holds a {type(items).__name__}, not a list of messages")
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise ConversationError(WRONG_TYPE, f"{key}[{i}] is a {type(m).__name__}, not an object")
        if "from" in m or "value" in m:  # ShareGPT speaker/value pairs, whichever key holds the list
            speaker = m.get("from")
            role = SHAREGPT_ROLES.get(speaker, speaker) if isinstance(speaker, str) else speaker
            out.append({"role": role, "content": m.get("value")})
        else:
            role = m.get("role")
            if roles is not None and isinstance(role, str):
                role = roles.get(role, role)
            out.append({"role": role, "content": m.get("content")})
    return out


def record_messages(obj: dict) -> tuple[str, list]:
    """(format, messages) of one record; raises `ConversationError` (missing_key, wrong_type...)."""
    if "messages" in obj:
        fmt, messages = "messages", _as_messages(obj["messages"], "messages", None)
    elif "conversations" in obj:
        fmt, messages = "sharegpt", _as_messages(obj["conversations"], "conversations", SHAREGPT_ROLES)
    elif "prompt" in obj and "completion" in obj:
        fmt = "prompt_completion"
        for k in ("prompt", "completion"):
            if not isinstance(obj[k], str):
                raise ConversationError(WRONG_TYPE, f"{k!r} holds a {type(obj[k]).__name__}, not a string")
        messages = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    else:
        raise ConversationError(
            MISSING_KEY,
            f"no 'messages', 'conversations' or 'prompt'/'completion' (keys present: {sorted(obj)[:8]})",
        )
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise ConversationError(WRONG_TYPE, f"'system' holds a {type(system).__name__}, not a string")
    # A top-level system prompt (ShareGPT exports, prompt/completion sets); empty means none.
    if system and system.strip() and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}] + messages
    return fmt, messages


@dataclass
class _Records:
    items: list  # (line, dict)
    bad: list = field(default_factory=list)
    blank_lines: int = 0


def _parse_chunk(chunk: Chunk) -> _Records:
    import json

    out = _Records([])
    if chunk.kind == "parquet":
        for r, row in enumerate(chunk.payload.to_pylist()):
            out.items.append((chunk.first_line + r, row))
        return out
    lines = chunk.payload.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for i, raw in enumerate(lines):
        lineno = chunk.first_line + i
        text = _decode_record(raw, lineno, chunk.file_start and i == 0, chunk.path, out)
        if text is None:
            continue
        if not text.strip():
            out.blank_lines += 1
            continue
        try:
            obj = json.loads(text)
        except ValueError as exc:
            detail = f"malformed JSON: {exc}"
            if lineno == 1 and text.lstrip().startswith("["):
                detail = ("the file is one JSON array, not JSON Lines; convert it with "
                          "jq -c '.[]' FILE > FILE.jsonl")
            out.bad.append(BadRecord(MALFORMED_JSON, chunk.path, lineno, detail))
            continue
        if not isinstance(obj, dict):
            out.bad.append(BadRecord(MALFORMED_JSON, chunk.path, lineno,
                                     f"expected a JSON object per line, got {type(obj).__name__}"))
            continue
        out.items.append((lineno, obj))
    return out


# ----------------------------------------------------------------------------------------------
# The job


@dataclass
class _Tally:
    counts: mf.DocumentCounts = field(default_factory=mf.DocumentCounts)
    formats: Counter = field(default_factory=Counter)
    truncated: int = 0
    messages_cut: int = 0  # messages removed by truncation
    trailing_removed: int = 0  # messages after the last assistant turn (nothing to learn from them)
    tokens: int = 0
    target_tokens: int = 0  # loss-mask ones


class _Bar:
    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total or None, unit="B", unit_scale=True, unit_divisor=1024, desc="sft",
                            dynamic_ncols=True, mininterval=0.5, file=sys.stderr)

    def update(self, n: int, tally: _Tally) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(f"{tally.counts.written:,} conversations, {tally.tokens:,} tokens",
                                     refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _Encoder:
    """One record -> (ids, mask) under the length policy, or a reason it is not written."""

    def __init__(self, chat: ChatTokenizer, opts: SFTOptions, tally: _Tally) -> None:
        self.chat, self.opts, self.tally = chat, opts, tally

    def __call__(self, obj: dict) -> tuple[Optional[tuple[list, list]], Optional[str]]:
        fmt, raw = record_messages(obj)
        messages = check_messages(raw)
        last = max((k for k, m in enumerate(messages) if m.role == "assistant"), default=-1)
        if last < 0:
            raise ConversationError(NO_ASSISTANT, "no assistant turn: nothing to train on")
        self.tally.formats[fmt] += 1
        self.tally.trailing_removed += len(messages) - last - 1
        enc = self.chat.encode(messages[: last + 1])
        if len(enc.ids) > self.opts.max_length:
            if self.opts.too_long == "drop":
                return None, TOO_LONG
            keep = max((k + 1 for k, end in enumerate(enc.ends)
                        if end <= self.opts.max_length and enc.roles[k] == "assistant"), default=0)
            if keep == 0:
                return None, TOO_LONG_NO_ASSISTANT
            self.tally.truncated += 1
            self.tally.messages_cut += len(enc.ends) - keep
            enc = enc.cut(keep)
        return (enc.ids, enc.loss_mask), None


def _check_options(opts: SFTOptions) -> None:
    if opts.too_long not in TOO_LONG_POLICIES:
        raise PreprocessError(f"--too-long {opts.too_long!r}: use one of {', '.join(TOO_LONG_POLICIES)}")
    if opts.on_error not in ("stop", "skip"):
        raise PreprocessError(f"--on-error {opts.on_error!r}: use stop or skip")
    if opts.max_length < 8:
        raise PreprocessError(f"--max-length {opts.max_length}: too short for any conversation (use 8 or more)")


def _input_files(opts: SFTOptions) -> list[InputFile]:
    files = expand_inputs(opts.inputs)
    for f in files:
        if f.kind == "text":
            raise PreprocessError(f"{f.path}: chat data must be JSON Lines (.jsonl/.json, .gz/.zst) or Parquet, "
                                  "one conversation per line or row")
    if opts.on_error != "skip":
        unreadable = check_readable(files)
        if unreadable:
            raise PreprocessError(unreadable[0].message() + "; fix the permissions or " + HOW_TO_SKIP)
    return files


def _write(files: Sequence[InputFile], chat: ChatTokenizer, opts: SFTOptions, tally: _Tally) -> tuple:
    tok_prefix, mask_prefix = tokens_prefix(opts.output_prefix), loss_mask_prefix(opts.output_prefix)
    dtype = optimal_dtype(chat.vocab_size)
    writers = [IndexedDatasetWriter(tok_prefix, dtype), IndexedDatasetWriter(mask_prefix, LOSS_MASK_DTYPE)]
    encode = _Encoder(chat, opts, tally)
    counts = tally.counts
    bad_files: list = []
    bar = _Bar(sum(f.size for f in files), opts.progress)
    try:
        for chunk in iter_chunks(files, opts.chunk_bytes, "line", opts.on_error, bad_files):
            parsed = _parse_chunk(chunk)
            counts.blank_lines_ignored += parsed.blank_lines
            bad = list(parsed.bad)
            ids_parts, mask_parts, lengths = [], [], []
            for line, obj in parsed.items:
                try:
                    encoded, dropped = encode(obj)
                except ConversationError as exc:
                    bad.append(BadRecord(exc.reason, chunk.path, line, exc.detail))
                    continue
                counts.read += 1
                if dropped is not None:
                    counts.skipped[dropped] += 1
                    continue
                ids, mask = encoded
                ids_parts.append(np.asarray(ids, dtype=dtype))
                mask_parts.append(np.asarray(mask, dtype=LOSS_MASK_DTYPE))
                lengths.append(len(ids))
            if bad:
                bad.sort(key=lambda r: r.line)  # the first bad record in input order stops the run
                if opts.on_error != "skip":
                    raise PreprocessError(bad[0].message() + "; " + HOW_TO_SKIP)
                for rec in bad:
                    counts.read += 1
                    counts.skipped[rec.reason] += 1
            if lengths:
                lens = np.asarray(lengths, dtype=np.int32)
                writers[0].add_chunk(np.concatenate(ids_parts).tobytes(), lens)
                writers[1].add_chunk(np.concatenate(mask_parts).tobytes(), lens)
                counts.written += len(lengths)
                tally.tokens += int(lens.sum())
                tally.target_tokens += int(sum(int(m.sum()) for m in mask_parts))
            bar.update(chunk.raw_bytes, tally)
        bar.close()
        written = [w.finalize() for w in writers]
    except BaseException:
        bar.close()
        for w in writers:
            if not w.closed:
                w.abort()
        raise
    for rec in bad_files:  # whole files skipped under --on-error skip
        counts.skipped[rec.reason] += 1
    return written


def _manifests(files, written, tally: _Tally, chat: ChatTokenizer, info, opts: SFTOptions, fp: str,
               duration: float) -> dict:
    tokens_ds, mask_ds = written
    sft = {
        "template": {"id": TEMPLATE_ID, "version": TEMPLATE_VERSION,
                     "control_tokens": {"<|im_start|>": chat.im_start, "<|im_end|>": chat.im_end},
                     "end_of_turn_id": chat.end_of_turn_id},
        "tokens_prefix": tokens_ds.prefix,
        "loss_mask_prefix": mask_ds.prefix,
        "loss_mask": {k: v for k, v in vars(mask_ds).items() if k != "prefix"},
        "max_length": opts.max_length,
        "too_long": opts.too_long,
        "truncated": tally.truncated,
        "messages_removed_by_truncation": tally.messages_cut,
        "trailing_messages_removed": tally.trailing_removed,
        "target_tokens": tally.target_tokens,
        "formats": dict(sorted(tally.formats.items())),
    }
    out = {}
    for ds in written:
        m = mf.Manifest(
            output=ds, fingerprint=fp, inputs=[f.as_dict() for f in files], documents=tally.counts,
            tokenizer=info.as_dict(),
            encoder={"mode": "chat template", "why": "each text stretch between control tokens is encoded "
                                                     "by SentencePiece; control ids are inserted directly"},
            options={**opts.output_options(), "kind": "sft"}, duration_s=duration,
            throughput=mf.throughput_section(tokens_ds.tokens, tally.counts.written,
                                             sum(f.size for f in files), duration, 1),
        ).to_dict()
        m["sft"] = sft
        mf.write_manifest(ds.prefix, m)
        out[ds.prefix] = m
    return out[tokens_ds.prefix]


def preprocess_sft_job(opts: SFTOptions) -> SFTResult:
    """Run the SFT preprocessing job (what ``preprocess sft`` runs)."""
    _check_options(opts)
    if not opts.tokenizer_model:
        raise PreprocessError("sft needs --tokenizer-model: the SentencePiece model of the model to fine-tune")
    files = _input_files(opts)
    info = describe(opts.tokenizer_model)
    chat = ChatTokenizer(opts.tokenizer_model)
    tok_prefix, mask_prefix = tokens_prefix(opts.output_prefix), loss_mask_prefix(opts.output_prefix)
    fp = mf.fingerprint([[f.path, f.size, f.mtime_ns] for f in files], info.sha256, opts.output_options())
    if not opts.overwrite and all(mf.is_complete(p, fp)[0] for p in (tok_prefix, mask_prefix)):
        print(f"sft: already complete and verified, skipping ({tok_prefix})", file=sys.stderr)
        return SFTResult(opts.output_prefix, tok_prefix, mask_prefix, mf.read_manifest(tok_prefix), True)
    t0 = time.time()
    tally = _Tally()
    written = _write(files, chat, opts, tally)
    m = _manifests(files, written, tally, chat, info, opts, fp, time.time() - t0)
    print(mf.summary_line(m) + f"; {tally.truncated:,} truncated, {tally.target_tokens:,} target tokens",
          file=sys.stderr)
    return SFTResult(opts.output_prefix, tok_prefix, mask_prefix, m, False)


def preprocess_sft(
    inputs: Sequence[str] | str,
    output_prefix: str,
    tokenizer_model: str,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    too_long: str = "truncate",
    on_error: str = "stop",
    progress: bool = False,
    **options,
) -> SFTResult:
    """Python entry point of ``preprocess sft``; returns the prefixes and the manifest."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    return preprocess_sft_job(SFTOptions(
        inputs=[os.fspath(i) for i in inputs], output_prefix=os.fspath(output_prefix),
        tokenizer_model=os.fspath(tokenizer_model), max_length=max_length, too_long=too_long,
        on_error=on_error, progress=progress, **options,
    ))


__all__ = ["SFTOptions", "SFTResult", "preprocess_sft", "preprocess_sft_job", "record_messages",
           "DEFAULT_MAX_LENGTH", "TOO_LONG_POLICIES", "FORMATS"]
