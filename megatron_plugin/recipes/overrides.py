"""Hydra `key=value` overrides applied to a typed RunConfig (through OmegaConf's structured
configs, which reject unknown keys and values of the wrong type)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_plugin.config import ConfigError, RunConfig, data_parallel_size

# Hugging Face Trainer names used in the seed document -> our keys.
HF_ALIASES = {
    "max_steps": "train.max_steps",
    "save_steps": "checkpoint.interval",
    "logging_steps": "log.interval",
    "per_device_train_batch_size": "train.micro_batch_size",
    "learning_rate": "optim.lr",
    "warmup_steps": "optim.warmup_steps",
    # Sets train.global_batch_size = micro batch x accumulation x data-parallel size.
    "gradient_accumulation_steps": "train.global_batch_size",
}


@dataclass
class AppliedOverride:
    text: str
    key: str
    alias: str | None = None


def _all_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if OmegaConf.is_dict(value):
            keys += _all_keys(value, full + ".")
    return keys


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> tuple[RunConfig, list[AppliedOverride]]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    structured = OmegaConf.structured(cfg)
    parser = OverridesParser.create()
    applied = []
    accumulation = None
    for text in overrides:
        try:
            parsed = parser.parse_override(text)
        except HydraException as error:
            raise ConfigError(f"cannot parse override {text!r}: {error}; write key=value, e.g. optim.lr=1e-4") from error
        key = parsed.key_or_group
        if parsed.is_delete():
            raise ConfigError(f"override {text!r}: keys of a typed config cannot be deleted")
        alias = None
        if key in HF_ALIASES:
            alias, key = key, HF_ALIASES[key]
        if OmegaConf.select(structured, key, default="__missing__") == "__missing__":
            close = difflib.get_close_matches(key, _all_keys(structured) + list(HF_ALIASES), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `--show` prints every key"
            raise ConfigError(f"override {text!r}: there is no key {key!r}{hint}")
        value = parsed.value()
        if alias == "gradient_accumulation_steps":
            accumulation = value
        else:
            try:
                OmegaConf.update(structured, key, value, merge=False)
            except (OmegaConfBaseException, ValueError) as error:
                raise ConfigError(f"override {text!r}: {str(error).splitlines()[0]}") from error
        applied.append(AppliedOverride(text, key, alias))
    result: RunConfig = OmegaConf.to_object(structured)
    if accumulation is not None:
        if not isinstance(accumulation, int) or accumulation < 1:
            raise ConfigError(f"gradient_accumulation_steps={accumulation!r}: give a positive integer")
        dp = data_parallel_size(result.parallel, result.parallel.gpus)
        result.train.global_batch_size = result.train.micro_batch_size * accumulation * dp
    return result, applied
