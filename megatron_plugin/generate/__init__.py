"""Text generation from a training checkpoint (any TP/PP layout) or a Hugging Face Llama folder,
with a KV cache, on Megatron-Core's inference building blocks. CLI: `python -m
megatron_plugin.generate` (docs/generate.md)."""

from megatron_plugin.generate.api import TextGenerator, load_generator
from megatron_plugin.generate.during_training import greedy_continuations
from megatron_plugin.generate.engine import Generation, Generator, SamplingOptions
from megatron_plugin.generate.errors import GenerateError
from megatron_plugin.generate.loading import LoadedModel, load_model, resolve_source

__all__ = [
    "GenerateError",
    "Generation",
    "Generator",
    "LoadedModel",
    "SamplingOptions",
    "TextGenerator",
    "load_generator",
    "load_model",
    "greedy_continuations",
    "resolve_source",
]
