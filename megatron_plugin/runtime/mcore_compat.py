"""The differences between the Megatron-Core releases the package runs on, in one place.

Two lines are supported: megatron-core 0.16.x (Python 3.10-3.11; the last line for them) and
0.19.x (Python 3.12+). Each function here asks Megatron-Core for the feature itself (a keyword,
a module, a method) instead of comparing version strings, so a patch release that keeps an API
keeps working. What differs, and what the package does about it:

- Inference: 0.16's `GPTInferenceWrapper` takes an `InferenceWrapperConfig` (hidden size, dtype,
  padded vocabulary, the micro-batching threshold); 0.17 removed that class and reads all of it
  from the model's own config. Its whole-batch pipeline forward is
  `forward_pass_with_pipeline_parallel_small_input_batch` in 0.16 and
  `forward_pass_with_pipeline_parallel` later.
- Async checkpoint saves: 0.17+ `dist_checkpointing.save` takes `async_strategy`, default "nvrx"
  (nvidia-resiliency-ext's writer and request type); the package's queue is Megatron-Core's own
  `AsyncCallsQueue`, so it asks for the in-tree "mcore" writer on every line that has the choice.
- Checkpoint files: 0.16 (up to 0.18) writes the common state to `common.pt`, 0.19 into the
  `.distcp` files (a ShardedObject "common_state") and still reads `common.pt` from older
  checkpoints. 0.16 cannot read 0.19's: its `dist_checkpointing.load` opens `common.pt`
  (strategies/common.py `load_common`), and the error path there fails in turn (`iterdir` on a
  str), so the user would see a FileNotFoundError chained to an AttributeError.
  `checkpoint_layout.check_common_state` finds such a checkpoint by its files, and
  `check_reads_common_state_in_data_files` turns it into a CheckpointError saying what to do.
- Training on CPU: 0.19's DDP waits on `torch.cuda.current_stream()` before each gradient
  reduction; `cpu_mode` answers it with a stream that has nothing to wait for.
- Log records and warnings new in 0.19 (the GPTModel deprecation, ...) are listed with the others
  in `runtime.expected_warnings`.
"""

from __future__ import annotations

import inspect
import os
from typing import Callable

from megatron_plugin.checkpoint_layout import COMMON_STATE_FILE, CheckpointError


def megatron_core_version() -> str:
    import megatron.core

    return megatron.core.__version__


def inference_wrapper(model, inference_context):
    """Megatron-Core's `GPTInferenceWrapper` over `model`, with the whole batch of prompts going
    through the pipeline at once."""
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper

    try:
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
            InferenceWrapperConfig,
        )
    except ImportError:  # 0.17+: everything comes from the model's config
        return GPTInferenceWrapper(model, inference_context)
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    wrapper_config = InferenceWrapperConfig(
        hidden_size=config.hidden_size,
        params_dtype=config.params_dtype,
        # Pipeline stages see the whole batch at once (no micro-batching of prompts).
        inference_batch_times_seqlen_threshold=-1,
        padded_vocab_size=model.vocab_size,
        fp32_residual_connection=config.fp32_residual_connection,
    )
    return GPTInferenceWrapper(model, wrapper_config, inference_context)


def pipeline_forward(wrapper) -> Callable:
    """The wrapper's forward of a whole batch through the pipeline stages."""
    forward = getattr(wrapper, "forward_pass_with_pipeline_parallel_small_input_batch", None)
    return forward if forward is not None else wrapper.forward_pass_with_pipeline_parallel


def async_save_kwargs(asynchronous: bool) -> dict:
    """Extra `dist_checkpointing.save` arguments for an async save through Megatron-Core's own
    `AsyncCallsQueue` (see the module docstring); none where the release has no choice."""
    from megatron.core import dist_checkpointing

    if asynchronous and "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        return {"async_strategy": "mcore"}
    return {}


def reads_common_state_in_data_files() -> bool:
    """Whether this Megatron-Core reads a checkpoint whose common state is in its .distcp files
    (0.19+). The release that made that the format also dropped `load`'s `common_strategy`
    argument (a reader for common.pt), which is what is asked here."""
    from megatron.core import dist_checkpointing

    return "common_strategy" not in inspect.signature(dist_checkpointing.load).parameters


def check_reads_common_state_in_data_files(ckpt_dir: str | os.PathLike) -> None:
    """Refuse, with the way out, a checkpoint (written by 0.19+: common state in the data files,
    no common.pt) that this Megatron-Core can only fail on."""
    if reads_common_state_in_data_files():
        return
    raise CheckpointError(
        f"checkpoint {ckpt_dir} was written by Megatron-Core 0.19 or later (its common state is in "
        f"the .distcp files, there is no {COMMON_STATE_FILE}), and this environment has megatron-core "
        f"{megatron_core_version()}, which reads {COMMON_STATE_FILE} only. Resume, export or generate "
        "from it in the Python 3.12 environment with megatron-core 0.19; or export it to Hugging Face "
        f"there (python -m megatron_plugin.export --checkpoint {ckpt_dir} --output HF_DIR) and use that "
        "folder here (python -m megatron_plugin.export --from-hf HF_DIR --output RUN/checkpoints, or "
        "checkpoint.load=HF_DIR; the optimizer state does not carry over)"
    )
