"""The CPU kernels behind the training-throughput work, against Megatron-Core's own code, and the
throughput benchmark run end to end at a tiny size (that it works, not how fast)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_python


def _rope_reference(t, freqs):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False)


def _megatron_freqs(seq: int, dim: int, dtype=torch.float32):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    return torch.cat((freqs, freqs), dim=-1)[:, None, None, :].to(dtype)


def test_rotary_matches_megatron_forward_and_backward():
    from megatron_plugin.model.fused_ops import rotary

    torch.manual_seed(0)
    s, b, n, d = 12, 3, 4, 16
    freqs = _megatron_freqs(s, d)
    # A strided view, as Megatron's QKV split hands it over.
    mixed = torch.randn(s, b, n, 3 * d, requires_grad=True)
    x = mixed[..., d : 2 * d]
    grad = torch.randn(s, b, n, d)
    ours = rotary(x, freqs)
    (ours_grad,) = torch.autograd.grad(ours, mixed, grad)
    ref = _rope_reference(x, freqs)
    (ref_grad,) = torch.autograd.grad(ref, mixed, grad)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-6, atol=1e-6)


def test_rotary_gradcheck_double():
    from megatron_plugin.model.fused_ops import rotary

    x = torch.randn(5, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    freqs = _megatron_freqs(5, 8, torch.float64)
    assert torch.autograd.gradcheck(lambda t: rotary(t, freqs), (x,))


def test_rotary_under_inference_mode():
    """A model run under torch.inference_mode hands over inference tensors (no version counter)."""
    from megatron_plugin.model.fused_ops import rotary

    x = torch.randn(6, 1, 2, 8)
    with torch.inference_mode():
        freqs = _megatron_freqs(6, 8)
        ours = rotary(x, freqs)
    torch.testing.assert_close(ours, _rope_reference(x, _megatron_freqs(6, 8)), rtol=1e-6, atol=1e-6)


def test_rotary_of_slices_of_one_frequency_table():
    """Inference hands each layer slices of one table per step (the query's rows a:b, the keys'
    rows :b); each equals the rotation with that slice's own frequencies, also after the
    table is changed in place."""
    from megatron_plugin.model.fused_ops import rotary

    torch.manual_seed(0)
    table = _megatron_freqs(32, 8)
    for a, b in [(0, 32), (5, 6), (0, 6), (31, 32), (7, 19)]:
        x = torch.randn(b - a, 2, 3, 8)
        own = _megatron_freqs(32, 8)[a:b]
        torch.testing.assert_close(rotary(x, table[a:b]), _rope_reference(x, own), rtol=1e-6, atol=1e-6)
    x = torch.randn(4, 1, 2, 8)
    before = rotary(x, table[2:6])
    table.mul_(0.5)
    after = rotary(x, table[2:6])
    torch.testing.assert_close(after, _rope_reference(x, table[2:6].clone()), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(before, after)


def test_rotary_declines_other_layouts():
    from megatron_plugin.model.fused_ops import rotary

    interleaved = torch.randn(4, 1, 1, 8)  # halves differ: not cat((f, f))
    assert rotary(torch.randn(4, 1, 2, 8), interleaved) is None


def test_swiglu_matches_chunked_reference():
    from megatron_plugin.model.fused_ops import swiglu

    torch.manual_seed(0)
    x = torch.randn(6, 2, 10, requires_grad=True)
    grad = torch.randn(6, 2, 5)
    ours = swiglu(x)
    (ours_grad,) = torch.autograd.grad(ours, x, grad)
    a, b = torch.chunk(x, 2, dim=-1)
    ref = torch.nn.functional.silu(a) * b
    (ref_grad,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours_grad, ref_grad)
    xd = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (xd,))


def test_cpu_wgrad_accumulation_is_the_gemm():
    from megatron_plugin.runtime.cpu_mode import _CpuWgradAccumulation

    inp, grad_out = torch.randn(20, 6), torch.randn(20, 4)
    main_grad = torch.randn(4, 6)
    expected = main_grad + grad_out.t() @ inp
    _CpuWgradAccumulation.wgrad_gemm_accum_fp32(inp, grad_out, main_grad)
    torch.testing.assert_close(main_grad, expected)
    # bf16 activations into an fp32 buffer (grad_reduce_in_fp32)
    inp16, grad16 = inp.bfloat16(), grad_out.bfloat16()
    expected = main_grad + grad16.float().t() @ inp16.float()
    _CpuWgradAccumulation.wgrad_gemm_accum_fp32(inp16, grad16, main_grad)
    torch.testing.assert_close(main_grad, expected)


def test_fused_adamw_matches_default(megatron_runtime):
    """The switch use_fused_adam makes gives the same update as torch's default AdamW."""
    from megatron_plugin.runtime import cpu_mode

    class Holder:
        pass

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 5)) for _ in range(3)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    holder = Holder()
    holder.optimizer = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    reference = torch.optim.AdamW(twins, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    assert cpu_mode.use_fused_adam(holder) == 1
    assert all(group["fused"] and not group["foreach"] for group in holder.optimizer.param_groups)
    for _ in range(3):
        grads = [torch.randn(7, 5) for _ in params]
        for p, t, g in zip(params, twins, grads):
            p.grad, t.grad = g.clone(), g.clone()
        holder.optimizer.step()
        reference.step()
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t, rtol=1e-5, atol=1e-6)


