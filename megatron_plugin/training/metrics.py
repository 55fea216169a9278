"""Metrics: console lines with ETA, RUN/metrics.jsonl, TensorBoard. Rank 0 writes."""

from __future__ import annotations

import json
import math
import logging
import os
import time
from typing import Callable, Optional

logger = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class MetricsWriter:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def write_text(self, tag: str, text: str, step: int) -> None:
        """A text entry in TensorBoard (its Text tab); metrics.jsonl carries the data itself."""
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Throughput:
    """Tokens/s, TFLOP/s per device and MFU over the steps since the last log line, and an ETA
    from the mean step time of the whole run so far.

    The ETA leaves out the first window (start-up: first-step allocations, data loader warm-up)
    and the time between `restart()` and the last log (validation, checkpoint saves), so that it
    settles instead of following each window's noise.

    MFU is the achieved FLOP/s over `peak_flops`, which must be an upper bound. Should a window go
    faster than the peak (a CPU peak measured on a busy machine), the peak is raised to what was
    achieved, with a warning, through `on_peak_exceeded` (default: raise the cached CPU figure,
    `runtime.peak.note_achieved_flops`): MFU then reads at most 100% against a true bound.
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, world_size: int, peak_flops: float,
                 on_peak_exceeded: Optional[Callable[[float], Optional[float]]] = None):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak_flops = peak_flops
        self.on_peak_exceeded = on_peak_exceeded or _raise_cached_cpu_peak
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._windows = 0
        self._timed_steps = 0
        self._timed_seconds = 0.0

    def restart(self) -> None:
        self._window_start = time.perf_counter()
        self._window_steps = 0

    def step(self) -> None:
        self._window_steps += 1

    def measure(self) -> dict:
        elapsed = time.perf_counter() - self._window_start
        steps = max(self._window_steps, 1)
        self._windows += 1
        if self._windows <= 2:  # the first (start-up) window only stands in until a second one
            self._timed_steps, self._timed_seconds = steps, elapsed
        else:
            self._timed_steps += steps
            self._timed_seconds += elapsed
        tokens_per_s = self.tokens_per_step * steps / elapsed
        flops_per_device = self.flops_per_token * tokens_per_s / self.world_size
        if self.peak_flops and math.isfinite(self.peak_flops) and flops_per_device > self.peak_flops:
            raised = self.on_peak_exceeded(flops_per_device)  # logs when it raises a cached figure
            if raised is None:
                logger.warning("%.3g FLOP/s per device is above the peak %.3g used for MFU (check the "
                               "FLOPs count or the peak); MFU is computed against %.3g from now on",
                               flops_per_device, self.peak_flops, flops_per_device)
            self.peak_flops = raised or flops_per_device
        self.restart()
        return {
            "step_time_s": elapsed / steps,
            "mean_step_time_s": self.mean_step_time_s(),
            "tokens_per_s": tokens_per_s,
            "tflops_per_gpu": flops_per_device / 1e12,
            "mfu": flops_per_device / self.peak_flops if self.peak_flops else float("nan"),
        }

    def mean_step_time_s(self) -> float:
        return self._timed_seconds / self._timed_steps if self._timed_steps else float("nan")

    def eta_s(self, remaining_steps: int) -> float:
        """Seconds left for `remaining_steps`, at the run's mean step time (see the class doc)."""
        return self.mean_step_time_s() * max(remaining_steps, 0)


def _raise_cached_cpu_peak(achieved: float) -> Optional[float]:
    from megatron_plugin.runtime.peak import note_achieved_flops

    return note_achieved_flops(achieved)


def console_line(record: dict, max_steps: int, eta_s: Optional[float]) -> str:
    parts = [
        f"step {record['step']}/{max_steps}",
        f"loss {record['loss']:.4f}",
        f"lr {record['lr']:.3e}",
    ]
    if record.get("grad_norm") is not None:
        parts.append(f"grad_norm {record['grad_norm']:.3f}")
    parts += [
        f"{record['tokens_per_s']:,.0f} tok/s",
        f"{record['tflops_per_gpu']:.2f} TFLOP/s/dev",
        f"MFU {100 * record['mfu']:.1f}%",
        f"ETA {format_duration(eta_s) if eta_s is not None else '?'}",
    ]
    return " | ".join(parts)
