"""Peak FLOP/s of the device, the denominator of MFU.

GPUs: the vendor's dense (no sparsity) tensor-core peak. CPUs have no such published figure for
our purposes, so it is measured: the best of several large matrix multiplies, in the training
dtype, on the threads torch uses. A one-off measurement on a busy machine reads low, and an MFU
against it can pass 100%; so the figure is measured once per machine (CPU model, thread count,
dtype, torch version) while no other rank of the run competes for the cores, cached on disk, and
raised (loudly) if training ever goes faster than it.

- cache: $MEGATRON_PLUGIN_CACHE_DIR, else $XDG_CACHE_HOME/megatron_plugin, else
  ~/.cache/megatron_plugin; file `cpu_peak_flops.json`. Delete it to measure again.
- override: MEGATRON_PLUGIN_CPU_PEAK_FLOPS=3.2e11 (FLOP/s per process) skips measuring.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from megatron_plugin import config

logger = logging.getLogger(__name__)

# Dense peaks in FLOP/s (NVIDIA data sheets; SXM parts).
GPU_PEAKS = {
    "h100": {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "fp32": 67e12},
    "h200": {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "fp32": 67e12},
    "a100": {"bf16": 312e12, "fp16": 312e12, "fp8": 312e12, "fp32": 19.5e12},
}

PEAK_ENV = "MEGATRON_PLUGIN_CPU_PEAK_FLOPS"
CACHE_DIR_ENV = "MEGATRON_PLUGIN_CACHE_DIR"
CACHE_FILE = "cpu_peak_flops.json"
# Square GEMM sizes measured, interleaved over several rounds so that a quiet moment is caught.
GEMM_SIZES = (1024, 2048)
GEMM_ROUNDS = 3
SECONDS_PER_GEMM = 0.3


def gpu_kind(name: str) -> str | None:
    lowered = name.lower()
    for kind in GPU_PEAKS:
        if kind in lowered:
            return kind
    return None


def cache_dir() -> Path:
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "megatron_plugin"


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform knows."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_peak_key(dtype: str, threads: int) -> str:
    return f"{cpu_model()} | {threads} threads | {dtype} | torch {torch.__version__.split('+')[0]}"


def measure_cpu_matmul_peak(dtype: str = "fp32", sizes=GEMM_SIZES, rounds: int = GEMM_ROUNDS,
                            seconds_per_gemm: float = SECONDS_PER_GEMM) -> float:
    """FLOP/s of the fastest square matmul seen: every size in `sizes`, `rounds` times, each
    repeated for about `seconds_per_gemm` (at least twice), on torch's current threads."""
    torch_dtype = config.torch_dtype(dtype) if dtype in config.DTYPE_NAMES else torch.float32
    generator = torch.Generator().manual_seed(0)
    operands = {n: (torch.randn(n, n, generator=generator).to(torch_dtype),
                    torch.randn(n, n, generator=generator).to(torch_dtype)) for n in sizes}
    best = 0.0
    for _ in range(rounds):
        for n, (a, b) in operands.items():
            torch.mm(a, b)  # warm-up: first-touch of the output, kernel selection
            deadline = time.perf_counter() + seconds_per_gemm
            repeats = 0
            while repeats < 2 or time.perf_counter() < deadline:
                start = time.perf_counter()
                torch.mm(a, b)
                best = max(best, 2 * n**3 / (time.perf_counter() - start))
                repeats += 1
    return best


@dataclass(frozen=True)
class _CpuPeakInUse:
    key: str
    path: Path


# The cache entry this process's MFU is computed against (see note_achieved_flops).
_in_use: Optional[_CpuPeakInUse] = None


@contextlib.contextmanager
def _locked_cache(path: Path) -> Iterator[dict]:
    """The cache's entries under an exclusive lock (ranks of one machine measure one at a time, and
    those that wait then find the figure); written back on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            try:
                entries = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                entries = {}
            before = json.dumps(entries, sort_keys=True)
            yield entries
            if json.dumps(entries, sort_keys=True) != before:
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
                os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cpu_peak_flops(dtype: str = "fp32") -> tuple[float, str]:
    """(peak FLOP/s of one process on this CPU at torch's current thread count, how the figure was
    obtained)."""
    global _in_use
    threads = torch.get_num_threads()
    if os.environ.get(PEAK_ENV):
        try:
            value = float(os.environ[PEAK_ENV])
        except ValueError:
            from megatron_plugin.errors import UserError

            raise UserError(f"{PEAK_ENV}={os.environ[PEAK_ENV]!r}: give FLOP/s as a number, e.g. 3.2e11") from None
        _in_use = None
        return value, f"CPU peak set by {PEAK_ENV}"
    key = cpu_peak_key(dtype, threads)
    path = cache_dir() / CACHE_FILE
    method = (f"best {dtype} GEMM of sizes {'/'.join(map(str, GEMM_SIZES))} x {GEMM_ROUNDS} rounds "
              f"on {threads} threads")
    with _locked_cache(path) as entries:
        entry = entries.get(key)
        if entry is None:
            flops = measure_cpu_matmul_peak(dtype)
            entry = {"flops": flops, "method": method, "measured": _now()}
            entries[key] = entry
            how = "measured now"
        else:
            how = f"measured {entry.get('measured', '?')}"
    _in_use = _CpuPeakInUse(key, path)
    return float(entry["flops"]), f"CPU {entry.get('method', method)}, {how}, cached in {path}"


def note_achieved_flops(achieved: float) -> Optional[float]:
    """Training reached `achieved` FLOP/s per process: if that is above the cached CPU peak in use,
    the measurement was low (a busy machine); raise the cached figure to it and return the new
    peak, else None. A GPU peak (a data-sheet bound) or an env override is never changed."""
    if _in_use is None or not achieved > 0:
        return None
    with _locked_cache(_in_use.path) as entries:
        entry = entries.get(_in_use.key)
        if entry is None or achieved <= entry["flops"]:
            return None
        logger.warning(
            "training ran at %.3g FLOP/s, above the cached CPU peak %.3g (measured on a busy machine?); "
            "the peak in %s is raised to it", achieved, entry["flops"], _in_use.path)
        entry.update(flops=achieved, method="training throughput above the GEMM measurement",
                     measured=_now())
    return achieved


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def device_peak_flops(dtype: str = "bf16", fp8: bool = False) -> tuple[float, str]:
    """(peak FLOP/s, a short description of where the figure comes from)."""
    global _in_use
    if torch.cuda.is_available():
        _in_use = None
        name = torch.cuda.get_device_name()
        kind = gpu_kind(name)
        if kind is None:
            return float("nan"), f"{name}: unknown GPU, no MFU"
        key = "fp8" if fp8 else dtype
        return GPU_PEAKS[kind][key], f"{name} dense {key} peak"
    return cpu_peak_flops(dtype)
