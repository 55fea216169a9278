"""Reading a training checkpoint (`RUN/checkpoints/iter_N`) one tensor at a time.

A checkpoint is a `megatron.core.dist_checkpointing` directory (torch_dist backend) plus the
`run_config.json` and `tokenizer.model` that rank 0 writes next to it. Its tensors are stored by
global key and global shape, so one reader serves every TP/PP/DP layout: we ask
dist_checkpointing for exactly the slice we want (a whole tensor, or one layer of a stacked
decoder weight) and it gathers it from whichever rank files hold the pieces. Nothing else is held
in memory, which is what keeps the export's peak memory near one tensor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator, Optional, Tuple

import torch

from megatron_plugin.config import ModelConfig, model_config_from_dict
from megatron_plugin.errors import UserError
from megatron_plugin.export import mapping
from megatron_plugin.training.checkpoint import ITER_DIR, CheckpointError

logger = logging.getLogger(__name__)

LATEST_FILE = "latest"
RUN_CONFIG_FILE = "run_config.json"
TOKENIZER_FILE = "tokenizer.model"
# Written by dist_checkpointing.save: its own metadata, and the torch.distributed.checkpoint index.
REQUIRED_FILES = ("metadata.json", ".metadata", "common.pt")


@contextlib.contextmanager
def dcp_errors(what: str, advice: str = "") -> Iterator[None]:
    """Turn a failure inside dist_checkpointing into a CheckpointError: `what (Type: error)advice`."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # DCP's CheckpointException derives from BaseException
        raise CheckpointError(f"{what} ({type(err).__name__}: {err}){advice}") from err


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """`RUN/checkpoints` (follows its `latest` file), `RUN/checkpoints/iter_N`, or the run folder
    `RUN` itself -> the iter dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not (path / LATEST_FILE).exists() and (path / "checkpoints" / LATEST_FILE).exists():
        path = path / "checkpoints"
    if (path / "metadata.json").exists() or ITER_DIR.match(path.name):
        return path
    latest = path / LATEST_FILE
    if latest.exists():
        name = latest.read_text().strip()
        if not name:
            raise CheckpointError(f"{latest} is empty: pass the iter_N directory itself")
        target = path / name
        if not target.is_dir():
            raise CheckpointError(
                f"{latest} names {name!r} but {target} is not a directory: the checkpoint was "
                "removed or never completed; pass an existing iter_N directory"
            )
        return target
    candidates = sorted(p.name for p in path.iterdir() if p.is_dir() and ITER_DIR.match(p.name))
    hint = f" (found {', '.join(candidates)}; pass one of them)" if candidates else ""
    raise CheckpointError(
        f"{path} is neither a checkpoint directory (no metadata.json) nor a checkpoints folder "
        f"with a {LATEST_FILE!r} file{hint}"
    )


def check_complete(ckpt_dir: Path) -> None:
    """Fail early, naming the missing file, on a checkpoint that was interrupted while saving."""
    missing = [name for name in REQUIRED_FILES if not (ckpt_dir / name).exists()]
    if missing:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} is incomplete: missing {', '.join(missing)} (the save was "
            "interrupted or files were removed); use an earlier iter_N directory"
        )
    if not any(ckpt_dir.glob("*.distcp")):
        raise CheckpointError(
            f"checkpoint {ckpt_dir} has no *.distcp data files; it is incomplete, use an earlier "
            "iter_N directory"
        )
    if not (ckpt_dir / RUN_CONFIG_FILE).exists():
        raise CheckpointError(
            f"checkpoint {ckpt_dir} has no {RUN_CONFIG_FILE}, which holds the model sizes; it was "
            "not written by megatron_plugin's trainer (or the save was interrupted)"
        )


def read_run_config(ckpt_dir: Path) -> dict:
    path = ckpt_dir / RUN_CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


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

    def layer_source(self, role: str, layer: int) -> Tuple[str, bool]:
        """(checkpoint key, stacked?) holding `role` of decoder layer `layer`."""
        for suffix in mapping.LAYER_SOURCES[role]:
            stacked = mapping.stacked_layer_key(suffix)
            if stacked in self.metadata:
                return stacked, True
            single = mapping.per_layer_key(layer, suffix)
            if single in self.metadata:
                return single, False
        raise CheckpointError(
            f"{self.dir} has no tensor for layer {layer} {role} (looked for "
            f"{', '.join(mapping.LAYER_SOURCES[role])} under decoder.layers); the checkpoint is "
            "incomplete or from an unsupported model"
        )

    def layer_shape(self, role: str, layer: int) -> Tuple[int, ...]:
        key, stacked = self.layer_source(role, layer)
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

    def load_layer(self, role: str, layer: int) -> torch.Tensor:
        """One decoder layer's tensor of `role`, read as a slice of the stacked key."""
        from megatron.core.dist_checkpointing import ShardedTensor

        key, stacked = self.layer_source(role, layer)
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
