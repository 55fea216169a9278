"""Reading a training checkpoint (`RUN/checkpoints/iter_N`) one tensor at a time.

A checkpoint is a `megatron.core.dist_checkpointing` directory (torch_dist backend) plus the
`run_config.json` and `tokenizer.model` that rank 0 writes next to it (the layout and its names:
megatron_plugin/checkpoint_layout.py). Its tensors are stored by global key and global shape, so one reader serves every TP/PP/DP layout: we ask
dist_checkpointing for exactly the slice we want (a whole tensor, or one layer of a stacked
decoder weight) and it gathers it from whichever rank files hold the pieces. Nothing else is held
in memory, which is what keeps the export's peak memory near one tensor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator, Optional, Tuple

import torch

from megatron_plugin.checkpoint_layout import (
    RUN_CONFIG_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    check_complete,
    read_run_config,
    resolve_checkpoint_dir,
)
from megatron_plugin.config import ModelConfig, model_config_from_dict
from megatron_plugin.errors import UserError
from megatron_plugin.export import mapping

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def dcp_errors(what: str, advice: str = "") -> Iterator[None]:
    """Turn a failure inside dist_checkpointing into a CheckpointError: `what (Type: error)advice`."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # DCP's CheckpointException derives from BaseException
        raise CheckpointError(f"{what} ({type(err).__name__}: {err}){advice}") from err


def model_config_from_run_config(run_config: dict, source: Path) -> ModelConfig:
    raw = run_config.get("model")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source} has no 'model' section")
    model, unknown = model_config_from_dict(raw)
    if unknown:
        logger.warning("%s: ignoring model fields this version does not know: %s", source, unknown)
    return model


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """dist_checkpointing needs torch.distributed; reading needs no peers, so a one-process gloo
    group with an in-memory store (no port) is enough. An existing group is reused."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            # Every rank would have to take part in each read; export from its own process.
            raise UserError(
                "megatron_plugin.export reads checkpoints in a single process, but "
                f"torch.distributed is running with {dist.get_world_size()} ranks; run the export "
                "as its own command (python -m megatron_plugin.export)"
            )
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _model_key_prefix(stored: dict, ckpt_dir: Path) -> str:
    """The prefix of the model's keys: "" for `gpt_model.sharded_state_dict()`, "module." when
    the trainer saved through Megatron's DDP wrapper."""
    prefixes = sorted(
        (key[: -len(mapping.EMBEDDING)] for key in stored
         if key.endswith(mapping.EMBEDDING) and not key.startswith("optimizer.")),
        key=len,
    )
    if not prefixes:
        raise CheckpointError(
            f"{ckpt_dir} holds no {mapping.EMBEDDING!r}: it is not a GPT model checkpoint "
            f"(keys: {sorted(stored)[:8]}...)"
        )
    return prefixes[0]


class MegatronCheckpoint:
    """Tensor-at-a-time access to one checkpoint directory. Use inside `process_group()`."""

    def __init__(self, path: str | os.PathLike):
        from megatron.core import dist_checkpointing

        self.dir = resolve_checkpoint_dir(path)
        check_complete(self.dir)
        self.model_config = model_config_from_run_config(read_run_config(self.dir), self.dir / RUN_CONFIG_FILE)
        with dcp_errors(f"cannot read the tensor index of {self.dir}",
                        "; the checkpoint is damaged, use an earlier iter_N directory"):
            stored = dict(dist_checkpointing.load_tensors_metadata(str(self.dir)))
        self.key_prefix = _model_key_prefix(stored, self.dir)
        # Model tensors by their GPTModel key (prefix removed); optimizer state etc. are skipped.
        self.metadata = {
            key[len(self.key_prefix):]: value
            for key, value in stored.items()
            if key.startswith(self.key_prefix) and not key.startswith("optimizer.")
        }

    # -- what is in it ---------------------------------------------------------------------
    @property
    def tokenizer_path(self) -> Optional[Path]:
        path = self.dir / TOKENIZER_FILE
        return path if path.exists() else None

    @property
    def padded_vocab_size(self) -> int:
        return int(self.metadata[mapping.EMBEDDING].global_shape[0])

    @property
    def tied_embeddings(self) -> bool:
        # A tied model saves its output layer under the embedding's key.
        return mapping.OUTPUT_LAYER not in self.metadata

    def dtype(self, key: str) -> torch.dtype:
        return self.metadata[key].dtype

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.metadata[key].global_shape)

    def layer_source(self, weight: mapping.Weight, layer: int) -> Tuple[str, bool]:
        """(checkpoint key, stacked?) holding `weight` of decoder layer `layer`."""
        for suffix in weight.megatron_keys:
            stacked = mapping.stacked_layer_key(suffix)
            if stacked in self.metadata:
                return stacked, True
            single = mapping.per_layer_key(layer, suffix)
            if single in self.metadata:
                return single, False
        raise CheckpointError(
            f"{self.dir} has no tensor for layer {layer} {weight.role} (looked for "
            f"{', '.join(weight.megatron_keys)} under {mapping.MEGATRON_LAYERS}); the checkpoint is "
            "incomplete or from an unsupported model"
        )

    def layer_shape(self, weight: mapping.Weight, layer: int) -> Tuple[int, ...]:
        key, stacked = self.layer_source(weight, layer)
        shape = self.shape(key)
        return shape[1:] if stacked else shape

    # -- reading ---------------------------------------------------------------------------
    def _load(self, key: str, sharded) -> torch.Tensor:
        from megatron.core import dist_checkpointing

        with dcp_errors(f"cannot read {key!r} from {self.dir}",
                        "; a data file is missing or damaged, use an earlier iter_N directory"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # DCP's deprecation notes, once per tensor
                # Access-integrity validation would demand that the whole tensor be requested;
                # reading one slice is the point here.
                loaded = dist_checkpointing.load(
                    {"t": sharded}, str(self.dir), validate_access_integrity=False
                )
        return loaded["t"]

    def load(self, key: str) -> torch.Tensor:
        """A whole tensor."""
        from megatron.core.dist_checkpointing import ShardedTensor

        buf = torch.empty(self.shape(key), dtype=self.dtype(key))
        return self._load(key, ShardedTensor.from_rank_offsets(self.key_prefix + key, buf, replica_id=0))

    def load_weight(self, weight: mapping.Weight, layer: Optional[int] = None) -> torch.Tensor:
        """The tensor of `weight` (of decoder layer `layer` for a layer weight)."""
        return self.load_layer(weight, layer) if weight.per_layer else self.load(weight.megatron)

    def load_layer(self, weight: mapping.Weight, layer: int) -> torch.Tensor:
        """One decoder layer's tensor of `weight`, read as a slice of the stacked key."""
        from megatron.core.dist_checkpointing import ShardedTensor

        key, stacked = self.layer_source(weight, layer)
        if not stacked:
            return self.load(key)
        shape = self.shape(key)
        if layer >= shape[0]:
            raise CheckpointError(f"{key!r} in {self.dir} has {shape[0]} layers, layer {layer} asked")
        buf = torch.empty((1,) + shape[1:], dtype=self.dtype(key))
        sharded = ShardedTensor.from_rank_offsets(
            self.key_prefix + key, buf, (0, layer, shape[0]), replica_id=0
        )
        return self._load(key, sharded)[0]
