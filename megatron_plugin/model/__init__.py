"""The Llama-style Megatron-Core GPTModel: build, FLOPs and parameter count."""

from megatron_plugin.model.build import build_gpt_model, transformer_config, uses_transformer_engine
from megatron_plugin.model.flops import flops_per_token, parameter_count

__all__ = [
    "build_gpt_model",
    "flops_per_token",
    "parameter_count",
    "transformer_config",
    "uses_transformer_engine",
]