def _run_benchmark(*options: str, nproc: int = 1) -> dict:
    """benchmarks/train_throughput.py for 2 steps of a one-layer model; its --json record."""
    result = run_python([
        "benchmarks/train_throughput.py", "--model", "small", "--seq", "32", "--micro-batch", "1",
        "--steps", "2", "--warmup", "1", "--json", *options,
        "model.num_layers=1", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.vocab_size=256",
    ], nproc=nproc, timeout=300)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_benchmark_runs_tiny_with_transformers_beside():
    record = _run_benchmark("--threads", "2", "--compare-hf")
    for key in ("step_time_s", "tokens_per_s", "tflops_per_device", "mfu", "peak_flops", "device", "params"):
        assert key in record
    assert record["params"] == record["hf"]["params"]
    assert record["step_time_s"] > 0 and record["hf"]["step_time_s"] > 0
    assert record["mfu"] > 0 and record["peak_flops"] > 0
    assert len(record["step_times_s"]) == 2 == len(record["hf"]["step_times_s"])


def test_benchmark_runs_tensor_parallel_two_processes():
    record = _run_benchmark("--threads", "1", "parallel.tensor=2", nproc=2)
    assert record["tensor_parallel"] == 2 and record["world_size"] == 2
    assert record["step_time_s"] > 0


def test_rms_norm_matches_torch():
    from megatron_plugin.model.fused_ops import RMSNorm, rms_norm

    torch.manual_seed(0)
    x = torch.randn(5, 3, 16, requires_grad=True)
    weight = torch.randn(16, requires_grad=True)
    grad = torch.randn(5, 3, 16)
    ours = rms_norm(x, weight, 1e-5)
    ours_grads = torch.autograd.grad(ours, (x, weight), grad)
    ref = torch.nn.functional.rms_norm(x, (16,), weight, 1e-5)
    ref_grads = torch.autograd.grad(ref, (x, weight), grad)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b)
    xd = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    wd = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction_apply(a, b), (xd, wd))
    norm = torch.nn.RMSNorm(16, eps=1e-5)
    norm.__class__ = RMSNorm
    assert set(norm.state_dict()) == {"weight"}


def _RMSNormFunction_apply(x, w):
    from megatron_plugin.model.fused_ops import _RMSNormFunction

    return _RMSNormFunction.apply(x, w, 1e-6)


def test_megatron_local_spec_uses_the_cpu_kernels(megatron_runtime):
    from megatron_plugin.config import BuildConfig, PrecisionConfig
    from megatron_plugin.model import build_gpt_model
    from megatron_plugin.model.fused_ops import RMSNorm
    from megatron_plugin.recipes.presets import tiny_model

    model = build_gpt_model(BuildConfig(tiny_model(), PrecisionConfig(dtype="fp32")))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert norms and all(type(m) is RMSNorm for m in norms)
    assert model.config.bias_activation_fusion
