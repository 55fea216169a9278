"""Resume with several processes (gloo on CPU): exact at the same layout after a SIGKILL, at another
data-parallel size, refused with the way through where the optimizer state cannot follow, and one
run per run directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, kill_after_checkpoint, kill_run, latest, read_metrics, run_python, start_python

pytestmark = pytest.mark.slow

SMOKE = ["-m", "megatron_plugin.recipes.run", "smoke"]
# 12 steps, a checkpoint every 4, every loss logged, validation at the end only.
SHORT = ["train.max_steps=12", "checkpoint.interval=4", "log.interval=1", "eval.interval=100", "eval.iters=1"]
# A DP change only reorders the sums of the loss and of the gradients over ranks and micro-batches
# (fp32 rounding, ~1e-7 relative per sum); the first loss after the resume comes from the very
# weights saved and the same samples, so it agrees to well within this.
FIRST_LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def straight_dp1(tmp_path_factory):
    """One process, uninterrupted; it also generates the corpus the other runs share."""
    run_dir = tmp_path_factory.mktemp("straight_dp1")
    run_python(SMOKE + SHORT + [f"run.dir={run_dir}"])
    return run_dir


@pytest.fixture(scope="module")
def data(straight_dp1):
    return ["data.generate_corpus=false", f"data.paths=[{straight_dp1}/data/corpus_text_document]",
            f"data.tokenizer_model={straight_dp1}/data/tokenizer.model"]


@pytest.fixture(scope="module")
def straight_dp2(tmp_path_factory, data):
    """Two processes, data parallel with the distributed optimizer, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("straight_dp2")
    run_python(SMOKE + SHORT + data + [f"run.dir={run_dir}"], nproc=2)
    return run_dir


def _assert_same_run(got_dir, expected_dir, steps) -> None:
    got, _ = read_metrics(got_dir)
    expected, _ = read_metrics(expected_dir)
    assert sorted(got) == list(steps)
    for step in steps:
        assert got[step]["loss"] == expected[step]["loss"], f"step {step}"
        assert got[step]["lr"] == expected[step]["lr"], f"step {step}"
        assert got[step]["consumed_samples"] == expected[step]["consumed_samples"]


@pytest.mark.parametrize("saving", ["sync", "async"])
def test_dp2_resume_after_sigkill_is_exact(straight_dp2, data, tmp_path, saving):
    run_dir = tmp_path / "killed"
    args = SMOKE + SHORT + data + [f"checkpoint.async_save={str(saving == 'async').lower()}", f"run.dir={run_dir}"]
    resumed_from = kill_after_checkpoint(args, run_dir, ("iter_0000004", "iter_0000008"), nproc=2)
    os.remove(run_dir / "metrics.jsonl")  # keep only what the resumed run logs
    result = run_python(args, nproc=2)
    assert f"resumed from {run_dir}/checkpoints/iter_{resumed_from:07d}" in result.stderr
    _assert_same_run(run_dir, straight_dp2, range(resumed_from + 1, 13))


@pytest.mark.parametrize("layout", ["parallel.tensor=2", "parallel.pipeline=2"])
def test_model_parallel_times_dp2_resume_is_exact(data, tmp_path, layout):
    """Four processes: TP=2 x DP=2 and PP=2 x DP=2 resume bit for bit from a checkpoint mid-run."""
    straight = tmp_path / "straight"
    run_python(SMOKE + SHORT + data + [layout, f"run.dir={straight}"], nproc=4)
    resumed = tmp_path / "resumed"
    run_python(SMOKE + SHORT + data + [layout, f"checkpoint.resume={straight}/checkpoints/iter_0000008",
                                       f"run.dir={resumed}"], nproc=4)
    _assert_same_run(resumed, straight, range(9, 13))


