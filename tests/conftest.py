"""Shared test helpers: running the package's entry points in fresh processes (several of them,
with gloo, where parallelism matters), and skipping GPU tests without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_plugin.runtime.distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (see docs/gpu.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def megatron_runtime():
    """Megatron's parallel state for one process (a gloo group of one), for tests that build models
    or datasets in the test process itself."""
    from megatron_plugin.config import ParallelConfig
    from megatron_plugin.runtime.distributed import init_distributed, shutdown

    runtime = init_distributed(ParallelConfig())
    yield runtime
    shutdown()


def child_env(threads: int = 2) -> dict:
    """The environment for a run started by a test: no inherited torch.distributed rendezvous."""
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {key: value for key, value in os.environ.items() if key not in rendezvous}
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run_python(args: list[str], nproc: int = 1, timeout: float = 300, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """`python ARGS` in a new process, or under torchrun with `nproc` processes (gloo on CPU)."""
    full_env = child_env(threads=1 if nproc > 1 else 2)
    if env:
        full_env.update(env)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port())] + args
    else:
        cmd = [sys.executable] + args
    # A session of its own: a test may kill the whole process group of the run it started.
    result = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
                            start_new_session=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"command failed ({result.returncode}): {' '.join(cmd)}\n--- stdout\n{result.stdout[-4000:]}"
            f"\n--- stderr\n{result.stderr[-6000:]}"
        )
    return result
