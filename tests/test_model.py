"""The Megatron-Core model: exact parameter count and FLOPs, SDPA attention, training on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_plugin.config import BuildConfig, ModelConfig, ParallelConfig, PrecisionConfig
from megatron_plugin.model import flops_per_token, parameter_count
from megatron_plugin.recipes.presets import llama_1b2, tiny_model


def test_1b2_parameter_count_matches_transformers_llama():
    """An independent count: transformers' own Llama of the same shape, built on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = llama_1b2()
    hf_config = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False,
    )
    with torch.device("meta"):
        hf_model = LlamaForCausalLM(hf_config)
    expected = sum(p.numel() for p in hf_model.parameters())
    assert parameter_count(m) == expected
    assert 1.20e9 < expected < 1.22e9


def test_1b2_flops_per_token_matches_hand_count():
    """Enumerate the matrix multiplies of one sequence and count multiply-adds by hand."""
    s, h, layers, vocab, ffn = 1024, 2048, 24, 32000, 5632
    heads, groups, d = 16, 4, 128
    gemms = []  # (rows, inner, cols) per layer, forward, one sequence of s tokens
    gemms.append((s, h, heads * d))  # q
    gemms.append((s, h, groups * d))  # k
    gemms.append((s, h, groups * d))  # v
    # causal attention: per head, QK^T and P@V over half of the s x s score matrix
    gemms += [(s, d, s / 2)] * heads + [(s, s / 2, d)] * heads
    gemms.append((s, heads * d, h))  # attention output projection
    gemms += [(s, h, ffn), (s, h, ffn), (s, ffn, h)]  # gate, up, down
    macs = layers * sum(a * b * c for a, b, c in gemms) + s * h * vocab  # + output layer
    hand = 3 * 2 * macs / s  # forward + backward (2x forward), 2 FLOPs per multiply-add
    assert flops_per_token(llama_1b2(), seq_length=1024) == pytest.approx(hand, rel=1e-12)
    assert math.isclose(hand, 7_187_988_480, rel_tol=0)


def test_padded_vocab_and_parameter_count_of_built_model(megatron_runtime):
    from megatron_plugin.model import build_gpt_model

    model_cfg = ModelConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_attention_heads=4,
                            num_query_groups=2, ffn_hidden_size=160, max_seq_length=64)
    model = build_gpt_model(BuildConfig(model_cfg, PrecisionConfig(dtype="fp32")))
    built = sum(p.numel() for p in model.parameters())
    assert model_cfg.padded_vocab_size() == 1024
    assert built == parameter_count(model_cfg, padded_vocab=True)
    assert built - parameter_count(model_cfg) == 2 * 24 * 64


def test_local_spec_uses_sdpa_attention(megatron_runtime):
    from megatron_plugin.model import build_gpt_model
    from megatron_plugin.model.attention import SDPAttention

    model = build_gpt_model(BuildConfig(tiny_model(), PrecisionConfig(dtype="fp32")))
    cores = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "softmax_scale")]
    assert cores and all(isinstance(m, SDPAttention) for m in cores)


def test_sdpa_attention_matches_megatron_dot_product_attention(megatron_runtime):
    """Same inputs through our SDPA core and Megatron-Core's unfused DotProductAttention (GQA)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_plugin.model import transformer_config
    from megatron_plugin.model.attention import SDPAttention

    config = transformer_config(BuildConfig(tiny_model(), PrecisionConfig(dtype="fp32")))
    ours = SDPAttention(config, 1, AttnMaskType.causal, "self")
    reference = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    s, b = 16, 2
    q = torch.randn(s, b, config.num_attention_heads, config.kv_channels)
    k = torch.randn(s, b, config.num_query_groups, config.kv_channels)
    v = torch.randn(s, b, config.num_query_groups, config.kv_channels)
    expected = reference(q, k, v, None, AttnMaskType.causal)
    torch.testing.assert_close(ours(q, k, v, None), expected, rtol=1e-5, atol=1e-5)


def test_tiny_model_trains_on_cpu(megatron_runtime):
    """Plain loop over fixed random-walk sequences: the loss must fall well below ln(vocab)."""
    from megatron_plugin.model import build_gpt_model

    torch.manual_seed(0)
    model_cfg = tiny_model(vocab_size=256, seq=64)
    model = build_gpt_model(BuildConfig(model_cfg, PrecisionConfig(dtype="fp32")))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # A learnable sequence: each token is the previous plus a small step.
    starts = torch.randint(0, 256, (8, 1))
    tokens = (starts + torch.arange(65).unsqueeze(0) * 3) % 256
    positions = torch.arange(64).unsqueeze(0).expand(8, -1)
    losses = []
    for _ in range(30):
        loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 0.8 * math.log(256)
    assert losses[-1] < 0.5 * losses[0]
