"""A one-process Megatron environment for building a TP=1/PP=1 GPTModel (verify, import)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

from megatron_plugin.config import BuildConfig, ModelConfig, ParallelConfig, PrecisionConfig
from megatron_plugin.export.checkpoint import process_group


@contextlib.contextmanager
def megatron_session(seed: int = 1234) -> Iterator[None]:
    """torch.distributed (one gloo process) + Megatron parallel state at TP=PP=1 + CPU mode."""
    from megatron.core import parallel_state

    from megatron_plugin.runtime import cpu_mode
    from megatron_plugin.runtime.distributed import seed_everything

    if not torch.cuda.is_available():
        cpu_mode.enable()  # must precede model construction on CPU
    with process_group():
        created = not parallel_state.model_parallel_is_initialized()
        if created:
            parallel_state.initialize_model_parallel(1, 1)
        try:
            seed_everything(seed)
            yield
        finally:
            if created:
                parallel_state.destroy_model_parallel()


def build_single_process_model(model: ModelConfig, padded_vocab_size: int, dtype: str = "fp32"):
    """A TP=1 GPTModel whose embedding has exactly `padded_vocab_size` rows, so that it matches a
    checkpoint saved at any TP (Megatron pads the vocabulary per TP size). CPU, eval mode."""
    from megatron_plugin.model.build import build_gpt_model

    shaped = dataclasses.replace(model, vocab_size=padded_vocab_size, make_vocab_size_divisible_by=1)
    build = BuildConfig(shaped, PrecisionConfig(dtype=dtype), ParallelConfig(tensor=1, pipeline=1))
    gpt = build_gpt_model(build, pre_process=True, post_process=True)
    return gpt.eval()
