"""Checkpoints across the two Megatron-Core lines: a tiny resumable checkpoint written by each
(tests/fixtures/mcore_versions, made by make_fixtures.py there) is read by whichever line runs
the tests. 0.19 reads both: resume (also at another data-parallel size) and export. 0.16 reads
its own and refuses 0.19's (common state inside the .distcp files, no common.pt) with one clear
error, for a resume, an export and generation alike."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from conftest import read_metrics, run_python
from megatron_plugin.checkpoint_layout import (CheckpointError, check_common_state, check_complete,
                                              common_state_in_data_files, iter_dir_name)

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mcore_versions"
_spec = importlib.util.spec_from_file_location("mcore_version_fixtures", FIXTURES / "make_fixtures.py")
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

VERSION = importlib.metadata.version("megatron-core")
LINE = fixtures.mcore_line(VERSION)
OTHER = {"0.16": "0.19", "0.19": "0.16"}.get(LINE)
if OTHER is None:
    pytest.skip(f"megatron-core {LINE} is not a supported line (0.16, 0.19)", allow_module_level=True)
# What this line reads: its own checkpoints, and on 0.19 those of 0.16 too.
READABLE = [LINE] + ([OTHER] if LINE == "0.19" else [])
STEP = fixtures.STEPS
SAMPLES_PER_STEP = 2  # train.global_batch_size in fixtures.OVERRIDES


def _run_dir(tmp_path: Path, line: str) -> Path:
    """A run folder whose checkpoints are a copy of the fixture of `line`."""
    run = tmp_path / f"run_{line}"
    shutil.copytree(fixtures.fixture_dir(line), run)
    return run


def _train(run: Path, steps: int, nproc: int = 1, extra: tuple = ()):
    args = ["-m", "megatron_plugin.recipes.run", fixtures.PRESET, f"run.dir={run}", f"train.max_steps={steps}",
            f"checkpoint.interval={steps}", "log.interval=1", *fixtures.OVERRIDES, *extra]
    return run_python(args, nproc=nproc, check=False, timeout=600)


def _ok(result) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def _refused(result) -> str:
    """The message of a command that stopped on the 0.19 checkpoint: exit 2, one error line."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-4000:]
    message = errors[0]
    for part in ("was written by Megatron-Core 0.19 or later", "no common.pt",
                 f"this environment has megatron-core {VERSION}",
                 "Python 3.12 environment with megatron-core 0.19", "python -m megatron_plugin.export --checkpoint",
                 "--from-hf HF_DIR", "checkpoint.load=HF_DIR"):
        assert part in message, message
    return message


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """(line, data-parallel size) -> (run folder, its output) of a run that resumed the fixture of
    `line` for one more step; each is run once for the module."""
    runs = {}

    def resume(line: str, dp: int = 1):
        if (line, dp) not in runs:
            run = _run_dir(tmp_path_factory.mktemp(f"resume_{line}_dp{dp}"), line)
            # micro batch x DP must divide the global batch of 2.
            extra = ("train.micro_batch_size=1",) if dp > 1 else ()
            runs[line, dp] = run, _ok(_train(run, STEP + 1, nproc=dp, extra=extra))
        return runs[line, dp]

    return resume


@pytest.mark.parametrize("line", READABLE)
def test_checkpoint_resumes_one_more_step(resumed, line):
    run, output = resumed(line)
    assert f"resumed from {run / 'checkpoints' / iter_dir_name(STEP)} at step {STEP}" in output
    state = json.loads((run / "checkpoints" / iter_dir_name(STEP + 1) / "train_state.json").read_text())
    assert state["step"] == STEP + 1
    assert state["consumed_samples"] == (STEP + 1) * SAMPLES_PER_STEP
    assert (run / "checkpoints" / "latest").read_text().strip() == iter_dir_name(STEP + 1)
    train, _ = read_metrics(run)
    assert sorted(train) == [STEP + 1]  # it continued, it did not start over


