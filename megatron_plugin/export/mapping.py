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

Each weight is one `Weight` record: its Megatron names (both layer specs), its HF names and shapes,
and the split (export) and join (import) between them. Export, import and their shape checks all
iterate `model_weights`, so a weight is described once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

Shape = Tuple[int, ...]

# Keys of whole (non-layer) tensors in a Megatron checkpoint, and their Hugging Face names.
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
HF_EMBEDDING = "model.embed_tokens.weight"
HF_LM_HEAD = "lm_head.weight"
HF_FINAL_NORM = "model.norm.weight"

MEGATRON_LAYERS = "decoder.layers"
HF_LAYERS = "model.layers"


@dataclass(frozen=True)
class Shapes:
    """The sizes the layouts depend on. vocab_size: rows of the vocabulary tensors in HF;
    padded_vocab_size: their rows in Megatron (padded for TP), needed only to import."""

    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    head_dim: int
    vocab_size: int = 0
    padded_vocab_size: int = 0

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


def model_shapes(model, padded_vocab_size: int = 0) -> Shapes:
    """The Shapes of a ModelConfig."""
    return Shapes(
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        head_dim=model.head_dim,
        vocab_size=model.vocab_size,
        padded_vocab_size=padded_vocab_size,
    )


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


def _same(tensor: torch.Tensor, shapes: Shapes) -> Sequence[torch.Tensor]:
    return (tensor,)


def _only(tensors: Sequence[torch.Tensor], shapes: Shapes) -> torch.Tensor:
    (tensor,) = tensors
    return tensor


def _unpad_vocab(tensor: torch.Tensor, shapes: Shapes) -> Sequence[torch.Tensor]:
    # The padded rows are never produced by the tokenizer; HF has exactly vocab_size rows.
    return (tensor[: shapes.vocab_size],)


def _pad_vocab(tensors: Sequence[torch.Tensor], shapes: Shapes) -> torch.Tensor:
    (tensor,) = tensors
    padding = tensor.new_zeros((shapes.padded_vocab_size - tensor.shape[0],) + tuple(tensor.shape[1:]))
    return torch.cat([tensor, padding])


@dataclass(frozen=True)
class Weight:
    """One weight of the model in both formats, and the conversion each way.

    `megatron` is the checkpoint key (relative to decoder.layers for a layer weight): the
    Transformer Engine spec's name, which checkpoints of the local spec use too, since that spec
    maps its norms onto these names when it saves. `local` is the local spec's parameter name
    where it differs (what a GPTModel built with it calls the parameter, and what older
    checkpoints may hold). `hf` are the HF names (relative to model.layers.N), in HF's usual
    order; `split` turns the Megatron tensor into them and `join` back."""

    role: str
    megatron: str
    hf: Tuple[str, ...]
    hf_shapes: Callable[[Shapes], Tuple[Shape, ...]]
    local: Optional[str] = None
    split: Callable[[torch.Tensor, Shapes], Sequence[torch.Tensor]] = _same
    join: Callable[[Sequence[torch.Tensor], Shapes], torch.Tensor] = _only
    per_layer: bool = True
    # Absent from a model whose output layer shares the embedding.
    untied_only: bool = False

    @property
    def megatron_keys(self) -> Tuple[str, ...]:
        """The relative checkpoint keys that may hold this weight, the preferred first."""
        return (self.megatron,) + ((self.local,) if self.local else ())

    def megatron_name(self, layer: Optional[int] = None, local_spec: bool = False) -> str:
        """The parameter name inside a (non-stacked) GPTModel built with the local or TE spec."""
        name = self.local if (local_spec and self.local) else self.megatron
        return per_layer_key(layer, name) if self.per_layer else name

    def hf_names(self, layer: Optional[int] = None) -> List[str]:
        return [hf_layer_name(layer, n) for n in self.hf] if self.per_layer else list(self.hf)

    def megatron_shape(self, shapes: Shapes) -> Shape:
        """The Megatron tensor's shape: its HF tensors stacked along rows (vocabulary padding aside)."""
        parts = self.hf_shapes(shapes)
        return (sum(p[0] for p in parts),) + tuple(parts[0][1:])


