"""Exact parameter count and training FLOPs per token (Megatron-LM's formula)."""

from __future__ import annotations

from megatron_plugin.config import ModelConfig


def parameter_count(model: ModelConfig, padded_vocab: bool = False, tensor_parallel: int = 1) -> int:
    """Parameters of the model. With `padded_vocab`, the embedding and output rows Megatron adds
    for tensor-parallel divisibility are counted too (what the GPTModel actually holds)."""
    vocab = model.padded_vocab_size(tensor_parallel) if padded_vocab else model.vocab_size
    h = model.hidden_size
    q = model.head_dim * model.num_attention_heads
    kv = model.head_dim * model.num_query_groups
    per_layer = (
        2 * h  # input and pre-MLP RMSNorm weights
        + h * (q + 2 * kv)  # fused QKV projection
        + q * h  # attention output projection
        + 3 * h * model.ffn_hidden_size  # SwiGLU: gate, up, down
    )
    embeddings = vocab * h * (1 if model.tie_embeddings else 2)
    return model.num_layers * per_layer + h + embeddings


def flops_per_token(model: ModelConfig, seq_length: int, tensor_parallel: int = 1) -> float:
    """Training FLOPs (forward + backward = 3x forward, 2 FLOPs per multiply-add) per token.

    Megatron-LM's `num_floating_point_operations` for a dense GQA model with a gated MLP and causal
    attention (half of the score matrix computed): per layer and token
    6 * (h*(q + 2kv) + q*h) for the projections, 6 * q * s for QK^T and attention x V, 18 * h * ffn
    for SwiGLU; plus 6 * h * V for the output layer (padded vocabulary, as computed)."""
    h = model.hidden_size
    q = model.head_dim * model.num_attention_heads
    kv = model.head_dim * model.num_query_groups
    per_layer = 6 * (h * (q + 2 * kv) + q * h) + 6 * q * seq_length + 18 * h * model.ffn_hidden_size
    logits = 6 * h * model.padded_vocab_size(tensor_parallel)
    return float(model.num_layers * per_layer + logits)
