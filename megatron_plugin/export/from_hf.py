"""Hugging Face Llama folder -> a training checkpoint this package continues pretraining from.

The result has the trainer's weights-only snapshot layout (megatron_plugin/checkpoint_layout.py):
`CHECKPOINTS/iter_0000000/` saved with dist_checkpointing from a TP=1 GPTModel
(`{"model": sharded_state_dict}`), with `run_config.json` and `tokenizer.model` beside it, and
`CHECKPOINTS/latest` naming it.
dist_checkpointing reshards on load, so training may resume at any TP/PP; only the padded
vocabulary depends on the TP size, hence `tensor_parallel` below.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch

from megatron_plugin.checkpoint_layout import ITER_DIR, RUN_CONFIG_FILE, TOKENIZER_FILE, iter_dir_name, write_latest
from megatron_plugin.config import (DTYPE_NAMES, ParallelConfig, PrecisionConfig, RunConfig, RunInfo, torch_dtype,
                                    validate_model)
from megatron_plugin.export import mapping
from megatron_plugin.export.hf_config import UnsupportedModelError, from_hf_config
from megatron_plugin.export.output_dir import check_output_free, staged_output
from megatron_plugin.export.safetensors_writer import list_safetensors

logger = logging.getLogger(__name__)

# Buffers some older exports saved along with the weights; they are recomputed, never loaded.
IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_DTYPE_ARG = {torch_dtype(name): name for name in DTYPE_NAMES}


class HFWeights:
    """Lazy access to the tensors of an HF folder's safetensors files."""

    def __init__(self, folder: Path):
        try:
            files, weight_map = list_safetensors(folder)
        except FileNotFoundError:
            has_bin = any(folder.glob("pytorch_model*.bin"))
            raise UnsupportedModelError(
                f"{folder} has no model.safetensors or model.safetensors.index.json"
                + (" (only pytorch_model*.bin: re-save it with save_pretrained(..., "
                   "safe_serialization=True))" if has_bin else "")
            ) from None
        from safetensors import safe_open

        self._handles = {}
        self.location: Dict[str, Path] = {}
        for path in files:
            if not path.exists():
                raise UnsupportedModelError(f"{path} is listed in the index but missing")
            handle = safe_open(str(path), framework="pt")
            self._handles[path] = handle
            for name in handle.keys():
                self.location[name] = path
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.location))
            if missing:
                raise UnsupportedModelError(f"index lists tensors its files lack: {missing[:5]}")

    def names(self):
        return set(self.location)

    def shape(self, name: str):
        return tuple(self._handles[self.location[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.location[name]].get_tensor(name)


def _expected_tensors(model) -> Dict[str, tuple]:
    return mapping.hf_tensor_shapes(mapping.model_shapes(model), model.num_layers, model.tie_embeddings)


def _check_tensors(weights: HFWeights, model, folder: Path) -> None:
    expected = _expected_tensors(model)
    present = {n for n in weights.names() if not IGNORED.match(n)}
    if model.tie_embeddings and mapping.HF_LM_HEAD in present:
        present.discard(mapping.HF_LM_HEAD)  # a tied copy; the embedding is what counts
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing:
        raise UnsupportedModelError(
            f"{folder}: tensors missing for the model config.json describes: {missing[:6]}"
        )
    if unexpected:
        raise UnsupportedModelError(
            f"{folder}: tensors our model has no place for (a different architecture?): {unexpected[:6]}"
        )
    for name, shape in expected.items():
        if weights.shape(name) != shape:
            raise UnsupportedModelError(
                f"{folder}: {name} has shape {weights.shape(name)}, config.json implies {shape}"
            )


def _resolve_target(output: Path) -> tuple[Path, Path]:
    """(checkpoints folder, iter dir): `output` is either of them."""
    if ITER_DIR.match(output.name):
        return output.parent, output
    return output, output / iter_dir_name(0)


def import_hf(
    hf_dir: str | os.PathLike,
    output: str | os.PathLike,
    tensor_parallel: int = 1,
    dtype: Optional[str] = None,
) -> Path:
    """Convert the HF Llama folder `hf_dir` into a checkpoint at `output` (RUN/checkpoints, or
    RUN/checkpoints/iter_N). `tensor_parallel`: the TP size training will use (sets the vocabulary
    padding). `dtype` (fp32|bf16|fp16) defaults to the folder's weights' dtype. Returns the iter
    dir. Refuses, naming the field, models our ModelConfig cannot express."""
    from megatron.core import dist_checkpointing

    from megatron_plugin.export.session import build_single_process_model, megatron_session

    folder = Path(hf_dir)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise UnsupportedModelError(f"{folder} has no config.json; pass a Hugging Face model folder")
    hf_config = json.loads(config_path.read_text())
    model = from_hf_config(hf_config)
    validate_model(model, tensor_parallel)
    weights = HFWeights(folder)
    _check_tensors(weights, model, folder)
    if dtype is None:
        # The stored dtype, not config.json's, so that exporting again gives the same bytes.
        stored = weights.get(mapping.HF_FINAL_NORM).dtype
        dtype = _DTYPE_ARG.get(stored, "fp32")
    sp_model = folder / TOKENIZER_FILE
    if not sp_model.exists():
        logger.warning(
            "%s has no %s; the checkpoint will have none (set data.tokenizer_model)", folder, TOKENIZER_FILE
        )
        sp_model = None

    checkpoints, iter_dir = _resolve_target(Path(output))
    check_output_free(iter_dir)
    padded = model.padded_vocab_size(tensor_parallel)
    with megatron_session(), staged_output(iter_dir) as staging:
        gpt = build_single_process_model(model, padded, dtype=dtype)
        params = dict(gpt.named_parameters())
        shapes = mapping.model_shapes(model, padded_vocab_size=padded)
        local_spec = mapping.INPUT_LAYERNORM.megatron_name(0, local_spec=True) in params
        with torch.no_grad():
            for weight, layer in mapping.model_weights(model.num_layers, model.tie_embeddings):
                parts = [weights.get(name) for name in weight.hf_names(layer)]
                params[weight.megatron_name(layer, local_spec)].copy_(weight.join(parts, shapes))
        dist_checkpointing.save({"model": gpt.sharded_state_dict()}, str(staging))
        run = RunConfig(
            run=RunInfo(name=folder.name, description=f"imported from {folder}"),
            model=model,
            parallel=ParallelConfig(tensor=1, pipeline=1),
            precision=PrecisionConfig(dtype=dtype),
        )
        (staging / RUN_CONFIG_FILE).write_text(json.dumps(run.to_dict(), indent=2) + "\n")
        if sp_model is not None:
            shutil.copyfile(sp_model, staging / TOKENIZER_FILE)
    write_latest(str(checkpoints), iter_dir.name)
    logger.info("wrote %s (%s, vocab padded to %d for TP=%d)", iter_dir, dtype, padded, tensor_parallel)
    return iter_dir