@pytest.mark.parametrize("saved_dp,resumed_dp", [(2, 1), (1, 2), (2, 4)])
def test_resume_at_another_data_parallel_size(straight_dp1, straight_dp2, data, tmp_path, saved_dp, resumed_dp):
    """A requeued job on fewer or more processes: same global batch, same schedule, same data
    position; the losses follow the uninterrupted run's."""
    source = {1: straight_dp1, 2: straight_dp2}[saved_dp]
    # The uninterrupted run at the new layout (DP=1 and DP=2 were both run; DP=4 takes DP=2's, as
    # the two agree: test_uninterrupted_runs_agree_across_data_parallel_sizes).
    reference = {1: straight_dp1, 2: straight_dp2, 4: straight_dp2}[resumed_dp]
    run_dir = tmp_path / "resumed"
    # global batch 8 at DP=4 needs micro batches of 2 (smoke's are 4)
    micro = ["train.micro_batch_size=2"] if resumed_dp == 4 else []
    result = run_python(SMOKE + SHORT + data + micro + [f"checkpoint.resume={source}/checkpoints/iter_0000008",
                                                        f"run.dir={run_dir}"], nproc=resumed_dp)
    assert "resumed from" in result.stderr
    got, _ = read_metrics(run_dir)
    expected, _ = read_metrics(reference)
    assert sorted(got) == [9, 10, 11, 12]
    assert got[9]["loss"] == pytest.approx(expected[9]["loss"], rel=FIRST_LOSS_RTOL)
    for step in got:
        assert got[step]["lr"] == expected[step]["lr"]
        assert got[step]["consumed_samples"] == expected[step]["consumed_samples"]
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-3)


def test_uninterrupted_runs_agree_across_data_parallel_sizes(straight_dp1, straight_dp2):
    one, _ = read_metrics(straight_dp1)
    two, _ = read_metrics(straight_dp2)
    for step in one:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-3)


def test_tensor_parallel_change_with_the_distributed_optimizer_is_refused(straight_dp2, data, tmp_path):
    run_dir = tmp_path / "tp2"
    result = run_python(SMOKE + SHORT + data + ["parallel.tensor=2", f"run.dir={run_dir}",
                                                f"checkpoint.resume={straight_dp2}/checkpoints/iter_0000008"],
                        nproc=2, check=False)
    assert result.returncode != 0  # torchrun's own code for a failed rank; each rank exits 2
    assert "error: " in result.stderr and "only at TP=1 PP=1" in result.stderr and "--from-hf" in result.stderr
    assert f'File "{REPO}/megatron_plugin' not in result.stderr  # no traceback from the ranks
    assert not (run_dir / "metrics.jsonl").exists() or read_metrics(run_dir)[0] == {}


def test_optimizer_kind_change_is_refused(straight_dp1, data, tmp_path):
    run_dir = tmp_path / "plain"
    result = run_python(SMOKE + SHORT + data + ["parallel.distributed_optimizer=false", f"run.dir={run_dir}",
                                                f"checkpoint.resume={straight_dp1}/checkpoints/iter_0000008"],
                        check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Resume with parallel.distributed_optimizer=true" in result.stderr
    assert "Traceback" not in result.stderr


def _wait_for_training(run_dir, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        assert proc.poll() is None and time.time() < deadline, "the first run did not start training"
        time.sleep(0.05)


def test_second_run_in_a_live_run_dir_is_refused(data, tmp_path):
    run_dir = tmp_path / "run"
    args = SMOKE + data + ["train.max_steps=100000", "checkpoint.interval=100000", "log.interval=1",
                           f"run.dir={run_dir}"]
    first = start_python(args, nproc=2)
    try:
        _wait_for_training(run_dir, first)
        owner = json.loads((run_dir / "run.lock").read_text())
        second = run_python(args, check=False)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"PID {owner['pid']} on host {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the live run goes on
    finally:
        kill_run(first)


def test_stale_lock_is_taken_over_loudly(data, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a PID that no longer runs
    (run_dir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid,
                                                   "started": "earlier"}))
    result = run_python(SMOKE + data + ["train.max_steps=6", "checkpoint.interval=6", f"run.dir={run_dir}"])
    assert f"taking over the lock left by PID {gone.pid}" in result.stderr
    assert latest(run_dir) == "iter_0000006"
    assert not (run_dir / "run.lock").exists()  # released at the end