def _norm(shapes: Shapes) -> Tuple[Shape, ...]:
    return ((shapes.hidden_size,),)


def _vocab(shapes: Shapes) -> Tuple[Shape, ...]:
    return ((shapes.vocab_size, shapes.hidden_size),)


def _qkv(s: Shapes) -> Tuple[Shape, ...]:
    h, d = s.hidden_size, s.head_dim
    return (s.num_attention_heads * d, h), (s.num_query_groups * d, h), (s.num_query_groups * d, h)


INPUT_LAYERNORM = Weight(
    "input_layernorm", "self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",), _norm,
    local="input_layernorm.weight",
)
QKV = Weight(
    "qkv", "self_attention.linear_qkv.weight",
    ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), _qkv,
    split=split_qkv, join=lambda parts, shapes: join_qkv(*parts, shapes),
)
PROJ = Weight(
    "proj", "self_attention.linear_proj.weight", ("self_attn.o_proj.weight",),
    lambda s: ((s.hidden_size, s.num_attention_heads * s.head_dim),),
)
POST_ATTENTION_LAYERNORM = Weight(
    "post_attention_layernorm", "mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",), _norm,
    local="pre_mlp_layernorm.weight",
)
FC1 = Weight(
    "fc1", "mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    lambda s: ((s.ffn_hidden_size, s.hidden_size), (s.ffn_hidden_size, s.hidden_size)),
    split=split_fc1, join=lambda parts, shapes: join_fc1(*parts),
)
FC2 = Weight(
    "fc2", "mlp.linear_fc2.weight", ("mlp.down_proj.weight",), lambda s: ((s.hidden_size, s.ffn_hidden_size),),
)
LAYER_WEIGHTS: Tuple[Weight, ...] = (INPUT_LAYERNORM, QKV, PROJ, POST_ATTENTION_LAYERNORM, FC1, FC2)

EMBEDDING_WEIGHT = Weight(
    "embedding", EMBEDDING, (HF_EMBEDDING,), _vocab, split=_unpad_vocab, join=_pad_vocab, per_layer=False,
)
FINAL_NORM_WEIGHT = Weight("final_norm", FINAL_NORM, (HF_FINAL_NORM,), _norm, per_layer=False)
OUTPUT_WEIGHT = Weight(
    "output_layer", OUTPUT_LAYER, (HF_LM_HEAD,), _vocab, split=_unpad_vocab, join=_pad_vocab, per_layer=False,
    untied_only=True,
)


def model_weights(num_layers: int, tied: bool) -> Iterator[Tuple[Weight, Optional[int]]]:
    """Every weight of a model as (record, layer), in the order of an HF checkpoint: embedding,
    the layers, final norm, output layer (absent when tied)."""
    yield EMBEDDING_WEIGHT, None
    for layer in range(num_layers):
        for weight in LAYER_WEIGHTS:
            yield weight, layer
    yield FINAL_NORM_WEIGHT, None
    if not tied:
        yield OUTPUT_WEIGHT, None


def hf_tensor_shapes(shapes: Shapes, num_layers: int, tied: bool) -> Dict[str, Shape]:
    """HF name -> shape of every tensor of the model, in `model_weights` order."""
    return {
        name: shape
        for weight, layer in model_weights(num_layers, tied)
        for name, shape in zip(weight.hf_names(layer), weight.hf_shapes(shapes))
    }


def hf_layer_name(layer: int, suffix: str) -> str:
    return f"{HF_LAYERS}.{layer}.{suffix}"


def stacked_layer_key(suffix: str) -> str:
    return f"{MEGATRON_LAYERS}.{suffix}"


def per_layer_key(layer: int, suffix: str) -> str:
    return f"{MEGATRON_LAYERS}.{layer}.{suffix}"
