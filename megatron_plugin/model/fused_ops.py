"""Rotary embedding, SwiGLU and RMSNorm for Megatron-Core's local layer spec on CPU, with
hand-written backward passes.

Megatron-Core's unfused implementations are written for readability: RoPE recomputes cos and sin
from the frequencies in every layer (for queries and keys separately), builds `rotate_half` with a
negation and a concatenation, slices and concatenates the (empty) unrotated part back on, and
autograd then records a zero-filled slice gradient and more concatenations; SwiGLU chunks the fc1
output, adds a 0.0 offset (a copy) and the backward concatenates the two half gradients; torch's
RMSNorm on CPU is a composite of pow / mean / rsqrt / mul whose autograd graph makes a dozen
passes over the activations. On a CPU,
where these element-wise passes run at memory bandwidth beside the GEMMs, they cost a noticeable
share of the step. The functions here compute the same values (to rounding) with the fewest
passes: cos/sin once per frequency tensor, each output half written in place, and gradients
written straight into one preallocated tensor.

`install()` routes Megatron-Core's `apply_rotary_pos_emb` (as its attention module calls it),
`bias_swiglu_impl` (as its MLP calls it when `bias_activation_fusion` is set) and the
`torch.nn.RMSNorm` that its local spec's `WrappedTorchNorm` builds (made an `RMSNorm` subclass
here: same parameters and state dict) through these for fp32 / CPU tensors in the cases they cover (no bias, standard non-interleaved RoPE over the whole head,
no packed sequences, no mscale); everything else, and every CUDA tensor, takes Megatron-Core's
own path unchanged.
"""

from __future__ import annotations

import torch

_installed = False
_original_rope = None
_original_swiglu = None

# cos / sin of the frequency tensors seen lately. Megatron's RotaryEmbedding returns the same
# (lru-cached) tensor to every layer, and inference slices it per step (the query's positions, the
# keys' positions): slices are served from the cos / sin of the tensor they view, so that a decode
# step computes no trigonometry.
_rope_cache: dict = {}
_ROPE_CACHE_ENTRIES = 4


def _version(t: torch.Tensor) -> int:
    # An inference tensor (a model run under torch.inference_mode) has no version counter.
    return 0 if t.is_inference() else t._version


def _full_cos_sin(freqs: torch.Tensor, dtype: torch.dtype):
    key = (id(freqs), _version(freqs), dtype)
    entry = _rope_cache.get(key)
    if entry is not None and entry[0] is freqs:
        return entry[1], entry[2]
    half = freqs.shape[-1] // 2
    first = freqs[..., :half]
    if not torch.equal(first, freqs[..., half:]):
        cos = sin = None  # not the cat((f, f)) layout this kernel assumes
    else:
        cos = torch.cos(first).to(dtype).contiguous()
        sin = torch.sin(first).to(dtype).contiguous()
    if len(_rope_cache) >= _ROPE_CACHE_ENTRIES:
        _rope_cache.pop(next(iter(_rope_cache)))
    _rope_cache[key] = (freqs, cos, sin)
    return cos, sin


def _cos_sin(freqs: torch.Tensor, dtype: torch.dtype):
    """cos / sin halves of freqs [s, 1, 1, d]; for a slice freqs = base[a:b] of a contiguous
    base, the rows a:b of the base's."""
    base = freqs._base
    if (base is not None and base.dim() == freqs.dim() and base.shape[1:] == freqs.shape[1:]
            and base.is_contiguous() and freqs.is_contiguous() and base.dtype == freqs.dtype):
        start, rest = divmod(freqs.storage_offset() - base.storage_offset(), base.stride(0))
        if rest == 0 and 0 <= start and start + freqs.shape[0] <= base.shape[0]:
            cos, sin = _full_cos_sin(base, dtype)
            if cos is None:
                return None, None
            return cos[start: start + freqs.shape[0]], sin[start: start + freqs.shape[0]]
    return _full_cos_sin(freqs, dtype)


