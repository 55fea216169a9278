"""The datasets a run trains and validates on, and the micro-batches each rank reads from them:
pretraining documents (data.format=text, Megatron-Core's GPTDataset) or packed conversations
(data.format=chat, `sft_packing`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from megatron_plugin.config import ConfigError, DataConfig, RunConfig
from megatron_plugin.data.gpt_dataset import (MicroBatches, build_datasets, megatron_tokenizer, parse_blend,
                                              require_prefixes, split_sample_counts)
from megatron_plugin.data.sft_dataset import loss_mask_prefix, output_prefix_of, tokens_prefix


@dataclass
class TrainingData:
    train: object
    valid: Optional[object]
    packed: bool

    def micro_batches(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int = 0):
        """This rank's micro-batches of `dataset` from `consumed_samples` on (both kinds slice
        the global sample stream alike, so a resumed run continues where it stopped)."""
        if self.packed:
            from megatron_plugin.data.sft_packing import PackedMicroBatches

            return PackedMicroBatches(dataset, micro_batch_size, dp_rank, dp_size, consumed_samples)
        return MicroBatches(dataset, micro_batch_size, dp_rank, dp_size, consumed_samples)


def chat_prefix(data: DataConfig) -> str:
    """The one `preprocess sft` output prefix of a chat run, its two datasets checked."""
    prefixes, weights = parse_blend(data.paths)
    if len(prefixes) != 1 or weights is not None:
        raise ConfigError(
            f"data.paths={list(data.paths)}: chat training reads one `preprocess sft` output prefix; "
            "preprocess every conversation file into one (several --input) and give that prefix"
        )
    prefix = output_prefix_of(prefixes[0])
    require_prefixes([tokens_prefix(prefix), loss_mask_prefix(prefix)])
    return prefix


def chat_data_tokenizer_sha256(prefix: str) -> Optional[str]:
    """The SHA-256 of the tokenizer a `preprocess sft` dataset was made with (its manifest)."""
    manifest = tokens_prefix(prefix) + ".json"
    if not os.path.isfile(manifest):
        return None
    with open(manifest, encoding="utf-8") as f:
        return (json.load(f).get("tokenizer") or {}).get("sha256")


def build_training_data(cfg: RunConfig) -> TrainingData:
    """Train and validation datasets of the run (rank 0 builds any index cache first)."""
    data, seq = cfg.data, cfg.data.seq_length
    if data.is_chat:
        from megatron_plugin.data.sft_packing import build_packed_sft_datasets

        train, valid, _ = build_packed_sft_datasets(chat_prefix(data), seq, data.split, cfg.train.seed)
        if train is None:
            raise ConfigError(f"data.paths={list(data.paths)}: data.split={data.split} leaves no training conversations")
        return TrainingData(train, valid, packed=True)
    train, valid, _ = build_datasets(
        data, seq, split_sample_counts(cfg.train, cfg.eval), cfg.train.seed,
        data.cache_dir or os.path.join(cfg.run_dir, "data_cache"), megatron_tokenizer(data.tokenizer_model),
    )
    return TrainingData(train, valid, packed=False)
