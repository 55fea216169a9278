"""The CPU peak behind MFU: measured once per machine and thread count, cached, a true bound."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

from megatron_plugin.runtime import peak
from megatron_plugin.training.metrics import Throughput


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(peak.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(peak.PEAK_ENV, raising=False)
    return tmp_path / peak.CACHE_FILE


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU peak")
def test_cpu_peak_is_measured_once_and_then_read_from_the_cache(cache):
    first, how_first = peak.device_peak_flops("fp32")
    second, how_second = peak.device_peak_flops("fp32")
    assert first == second > 1e8  # re-measuring would give another figure every start
    assert "measured now" in how_first and "GEMM" in how_first and str(cache) in how_second
    entries = json.loads(cache.read_text())
    (key,) = entries
    assert peak.cpu_model() in key and f"{torch.get_num_threads()} threads" in key and "fp32" in key
    assert entries[key]["flops"] == first


def test_thread_count_and_dtype_have_their_own_figure(cache):
    threads = torch.get_num_threads()
    peak.cpu_peak_flops("fp32")
    torch.set_num_threads(1)
    try:
        peak.cpu_peak_flops("fp32")
    finally:
        torch.set_num_threads(threads)
    keys = sorted(json.loads(cache.read_text()))
    assert len(keys) == (2 if threads > 1 else 1)
    assert any("| 1 threads |" in key for key in keys)


def test_env_override(cache, monkeypatch):
    monkeypatch.setenv(peak.PEAK_ENV, "2.5e11")
    assert peak.cpu_peak_flops("fp32") == (2.5e11, f"CPU peak set by {peak.PEAK_ENV}")
    assert not cache.exists()


def test_the_measured_peak_bounds_a_gemm_measured_after_it(cache):
    bound, _ = peak.cpu_peak_flops("fp32")
    # The shapes of a small model's MLP: smaller GEMMs run below the large square ones measured.
    a, b = torch.randn(1024, 512), torch.randn(512, 1408)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(5):
        torch.mm(a, b)
    achieved = 5 * 2 * 1024 * 512 * 1408 / (time.perf_counter() - start)
    assert achieved <= bound


def test_mfu_never_passes_100_percent_the_low_peak_is_raised_loudly(cache, caplog):
    peak.cpu_peak_flops("fp32")
    (key,) = json.loads(cache.read_text())
    # A figure measured on a very busy machine.
    cache.write_text(json.dumps({key: {"flops": 1e3, "method": "test", "measured": "then"}}))
    low, _ = peak.cpu_peak_flops("fp32")
    assert low == 1e3
    throughput = Throughput(tokens_per_step=1000, flops_per_token=1e6, world_size=1, peak_flops=low)
    throughput.step()
    time.sleep(0.01)
    with caplog.at_level(logging.WARNING):
        record = throughput.measure()
    assert 0.99 <= record["mfu"] <= 1.0
    assert "above the cached CPU peak" in caplog.text
    raised = json.loads(cache.read_text())[key]["flops"]
    assert raised == pytest.approx(record["tflops_per_gpu"] * 1e12)
    assert peak.cpu_peak_flops("fp32")[0] == raised  # the next run starts from the raised bound


def test_eta_uses_the_mean_step_time_without_the_start_up_window():
    throughput = Throughput(tokens_per_step=10, flops_per_token=1.0, world_size=1, peak_flops=float("nan"))

    def window(steps, seconds_per_step):
        for _ in range(steps):
            throughput.step()
            time.sleep(seconds_per_step)
        return throughput.measure()

    first = window(1, 0.4)  # start-up: a slow first step
    assert first["mean_step_time_s"] == pytest.approx(first["step_time_s"])
    records = [window(2, seconds) for seconds in (0.02, 0.06, 0.02, 0.06)]
    # Per-window step times jump by 3x; the ETA's mean step time does not follow them.
    assert records[1]["step_time_s"] > 2 * records[0]["step_time_s"]
    assert throughput.mean_step_time_s() == pytest.approx(0.04, rel=0.35)
    assert throughput.eta_s(100) == pytest.approx(100 * throughput.mean_step_time_s())
    assert throughput.eta_s(100) < 0.25 * 100 * first["step_time_s"]
