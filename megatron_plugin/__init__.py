"""megatron_plugin: pretrain Llama-style models with Megatron-Core, from raw text to Hugging Face."""
__version__ = "0.1.0"
