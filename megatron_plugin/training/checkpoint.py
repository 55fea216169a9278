"""Checkpoints with Megatron-Core distributed checkpointing (torch_dist).

The folder layout and its file names are megatron_plugin/checkpoint_layout.py's, shared with
export, generation and evaluation; this module writes, prunes and resumes from it.

A checkpoint is written as iter_N.partial and renamed once every rank has finished, and only
then does `latest` move: a crash or a full disk during a save leaves the previous checkpoint as
`latest`. With checkpoint.async_save a forked writer process does the writing while training
goes on. Beyond the newest `checkpoint.keep` checkpoints the optimizer/ folder is deleted,
leaving weights-only snapshots.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_plugin.checkpoint_layout import (
    INITIAL_WEIGHTS_DIR,
    OPTIMIZER_DIR,
    PARTIAL_SUFFIX,
    RUN_CONFIG_FILE,
    TOKENIZER_FILE,
    TRAIN_STATE_FILE,
    CheckpointError,
    check_common_state,
    check_complete,
    checkpoints_dir,
    has_latest,
    is_hf_folder,
    iter_dir_name,
    iter_step,
    list_checkpoints,
    read_latest,
    resolve_checkpoint_dir,
    write_latest,
)
from megatron_plugin.config import RunConfig, data_parallel_size, model_config_from_dict
from megatron_plugin.runtime import mcore_compat
from megatron_plugin.training.checkpoint_files import find_damage, write_file_manifest
from megatron_plugin.training.optimizer import TrainState
from megatron_plugin.training.optimizer_state import (
    check_optimizer_resumable,
    optimizer_format,
    optimizer_metadata,
    prime_optimizer_state,
    restore_adam_steps,
    saved_optimizer_format,
)

logger = logging.getLogger(__name__)


class CheckpointMismatch(CheckpointError):
    """A checkpoint whose model does not fit this run's (every rank compares the same files)."""

    same_on_every_rank = True


@dataclass
class Resumed:
    step: int
    consumed_samples: int
    layout_changed: bool
    weights_only: bool = False


