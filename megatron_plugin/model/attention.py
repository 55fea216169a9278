"""Core attention for Megatron-Core's local layer spec through PyTorch's fused SDPA.

Megatron-Core's local `DotProductAttention` materialises the [b, heads, s, s] score matrix, a
causal mask and a softmax copy. `scaled_dot_product_attention` with `is_causal=True` does the same
maths with flash / memory-efficient kernels on GPU and a fused kernel on CPU, and handles GQA
without repeating K/V (`enable_gqa`). Same interface and layouts as `DotProductAttention`:
q [sq, b, np, hn], k/v [sk, b, ng, hn] -> context [sq, b, np * hn].

With a KV cache the query can be shorter than the keys (sq < sk): the queries are the newest sq
positions. PyTorch's `is_causal` mask is aligned to the top-left corner, which would let a
one-token decode query see only the first key, so causal attention uses it only when sq == sk;
a single query attends to every key (no mask), and a chunk of queries gets the bottom-right
aligned causal mask. Megatron-Core passes `attn_mask_type=no_mask` on every step after the first
with its static inference context; for a causal layer that is only right when sq == 1, so the
layer's causal type, with the alignment above, decides.

Packed sequences (SFT rows holding several conversations) come as Megatron-Core's
`PackedSeqParams` in its "thd" format: q/k/v [t, heads, hn] with the sequence boundaries in
`cu_seqlens_q`. Each sequence gets its own causal attention, so no token attends across a
boundary; RoPE positions restart per sequence in Megatron's own rotary code on that path.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def _bottom_right_causal_mask(sq: int, sk: int, device: torch.device) -> torch.Tensor:
    """True where query i (at position sk - sq + i) may attend to key j (j <= sk - sq + i)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)


class SDPAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use the TE spec")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(f"SDPAttention supports causal attention only, got {attn_mask_type}")
        self.causal = attn_mask_type == AttnMaskType.causal
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention bias")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        sq, batch, heads, head_dim = query.shape
        # [s, b, n, d] -> [b, n, s, d]: the layout SDPA's kernels expect.
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        dropout_p = self.dropout_p if self.training else 0.0
        # Causal attention ignores attention_mask (GPTDataset gives no padding mask); a mask is
        # applied only to non-causal attention.
        mask = None
        is_causal = False
        sk = k.shape[2]
        if self.causal:
            if sq == sk:
                is_causal = True
            elif sq > 1:
                mask = _bottom_right_causal_mask(sq, sk, q.device)
        elif attention_mask is not None:
            mask = ~attention_mask
        kwargs = dict(
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:
            context = F.scaled_dot_product_attention(q, k, v, **kwargs)
        # [b, n, s, d] -> [s, b, n * d]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, heads * head_dim)

    def _packed(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params) -> torch.Tensor:
        """thd format: causal attention within each sequence of `cu_seqlens_q` (one SDPA call per
        sequence: the fused causal kernel, and no [t, t] mask for the whole pack)."""
        if params.qkv_format != "thd":
            raise ValueError(f"SDPAttention supports packed sequences in the thd format only, got {params.qkv_format}")
        if not torch.equal(params.cu_seqlens_q, params.cu_seqlens_kv):
            raise ValueError("SDPAttention needs the same packed sequences for queries and keys")
        if self.dropout_p > 0.0 and self.training:
            raise ValueError("SDPAttention supports no attention dropout with packed sequences")
        total, heads, head_dim = query.shape
        # [t, n, d] -> [1, n, t, d]
        q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))
        gqa = k.shape[1] != q.shape[1]
        bounds = params.cu_seqlens_q.tolist()
        if bounds[0] != 0 or bounds[-1] != total:
            raise ValueError(f"packed sequences cover tokens {bounds[0]}..{bounds[-1]} of {total}")
        parts = [
            F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=self.causal,
                                           scale=self.softmax_scale, enable_gqa=gqa)
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a
        ]
        # [1, n, t, d] -> [t, n * d]
        return torch.cat(parts, dim=2)[0].permute(1, 0, 2).reshape(total, heads * head_dim)


class RotatedKeyCacheSelfAttention:
    """Mixed into Megatron-Core's SelfAttention (see `self_attention_class`): with a static KV
    cache, each new key is rotated once, before it is cached. Megatron-Core caches keys unrotated
    and rotates every cached key again at every decode step (`k_pos_emb[:sequence_end]`), work that
    grows with the sequence; a rotation depends only on the key's own position, so rotating at
    write time gives the same keys."""

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
        rotate_at_write = (
            inference_context is not None
            and inference_context.is_static_batching()
            and isinstance(rotary_pos_emb, tuple)
            and rotary_pos_emb[1] is not None
            and not self.config.rotary_interleaved
            and not self.config.multi_latent_attention
        )
        if rotate_at_write:
            from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

            start = inference_context.sequence_len_offset
            key = apply_rotary_pos_emb(key, rotary_pos_emb[1][start: start + key.size(0)], config=self.config)
        query, key, value, rotary_pos_emb, mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        if rotate_at_write:
            rotary_pos_emb = (rotary_pos_emb[0], None)  # the cached keys are rotated already
        return query, key, value, rotary_pos_emb, mask_type, block_table


@functools.lru_cache(maxsize=None)
def self_attention_class():
    """Megatron-Core's SelfAttention with `RotatedKeyCacheSelfAttention` (the local spec's)."""
    from megatron.core.transformer.attention import SelfAttention

    return type("SelfAttention", (RotatedKeyCacheSelfAttention, SelfAttention), {})
