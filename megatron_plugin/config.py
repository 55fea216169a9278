"""Typed configuration for every part of a run.

A run is described by one `RunConfig` made of small dataclasses, one per concern. Presets
(`megatron_plugin.recipes`) are plain functions returning a `RunConfig`; the run CLI applies
Hydra-style overrides on top and calls `validate()` before anything starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from megatron_plugin.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message says which key to change and how."""


DEFAULT_VOCAB_SIZE = 32000  # the seed's Llama-2-sized vocabulary; also what preprocessing trains by default


# precision.dtype names (and the --dtype choices of export, generate and evaluate). The torch
# dtypes come from `torch_dtype`, so that modules reading configs need not import torch.
DTYPE_NAMES = ("fp32", "fp16", "bf16")


def torch_dtype(name: str):
    """The torch dtype of a precision.dtype name."""
    import torch

    if name not in DTYPE_NAMES:
        raise ConfigError(f"dtype {name!r}: use one of {', '.join(DTYPE_NAMES)}")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


@dataclass
class ModelConfig:
    """A Llama-style decoder. Defaults are the 1.2B model of the 8-GPU presets."""

    vocab_size: int = DEFAULT_VOCAB_SIZE
    hidden_size: int = 2048
    num_layers: int = 24
    num_attention_heads: int = 16
    num_query_groups: int = 4
    ffn_hidden_size: int = 5632
    max_seq_length: int = 1024
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Megatron pads the embedding rows so each TP shard is a multiple of this (Megatron-LM's
    # --make-vocab-size-divisible-by); the padded rows are dropped on export.
    make_vocab_size_divisible_by: int = 128
    # "auto": Transformer Engine's layer spec when TE imports and CUDA is present, else the local
    # Megatron-Core spec with PyTorch SDPA attention. "local" / "transformer_engine" force one.
    transformer_impl: str = "auto"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return -(-self.vocab_size // multiple) * multiple


@dataclass
class ParallelConfig:
    """How the model is split. Data parallelism is what is left: world_size / (TP * PP * CP)."""

    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    sequence_parallel: bool = False
    # Megatron-Core's distributed optimizer (ZeRO-1 style sharding of fp32 master weights and
    # Adam moments over the data-parallel group).
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    average_in_collective: bool = False
    # Number of processes the preset was written for (torchrun's --nproc-per-node x nodes).
    # Only used by `plan` and the launcher; at run time the real world size is used.
    gpus: int = 1


@dataclass
class PrecisionConfig:
    # fp32 | bf16 | fp16. On CPU bf16 runs but slowly; the smoke recipe uses fp32.
    dtype: str = "bf16"
    # None | "hybrid" | "e4m3": FP8 through Transformer Engine.
    fp8: Optional[str] = None
    # "tensorwise" (current scaling, Megatron-Bridge's default) | "delayed"
    fp8_recipe: str = "tensorwise"
    # Keep FP8 copies of the weights and all-gather them in FP8 (distributed optimizer).
    fp8_param_gather: bool = True

    @property
    def torch_dtype(self):
        return torch_dtype(self.dtype)


@dataclass
class FusionConfig:
    """Fused kernels, used when the Transformer Engine layer spec runs on CUDA (the local CPU
    path has none of them). Defaults follow Megatron-Bridge's Llama 3.2 1B H100 recipe."""

    rope: bool = True  # TE fused rotary embedding (apply_rope_fusion)
    swiglu: bool = True  # fused bias + SwiGLU activation (bias_activation_fusion)
    masked_softmax: bool = True  # fused scale + mask + softmax
    cross_entropy: bool = True  # TE's fused vocab-parallel cross entropy
    grad_accumulation: bool = True  # weight-gradient GEMM accumulates straight into main_grad
    persist_layer_norm: bool = True  # TE's persistent norm kernel


@dataclass
class DataConfig:
    # Megatron indexed-dataset prefixes, optionally with weights: ["a"] or [0.7, "a", 0.3, "b"].
    paths: list = field(default_factory=list)
    split: str = "969,30,1"
    seq_length: int = 1024
    tokenizer_model: Optional[str] = None
    # Where GPTDataset writes its index cache; default RUN/data_cache.
    cache_dir: Optional[str] = None
    # "text": pretraining documents (Megatron-Core's GPTDataset over `preprocess` output).
    # "chat": conversations from `preprocess sft` (P_tokens_document + P_loss_mask_document),
    # packed into seq_length rows; the loss counts assistant tokens only (docs/sft.md).
    format: str = "text"
    # Generate a corpus into RUN/data (the smoke recipes) when this is set and data.paths names
    # no dataset of the user's: text and a tokenizer for "text", the generated instruction task
    # (megatron_plugin/data/synthetic_chat.py) with the initial weights' tokenizer for "chat".
    generate_corpus: bool = False

    @property
    def uses_generated_corpus(self) -> bool:
        return self.generate_corpus and not self.paths

    @property
    def is_chat(self) -> bool:
        return self.format == "chat"


DATA_FORMATS = ("text", "chat")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    micro_batch_size: int = 8
    global_batch_size: int = 256
    seed: int = 1234
    grad_clip: float = 1.0
    recompute: Optional[str] = None  # None | "selective" | "full"
    # Python's garbage collector runs every N steps instead of at random points (0 = automatic).
    manual_gc_interval: int = 0

    def grad_accumulation_steps(self, data_parallel: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * data_parallel)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    # Cosine decay after warmup down to min_lr_ratio * lr (the seed gives no decay; this is ours).
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    # Cosine decay lasts until this step; None = train.max_steps.
    decay_steps: Optional[int] = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class CheckpointConfig:
    interval: int = 1000
    # Resumable checkpoints (with optimizer state) kept; older ones become weights-only snapshots.
    keep: int = 3
    resume: str = "auto"  # auto | none | PATH
    # Initial weights for a run that has no checkpoint of its own yet (fine-tuning): a training
    # checkpoint (RUN, RUN/checkpoints, iter_N) or a Hugging Face Llama folder. Weights only: the
    # optimizer, LR schedule and data position start fresh. Once the run has saved, resuming
    # takes its own checkpoints and this is not read again.
    load: Optional[str] = None
    # With checkpoint.load unset: train this CPU preset first, in RUN/base, and start from its
    # last checkpoint (smoke_sft pretrains the smoke model it fine-tunes).
    base_preset: Optional[str] = None
    # Write checkpoints in a forked background process while training continues.
    async_save: bool = False
    # Keep a weights-only snapshot of every checkpoint that drops out of the `keep` window.
    weights_only_snapshots: bool = True


@dataclass
class LogConfig:
    interval: int = 10
    tensorboard: bool = True


@dataclass
class EvalConfig:
    interval: int = 1000
    iters: int = 10
    # Validate once before the first step (e.g. to check a resumed or resharded checkpoint).
    at_start: bool = False
    # At each validation, the greedy continuation of each of these prompts is logged (console,
    # metrics.jsonl, TensorBoard text), prompt_tokens new tokens long at most.
    prompts: list = field(default_factory=list)
    prompt_tokens: int = 32
    # With the generated chat corpus: at each validation, the exact-match accuracy of greedy
    # replies to this many held-out task prompts (never in the training data), and the share of
    # replies that end their turn (metrics.jsonl task_exact_match, task_ended_turn).
    task_prompts: int = 0


@dataclass
class RunInfo:
    name: str = "run"
    dir: Optional[str] = None  # default runs/<name>
    description: str = ""


@dataclass
class BuildConfig:
    """What building the model reads: its shape, its split, its number format, and the
    recompute and fusion choices. Precision has no default here: a build states it."""

    model: ModelConfig
    precision: PrecisionConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # recompute only
    fusion: FusionConfig = field(default_factory=FusionConfig)


@dataclass
class RunConfig:
    run: RunInfo = field(default_factory=RunInfo)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> str:
        return self.run.dir or f"runs/{self.run.name}"

    def build_config(self) -> BuildConfig:
        return BuildConfig(self.model, self.precision, self.parallel, self.train, self.fusion)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        from omegaconf import OmegaConf

        return OmegaConf.to_yaml(OmegaConf.structured(self))


def model_config_from_dict(raw: dict) -> tuple[ModelConfig, list[str]]:
    """A ModelConfig from a saved run config's "model" section, and the keys this version does
    not know (ignored)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in raw.items() if k in fields}), sorted(set(raw) - fields)


def data_parallel_size(parallel: ParallelConfig, world_size: int) -> int:
    model_parallel = parallel.tensor * parallel.pipeline * parallel.context
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tensor ({parallel.tensor}) x "
            f"parallel.pipeline ({parallel.pipeline}) x parallel.context ({parallel.context}) = "
            f"{model_parallel}: start a multiple of {model_parallel} processes (torchrun --nproc-per-node N "
            f"... / ./start_training.sh --gpus N) or change the parallel.* sizes"
        )
    return world_size // model_parallel


def validate_model(model: ModelConfig, tensor_parallel: int = 1) -> None:
    if model.hidden_size % model.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size ({model.hidden_size}) is not divisible by "
            f"model.num_attention_heads ({model.num_attention_heads})"
        )
    if model.num_attention_heads % model.num_query_groups:
        raise ConfigError(
            f"model.num_attention_heads ({model.num_attention_heads}) is not divisible by "
            f"model.num_query_groups ({model.num_query_groups})"
        )
    if model.num_attention_heads % tensor_parallel:
        raise ConfigError(
            f"model.num_attention_heads ({model.num_attention_heads}) is not divisible by "
            f"parallel.tensor ({tensor_parallel}): pick a tensor-parallel size that divides it"
        )
    if model.num_query_groups % tensor_parallel:
        raise ConfigError(
            f"model.num_query_groups ({model.num_query_groups}) is not divisible by "
            f"parallel.tensor ({tensor_parallel}): pick a tensor-parallel size that divides it"
        )
    if model.ffn_hidden_size % tensor_parallel:
        raise ConfigError(
            f"model.ffn_hidden_size ({model.ffn_hidden_size}) is not divisible by "
            f"parallel.tensor ({tensor_parallel})"
        )
    if model.transformer_impl not in ("auto", "local", "transformer_engine"):
        raise ConfigError(
            f"model.transformer_impl={model.transformer_impl!r}: use auto, local or "
            "transformer_engine"
        )
