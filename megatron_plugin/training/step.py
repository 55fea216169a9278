"""One training or evaluation step through Megatron-Core's forward-backward schedule."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megatron_plugin.config import RunConfig
from megatron_plugin.training.optimizer import TrainState


@dataclass(frozen=True)
class BatchShape:
    """How this rank feeds one global batch through the schedule: micro-batches of
    `micro_batch_size` sequences of `seq_length` tokens, `num_microbatches` of them, on `device`."""

    num_microbatches: int
    micro_batch_size: int
    seq_length: int
    device: torch.device

    @classmethod
    def of_run(cls, cfg: RunConfig, data_parallel: int, device: torch.device) -> "BatchShape":
        return cls(cfg.train.grad_accumulation_steps(data_parallel), cfg.train.micro_batch_size,
                   cfg.data.seq_length, device)


@dataclass
class StepResult:
    loss: float  # token-weighted mean over the global batch
    grad_norm: Optional[float]
    lr: float
    skipped: bool  # the optimizer skipped the update (fp16 overflow)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of per-token losses and the token count; the schedule divides (Megatron-LM's form)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    reporting = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": reporting}


def _forward_step(device: torch.device, data_iterator: Iterator[dict], model):
    batch = _to_device(next(data_iterator), device)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def _reduce_loss(losses: list, device: torch.device) -> float:
    """Token-weighted mean over micro-batches and data-parallel ranks (on the last PP stage)."""
    from megatron.core import parallel_state

    totals = torch.zeros(2, dtype=torch.float64)
    for item in losses:
        totals += item["lm loss"].detach().to("cpu", torch.float64)
    if parallel_state.get_data_parallel_world_size() > 1:
        totals_dev = totals.to(device)
        dist.all_reduce(totals_dev, group=parallel_state.get_data_parallel_group())
        totals = totals_dev.cpu()
    return float(totals[0] / totals[1].clamp(min=1))


def _broadcast_from_last_stage(value: float, device: torch.device) -> float:
    """So every rank (and rank 0's logger) sees the loss computed on the last pipeline stage."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast(tensor, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return float(tensor.item())


def _run_schedule(state: TrainState, data_iterator, shape: BatchShape, forward_only: bool) -> float:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    losses = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, shape.device),
        data_iterator=data_iterator,
        model=state.model,
        num_microbatches=shape.num_microbatches,
        seq_length=shape.seq_length,
        micro_batch_size=shape.micro_batch_size,
        forward_only=forward_only,
    )
    loss = _reduce_loss(losses, shape.device) if parallel_state.is_pipeline_last_stage() else 0.0
    return _broadcast_from_last_stage(loss, shape.device)


def train_step(state: TrainState, data_iterator, shape: BatchShape) -> StepResult:
    for chunk in state.model:
        chunk.train()
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    loss = _run_schedule(state, data_iterator, shape, False)
    success, grad_norm, _ = state.optimizer.step()
    lr = state.optimizer.param_groups[0]["lr"]
    if success:
        state.scheduler.step(increment=1)
    return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, skipped=not success)


@torch.no_grad()
def eval_step(state: TrainState, data_iterator, shape: BatchShape) -> float:
    for chunk in state.model:
        chunk.eval()
    loss = _run_schedule(state, data_iterator, shape, True)
    for chunk in state.model:
        chunk.train()
    return loss