@pytest.mark.skipif(LINE != "0.19", reason="resharding 0.16's optimizer state is 0.19's to do")
def test_016_checkpoint_resumes_at_another_data_parallel_size(resumed):
    """Written at DP=1 with the distributed optimizer under 0.16, resumed at DP=2 under 0.19: the
    same step, data position and first loss as the DP=1 resume (up to the order of fp32 sums)."""
    run_dp1, _ = resumed("0.16", 1)
    run, output = resumed("0.16", 2)
    assert f"at step {STEP}" in output
    state = json.loads((run / "checkpoints" / iter_dir_name(STEP + 1) / "train_state.json").read_text())
    assert (state["step"], state["data_parallel"]) == (STEP + 1, 2)
    assert state["consumed_samples"] == (STEP + 1) * SAMPLES_PER_STEP
    loss_dp1 = read_metrics(run_dp1)[0][STEP + 1]["loss"]
    loss_dp2 = read_metrics(run)[0][STEP + 1]["loss"]
    assert loss_dp2 == pytest.approx(loss_dp1, rel=1e-5)


@pytest.mark.parametrize("line", READABLE)
def test_checkpoint_exports_and_transformers_reproduces_it(tmp_path, line):
    run = _run_dir(tmp_path, line)
    out = tmp_path / "hf"
    result = run_python(["-m", "megatron_plugin.export", "--checkpoint", str(run / "checkpoints"),
                         "--output", str(out), "--dtype", "fp32", "--verify"], check=False)
    output = _ok(result)
    assert "verify: " in output and ": OK" in output
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (16, 1)


@pytest.mark.skipif(LINE != "0.16", reason="only 0.16 cannot read 0.19's checkpoints")
def test_019_checkpoint_refused_on_resume(tmp_path):
    run = _run_dir(tmp_path, "0.19")
    message = _refused(_train(run, STEP + 1))
    assert str(run / "checkpoints" / iter_dir_name(STEP)) in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [iter_dir_name(STEP), "latest"]


@pytest.mark.skipif(LINE != "0.16", reason="only 0.16 cannot read 0.19's checkpoints")
def test_019_checkpoint_refused_on_export(tmp_path):
    run = _run_dir(tmp_path, "0.19")
    out = tmp_path / "hf"
    _refused(run_python(["-m", "megatron_plugin.export", "--checkpoint", str(run), "--output", str(out)],
                        check=False))
    assert not out.exists()


@pytest.mark.skipif(LINE != "0.16", reason="only 0.16 cannot read 0.19's checkpoints")
def test_019_checkpoint_refused_on_generate(tmp_path):
    run = _run_dir(tmp_path, "0.19")
    _refused(run_python(["-m", "megatron_plugin.generate", "--checkpoint", str(run), "--max-new-tokens", "2",
                         "Story 1:"], check=False))


def test_fixtures_keep_their_common_state_where_their_line_writes_it():
    """What the refusal is decided on: common.pt (0.16), the data files' index (0.19)."""
    for line, in_data_files in (("0.16", False), ("0.19", True)):
        ckpt = Path(fixtures.fixture_dir(line)) / "checkpoints" / iter_dir_name(STEP)
        assert common_state_in_data_files(ckpt) is in_data_files
        assert common_state_in_data_files(ckpt / "optimizer") is in_data_files


def test_check_complete_decides_in_the_process(tmp_path):
    """The same decision without a command: check_complete refuses 0.19's checkpoint exactly where
    this line cannot read it, and takes every checkpoint this line reads."""
    for line in ("0.16", "0.19"):
        ckpt = _run_dir(tmp_path, line) / "checkpoints" / iter_dir_name(STEP)
        if line in READABLE:
            check_complete(ckpt)
        else:
            with pytest.raises(CheckpointError, match="written by Megatron-Core 0.19 or later"):
                check_complete(ckpt)


def test_checkpoint_without_its_common_state_is_incomplete(tmp_path):
    ckpt = _run_dir(tmp_path, "0.16") / "checkpoints" / iter_dir_name(STEP)
    (ckpt / "optimizer" / "common.pt").unlink()
    check_complete(ckpt)  # the model part is whole: export and generation can read it
    with pytest.raises(CheckpointError, match="optimizer is incomplete: missing common.pt"):
        check_common_state(ckpt, with_optimizer=True)
    (ckpt / "common.pt").unlink()
    with pytest.raises(CheckpointError, match="incomplete: missing common.pt"):
        check_complete(ckpt)
    # Without the index's word for it, 0.19's metadata.json (no common backend) still tells.
    config = json.loads((ckpt / "metadata.json").read_text())
    config.pop("common_backend")
    (ckpt / "metadata.json").write_text(json.dumps(config))
    assert common_state_in_data_files(ckpt) is True
