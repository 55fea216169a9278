"""A training checkpoint or a Hugging Face Llama folder -> our GPTModel on this process's layout.

Checkpoints are found by the package's one resolver (megatron_plugin/checkpoint_layout.py: `RUN`,
`RUN/checkpoints`, `latest`, `iter_N`; any TP/PP layout), and read with dist_checkpointing, which
reshards the stored global tensors onto the TP/PP layout this process runs with. A Hugging Face
folder goes through the export's importer into a temporary checkpoint first, so both inputs take
one loading path.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_plugin.checkpoint_layout import (CHECKPOINTS_DIR, MODEL_METADATA_FILE, check_complete, is_hf_folder,
                                              resolve_checkpoint_dir)
from megatron_plugin.config import DTYPE_NAMES, BuildConfig, ModelConfig, ParallelConfig, PrecisionConfig, validate_model
from megatron_plugin.generate.errors import GenerateError
from megatron_plugin.generate.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class LoadedModel:
    model: torch.nn.Module  # this rank's GPTModel part, eval mode
    config: ModelConfig  # the checkpoint's model (its real vocab_size)
    tokenizer: Optional[Tokenizer]
    checkpoint_dir: Path  # the iter_N directory read
    dtype: str

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def max_sequence_length(self) -> int:
        return self.config.max_seq_length


def default_dtype() -> str:
    return "bf16" if torch.cuda.is_available() else "fp32"


def _check_source(path: Path) -> None:
    if not path.exists():
        raise GenerateError(
            f"{path} does not exist: pass a run folder, RUN/checkpoints, an iter_N checkpoint "
            "folder or a Hugging Face model folder"
        )
    if path.is_file():
        raise GenerateError(
            f"{path} is a file: pass the folder that holds the checkpoint (RUN/checkpoints or "
            "iter_N) or the Hugging Face model folder"
        )
    weights = [p.name for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES]
    megatron_checkpoint = (path / MODEL_METADATA_FILE).exists()
    if weights and not is_hf_folder(path) and not megatron_checkpoint:
        raise GenerateError(
            f"{path} holds weights only ({weights[0]}) and no config.json describing the model: "
            "pass the whole folder written by `python -m megatron_plugin.export` (config.json, "
            "weights, tokenizer files) or the training checkpoint it came from"
        )


def import_hf_folder(path: Path, tensor_parallel: int) -> Path:
    """The HF folder converted by the export's importer into a temporary checkpoint. Each process
    converts its own copy: the importer runs as a single process, before torch.distributed starts."""
    from megatron_plugin.export.from_hf import import_hf

    scratch = Path(tempfile.mkdtemp(prefix="megatron_plugin_hf_"))
    # The weights are read into the model right after; the copy goes when the process ends.
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    target = scratch / CHECKPOINTS_DIR
    logger.info("importing %s into %s", path, target)
    return import_hf(path, target, tensor_parallel=tensor_parallel)


def resolve_source(source: str | os.PathLike, tensor_parallel: int = 1) -> Path:
    """The checkpoint directory to read for `source` (a checkpoint path or an HF folder)."""
    path = Path(source)
    _check_source(path)
    if is_hf_folder(path):
        return import_hf_folder(path, tensor_parallel)
    ckpt_dir = resolve_checkpoint_dir(path)
    check_complete(ckpt_dir)
    return ckpt_dir


def ensure_runtime(parallel: ParallelConfig, seed: int = 1234) -> None:
    """torch.distributed and Megatron's parallel state for `parallel` (kept if already so)."""
    from megatron.core import parallel_state

    from megatron_plugin.runtime.distributed import init_distributed

    if parallel_state.model_parallel_is_initialized() and (
        parallel_state.get_tensor_model_parallel_world_size() == parallel.tensor
        and parallel_state.get_pipeline_model_parallel_world_size() == parallel.pipeline
    ):
        return
    init_distributed(parallel, seed)


def load_model(ckpt_dir: str | os.PathLike, dtype: Optional[str] = None) -> LoadedModel:
    """Our GPTModel with the weights of `ckpt_dir` (an iter_N directory, see `resolve_source`),
    on the TP/PP layout Megatron's parallel state was initialised with."""
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_plugin.export.checkpoint import MegatronCheckpoint, dcp_errors
    from megatron_plugin.model.build import build_gpt_model

    dtype = dtype or default_dtype()
    if dtype not in DTYPE_NAMES:
        raise GenerateError(f"--dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)}")
    ckpt = MegatronCheckpoint(ckpt_dir)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    padded = ckpt.padded_vocab_size
    if padded % tp:
        raise GenerateError(
            f"{ckpt.dir} has its vocabulary padded to {padded} rows, which does not split over "
            f"tensor parallelism {tp}: run with a tensor-parallel size that divides {padded}"
        )
    # The stored embedding rows, whatever TP the checkpoint was written at.
    shaped = dataclasses.replace(ckpt.model_config, vocab_size=padded, make_vocab_size_divisible_by=1)
    validate_model(shaped, tp)
    if ckpt.model_config.num_layers % pp:
        raise GenerateError(
            f"{ckpt.dir}: {ckpt.model_config.num_layers} layers do not split over {pp} pipeline "
            "stages; pick a pipeline-parallel size that divides the layer count"
        )
    gpt = build_gpt_model(BuildConfig(shaped, PrecisionConfig(dtype=dtype), ParallelConfig(tensor=tp, pipeline=pp)))
    prefix = ckpt.key_prefix
    with dcp_errors(f"cannot load the model from {ckpt.dir}",
                    "; a data file is missing or damaged, use an earlier iter_N directory"):
        state = dist_checkpointing.load({"model": gpt.sharded_state_dict(prefix=prefix)}, str(ckpt.dir))
    gpt.load_state_dict({key[len(prefix):]: value for key, value in state["model"].items()})
    tokenizer = Tokenizer(ckpt.tokenizer_path) if ckpt.tokenizer_path else None
    return LoadedModel(gpt.eval(), ckpt.model_config, tokenizer, ckpt.dir, dtype)
