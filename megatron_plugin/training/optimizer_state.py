"""The optimizer part of a checkpoint: its on-disk formats, which layouts each reloads at, and
what Megatron-Core's distributed optimizer needs around a load on the torch-optimizer path
(docs/checkpoints.md)."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_plugin.config import RunConfig
from megatron_plugin.errors import UserError


class OptimizerStateError(UserError):
    """A checkpoint's optimizer state that cannot be loaded at this run's layout or settings."""

    same_on_every_rank = True  # every rank checks the same files against the same config


# The optimizer state's on-disk format, as train_state.json records it. Megatron-Core's plain
# optimizer writes one sharded tensor per parameter, which reshards to any TP/PP/DP layout. The
# distributed optimizer writes "dp_reshardable": each rank its own contiguous shard of the grad
# buffers, in parallel and without gathering, which reloads at any data-parallel size with the
# same TP/PP. Its "fully_reshardable" alternative all-gathers the whole optimizer state onto every
# rank at each save, and on the torch-optimizer path of megatron-core 0.16 fails to load
# (KeyError 'step'); docs/checkpoints.md has the measurements.
PLAIN_OPTIMIZER = "plain"
DISTRIBUTED_OPTIMIZER = "dp_reshardable"


def optimizer_format(distributed_optimizer: bool) -> str:
    return DISTRIBUTED_OPTIMIZER if distributed_optimizer else PLAIN_OPTIMIZER


def optimizer_metadata(fmt: str) -> Optional[dict]:
    return None if fmt == PLAIN_OPTIMIZER else {"distrib_optim_sharding_type": fmt}


def _torch_adams(optimizer) -> list:
    """The torch Adam/AdamW optimizers inside a Megatron (chained) optimizer."""
    found = []
    for megatron_opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(megatron_opt, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            found.append(inner)
    return found


def prime_optimizer_state(optimizer) -> None:
    """Give each torch Adam/AdamW inside a Megatron optimizer the per-parameter state its first
    step would create (zero moments, step 0), where it has none yet.

    Megatron-Core's DistributedOptimizer builds its loading state dict from the live optimizer's
    own `state_dict()`, which on the torch-optimizer path (no Transformer Engine / Apex fused Adam)
    reads the `step` of every parameter's state; a freshly built optimizer has none, and its
    `init_state_fn` fills only the moments. TE's and Apex's FusedAdam keep `step` in the param
    groups instead and need nothing. The primed values are placeholders: the load overwrites the
    moments in place, and `restore_adam_steps` sets the step."""
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            on_device = group.get("fused") or group.get("capturable")
            for param in group["params"]:
                slot = inner.state[param]
                if slot:
                    continue
                slot["step"] = torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")
                slot["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                slot["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    slot["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def restore_adam_steps(optimizer) -> None:
    """After a distributed-optimizer load on the torch-optimizer path: give every parameter its
    own Adam `step` tensor, valued from the loaded param groups. Megatron-Core restores the step
    into the param groups and hands one tensor to all parameters, then copies its sharded state
    over the live tensors, `step` included, from the placeholder the state dict was built from
    (0 for a fresh optimizer). Both would break Adam's bias correction: the shared tensor is
    incremented once per parameter and step."""
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                slot = inner.state.get(param)
                if slot and torch.is_tensor(slot.get("step")):
                    slot["step"] = torch.tensor(float(group["step"]), dtype=slot["step"].dtype,
                                                device=slot["step"].device)


def saved_optimizer_format(saved: dict, saved_run: dict) -> str:
    """The optimizer format of a checkpoint; those written before train_state.json recorded it
    used the distributed optimizer only with more than one data-parallel rank."""
    if "optimizer_format" in saved:
        return saved["optimizer_format"]
    parallel = saved_run.get("parallel", {})
    model_parallel = parallel.get("tensor", 1) * parallel.get("pipeline", 1) * parallel.get("context", 1)
    data_parallel = saved.get("world_size", 1) // model_parallel
    return optimizer_format(parallel.get("distributed_optimizer", True) and data_parallel > 1)


def check_optimizer_resumable(cfg: RunConfig, path: str, saved_format: str, saved_layout: tuple,
                               saved_dp: Optional[int]) -> None:
    """Refuse, before anything is loaded, a resume whose optimizer state cannot be resharded onto
    this run's layout, and say what can be done."""
    wanted = optimizer_format(cfg.parallel.distributed_optimizer)
    tp, pp = saved_layout
    written = f"TP={tp} PP={pp}" + (f" DP={saved_dp}" if saved_dp else "")
    fallback = (f"or start from its weights with a new optimizer: python -m megatron_plugin.export "
                f"--checkpoint {path} --output HF_DIR, then python -m megatron_plugin.export --from-hf "
                f"HF_DIR --output NEW_RUN_DIR/checkpoints")
    if saved_format != wanted:
        setting = "true" if saved_format == DISTRIBUTED_OPTIMIZER else "false"
        raise OptimizerStateError(
            f"{path} holds the optimizer state of {'the distributed' if setting == 'true' else 'the plain'} "
            f"optimizer ({written}); this run has parallel.distributed_optimizer="
            f"{str(cfg.parallel.distributed_optimizer).lower()}. Resume with "
            f"parallel.distributed_optimizer={setting}, {fallback}"
        )
    if saved_format == DISTRIBUTED_OPTIMIZER and saved_layout != (cfg.parallel.tensor, cfg.parallel.pipeline):
        raise OptimizerStateError(
            f"{path} was written with the distributed optimizer at {written}; its optimizer state "
            f"reloads at any data-parallel size but only at TP={tp} PP={pp}, and this run has "
            f"parallel.tensor={cfg.parallel.tensor} parallel.pipeline={cfg.parallel.pipeline}. Resume "
            f"with parallel.tensor={tp} parallel.pipeline={pp} on any number of processes"
            f"{f' that is a multiple of {tp * pp}' if tp * pp > 1 else ''}, {fallback}. Runs that train with "
            "parallel.distributed_optimizer=false write checkpoints that reshard to any TP/PP/DP."
        )
