"""Checks made before anything runs; each message says what to change."""

from __future__ import annotations

import contextlib

from megatron_plugin.config import DATA_FORMATS, ConfigError, RunConfig, data_parallel_size, validate_model
from megatron_plugin.data.gpt_dataset import check_tokenizer_fits, parse_blend, require_prefixes


def validate(cfg: RunConfig, world_size: int, check_data: bool = True, cuda: bool | None = None) -> None:
    """Raise one ConfigError listing every problem found (not only the first)."""
    import torch

    problems = _Problems()
    p = cfg.parallel
    for name in ("tensor", "pipeline", "context"):
        if getattr(p, name) < 1:
            problems.add(f"parallel.{name}={getattr(p, name)}: must be 1 or more")
    dp = None
    if not problems:
        with problems.collect():
            dp = _data_parallel(p, world_size, cfg.run.name)
    with problems.collect():
        validate_model(cfg.model, max(p.tensor, 1))
    t = cfg.train
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        problems.add("train.micro_batch_size and train.global_batch_size must be positive")
    elif dp is not None and t.global_batch_size % (t.micro_batch_size * dp):
        problems.add(
            f"train.global_batch_size ({t.global_batch_size}) is not divisible by "
            f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp}) = "
            f"{t.micro_batch_size * dp}: change one of them (data-parallel size = world size "
            f"{world_size} / (TP x PP x CP))"
        )
    if p.pipeline >= 1 and cfg.model.num_layers % p.pipeline:
        problems.add(
            f"model.num_layers ({cfg.model.num_layers}) is not divisible by parallel.pipeline ({p.pipeline})"
        )
    if cfg.data.seq_length > cfg.model.max_seq_length:
        problems.add(
            f"data.seq_length ({cfg.data.seq_length}) is above model.max_seq_length "
            f"({cfg.model.max_seq_length}): lower data.seq_length or raise model.max_seq_length"
        )
    if cfg.precision.dtype not in ("fp32", "bf16", "fp16"):
        problems.add(f"precision.dtype={cfg.precision.dtype!r}: use fp32, bf16 or fp16")
    if t.max_steps < 1:
        problems.add(f"train.max_steps={t.max_steps}: must be 1 or more")
    elif cfg.optim.warmup_steps > t.max_steps:
        problems.add(
            f"optim.warmup_steps ({cfg.optim.warmup_steps}) is above train.max_steps ({t.max_steps}): "
            "lower the warmup"
        )
    if cfg.log.interval < 1:
        problems.add(f"log.interval={cfg.log.interval}: must be 1 or more")
    if cfg.checkpoint.keep < 1:
        problems.add(f"checkpoint.keep={cfg.checkpoint.keep}: keep at least 1 resumable checkpoint")
    with problems.collect():
        _validate_fp8(cfg, torch.cuda.is_available() if cuda is None else cuda)
    if check_data:
        with problems.collect():
            _validate_data(cfg)
    problems.raise_if_any()


class _Problems:
    """Messages gathered from every check of a config, raised together."""

    def __init__(self):
        self.messages: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.messages)

    def add(self, message: str) -> None:
        self.messages.append(message)

    @contextlib.contextmanager
    def collect(self):
        try:
            yield
        except ConfigError as error:
            self.messages.append(str(error))

    def raise_if_any(self) -> None:
        if len(self.messages) == 1:
            raise ConfigError(self.messages[0])
        if self.messages:
            raise ConfigError(f"{len(self.messages)} problems with the config:\n"
                              + "\n".join(f"  - {m}" for m in self.messages))


def _data_parallel(p, world_size: int, preset: str) -> int:
    """The data-parallel size, or a ConfigError that says how to start the processes needed."""
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        need = model_parallel * max(1, -(-world_size // model_parallel))
        raise ConfigError(
            f"parallel.tensor ({p.tensor}) x parallel.pipeline ({p.pipeline}) x parallel.context "
            f"({p.context}) = {model_parallel} processes per model copy, but this run has {world_size}: "
            f"start {need} processes (one per GPU; on CPU they share the cores), e.g. "
            f"`torchrun --nproc-per-node {need} -m megatron_plugin.recipes.run {preset} ...` or "
            f"`./start_training.sh --config {preset} --gpus {need} ...`; or lower the parallel.* sizes"
        )
    return data_parallel_size(p, world_size)


def _validate_fp8(cfg: RunConfig, cuda: bool) -> None:
    fp8 = cfg.precision.fp8
    if fp8 is None:
        return
    if fp8 not in ("hybrid", "e4m3"):
        raise ConfigError(f"precision.fp8={fp8!r}: use hybrid, e4m3 or null")
    if cfg.precision.fp8_recipe not in ("tensorwise", "delayed"):
        raise ConfigError(f"precision.fp8_recipe={cfg.precision.fp8_recipe!r}: use tensorwise or delayed")
    if not cuda:
        raise ConfigError("precision.fp8 needs a CUDA GPU with FP8 (Hopper or newer); set precision.fp8=null on this machine")
    import torch

    major, _ = torch.cuda.get_device_capability()
    if major < 9:
        raise ConfigError(
            f"precision.fp8 needs compute capability 9.0+ (H100/H200), this GPU has {major}.x; "
            "set precision.fp8=null"
        )
    try:
        import transformer_engine  # noqa: F401
    except Exception as error:
        raise ConfigError(
            f"precision.fp8 needs Transformer Engine ({error}); install the [gpu] extra or set precision.fp8=null"
        ) from error


def _validate_data(cfg: RunConfig) -> None:
    if cfg.data.format not in DATA_FORMATS:
        raise ConfigError(f"data.format={cfg.data.format!r}: use text (pretraining documents) or chat "
                          "(conversations from `preprocess sft`)")
    if cfg.data.is_chat:
        _validate_chat_data(cfg)
        return
    if cfg.data.uses_generated_corpus:
        if cfg.data.tokenizer_model:
            raise ConfigError(
                f"data.tokenizer_model={cfg.data.tokenizer_model} is given without data.paths, and "
                "data.generate_corpus=true would train on a generated corpus with its own tokenizer: "
                "give data.paths=[PREFIX] of the dataset made with this tokenizer, or drop data.tokenizer_model"
            )
        return
    require_prefixes(parse_blend(cfg.data.paths)[0])
    check_tokenizer_fits(cfg.data, cfg.model)


def _validate_chat_data(cfg: RunConfig) -> None:
    from megatron_plugin.data.training_data import chat_prefix

    data = cfg.data
    has_base = bool(cfg.checkpoint.load or cfg.checkpoint.base_preset)
    if not data.tokenizer_model and not has_base:
        raise ConfigError("data.format=chat needs the tokenizer of the model it fine-tunes: set checkpoint.load "
                          "(its tokenizer.model is used) or data.tokenizer_model")
    if not data.uses_generated_corpus:
        chat_prefix(data)
    if data.tokenizer_model:
        check_tokenizer_fits(data, cfg.model)
