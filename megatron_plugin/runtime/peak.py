"""Peak FLOP/s of the device, the denominator of MFU.

GPUs: the vendor's dense (no sparsity) tensor-core peak. CPUs have no such published figure for
our purposes, so it is measured: a large fp32 matrix multiply on the threads torch uses.
"""

from __future__ import annotations

import time

import torch

# Dense peaks in FLOP/s (NVIDIA data sheets; SXM parts).
GPU_PEAKS = {
    "h100": {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "fp32": 67e12},
    "h200": {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "fp32": 67e12},
    "a100": {"bf16": 312e12, "fp16": 312e12, "fp8": 312e12, "fp32": 19.5e12},
}


def gpu_kind(name: str) -> str | None:
    lowered = name.lower()
    for kind in GPU_PEAKS:
        if kind in lowered:
            return kind
    return None


def measure_cpu_matmul_peak(size: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of a size x size fp32 matmul, best of repeated runs over about `seconds`."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def device_peak_flops(dtype: str = "bf16", fp8: bool = False) -> tuple[float, str]:
    """(peak FLOP/s, a short description of where the figure comes from)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        kind = gpu_kind(name)
        if kind is None:
            return float("nan"), f"{name}: unknown GPU, no MFU"
        key = "fp8" if fp8 else dtype
        return GPU_PEAKS[kind][key], f"{name} dense {key} peak"
    peak = measure_cpu_matmul_peak()
    return peak, f"CPU fp32 matmul measured on {torch.get_num_threads()} threads"
