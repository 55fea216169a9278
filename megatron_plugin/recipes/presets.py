"""Presets: plain functions returning a RunConfig, looked up by name.

The three GPU presets carry the seed document's figures (see DESIGN.md section 2): 1.2B
Llama-style model, seq 1024, peak LR 3e-4 with 2% linear warmup, then cosine decay to 10% of peak
(the seed gives no decay; this is our choice).

Parallel layout for a 1.2B model on one 8-GPU node: TP=1 x PP=1 x DP=8. The whole model (2.4 GB
of bf16 weights) fits on every GPU, so tensor parallelism would only add communication inside
every layer; data parallelism with Megatron-Core's distributed optimizer shards the fp32 master
weights and Adam moments (~14.5 GB) over the 8 ranks instead. `parallel.tensor=2` works by
override (DP becomes 4). Overlapped gradient reduce-scatter and parameter all-gather with
averaging inside the collective, and a manual garbage collection every 100 steps, follow
Megatron-Bridge's Llama 3.2 1B H100 recipe.
"""

from __future__ import annotations

from typing import Callable

from megatron_plugin.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    RunInfo,
    TrainConfig,
)

PRESETS: dict[str, Callable[[], RunConfig]] = {}


# Presets written for CPU (no GPU needed): `--plan` prices them with the CPU's measured peak.
CPU_PRESETS: set[str] = set()


def preset(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
    PRESETS[fn.__name__] = fn
    return fn


def cpu_preset(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
    CPU_PRESETS.add(fn.__name__)
    return preset(fn)


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def llama_1b2() -> ModelConfig:
    """The 1.2B model of DESIGN.md section 3 (ModelConfig's defaults, named here for clarity)."""
    return ModelConfig()


def _warmup(max_steps: int) -> int:
    return int(0.02 * max_steps)


def _gpu_parallel(gpus: int) -> ParallelConfig:
    return ParallelConfig(
        tensor=1,
        pipeline=1,
        distributed_optimizer=True,
        overlap_grad_reduce=True,
        overlap_param_gather=True,
        average_in_collective=True,
        gpus=gpus,
    )


def _gpu_run(name: str, description: str, gpus: int, micro_batch: int, global_batch: int,
             max_steps: int, save_every: int, log_every: int, eval_every: int) -> RunConfig:
    return RunConfig(
        run=RunInfo(name=name, description=description),
        model=llama_1b2(),
        parallel=_gpu_parallel(gpus),
        precision=PrecisionConfig(dtype="bf16"),
        data=DataConfig(seq_length=1024),
        train=TrainConfig(max_steps=max_steps, micro_batch_size=micro_batch,
                          global_batch_size=global_batch, manual_gc_interval=100),
        optim=OptimConfig(lr=3e-4, warmup_steps=_warmup(max_steps)),
        checkpoint=CheckpointConfig(interval=save_every, keep=3),
        log=LogConfig(interval=log_every),
        eval=EvalConfig(interval=eval_every, iters=20),
    )


@preset
def production_8gpu() -> RunConfig:
    """1.2B, 8 GPUs, 590,625 steps = 3.04 epochs of 51B tokens (the seed's main configuration)."""
    return _gpu_run("production_8gpu", production_8gpu.__doc__, gpus=8, micro_batch=8,
                    global_batch=256, max_steps=590_625, save_every=20_000, log_every=3_000,
                    eval_every=20_000)


@preset
def fast_8gpu() -> RunConfig:
    """1.2B, 8 GPUs, 75,000 steps = 0.386 epochs of 51B tokens."""
    return _gpu_run("fast_8gpu", fast_8gpu.__doc__, gpus=8, micro_batch=8, global_batch=256,
                    max_steps=75_000, save_every=5_000, log_every=500, eval_every=5_000)


@preset
def basic_2gpu() -> RunConfig:
    """1.2B, 2 GPUs, 25,000 steps of 32,768 tokens (0.016 epochs of 51B tokens)."""
    return _gpu_run("basic_2gpu", basic_2gpu.__doc__, gpus=2, micro_batch=4, global_batch=32,
                    max_steps=25_000, save_every=2_500, log_every=250, eval_every=2_500)


def tiny_model(vocab_size: int = 512, seq: int = 128) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, hidden_size=128, num_layers=2, num_attention_heads=4,
                       num_query_groups=2, ffn_hidden_size=352, max_seq_length=seq)


@cpu_preset
def smoke() -> RunConfig:
    """Tiny model on CPU over a generated corpus: the whole pipeline in well under a minute."""
    return RunConfig(
        run=RunInfo(name="smoke", description=smoke.__doc__),
        model=tiny_model(),
        parallel=ParallelConfig(gpus=1),
        precision=PrecisionConfig(dtype="fp32"),
        data=DataConfig(seq_length=128, generate_corpus=True, split="90,9,1"),
        train=TrainConfig(max_steps=60, micro_batch_size=4, global_batch_size=8, seed=1234),
        optim=OptimConfig(lr=3e-3, warmup_steps=5, weight_decay=0.01),
        checkpoint=CheckpointConfig(interval=20, keep=2),
        log=LogConfig(interval=5),
        eval=EvalConfig(interval=20, iters=2),
    )


@preset
def sft_1b2() -> RunConfig:
    """1.2B chat model: supervised fine-tuning of the production checkpoint on 8 GPUs (docs/sft.md)."""
    cfg = _gpu_run("sft_1b2", sft_1b2.__doc__, gpus=8, micro_batch=2, global_batch=128,
                   max_steps=1000, save_every=100, log_every=10, eval_every=100)
    # Settings of Megatron-Bridge's full-SFT recipe for Llama 3.2 1B (docs/sft.md, *Presets*):
    # 1000 iterations, 50 warmup, cosine to 0, Adam beta2 0.98, packed sequences; the peak LR is
    # 2e-5 (HF alignment-handbook / Zephyr full SFT) rather than Bridge's 5e-6, which is tuned for
    # a model pretrained on 9T tokens.
    cfg.data = DataConfig(format="chat", seq_length=1024, split="98,2,0")
    cfg.optim = OptimConfig(lr=2e-5, min_lr_ratio=0.0, warmup_steps=50, weight_decay=0.0, beta2=0.98)
    cfg.checkpoint.load = "runs/production_8gpu"
    cfg.parallel.average_in_collective = False  # a token-weighted loss sums gradients (Megatron-Core's rule)
    cfg.eval.iters = 8
    return cfg


@cpu_preset
def smoke_sft() -> RunConfig:
    """The smoke model pretrained, then fine-tuned on CPU to count words (a generated chat task)."""
    return RunConfig(
        run=RunInfo(name="smoke_sft", description=smoke_sft.__doc__),
        model=tiny_model(),
        parallel=ParallelConfig(gpus=1),
        precision=PrecisionConfig(dtype="fp32"),
        data=DataConfig(format="chat", seq_length=128, generate_corpus=True, split="95,5,0"),
        train=TrainConfig(max_steps=150, micro_batch_size=4, global_batch_size=8, seed=1234),
        optim=OptimConfig(lr=2e-3, warmup_steps=10, weight_decay=0.0),
        checkpoint=CheckpointConfig(interval=150, keep=1, base_preset="smoke"),
        log=LogConfig(interval=10),
        eval=EvalConfig(interval=75, iters=2, at_start=True, task_prompts=48, prompt_tokens=16),
    )
