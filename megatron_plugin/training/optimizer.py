"""Model wrapped in Megatron-Core DDP, its optimizer and the LR schedule."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_plugin.config import RunConfig
from megatron_plugin.model import build_gpt_model
from megatron_plugin.runtime import cpu_mode


@dataclass
class TrainState:
    """Everything a training step needs; `model` is the list of model chunks Megatron expects."""

    model: list
    optimizer: object
    scheduler: object


def lr_schedule_steps(cfg: RunConfig) -> tuple[int, int]:
    warmup = cfg.optim.warmup_steps
    decay = cfg.optim.decay_steps or cfg.train.max_steps
    return warmup, max(decay, warmup + 1)


def _wire_schedule_hooks(model: list, optimizer, ddp_config) -> None:
    """The forward-backward schedule reaches DDP and the optimizer through the model's config:
    finalize_model_grads all-reduces gradients (DP, tied embeddings across PP, SP norms), the loss
    is scaled for fp16, and grad sync is deferred to the last micro-batch."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(model[0])
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model[0].no_sync
    if ddp_config.overlap_grad_reduce:
        config.grad_sync_func = model[0].start_grad_sync
    if ddp_config.overlap_param_gather:
        config.param_sync_func = model[0].start_param_sync


def ddp_config_kwargs(cfg: RunConfig, data_parallel: int) -> dict:
    """Megatron-Core DistributedDataParallelConfig arguments. The distributed optimizer is used
    at every data-parallel size when asked for, one rank included, so that a run's checkpoints
    keep one optimizer format and resume at another DP size (docs/checkpoints.md)."""
    distributed_optimizer = cfg.parallel.distributed_optimizer
    return dict(
        grad_reduce_in_fp32=cfg.precision.dtype != "fp32",
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather and distributed_optimizer,
        # A token-weighted loss (chat) sums gradients and divides by the global token count
        # afterwards; Megatron-Core refuses averaging inside the collective with it.
        average_in_collective=cfg.parallel.average_in_collective and not cfg.data.is_chat,
        use_distributed_optimizer=distributed_optimizer,
    )


def optimizer_config_kwargs(cfg: RunConfig, data_parallel: int) -> dict:
    """Megatron-Core OptimizerConfig arguments: AdamW (decoupled weight decay); Megatron picks
    Transformer Engine's fused Adam, else apex's, else torch's."""
    ddp = ddp_config_kwargs(cfg, data_parallel)
    return dict(
        optimizer="adam",
        lr=cfg.optim.lr,
        min_lr=cfg.optim.lr * cfg.optim.min_lr_ratio,
        weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.beta1,
        adam_beta2=cfg.optim.beta2,
        adam_eps=cfg.optim.eps,
        clip_grad=cfg.train.grad_clip,
        bf16=cfg.precision.dtype == "bf16",
        fp16=cfg.precision.dtype == "fp16",
        params_dtype=cfg.precision.torch_dtype,
        use_distributed_optimizer=ddp["use_distributed_optimizer"],
        overlap_param_gather=ddp["overlap_param_gather"],
    )


def build_train_state(cfg: RunConfig, data_parallel: int) -> TrainState:
    """GPTModel -> Megatron-Core DDP -> Megatron optimizer (distributed when asked and DP > 1) ->
    warmup + cosine schedule down to optim.min_lr_ratio x optim.lr."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gpt = build_gpt_model(cfg.build_config())
    if cfg.precision.dtype in ("bf16", "fp16"):
        # Every parameter in half precision (modules such as torch's RMSNorm are built in fp32),
        # inputs cast on the first stage and logits back to fp32 on the last: what Megatron's
        # mixed-precision optimizer and its checkpoint mapping expect.
        from megatron.core.transformer.module import Float16Module

        gpt = Float16Module(gpt.config, gpt)
    # Chat: the loss is the mean over the assistant tokens of the whole global batch, however
    # unevenly they fall into micro-batches and data-parallel ranks. Each micro-batch then returns
    # its summed loss, and finalize_model_grads divides the summed gradients by the global token
    # count (read by DDP when it is built and by the schedule at every step).
    gpt.config.calculate_per_token_loss = cfg.data.is_chat
    ddp_config = DistributedDataParallelConfig(**ddp_config_kwargs(cfg, data_parallel))
    model = [DistributedDataParallel(gpt.config, ddp_config, gpt)]
    optimizer = get_megatron_optimizer(OptimizerConfig(**optimizer_config_kwargs(cfg, data_parallel)), model)
    # CPU mode only (no-ops on CUDA): weight gradients accumulated by the GEMM into DDP's grad
    # buffer, and torch's fused AdamW kernel.
    cpu_mode.fuse_wgrad_accumulation(model)
    cpu_mode.use_fused_adam(optimizer)
    _wire_schedule_hooks(model, optimizer, ddp_config)
    warmup, decay = lr_schedule_steps(cfg)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.optim.lr,
        min_lr=cfg.optim.lr * cfg.optim.min_lr_ratio,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        lr_decay_style="cosine",
        start_wd=cfg.optim.weight_decay,
        end_wd=cfg.optim.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
    )
    return TrainState(model=model, optimizer=optimizer, scheduler=scheduler)
