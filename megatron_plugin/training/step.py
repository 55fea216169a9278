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
    # Packed conversations (data.format=chat): a micro-batch's rows run as one sequence of
    # micro_batch_size x seq_length tokens with Megatron-Core's PackedSeqParams ("thd").
    packed: bool = False

    @classmethod
    def of_run(cls, cfg: RunConfig, data_parallel: int, device: torch.device) -> "BatchShape":
        return cls(cfg.train.grad_accumulation_steps(data_parallel), cfg.train.micro_batch_size,
                   cfg.data.seq_length, device, packed=cfg.data.is_chat)

    def schedule_shape(self) -> tuple[int, int]:
        """(seq_length, micro_batch_size) of the activations the schedule passes between
        pipeline stages: [s, b, h], or [b*s, 1, h] for a packed micro-batch."""
        if self.packed:
            return self.micro_batch_size * self.seq_length, 1
        return self.seq_length, self.micro_batch_size


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
    if "cu_seqlens" not in batch:
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(_loss_func, batch["loss_mask"])
    from megatron_plugin.data.sft_packing import packed_seq_params

    # The micro-batch's rows as one sequence whose conversations attend only to themselves.
    seq_length = batch["tokens"].shape[1]
    params = packed_seq_params(batch["cu_seqlens"], batch["cu_seqlens_len"], seq_length, device)
    flat = {key: batch[key].reshape(1, -1) for key in ("tokens", "position_ids", "labels")}
    output = model(flat["tokens"], flat["position_ids"], None, labels=flat["labels"], packed_seq_params=params)
    return output, partial(_loss_func, batch["loss_mask"])


@dataclass(frozen=True)
class LossTotal:
    """Summed per-token loss and the number of tokens it covers, over a global batch."""

    loss_sum: float
    tokens: float

    @property
    def mean(self) -> float:
        return self.loss_sum / max(self.tokens, 1.0)

    def __add__(self, other: "LossTotal") -> "LossTotal":
        return LossTotal(self.loss_sum + other.loss_sum, self.tokens + other.tokens)


def _reduce_loss(losses: list, device: torch.device) -> torch.Tensor:
    """[loss sum, tokens] over micro-batches and data-parallel ranks (on the last PP stage)."""
    from megatron.core import parallel_state

    totals = torch.zeros(2, dtype=torch.float64)
    for item in losses:
        totals += item["lm loss"].detach().to("cpu", torch.float64)
    if parallel_state.get_data_parallel_world_size() > 1:
        totals_dev = totals.to(device)
        dist.all_reduce(totals_dev, group=parallel_state.get_data_parallel_group())
        totals = totals_dev.cpu()
    return totals


def _broadcast_from_last_stage(totals: torch.Tensor, device: torch.device) -> torch.Tensor:
    """So every rank (and rank 0's logger) sees the loss computed on the last pipeline stage."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return totals
    tensor = totals.to(device)
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast(tensor, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return tensor.cpu()


def _run_schedule(state: TrainState, data_iterator, shape: BatchShape, forward_only: bool) -> LossTotal:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    seq_length, micro_batch_size = shape.schedule_shape()
    losses = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, shape.device),
        data_iterator=data_iterator,
        model=state.model,
        num_microbatches=shape.num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if parallel_state.is_pipeline_last_stage():
        totals = _reduce_loss(losses, shape.device)
    else:
        totals = torch.zeros(2, dtype=torch.float64)
    totals = _broadcast_from_last_stage(totals, shape.device)
    return LossTotal(float(totals[0]), float(totals[1]))


def train_step(state: TrainState, data_iterator, shape: BatchShape) -> StepResult:
    for chunk in state.model:
        chunk.train()
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    loss = _run_schedule(state, data_iterator, shape, False).mean
    success, grad_norm, _ = state.optimizer.step()
    lr = state.optimizer.param_groups[0]["lr"]
    if success:
        state.scheduler.step(increment=1)
    return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, skipped=not success)


@torch.no_grad()
def eval_step(state: TrainState, data_iterator, shape: BatchShape) -> LossTotal:
    """The summed loss and token count of one global batch (validation weighs batches by tokens)."""
    for chunk in state.model:
        chunk.eval()
    loss = _run_schedule(state, data_iterator, shape, True)
    for chunk in state.model:
        chunk.train()
    return loss
