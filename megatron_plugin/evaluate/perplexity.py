"""Loss, perplexity and bits per byte of a checkpoint on token windows.

Sources of windows (each `seq_length + 1` tokens; consecutive windows share one token, as
Megatron's GPTDataset samples do, so every token after the first is predicted once):
- an indexed dataset prefix (`PREFIX.bin` + `PREFIX.idx`): its token stream in order;
- a raw JSONL (`text` key) or text file (`.gz` / `.zst` too): documents tokenized with the
  checkpoint's tokenizer, EOS after each (what preprocessing with --append-eod writes); a text
  file is one document per line, like preprocessing's default;
- `split="valid"|"test"|"train"` of the checkpoint's own run: Megatron's GPTDataset built exactly
  as the training loop builds it (same blend, split, seed, sample counts), first samples first.
  With the default sample count (`eval.iters` global batches) this is the validation the training
  loop runs, and the loss is the same.

The loss of each token is what training computes (Megatron-Core's vocab-parallel cross entropy
through the model's own `labels` path), summed in float64.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np
import torch

from megatron_plugin.checkpoint_layout import RUN_CONFIG_FILE, TOKENIZER_FILE, read_run_config
from megatron_plugin.generate.errors import GenerateError


@dataclass
class PerplexityResult:
    loss: float  # mean nats per predicted token
    ppl: float
    bits_per_byte: float
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the predicted tokens' text

    def to_dict(self) -> dict:
        return {"loss": self.loss, "ppl": self.ppl, "bits_per_byte": self.bits_per_byte,
                "tokens": self.tokens, "bytes": self.bytes}


# -- token streams -------------------------------------------------------------------------
def _is_prefix(path: str) -> bool:
    return os.path.isfile(path + ".bin") and os.path.isfile(path + ".idx")


def indexed_stream(prefix: str) -> np.ndarray:
    """The token stream of an indexed dataset: its .bin file is every sequence back to back."""
    from megatron_plugin.data.indexed import bin_path, check_dataset

    try:
        header = check_dataset(prefix)
    except (OSError, ValueError) as err:
        raise GenerateError(f"--data {prefix}: not a readable indexed dataset ({err})") from None
    return np.memmap(bin_path(prefix), dtype=header.dtype, mode="r")


def _open_text(path: str, compression: Optional[str]) -> io.TextIOBase:
    if compression == "gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    if compression == "zst":
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


def raw_documents(path: str, json_key: str = "text") -> Iterator[str]:
    from megatron_plugin.preprocess.readers import classify

    kind, compression = classify(path)
    if kind not in ("jsonl", "text"):
        raise GenerateError(
            f"--data {path}: not an indexed dataset prefix (no {path}.bin / {path}.idx) nor a "
            ".jsonl / .txt file (optionally .gz / .zst)"
        )
    with _open_text(path, compression) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if kind == "text":
                yield line.rstrip("\n")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise GenerateError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            text = record.get(json_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise GenerateError(f"{path}:{lineno}: no string {json_key!r} key (set --json-key)")
            yield text


def raw_stream(path: str, tokenizer, json_key: str = "text", max_tokens: Optional[int] = None) -> np.ndarray:
    ids: List[int] = []
    for text in raw_documents(path, json_key):
        ids += tokenizer.encode(text)
        if tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
        if max_tokens is not None and len(ids) > max_tokens:
            break
    return np.asarray(ids, dtype=np.int64)


def stream_windows(stream: np.ndarray, seq_length: int, max_tokens: Optional[int] = None) -> Iterator[np.ndarray]:
    """Windows of seq_length + 1 tokens (the last may be shorter), at most max_tokens predicted."""
    predicted = len(stream) - 1
    if max_tokens is not None:
        predicted = min(predicted, max_tokens)
    for start in range(0, predicted, seq_length):
        stop = min(start + seq_length, predicted)
        yield np.asarray(stream[start: stop + 1], dtype=np.int64)


def split_windows(run_config: dict, ckpt_dir: Path, split: str, num_samples: Optional[int],
                  max_tokens: Optional[int]) -> Iterator[np.ndarray]:
    """Samples of the run's GPTDataset split, first first, as the training loop reads them."""
    from megatron_plugin.config import DataConfig, EvalConfig, TrainConfig
    from megatron_plugin.data.gpt_dataset import build_datasets, megatron_tokenizer, split_sample_counts

    data = DataConfig(**{k: v for k, v in run_config.get("data", {}).items() if k in DataConfig.__dataclass_fields__})
    train = TrainConfig(**{k: v for k, v in run_config.get("train", {}).items() if k in TrainConfig.__dataclass_fields__})
    evals = EvalConfig(**{k: v for k, v in run_config.get("eval", {}).items() if k in EvalConfig.__dataclass_fields__})
    if data.is_chat:
        raise GenerateError(
            f"--split {split}: {ckpt_dir} was fine-tuned on conversations (data.format=chat), and --split scores "
            "a pretraining split; its validation loss over assistant tokens is the run's val_loss "
            "(metrics.jsonl). Score text with --data FILE, or run --tasks"
        )
    if not data.paths:
        raise GenerateError(f"{ckpt_dir}/{RUN_CONFIG_FILE} names no data.paths: pass --data PREFIX instead of --split")
    missing = [p for p in data.paths if isinstance(p, str) and not _is_prefix(p)]
    if missing:
        raise GenerateError(
            f"--split {split}: the run's dataset {missing[0]} (.bin/.idx) is not there; run from "
            "the directory the training ran in, or pass --data PREFIX"
        )
    # The training loop's sample counts: the same samples (and the run's index cache).
    counts = split_sample_counts(train, evals)
    run_dir = (run_config.get("run") or {}).get("dir") or f"runs/{(run_config.get('run') or {}).get('name', 'run')}"
    cache = data.cache_dir or os.path.join(run_dir, "data_cache")
    if not os.path.isdir(cache):
        import tempfile

        cache = tempfile.mkdtemp(prefix="megatron_plugin_eval_cache_")
    tokenizer = megatron_tokenizer(str(ckpt_dir / TOKENIZER_FILE))
    datasets = dict(zip(("train", "valid", "test"), build_datasets(data, data.seq_length, counts, train.seed,
                                                                 cache, tokenizer)))
    dataset = datasets[split]
    if dataset is None or len(dataset) == 0:
        raise GenerateError(f"--split {split}: the run's data.split={data.split!r} gives it no samples")
    if num_samples is None:
        num_samples = evals.iters * train.global_batch_size if split == "valid" else len(dataset)
    predicted = 0
    for i in range(num_samples):
        sample = dataset[i % len(dataset)]
        window = torch.cat([sample["tokens"][:1], sample["labels"]]).numpy()
        if max_tokens is not None and predicted + len(window) - 1 > max_tokens:
            window = window[: max_tokens - predicted + 1]
        if len(window) < 2:
            return
        predicted += len(window) - 1
        yield window


