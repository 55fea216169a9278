"""Metrics: console lines with ETA, RUN/metrics.jsonl, TensorBoard. Rank 0 writes."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional


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

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Throughput:
    """Tokens/s, TFLOP/s per device and MFU over the steps since the last log line."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, world_size: int, peak_flops: float):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak_flops = peak_flops
        self._window_start = time.perf_counter()
        self._window_steps = 0

    def restart(self) -> None:
        self._window_start = time.perf_counter()
        self._window_steps = 0

    def step(self) -> None:
        self._window_steps += 1

    def measure(self) -> dict:
        elapsed = time.perf_counter() - self._window_start
        steps = max(self._window_steps, 1)
        tokens_per_s = self.tokens_per_step * steps / elapsed
        tflops_per_device = self.flops_per_token * tokens_per_s / self.world_size / 1e12
        self.restart()
        return {
            "step_time_s": elapsed / steps,
            "tokens_per_s": tokens_per_s,
            "tflops_per_gpu": tflops_per_device,
            "mfu": tflops_per_device * 1e12 / self.peak_flops if self.peak_flops else float("nan"),
        }


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
