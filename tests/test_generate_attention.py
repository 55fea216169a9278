"""The SDPA core attention when the query is shorter than the keys (KV-cache decode steps).

PyTorch's `is_causal=True` mask is aligned to the top-left corner: with 1 query and n keys the
query sees only key 0. A decode step's query is the newest position, so it must see every key;
a chunk of several new queries must see the cache plus the causal part of the chunk
(bottom-right alignment). The reference here is explicit softmax attention with that mask.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_plugin.config import BuildConfig, PrecisionConfig
from megatron_plugin.recipes.presets import tiny_model


def _reference(q, k, v):
    """q [sq, b, nh, d], k/v [sk, b, ng, d] -> [sq, b, nh*d]; query i sits at position sk-sq+i."""
    sq, b, nh, d = q.shape
    sk, ng = k.shape[0], k.shape[2]
    k = k.repeat_interleave(nh // ng, dim=2)
    v = v.repeat_interleave(nh // ng, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(d)
    allowed = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v)
    return out.reshape(sq, b, nh * d)


@pytest.mark.parametrize("sq,sk", [(1, 9), (3, 9), (9, 9)])
def test_sdpa_attention_aligns_causal_mask_bottom_right(megatron_runtime, sq, sk):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_plugin.model import transformer_config
    from megatron_plugin.model.attention import SDPAttention

    config = transformer_config(BuildConfig(tiny_model(), PrecisionConfig(dtype="fp32")))
    core = SDPAttention(config, 1, AttnMaskType.causal, "self").eval()
    gen = torch.Generator().manual_seed(0)
    b = 2
    q = torch.randn(sq, b, config.num_attention_heads, config.kv_channels, generator=gen)
    k = torch.randn(sk, b, config.num_query_groups, config.kv_channels, generator=gen)
    v = torch.randn(sk, b, config.num_query_groups, config.kv_channels, generator=gen)
    expected = _reference(q, k, v)
    # Megatron-Core passes no_mask on every step after the first with a static KV cache and the
    # layer's own causal type otherwise; both must give causal attention over the cache.
    for mask_type in (None, AttnMaskType.causal, AttnMaskType.no_mask):
        got = core(q, k, v, None, attn_mask_type=mask_type)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
