"""Megatron-Core GPTDataset wiring: blends of indexed-dataset prefixes, splits, index cache."""

from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence

import torch

from megatron_plugin.config import ConfigError, DataConfig, EvalConfig, ModelConfig, TrainConfig


def parse_blend(paths: Sequence) -> tuple[list[str], Optional[list[float]]]:
    """`["a", "b"]` -> (prefixes, None); `[0.7, "a", 0.3, "b"]` -> (prefixes, weights)."""
    paths = list(paths)
    if not paths:
        raise ConfigError("data.paths is empty: give one or more indexed-dataset prefixes")

    def is_number(value) -> bool:
        if isinstance(value, (int, float)):
            return True
        try:
            float(value)
        except (TypeError, ValueError):
            return False
        return True

    if is_number(paths[0]):
        if len(paths) % 2:
            raise ConfigError(
                f"data.paths={paths}: weighted blends are pairs [weight, prefix, weight, prefix, ...]"
            )
        weights = [float(w) for w in paths[0::2]]
        prefixes = [str(p) for p in paths[1::2]]
        if any(w <= 0 for w in weights):
            raise ConfigError(f"data.paths={paths}: blend weights must be positive")
        return prefixes, weights
    return [str(p) for p in paths], None


def require_prefixes(prefixes: Sequence[str]) -> None:
    """Every prefix has its PREFIX.bin and PREFIX.idx, or a message naming the missing ones."""
    missing = [p for p in prefixes if not (os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx"))]
    if missing:
        raise ConfigError(
            f"data.paths: no PREFIX.bin / PREFIX.idx for {', '.join(missing)}; run "
            "`python -m megatron_plugin.preprocess --input ... --output-prefix ...` first or fix the path"
        )


def check_tokenizer_fits(data: DataConfig, model: ModelConfig) -> None:
    """The tokenizer exists and its ids fit the model's vocabulary."""
    if not data.tokenizer_model:
        raise ConfigError("data.tokenizer_model is not set: give the SentencePiece .model the data was made with")
    if not os.path.isfile(data.tokenizer_model):
        raise ConfigError(f"data.tokenizer_model={data.tokenizer_model}: no such file")
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=data.tokenizer_model).vocab_size()
    if vocab > model.vocab_size:
        raise ConfigError(
            f"the tokenizer {data.tokenizer_model} has {vocab} tokens but model.vocab_size is "
            f"{model.vocab_size}: set model.vocab_size={vocab}"
        )


def megatron_tokenizer(model_path: str):
    """Megatron-Core's own SentencePiece tokenizer (what GPTDataset expects)."""
    from megatron.core.tokenizers import MegatronTokenizer

    return MegatronTokenizer.from_pretrained(
        tokenizer_path=model_path, metadata_path={"library": "sentencepiece", "model_type": "gpt"}
    )


def split_sample_counts(train: TrainConfig, evals: EvalConfig) -> tuple[int, int, int]:
    """The (train, valid, test) sample counts a run asks the dataset builder for: every training
    step's global batch, and eval.iters global batches for each validation. They decide each
    split's shuffling, so whoever rebuilds a run's splits (evaluation) must ask for the same."""
    eval_runs = train.max_steps // evals.interval + 1 if evals.interval > 0 else 0
    return (train.max_steps * train.global_batch_size, eval_runs * evals.iters * train.global_batch_size, 0)


def build_datasets(
    data: DataConfig,
    seq_length: int,
    num_samples: tuple[int, int, int],
    seed: int,
    cache_dir: str,
    tokenizer,
):
    """Train/valid/test GPTDatasets. Rank 0 builds the index cache first, then the others load it
    (BlendedMegatronDatasetBuilder does this ordering with its `is_built_on_rank` hook)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights = parse_blend(data.paths)
    require_prefixes(prefixes)
    os.makedirs(cache_dir, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=data.split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        # Causal SDPA / TE attention need no mask; the default would materialise [1, s, s] per sample.
        create_attention_mask=False,
    )
    # The builder orders the ranks itself: global rank 0 builds the index cache, a barrier, then
    # every other rank loads it.
    return BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config).build()


class MicroBatches:
    """Deterministic micro-batches from a GPTDataset, starting at a consumed-sample offset.

    Each data-parallel rank reads its own contiguous slice of every global batch, so the stream
    of samples is the same whatever the DP size, and resuming at `consumed_samples` continues it."""

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int = 0):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        span = self.micro_batch_size * self.dp_size
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        indices = [(start + i) % len(self.dataset) for i in range(self.micro_batch_size)]
        self.consumed_samples += span
        samples = [self.dataset[i] for i in indices]
        return {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask", "position_ids")}