# -- scoring ---------------------------------------------------------------------------------
@torch.no_grad()
def score_windows(model, windows: Iterator[np.ndarray], tokenizer=None, batch_size: int = 8,
                  progress: bool = True, total: Optional[int] = None) -> PerplexityResult:
    """Sum of per-token losses over `windows` through `model` (a GPTModel, PP=1)."""
    from tqdm import tqdm

    model.eval()
    device = next(model.parameters()).device
    loss_sum, count, nbytes = 0.0, 0, 0
    bar = tqdm(total=total, unit="tok", desc="perplexity", disable=not progress)
    batch: List[np.ndarray] = []

    def flush() -> None:
        nonlocal loss_sum, count, nbytes
        width = max(len(w) for w in batch) - 1
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.float64)
        for row, w in enumerate(batch):
            n = len(w) - 1
            tokens[row, :n] = torch.from_numpy(w[:-1])
            labels[row, :n] = torch.from_numpy(w[1:])
            mask[row, :n] = 1.0
        positions = torch.arange(width).unsqueeze(0).expand(len(batch), width)
        losses = model(tokens.to(device), positions.to(device), None, labels=labels.to(device))
        loss_sum += float((losses.double().cpu() * mask).sum())
        predicted = int(mask.sum())
        count += predicted
        if tokenizer is not None:
            nbytes += sum(len(tokenizer.decode(w[1:].tolist()).encode("utf-8")) for w in batch)
        bar.update(predicted)
        batch.clear()

    for window in windows:
        if len(window) < 2:
            continue
        batch.append(window)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    if count == 0:
        raise GenerateError("no tokens to score: the data is empty or shorter than two tokens")
    loss = loss_sum / count
    bpb = loss_sum / math.log(2) / nbytes if nbytes else float("nan")
    return PerplexityResult(loss=loss, ppl=math.exp(min(loss, 700.0)), bits_per_byte=bpb, tokens=count, bytes=nbytes)


def perplexity(loaded, data: Optional[str] = None, split: Optional[str] = None, max_tokens: Optional[int] = None,
               num_samples: Optional[int] = None, batch_size: int = 8, json_key: str = "text",
               seq_length: Optional[int] = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of `loaded` (a LoadedModel) on `data` (indexed prefix or raw file) or on `split`
    of its run. seq_length: window length (default: the run's data.seq_length, else the model's
    context)."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise GenerateError("perplexity runs with pipeline parallelism 1 (tensor parallelism works)")
    if (data is None) == (split is None):
        raise GenerateError("give one of --data PREFIX_OR_FILE and --split valid|test|train")
    if max_tokens is not None and max_tokens < 1:
        raise GenerateError(f"--max-tokens {max_tokens}: must be at least 1")
    run_config = read_run_config(loaded.checkpoint_dir)
    seq = seq_length or (run_config.get("data") or {}).get("seq_length") or loaded.max_sequence_length
    seq = min(seq, loaded.max_sequence_length)
    tokenizer = loaded.tokenizer
    if split is not None:
        if split not in ("train", "valid", "test"):
            raise GenerateError(f"--split {split!r}: use train, valid or test")
        windows = split_windows(run_config, loaded.checkpoint_dir, split, num_samples, max_tokens)
    elif _is_prefix(data):
        windows = stream_windows(indexed_stream(data), seq, max_tokens)
    else:
        if not os.path.exists(data):
            raise GenerateError(f"--data {data}: no such file and no {data}.bin / {data}.idx")
        if tokenizer is None:
            raise GenerateError(f"{loaded.checkpoint_dir} has no {TOKENIZER_FILE} to tokenize {data} with")
        windows = stream_windows(raw_stream(data, tokenizer, json_key, max_tokens), seq, max_tokens)
    return score_windows(loaded.model, windows, tokenizer, batch_size, progress, total=max_tokens)
