"""ModelConfig <-> Hugging Face `LlamaConfig` fields (config.json, generation_config.json)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from megatron_plugin.config import ModelConfig
from megatron_plugin.errors import UserError

TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class UnsupportedModelError(UserError, ValueError):
    """An HF model our ModelConfig cannot express; the message names the field."""


def to_hf_config(
    model: ModelConfig,
    dtype: torch.dtype,
    bos_token_id: Optional[int],
    eos_token_id: Optional[int],
    pad_token_id: Optional[int] = None,
) -> Dict[str, Any]:
    """config.json for LlamaForCausalLM. Both the transformers 5 names (`dtype`,
    `rope_parameters`) and the 4.x names (`torch_dtype`, `rope_theta`) are written so either
    major version reads the same model."""
    import transformers

    theta = float(model.rotary_base)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_length,
        "rms_norm_eps": model.norm_epsilon,
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "tie_word_embeddings": bool(model.tie_embeddings),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": model.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": TORCH_DTYPE_NAMES[dtype],
        "dtype": TORCH_DTYPE_NAMES[dtype],
        "transformers_version": transformers.__version__,
    }


def generation_config(
    bos_token_id: Optional[int],
    eos_token_id: Optional[int],
    pad_token_id: Optional[int],
    end_of_turn_id: Optional[int] = None,
) -> Dict[str, Any]:
    """generation_config.json. With a chat tokenizer (`end_of_turn_id`, the template's
    `<|im_end|>`), generation stops at either token: a chat reply ends with the end of its turn,
    plain text with EOS. The plain EOS stays first, where `generate` takes its padding fallback."""
    import transformers

    eos: Any = eos_token_id
    if end_of_turn_id is not None and end_of_turn_id != eos_token_id:
        eos = [i for i in (eos_token_id, end_of_turn_id) if i is not None]
    config: Dict[str, Any] = {"bos_token_id": bos_token_id, "eos_token_id": eos}
    if pad_token_id is not None:
        config["pad_token_id"] = pad_token_id
    config["transformers_version"] = transformers.__version__
    return config


def _rope_theta(config: Dict[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling")
    for source, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value:
            rope_type = value.get("rope_type", value.get("type", "default"))
            if rope_type != "default":
                raise UnsupportedModelError(
                    f"config.json {source}.rope_type is {rope_type!r}; only plain RoPE "
                    "('default', no scaling) is supported"
                )
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if float(theta) != int(float(theta)):
        raise UnsupportedModelError(f"config.json rope_theta is {theta}; only whole-number bases are supported")
    return float(theta)


def from_hf_config(config: Dict[str, Any]) -> ModelConfig:
    """config.json -> ModelConfig, refusing (with the field named) what the model cannot express."""

    def need(field: str, ok: bool, wanted: str) -> None:
        if not ok:
            raise UnsupportedModelError(
                f"config.json {field} is {config.get(field)!r}; megatron_plugin models need {wanted}"
            )

    model_type = config.get("model_type")
    architectures = config.get("architectures") or ["LlamaForCausalLM"]
    need("model_type", model_type == "llama", "'llama'")
    need("architectures", "LlamaForCausalLM" in architectures, "['LlamaForCausalLM']")
    need("hidden_act", config.get("hidden_act", "silu") in ("silu", "swish"), "'silu' (SwiGLU)")
    need("attention_bias", not config.get("attention_bias", False), "false (no biases)")
    need("mlp_bias", not config.get("mlp_bias", False), "false (no biases)")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(config.get(field), int):
            raise UnsupportedModelError(f"config.json has no integer {field}")
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    groups = config.get("num_key_value_heads") or heads
    need("hidden_size", hidden % heads == 0, f"a multiple of num_attention_heads ({heads})")
    need("num_key_value_heads", heads % groups == 0, f"a divisor of num_attention_heads ({heads})")
    head_dim = config.get("head_dim")
    need("head_dim", head_dim in (None, hidden // heads),
         f"hidden_size / num_attention_heads = {hidden // heads}")
    return ModelConfig(
        vocab_size=config["vocab_size"],
        hidden_size=hidden,
        num_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=config["intermediate_size"],
        max_seq_length=config.get("max_position_embeddings", 2048),
        rotary_base=_rope_theta(config),
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=float(config.get("initializer_range", 0.02)),
    )
