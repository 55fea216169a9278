"""Training checkpoint -> Hugging Face LlamaForCausalLM folder, one tensor at a time.

Each checkpoint tensor (the embedding, one layer's slice of a stacked decoder weight, ...) is read
on its own, split into its HF tensors, cast to the output dtype and written to its preplanned
place in the safetensors files; then it is dropped. Peak memory is therefore about the largest
single tensor (in the checkpoint dtype and the output dtype) on top of the libraries.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from megatron_plugin.checkpoint_layout import RUN_CONFIG_FILE, TOKENIZER_FILE, CheckpointError
from megatron_plugin.config import DTYPE_NAMES, torch_dtype
from megatron_plugin.export import mapping
from megatron_plugin.export.checkpoint import MegatronCheckpoint, process_group
from megatron_plugin.export.hf_config import generation_config, to_hf_config
from megatron_plugin.export.output_dir import staged_output
from megatron_plugin.export.safetensors_writer import Entry, ShardedSafetensorsWriter, parse_size
from megatron_plugin.export.tokenizer import special_ids, write_hf_tokenizer
from megatron_plugin.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclass
class _Job:
    """One checkpoint read and the HF tensors it produces."""

    load: Callable[[], torch.Tensor]
    split: Callable[[torch.Tensor], Sequence[torch.Tensor]]
    names: List[str]
    shapes: List[tuple]


def _check_shapes(ckpt: MegatronCheckpoint) -> None:
    """Compare the stored shapes with run_config.json before writing anything."""
    model = ckpt.model_config
    source = ckpt.dir / RUN_CONFIG_FILE
    rows, hidden = ckpt.shape(mapping.EMBEDDING)
    if hidden != model.hidden_size:
        raise CheckpointError(
            f"{mapping.EMBEDDING} has hidden size {hidden} but {source} says {model.hidden_size}"
        )
    if rows < model.vocab_size:
        raise CheckpointError(
            f"{mapping.EMBEDDING} has {rows} rows, fewer than vocab_size {model.vocab_size} in {source}"
        )
    if model.tie_embeddings != ckpt.tied_embeddings:
        raise CheckpointError(
            f"{source} says tie_embeddings={model.tie_embeddings} but the checkpoint "
            f"{'lacks' if ckpt.tied_embeddings else 'has'} a separate {mapping.OUTPUT_LAYER}"
        )
    key, stacked = ckpt.layer_source(mapping.QKV, 0)
    if stacked and ckpt.shape(key)[0] != model.num_layers:
        raise CheckpointError(
            f"{key} holds {ckpt.shape(key)[0]} layers but {source} says num_layers={model.num_layers}"
        )
    shapes = mapping.model_shapes(model)
    for weight in mapping.LAYER_WEIGHTS:
        got = ckpt.layer_shape(weight, 0)
        expected = weight.megatron_shape(shapes)
        if got != expected:
            raise CheckpointError(
                f"layer {weight.role} tensor has shape {got}, expected {expected} from {source}; the "
                "run config does not describe this checkpoint"
            )


def _plan(ckpt: MegatronCheckpoint) -> List[_Job]:
    model = ckpt.model_config
    shapes = mapping.model_shapes(model)
    return [
        _Job(
            load=lambda weight=weight, layer=layer: ckpt.load_weight(weight, layer),
            split=lambda t, weight=weight: weight.split(t, shapes),
            names=weight.hf_names(layer),
            shapes=list(weight.hf_shapes(shapes)),
        )
        for weight, layer in mapping.model_weights(model.num_layers, model.tie_embeddings)
    ]


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    dtype: str = "bf16",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    tokenizer: Optional[str | os.PathLike] = None,
) -> Path:
    """Export `checkpoint` (RUN/checkpoints or RUN/checkpoints/iter_N, any TP/PP/DP layout) to an
    HF LlamaForCausalLM folder at `output`. dtype: bf16 | fp16 | fp32. `tokenizer` overrides the
    checkpoint's own tokenizer.model. Returns the output path; on error nothing is left there."""
    if dtype not in DTYPE_NAMES:
        raise UserError(f"dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)}")
    out_dtype = torch_dtype(dtype)
    output = Path(output)
    with process_group(), staged_output(output) as staging:
        ckpt = MegatronCheckpoint(checkpoint)
        model = ckpt.model_config
        _check_shapes(ckpt)
        sp_model = Path(tokenizer) if tokenizer else ckpt.tokenizer_path
        if sp_model is None or not sp_model.exists():
            raise CheckpointError(
                f"no SentencePiece model: {ckpt.dir}/{TOKENIZER_FILE} is missing; pass --tokenizer PATH"
            )
        ids = special_ids(sp_model)
        if ids.vocab_size > model.vocab_size:
            raise CheckpointError(
                f"tokenizer {sp_model} has {ids.vocab_size} pieces but the model's vocab_size is "
                f"{model.vocab_size}; pass the tokenizer the model was trained with"
            )
        logger.info("exporting %s (%d layers) to %s as %s", ckpt.dir, model.num_layers, output, dtype)

        jobs = _plan(ckpt)
        entries = [Entry(n, tuple(s), out_dtype) for job in jobs for n, s in zip(job.names, job.shapes)]
        writer = ShardedSafetensorsWriter(staging, entries, parse_size(max_shard_size))
        try:
            for job in jobs:
                source = job.load()
                for name, part in zip(job.names, job.split(source)):
                    converted = part.to(out_dtype)
                    narrowed = out_dtype == torch.float16 and part.dtype != torch.float16
                    if narrowed and not torch.isfinite(converted).all():
                        raise CheckpointError(
                            f"{name} has values beyond fp16's range (max |x| "
                            f"{part.abs().max().item():.3g}); export with --dtype bf16 or fp32"
                        )
                    writer.write(name, converted)
                    del converted, part
                del source
        except BaseException:
            writer.abort()
            raise
        files = writer.close()

        config = to_hf_config(model, out_dtype, ids.bos, ids.eos, ids.pad)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / "generation_config.json").write_text(
            json.dumps(generation_config(ids.bos, ids.eos, ids.pad, end_of_turn_id=ids.end_of_turn), indent=2) + "\n"
        )
        write_hf_tokenizer(sp_model, staging)
        logger.info("wrote %s", ", ".join(files))
    return output
