"""Shared test helpers: running the package's entry points in fresh processes (several of them,
with gloo, where parallelism matters), and skipping GPU tests without CUDA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from megatron_plugin.runtime.distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The tests to run on the second Megatron-Core line too (Python 3.12, megatron-core 0.19: `pytest
# -m both_lines`): those that go through an API or file format in which the two lines differ
# (runtime/mcore_compat.py, cpu_mode.py, expected_warnings.py, checkpoint_layout.py), one or more per
# difference. The rest of the suite exercises the package's own code above those APIs the same way
# on both lines; running all of it twice does not fit CI's time on two cores.
BOTH_LINES = {
    "tests/test_mcore_versions.py": "each line's checkpoints, read by the other",
    "tests/test_warnings.py": "each line's expected Megatron-Core warnings and log records",
    "tests/test_cpu_mode.py": "CPU mode's adapters for each line's CUDA-only calls",
    "tests/test_generate_attention.py": "the static inference context and wrapper (mcore_compat.inference_wrapper)",
    "tests/test_packed_attention.py": "PackedSeqParams through Megatron-Core's attention",
    "tests/test_export_roundtrip.py": "the weight mapping onto each line's GPTModel",
    "tests/test_training.py::test_resume_after_sigkill_is_exact": "dist checkpointing, optimizer state and resume",
    "tests/test_training.py::test_async_save_gives_the_same_run_and_resumable_checkpoints":
        "the async checkpoint writer (mcore_compat.async_save_kwargs)",
    "tests/test_resume_parallel.py::test_dp2_resume_after_sigkill_is_exact[sync]":
        "the distributed optimizer's sharded state over two ranks (current_stream on 0.19)",
    "tests/test_generate.py::test_kv_cache_greedy_matches_full_recompute_and_transformers":
        "Megatron-Core's inference building blocks against transformers",
    "tests/test_generate.py::test_two_process_layouts_give_the_same_tokens_as_one_process[pp2]":
        "the pipeline-parallel inference forward (mcore_compat.pipeline_forward)",
    "tests/test_sft_training.py::test_the_loss_is_the_token_mean_of_the_global_batch_in_every_layout[pp2]":
        "calculate_per_token_loss and packed activations through the pipeline schedule",
    "tests/test_evaluate.py::test_split_valid_perplexity_equals_training_validation_loss":
        "GPTDataset's splits and index cache",
}


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.nodeid == key or item.nodeid.startswith(key + "::") for key in BOTH_LINES):
            item.add_marker(pytest.mark.both_lines)
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


def python_command(args: list[str], nproc: int = 1, env: dict | None = None) -> tuple[list[str], dict]:
    """The command line and environment of `python ARGS`, under torchrun when `nproc` > 1."""
    full_env = child_env(threads=1 if nproc > 1 else 2)
    if env:
        full_env.update(env)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port())] + args
    else:
        cmd = [sys.executable] + args
    return cmd, full_env


def start_python(args: list[str], nproc: int = 1, env: dict | None = None) -> subprocess.Popen:
    """`python ARGS` started in the background, in a session of its own; output discarded. Stop
    it with `kill_run`."""
    cmd, full_env = python_command(args, nproc, env)
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL a run started by `start_python` with every process under it: its process group, and
    torchrun's workers, which run in sessions of their own and would outlive their launcher."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(descendants, timeout=30)


def run_python(args: list[str], nproc: int = 1, timeout: float = 300, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """`python ARGS` in a new process, or under torchrun with `nproc` processes (gloo on CPU)."""
    cmd, full_env = python_command(args, nproc, env)
    # A session of its own: a test may kill the whole process group of the run it started.
    result = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
                            start_new_session=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"command failed ({result.returncode}): {' '.join(cmd)}\n--- stdout\n{result.stdout[-4000:]}"
            f"\n--- stderr\n{result.stderr[-6000:]}"
        )
    return result


def read_metrics(run_dir) -> tuple[dict, dict]:
    """A run's metrics.jsonl as (step -> training record, step -> validation record); later
    records of a step win."""
    train, val = {}, {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            (val if "val_loss" in record else train)[record["step"]] = record
    return train, val


def latest(run_dir) -> str | None:
    """The checkpoint name RUN/checkpoints/latest points at, or None."""
    pointer = os.path.join(run_dir, "checkpoints", "latest")
    return open(pointer).read().strip() if os.path.exists(pointer) else None


def kill_after_checkpoint(args: list[str], run_dir, checkpoints: tuple[str, ...], nproc: int = 1) -> int:
    """Start the run, SIGKILL every process of it as soon as `latest` names one of `checkpoints`,
    and return the step of the checkpoint it names then."""
    import time

    proc = start_python(args, nproc=nproc)
    try:
        deadline = time.time() + 300
        while latest(run_dir) not in checkpoints and time.time() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        kill_run(proc)  # the ranks and their checkpoint writers too
    return int(latest(run_dir).split("_")[1])
