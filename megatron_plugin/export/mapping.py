"""Megatron-Core GPTModel <-> Hugging Face Llama: tensor names and the fused-tensor layouts.

Megatron stores the decoder layers of a checkpoint stacked: one key per weight kind with the
layer index as an extra leading axis (`decoder.layers.mlp.linear_fc2.weight` has shape
[num_layers, hidden, ffn]), whatever the TP/PP layout it was trained with. Two of its weights are
fused where Llama keeps them apart:

- `linear_qkv.weight` is grouped per query group: for each of the `groups` KV heads, the rows of
  its `heads/groups` query heads, then its key head, then its value head (head_dim rows each).
- `linear_fc1.weight` is [gate; up] (SwiGLU), each ffn_hidden_size rows.

Non-interleaved RoPE in Megatron is the same rotate-half convention as HF Llama, so q/k rows need
no permutation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# Keys of whole (non-layer) tensors in a Megatron checkpoint.
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"

# Per-layer weights: our role name -> the layer-relative Megatron keys that may hold it. The
# local spec maps its norms onto the Transformer Engine names when it saves (so checkpoints of
# either spec read alike); the plain local names are accepted too.
LAYER_SOURCES: Dict[str, Tuple[str, ...]] = {
    "input_layernorm": ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    "qkv": ("self_attention.linear_qkv.weight",),
    "proj": ("self_attention.linear_proj.weight",),
    "post_attention_layernorm": ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    "fc1": ("mlp.linear_fc1.weight",),
    "fc2": ("mlp.linear_fc2.weight",),
}

# The HF names each layer role produces, in HF's usual order.
LAYER_TARGETS: Dict[str, Tuple[str, ...]] = {
    "input_layernorm": ("input_layernorm.weight",),
    "qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "proj": ("self_attn.o_proj.weight",),
    "post_attention_layernorm": ("post_attention_layernorm.weight",),
    "fc1": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "fc2": ("mlp.down_proj.weight",),
}

HF_EMBEDDING = "model.embed_tokens.weight"
HF_LM_HEAD = "lm_head.weight"
HF_FINAL_NORM = "model.norm.weight"


def hf_layer_name(layer: int, suffix: str) -> str:
    return f"model.layers.{layer}.{suffix}"


def stacked_layer_key(suffix: str) -> str:
    return f"decoder.layers.{suffix}"


def per_layer_key(layer: int, suffix: str) -> str:
    return f"decoder.layers.{layer}.{suffix}"


@dataclass(frozen=True)
class Shapes:
    """The sizes the layouts depend on."""

    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def hf_shapes(self, role: str) -> List[Tuple[int, ...]]:
        """Shapes of the HF tensors a layer role produces (same order as LAYER_TARGETS)."""
        h, d = self.hidden_size, self.head_dim
        if role in ("input_layernorm", "post_attention_layernorm"):
            return [(h,)]
        if role == "qkv":
            return [
                (self.num_attention_heads * d, h),
                (self.num_query_groups * d, h),
                (self.num_query_groups * d, h),
            ]
        if role == "proj":
            return [(h, self.num_attention_heads * d)]
        if role == "fc1":
            return [(self.ffn_hidden_size, h), (self.ffn_hidden_size, h)]
        if role == "fc2":
            return [(h, self.ffn_hidden_size)]
        raise KeyError(role)


def split_qkv(qkv: torch.Tensor, shapes: Shapes) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's group-interleaved [q..., k, v] x groups rows -> (q, k, v) in HF's head order."""
    g, qpg, d = shapes.num_query_groups, shapes.heads_per_group, shapes.head_dim
    expected = (g * (qpg + 2) * d, shapes.hidden_size)
    if tuple(qkv.shape) != expected:
        raise ValueError(f"linear_qkv.weight has shape {tuple(qkv.shape)}, expected {expected}")
    grouped = qkv.view(g, (qpg + 2) * d, shapes.hidden_size)
    q = grouped[:, : qpg * d].reshape(g * qpg * d, shapes.hidden_size)
    k = grouped[:, qpg * d : (qpg + 1) * d].reshape(g * d, shapes.hidden_size)
    v = grouped[:, (qpg + 1) * d :].reshape(g * d, shapes.hidden_size)
    return q, k, v


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shapes: Shapes) -> torch.Tensor:
    """Inverse of `split_qkv`."""
    g, qpg, d, h = shapes.num_query_groups, shapes.heads_per_group, shapes.head_dim, shapes.hidden_size
    grouped = torch.cat(
        [q.reshape(g, qpg * d, h), k.reshape(g, d, h), v.reshape(g, d, h)], dim=1
    )
    return grouped.reshape(g * (qpg + 2) * d, h)


def split_fc1(fc1: torch.Tensor, shapes: Shapes) -> Tuple[torch.Tensor, torch.Tensor]:
    """Megatron's [gate; up] -> (gate, up)."""
    expected = (2 * shapes.ffn_hidden_size, shapes.hidden_size)
    if tuple(fc1.shape) != expected:
        raise ValueError(f"linear_fc1.weight has shape {tuple(fc1.shape)}, expected {expected}")
    return fc1[: shapes.ffn_hidden_size], fc1[shapes.ffn_hidden_size :]


def join_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_role(role: str, tensor: torch.Tensor, shapes: Shapes) -> Sequence[torch.Tensor]:
    """One Megatron layer tensor -> the HF tensors of LAYER_TARGETS[role]."""
    if role == "qkv":
        return split_qkv(tensor, shapes)
    if role == "fc1":
        return split_fc1(tensor, shapes)
    return (tensor,)


def join_role(role: str, tensors: Sequence[torch.Tensor], shapes: Shapes) -> torch.Tensor:
    """The HF tensors of LAYER_TARGETS[role] -> one Megatron layer tensor."""
    if role == "qkv":
        return join_qkv(*tensors, shapes)
    if role == "fc1":
        return join_fc1(*tensors)
    (tensor,) = tensors
    return tensor


def megatron_param_name(layer: Optional[int], role: str, local_spec: bool = True) -> str:
    """The parameter name inside a (non-stacked) GPTModel built with our layer spec."""
    names = {
        "input_layernorm": (
            "input_layernorm.weight" if local_spec else "self_attention.linear_qkv.layer_norm_weight"
        ),
        "qkv": "self_attention.linear_qkv.weight",
        "proj": "self_attention.linear_proj.weight",
        "post_attention_layernorm": (
            "pre_mlp_layernorm.weight" if local_spec else "mlp.linear_fc1.layer_norm_weight"
        ),
        "fc1": "mlp.linear_fc1.weight",
        "fc2": "mlp.linear_fc2.weight",
    }
    return f"decoder.layers.{layer}.{names[role]}"