class _RotaryFunction(torch.autograd.Function):
    """y = x * cos + rotate_half(x) * sin over the last dimension, rotate_half(x) = [-x2, x1]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        o1, o2 = out[..., :half], out[..., half:]
        torch.mul(x1, cos, out=o1)
        o1.addcmul_(x2, sin, value=-1)
        torch.mul(x2, cos, out=o2)
        o2.addcmul_(x1, sin)
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        g1, g2 = grad[..., :half], grad[..., half:]
        dx = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        d1, d2 = dx[..., :half], dx[..., half:]
        # The transpose of the rotation: dx1 = g1 cos + g2 sin, dx2 = g2 cos - g1 sin.
        torch.mul(g1, cos, out=d1)
        d1.addcmul_(g2, sin)
        torch.mul(g2, cos, out=d2)
        d2.addcmul_(g1, sin, value=-1)
        return dx, None, None


def rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor | None:
    """RoPE of x [s, b, n, d] with Megatron's freqs [s, 1, 1, d] (= cat(f, f)); None if freqs do not
    have that layout."""
    cos, sin = _cos_sin(freqs, x.dtype)
    if cos is None:
        return None
    return _RotaryFunction.apply(x, cos, sin)


class _SwiGLUFunction(torch.autograd.Function):
    """silu(a) * b for x = [a, b] split in halves over the last dimension."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        a, b = x[..., :half], x[..., half:]
        out = torch.nn.functional.silu(a)
        out.mul_(b)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        half = x.shape[-1] // 2
        a, b = x[..., :half], x[..., half:]
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        da, db = dx[..., :half], dx[..., half:]
        # d/db = grad * silu(a); d/da = grad * b * silu'(a)
        torch.mul(torch.nn.functional.silu(a), grad, out=db)
        torch.ops.aten.silu_backward.grad_input(grad * b, a, grad_input=da)
        return dx


def swiglu(x: torch.Tensor) -> torch.Tensor:
    return _SwiGLUFunction.apply(x)


class _RMSNormFunction(torch.autograd.Function):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        hidden = x.shape[-1]
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        rstd = torch.rsqrt(norm.square_().div_(hidden).add_(eps))
        out = torch.mul(x, rstd)
        out.mul_(weight)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        hidden = x.shape[-1]
        xhat = torch.mul(x, rstd)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mul(grad, xhat).reshape(-1, hidden).sum(0)
        gw = torch.mul(grad, weight)
        # dx = rstd * (g w - xhat * mean(g w xhat))
        dot = torch.mul(gw, xhat).sum(-1, keepdim=True).div_(hidden)
        grad_x = torch.addcmul(gw, xhat, dot, value=-1).mul_(rstd)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNormFunction.apply(x, weight, eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm whose fp32 CPU forward / backward go through `rms_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight is not None
            and self.weight.dtype == torch.float32
            and len(self.normalized_shape) == 1
        ):
            eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
            return rms_norm(x, self.weight, eps)
        return super().forward(x)


def _apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):
    if (
        t.device.type == "cpu"
        and cu_seqlens is None
        and mscale == 1.0
        and not config.apply_rope_fusion
        and not config.rotary_interleaved
        and not config.multi_latent_attention
        and freqs.dim() == 4
        and freqs.shape[-1] == t.shape[-1]
        and t.shape[-1] % 2 == 0
        and not freqs.requires_grad
    ):
        out = rotary(t, freqs)
        if out is not None:
            return out
    return _original_rope(t, freqs, config=config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)


def _bias_swiglu_impl(input, bias, fp8_input_store=False, cpu_offload_input=False):
    if input.device.type == "cpu" and bias is None and not fp8_input_store:
        return swiglu(input)
    return _original_swiglu(input, bias, fp8_input_store, cpu_offload_input)


def install() -> None:
    """Route Megatron-Core's RoPE, SwiGLU and torch RMSNorm through the functions above for CPU
    tensors."""
    global _installed, _original_rope, _original_swiglu
    if _installed:
        return
    import megatron.core.transformer.attention as attention
    import megatron.core.transformer.mlp as mlp
    import megatron.core.transformer.torch_norm as torch_norm

    _original_rope = attention.apply_rotary_pos_emb
    _original_swiglu = mlp.bias_swiglu_impl
    attention.apply_rotary_pos_emb = _apply_rotary_pos_emb
    mlp.bias_swiglu_impl = _bias_swiglu_impl

    wrapped_new = torch_norm.WrappedTorchNorm.__new__

    def _new(cls, *args, **kwargs):
        norm = wrapped_new(cls, *args, **kwargs)
        if type(norm) is torch.nn.RMSNorm:
            norm.__class__ = RMSNorm
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(_new)
    _installed = True