def checkpoint_root(cfg: RunConfig) -> str:
    return checkpoints_dir(cfg.run_dir)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _gpt(state: TrainState):
    return state.model[0].module


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(state: Optional[dict] = None):
    """RNG state per (PP, TP) rank, replicated over data-parallel ranks."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state",
        state if state is not None else _rng_state(),
        (parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size()),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


class Checkpointer:
    """Saves checkpoints, synchronously or (checkpoint.async_save) in a background process.

    An async save writes the optimizer part from a forked writer process (Megatron-Core's
    AsyncCallsQueue) that sees the state as it was at the fork; training continues, and the
    checkpoint is renamed into place and named `latest` once every rank's writer has finished.
    At most one save is in flight."""

    def __init__(self, cfg: RunConfig, tokenizer_model: Optional[str], saved_at: Optional[int] = None):
        self.cfg = cfg
        self.tokenizer_model = tokenizer_model
        self.root = checkpoint_root(cfg)
        # The step of the newest checkpoint of this run (the one resumed from, at first).
        self.saved_at = saved_at
        self._queue = None
        self._in_flight: Optional[str] = None
        self._started = 0.0
        if cfg.checkpoint.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue()

    def due(self, step: int) -> bool:
        """A periodic save is due at this step (checkpoint.interval)."""
        interval = self.cfg.checkpoint.interval
        return interval > 0 and step % interval == 0

    def save_unless_saved(self, state: TrainState, step: int, consumed_samples: int) -> None:
        """Save at this step unless a checkpoint of it exists already (the end of a run, a stop)."""
        if self.saved_at != step:
            self.save(state, step, consumed_samples)

    def save(self, state: TrainState, step: int, consumed_samples: int) -> str:
        from megatron.core import dist_checkpointing

        self.wait()
        self._started = time.perf_counter()
        self.saved_at = step
        final = os.path.join(self.root, iter_dir_name(step))
        partial = final + PARTIAL_SUFFIX
        if _is_rank0():
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # a leftover of an interrupted save
            os.makedirs(partial)
        _barrier()
        asynchronous = self._queue is not None
        try:
            # The model part (1/7 of the bytes with fp32 Adam state) is written synchronously:
            # Megatron-Core's async writers share one results queue, so two saves may not overlap.
            dist_checkpointing.save({"model": _gpt(state).sharded_state_dict()}, partial)
            if _is_rank0():
                os.makedirs(os.path.join(partial, OPTIMIZER_DIR))
            _barrier()
            # A fresh model state dict: save() consumed the first one, and the optimizer maps its
            # states onto the model's sharded tensors by parameter identity.
            model_sd = _gpt(state).sharded_state_dict()
            metadata = optimizer_metadata(optimizer_format(self.cfg.parallel.distributed_optimizer))
            optimizer_sd = {
                "optimizer": state.optimizer.sharded_state_dict(model_sd, metadata=metadata),
                "scheduler": state.scheduler.state_dict(),
                "rng": _rng_sharded(),
            }
            optimizer_request = dist_checkpointing.save(
                optimizer_sd, os.path.join(partial, OPTIMIZER_DIR), async_sharded_save=asynchronous,
                **mcore_compat.async_save_kwargs(asynchronous))
            if _is_rank0():
                self._write_metadata(partial, step, consumed_samples)
        except Exception as error:
            if _is_rank0():
                shutil.rmtree(partial, ignore_errors=True)
            raise self._failed(final, error) from error
        if asynchronous:
            optimizer_request.add_finalize_fn(lambda: self._publish(partial, final))
            self._queue.schedule_async_request(optimizer_request)
            self._in_flight = final
            if _is_rank0():
                logger.info("checkpoint %s: model written in %.1f s, optimizer state being written in "
                            "the background", final, time.perf_counter() - self._started)
        else:
            _barrier()
            self._publish(partial, final)
            _barrier()
        return final

    def poll(self) -> None:
        """Publish an async save that has finished on every rank (cheap; call every step)."""
        self._finalize(blocking=False)

    def wait(self) -> None:
        """Block until the async save in flight, if any, is written and published."""
        self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        if self._queue is None or self._in_flight is None:
            return
        try:
            self._queue.maybe_finalize_async_calls(blocking=blocking)
        except Exception as error:
            final, self._in_flight = self._in_flight, None
            if _is_rank0():
                shutil.rmtree(final + PARTIAL_SUFFIX, ignore_errors=True)
            raise self._failed(final, error) from error
        if self._queue.get_num_unfinalized_calls() == 0:
            self._in_flight = None

    def _failed(self, final: str, error: Exception) -> "CheckpointError":
        return CheckpointError(
            f"saving checkpoint {final} failed ({type(error).__name__}: {error}); the previous "
            f"checkpoint ({read_latest(self.root) or 'none'}) is untouched. Free disk space or fix "
            "checkpoint.* and resume."
        )

    def _write_metadata(self, partial: str, step: int, consumed_samples: int) -> None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        _write_json(os.path.join(partial, TRAIN_STATE_FILE), {
            "step": step,
            "consumed_samples": consumed_samples,
            "tensor_parallel": self.cfg.parallel.tensor,
            "pipeline_parallel": self.cfg.parallel.pipeline,
            "world_size": world_size,
            "data_parallel": data_parallel_size(self.cfg.parallel, world_size),
            "optimizer_format": optimizer_format(self.cfg.parallel.distributed_optimizer),
        })
        _write_json(os.path.join(partial, RUN_CONFIG_FILE), dataclasses.asdict(self.cfg))
        if self.tokenizer_model:
            shutil.copyfile(self.tokenizer_model, os.path.join(partial, TOKENIZER_FILE))

    def _publish(self, partial: str, final: str) -> None:
        """Rank 0, once every rank has written: rename into place, move `latest`, prune."""
        if not _is_rank0():
            return
        write_file_manifest(partial)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        write_latest(self.root, os.path.basename(final))
        prune(self.root, self.cfg.checkpoint.keep, self.cfg.checkpoint.weights_only_snapshots)
        logger.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - self._started)


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=str)


def prune(root: str, keep: int, weights_only_snapshots: bool) -> None:
    """Keep the newest `keep` resumable checkpoints; older ones lose their optimizer state
    (weights-only snapshots) or are deleted."""
    resumable = [(s, p) for s, p in list_checkpoints(root) if os.path.isdir(os.path.join(p, OPTIMIZER_DIR))]
    for _, path in resumable[: max(len(resumable) - keep, 0)]:
        if weights_only_snapshots:
            shutil.rmtree(os.path.join(path, OPTIMIZER_DIR))
        else:
            shutil.rmtree(path)


def resolve_resume(cfg: RunConfig) -> Optional[str]:
    """The checkpoint this run resumes from, None to start fresh. A damaged newest checkpoint of a
    run (checkpoint.resume=auto, or a checkpoints folder) gives way to the newest intact resumable
    one before it, with a warning naming the damage; a damaged checkpoint named by its own path is
    refused. So is one this Megatron-Core cannot read (written by a newer one)."""
    path = _resume_candidate(cfg)
    if path is not None:
        check_common_state(path, with_optimizer=True)
    return path


def _resume_candidate(cfg: RunConfig) -> Optional[str]:
    mode = cfg.checkpoint.resume
    if mode in (None, "none", "never", False):
        return None
    if mode == "auto":
        return _newest_intact(checkpoint_root(cfg))
    path = str(mode)
    if has_latest(path):
        return _newest_intact(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint.resume={path}: no such checkpoint folder")
    damage = find_damage(path)
    if damage:
        raise CheckpointError(f"checkpoint {path} is damaged: {damage}. Resume from an earlier checkpoint "
                              "(checkpoint.resume=PATH/iter_N) or from the run's checkpoints folder")
    return path


def _newest_intact(root: str) -> Optional[str]:
    newest = read_latest(root)
    if newest is None:
        return None
    damage = find_damage(newest)
    if damage is None:
        return newest
    newest_step = iter_step(os.path.basename(newest))
    for step, path in reversed(list_checkpoints(root)):
        if step < newest_step and os.path.isdir(os.path.join(path, OPTIMIZER_DIR)) and find_damage(path) is None:
            logger.warning("checkpoint %s is damaged: %s. Resuming from %s, the newest intact checkpoint "
                           "before it; the steps after it are trained again", newest, damage, path)
            return path
    raise CheckpointError(
        f"checkpoint {newest} is damaged ({damage}) and no intact resumable checkpoint precedes it in "
        f"{root}: restore the file, or start fresh with checkpoint.resume=none and another run.dir"
    )


def resolve_initial_weights(cfg: RunConfig) -> Optional[str]:
    """The checkpoint folder of checkpoint.load (None when unset). A Hugging Face folder is
    converted once into RUN/initial_weights (in a separate process: conversion builds its own
    one-process Megatron model) and that conversion is read from then on. Rank 0 decides."""
    source = cfg.checkpoint.load
    if not source:
        return None
    if is_hf_folder(source):
        return _converted_hf_weights(cfg, str(source))
    try:
        path = resolve_checkpoint_dir(source)
        check_complete(path)
    except CheckpointError as error:
        raise CheckpointError(f"checkpoint.load={source}: {error}") from error
    damage = find_damage(str(path))
    if damage:
        raise CheckpointError(f"checkpoint.load={source}: {path} is damaged: {damage}. Load another "
                              "checkpoint (RUN/checkpoints/iter_N)")
    return str(path)


# torchrun's variables: a child process that inherits them would join the training job's rendezvous.
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _converted_hf_weights(cfg: RunConfig, folder: str) -> str:
    import subprocess
    import sys

    target = os.path.join(cfg.run_dir, INITIAL_WEIGHTS_DIR)
    converted = read_latest(target)
    if converted is not None and find_damage(converted) is None:
        return converted
    shutil.rmtree(target, ignore_errors=True)
    logger.info("checkpoint.load=%s is a Hugging Face folder: converting it into %s", folder, target)
    command = [sys.executable, "-m", "megatron_plugin.export", "--from-hf", folder, "--output", target,
               "--tensor-parallel", str(cfg.parallel.tensor), "--dtype", cfg.precision.dtype]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV and not k.startswith("TORCHELASTIC_")}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise CheckpointError(f"checkpoint.load={folder}: converting the Hugging Face folder failed:\n{tail}")
    write_file_manifest(read_latest(target))
    return read_latest(target)


_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                 "ffn_hidden_size", "tie_embeddings", "make_vocab_size_divisible_by")


def _check_model_matches(cfg: RunConfig, path: str, saved_run: dict, saved_tp: int) -> None:
    """A clear message instead of a shape error deep inside distributed checkpointing."""
    saved_model = saved_run.get("model", {})
    for name in _SHAPE_FIELDS:
        if name in saved_model and saved_model[name] != getattr(cfg.model, name):
            raise CheckpointMismatch(
                f"{path} holds a model with model.{name}={saved_model[name]}, this run has "
                f"model.{name}={getattr(cfg.model, name)}: set model.{name}={saved_model[name]} or "
                "start a new run.dir"
            )
    saved_padded = model_config_from_dict(saved_model)[0].padded_vocab_size(saved_tp)
    if saved_model and saved_padded != cfg.model.padded_vocab_size(cfg.parallel.tensor):
        raise CheckpointMismatch(
            f"{path} has its vocabulary padded to {saved_padded} rows (TP={saved_tp}); at "
            f"parallel.tensor={cfg.parallel.tensor} this run pads to "
            f"{cfg.model.padded_vocab_size(cfg.parallel.tensor)}: adjust model.make_vocab_size_divisible_by"
        )


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_checkpoint(cfg: RunConfig, state: TrainState, path: str, weights_only: bool = False) -> Resumed:
    """Load the model (resharded to the current TP/PP layout) and, when the checkpoint is
    resumable and `weights_only` is not asked for, the optimizer, scheduler, RNG and data
    position. A weights-only load (checkpoint.load, an older snapshot, or a checkpoint imported
    from Hugging Face) starts a new schedule from the weights."""
    from megatron.core import dist_checkpointing

    saved = _read_json(os.path.join(path, TRAIN_STATE_FILE))
    saved_run = _read_json(os.path.join(path, RUN_CONFIG_FILE))
    saved_layout = (
        saved.get("tensor_parallel", saved_run.get("parallel", {}).get("tensor", 1)),
        saved.get("pipeline_parallel", saved_run.get("parallel", {}).get("pipeline", 1)),
    )
    _check_model_matches(cfg, path, saved_run, saved_layout[0])
    layout_changed = saved_layout != (cfg.parallel.tensor, cfg.parallel.pipeline)
    optimizer_dir = os.path.join(path, OPTIMIZER_DIR)
    resumable = not weights_only and os.path.isdir(optimizer_dir) and bool(saved)
    saved_format = saved_optimizer_format(saved, saved_run)
    if resumable:
        check_optimizer_resumable(cfg, path, saved_format, saved_layout, saved.get("data_parallel"))
    gpt = _gpt(state)
    loaded = dist_checkpointing.load({"model": gpt.sharded_state_dict()}, path)
    gpt.load_state_dict(loaded["model"])
    # bf16/fp16: the optimizer's fp32 master copies were made from the initial weights; refresh
    # them (a full resume then overwrites them with the saved ones).
    state.optimizer.reload_model_params()
    if not resumable:
        if _is_rank0() and weights_only:
            logger.info("initial weights from %s (checkpoint.load, weights only): training starts at "
                        "step 0 with a new optimizer and LR schedule", path)
        elif _is_rank0():
            logger.info("%s has weights only: training starts at step 0 from these weights with a "
                        "new optimizer and LR schedule", path)
        return Resumed(0, 0, layout_changed, weights_only=True)
    model_sd = gpt.sharded_state_dict()
    prime_optimizer_state(state.optimizer)
    optimizer_sd = {
        "optimizer": state.optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=optimizer_metadata(saved_format)),
    }
    if not layout_changed:
        optimizer_sd["rng"] = _rng_sharded()
    # No autograd: the distributed optimizer copies into fp32 shards that are views of parameters.
    with torch.no_grad():
        loaded = dist_checkpointing.load(optimizer_sd, optimizer_dir)
        state.optimizer.load_state_dict(loaded["optimizer"])
        restore_adam_steps(state.optimizer)
    state.scheduler.load_state_dict(loaded["scheduler"])  # common (non-sharded) state
    if not layout_changed:
        _set_rng_state(loaded["rng"])
    return Resumed(saved["step"], saved["consumed_samples"], layout_changed)
