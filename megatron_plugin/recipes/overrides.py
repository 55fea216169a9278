"""Hydra `key=value` overrides applied to a typed RunConfig (through OmegaConf's structured
configs, which reject unknown keys and values of the wrong type)."""

from __future__ import annotations

import dataclasses
import difflib
import typing
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


def _field_type(key: str):
    """The annotation of a dotted key of RunConfig (e.g. train.max_steps -> int), or None."""
    cls = RunConfig
    hint = None
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        hint = cls = hints[part]
    return hint


def _describe(hint) -> tuple[str, str]:
    """(what a value of this type is, an example) for a message."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) is typing.Union and len(args) < len(typing.get_args(hint))
    base = args[0] if optional and len(args) == 1 else hint
    origin = typing.get_origin(base) or base
    kinds = {int: ("an integer", "10"), float: ("a number", "3e-4"), bool: ("true or false", "true"),
             str: ("a string", "text"), list: ("a list", "[a,b]")}
    what, example = kinds.get(origin, (getattr(origin, "__name__", str(origin)), ""))
    return (what + " or null" if optional else what), example


def _value_error(text: str, key: str, raw: str, value) -> str:
    """A message naming the key, the type it takes and the value given."""
    hint = _field_type(key)
    if hint is not None and dataclasses.is_dataclass(hint):
        first = dataclasses.fields(hint)[0].name
        return (f"override {text!r}: {key} is a group of keys, not a value; set one of them, "
                f"e.g. {key}.{first}=... (`--show` prints them all)")
    what, example = _describe(hint) if hint is not None else ("another type", "")
    if what.startswith("a list"):
        items = raw if not raw.startswith("[") else raw.strip("[]")
        return f"override {text!r}: {key} is a list; write {key}=[{items}] (brackets, comma-separated)"
    if value is None:
        return f"override {text!r}: {key} cannot be null; give {what}, e.g. {key}={example}"
    return (f"override {text!r}: {key} takes {what}, got {raw!r}"
            + (f"; e.g. {key}={example}" if example else ""))


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> tuple[RunConfig, list[AppliedOverride]]:
    """Apply every override; all that are wrong are reported together in one ConfigError."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    structured = OmegaConf.structured(cfg)
    parser = OverridesParser.create()
    applied = []
    errors: list[str] = []
    accumulation = None
    for text in overrides:
        try:
            parsed = parser.parse_override(text)
        except HydraException as error:
            errors.append(f"cannot parse override {text!r}: {str(error).splitlines()[0]}; write key=value, "
                          "e.g. optim.lr=1e-4")
            continue
        key = parsed.key_or_group
        if parsed.is_delete():
            errors.append(f"override {text!r}: keys of a typed config cannot be deleted")
            continue
        alias = None
        if key in HF_ALIASES:
            alias, key = key, HF_ALIASES[key]
        if OmegaConf.select(structured, key, default="__missing__") == "__missing__":
            close = difflib.get_close_matches(key, _all_keys(structured) + list(HF_ALIASES), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `--show` prints every key"
            errors.append(f"override {text!r}: there is no key {key!r}{hint}")
            continue
        value = parsed.value()
        raw = text.split("=", 1)[1] if "=" in text else ""
        if alias == "gradient_accumulation_steps":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                errors.append(f"override {text!r}: gradient_accumulation_steps takes a positive integer, "
                              f"got {raw!r}")
                continue
            accumulation = value
        else:
            try:
                OmegaConf.update(structured, key, value, merge=False)
            except (OmegaConfBaseException, ValueError):
                errors.append(_value_error(text, key, raw, value))
                continue
        applied.append(AppliedOverride(text, key, alias))
    if errors:
        raise ConfigError(_join(errors))
    result: RunConfig = OmegaConf.to_object(structured)
    if accumulation is not None:
        dp = data_parallel_size(result.parallel, result.parallel.gpus)
        result.train.global_batch_size = result.train.micro_batch_size * accumulation * dp
    return result, applied


def _join(errors: list[str]) -> str:
    if len(errors) == 1:
        return errors[0]
    return f"{len(errors)} problems with the overrides:\n" + "\n".join(f"  - {e}" for e in errors)
