"""The training loop on CPU: exact resume, parallel layouts, resharding, failures, metrics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, child_env, kill_after_checkpoint, latest, read_metrics, run_python

SMOKE = ["-m", "megatron_plugin.recipes.run", "smoke"]
# Short, fast settings: 12 steps, a checkpoint and a validation every 4, a log line every step.
SHORT = ["train.max_steps=12", "checkpoint.interval=4", "log.interval=1", "eval.interval=4", "eval.iters=1"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    result = run_python(SMOKE + SHORT + [f"run.dir={run_dir}"])
    return run_dir, result


def _export(args: list[str], capsys) -> str:
    """`python -m megatron_plugin.export ARGS` in this process; its standard output."""
    from megatron_plugin.export.__main__ import main

    code = main(args)
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    return printed.out


def test_smoke_trains_and_metrics_are_complete(straight_run):
    run_dir, result = straight_run
    train, val = read_metrics(run_dir)
    assert sorted(train) == list(range(1, 13))
    assert train[12]["loss"] < 0.6 * train[1]["loss"]
    fields = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "mfu", "consumed_samples", "elapsed_s"}
    assert fields <= set(train[5])
    from megatron_plugin.model import flops_per_token
    from megatron_plugin.recipes.presets import get_preset

    cfg = get_preset("smoke")
    fpt = flops_per_token(cfg.model, cfg.data.seq_length)
    for record in train.values():
        assert record["tflops_per_gpu"] == pytest.approx(fpt * record["tokens_per_s"] / 1e12, rel=1e-9)
    assert train[12]["consumed_samples"] == 12 * cfg.train.global_batch_size
    assert set(val) == {4, 8, 12} and all(v["val_ppl"] > 1 for v in val.values())
    assert latest(run_dir) == "iter_0000012"
    assert os.path.isdir(os.path.join(run_dir, "tensorboard"))
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))
    assert "CPU mode on" in result.stderr


def test_resume_after_sigkill_is_exact(straight_run, tmp_path):
    straight_dir, _ = straight_run
    run_dir = tmp_path / "killed"
    resumed_from = kill_after_checkpoint(SMOKE + SHORT + [f"run.dir={run_dir}"], run_dir,
                                         ("iter_0000004", "iter_0000008"))
    assert resumed_from < 12
    result = run_python(SMOKE + SHORT + [f"run.dir={run_dir}"])
    assert f"resumed from" in result.stderr
    expected, _ = read_metrics(straight_dir)
    got, _ = read_metrics(run_dir)
    for step in range(resumed_from + 1, 13):
        assert got[step]["loss"] == expected[step]["loss"], f"step {step}"
        assert got[step]["lr"] == expected[step]["lr"]


# TP=2 with the plain optimizer, whose checkpoints reshard to any layout (the distributed
# optimizer's reload at another TP/PP is refused: test_resume_parallel.py).
TP2_PLAIN = "parallel.tensor=2 parallel.distributed_optimizer=false"


@pytest.mark.parametrize("layout", [TP2_PLAIN, "parallel.pipeline=2", "parallel.tensor=1"])
def test_parallel_layouts_train(layout, tmp_path, capsys):
    """TP=2, PP=2 and DP=2 (the distributed optimizer), each with two gloo processes."""
    run_dir = tmp_path / "run"
    run_python(SMOKE + ["train.max_steps=12", "log.interval=1", "eval.interval=12", "eval.iters=1",
                        "checkpoint.interval=12", *layout.split(), f"run.dir={run_dir}"], nproc=2)
    train, val = read_metrics(run_dir)
    assert train[12]["loss"] < 0.6 * train[1]["loss"]
    if layout == TP2_PLAIN:
        # the TP=2 checkpoint resumes at TP=1 with the same validation loss (validated at the start:
        # one more step on the same LR schedule, not saved, so that the run does not end at once)
        result = run_python(SMOKE + ["train.max_steps=13", "optim.decay_steps=12", "eval.at_start=true",
                                     "eval.iters=1", "checkpoint.interval=0", "parallel.distributed_optimizer=false",
                                     f"run.dir={run_dir}"])
        assert "resharded" in result.stderr and "validation at step 12" in result.stderr
        _, val_after = read_metrics(run_dir)
        assert val_after[12]["val_loss"] == pytest.approx(val[12]["val_loss"], rel=1e-5)
        # ... and exports to Hugging Face, whose logits match ours
        out = _export(["--checkpoint", str(run_dir / "checkpoints"), "--output", str(tmp_path / "hf"),
                       "--dtype", "fp32", "--verify"], capsys)
        assert "verify:" in out and "OK" in out
        assert (tmp_path / "hf" / "config.json").is_file()


def test_continued_pretraining_from_a_hugging_face_folder(straight_run, tmp_path, capsys):
    """Ours -> HF (fp32) -> ours: training starts from exactly the exported weights."""
    straight_dir, _ = straight_run
    _, val = read_metrics(straight_dir)
    _export(["--checkpoint", str(straight_dir / "checkpoints"), "--output", str(tmp_path / "hf"), "--dtype", "fp32"],
            capsys)
    run_dir = tmp_path / "continued"
    _export(["--from-hf", str(tmp_path / "hf"), "--output", str(run_dir / "checkpoints")], capsys)
    data = [f"data.paths=[{straight_dir}/data/corpus_text_document]", "data.generate_corpus=false",
            f"data.tokenizer_model={straight_dir}/data/tokenizer.model"]
    result = run_python(SMOKE + data + ["train.max_steps=5", "eval.at_start=true", "eval.iters=1",
                                        "eval.interval=5", "log.interval=1", f"run.dir={run_dir}"])
    assert "weights only: training starts at step 0" in result.stderr
    train, val_continued = read_metrics(run_dir)
    assert val_continued[0]["val_loss"] == pytest.approx(val[12]["val_loss"], rel=1e-5)
    assert sorted(train) == [1, 2, 3, 4, 5]


def _run_with_fault(fault: str, step: int, run_dir):
    """The smoke recipe with SHORT settings under tests/train_worker.py, which injects `fault` at `step`."""
    return run_python(["tests/train_worker.py", fault, str(step), "smoke"] + SHORT + [f"run.dir={run_dir}"],
                      check=False)


def test_crash_during_save_keeps_previous_latest(tmp_path):
    run_dir = tmp_path / "run"
    result = _run_with_fault("crash-save", 8, run_dir)
    assert result.returncode == -signal.SIGKILL
    assert latest(run_dir) == "iter_0000004"
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "iter_0000008.partial"))
    result = run_python(SMOKE + SHORT + [f"run.dir={run_dir}"])
    assert "resumed from" in result.stderr and "iter_0000004" in result.stderr
    assert latest(run_dir) == "iter_0000012"
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "iter_0000008.partial"))


def test_full_disk_fails_the_save_loudly(tmp_path):
    run_dir = tmp_path / "run"
    result = _run_with_fault("enospc", 8, run_dir)
    assert result.returncode != 0
    assert "No space left on device" in result.stderr and "iter_0000004" in result.stderr
    assert latest(run_dir) == "iter_0000004"
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "iter_0000004", "optimizer"))
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "iter_0000008.partial"))


def test_nan_loss_stops_with_the_step_named(tmp_path):
    run_dir = tmp_path / "run"
    result = _run_with_fault("nan", 6, run_dir)
    assert result.returncode != 0
    assert "loss is nan at step 6" in result.stderr
    assert latest(run_dir) == "iter_0000004"


def test_sigterm_saves_and_exits_zero(tmp_path):
    run_dir = tmp_path / "run"
    env = child_env()
    proc = subprocess.Popen([sys.executable] + SMOKE + ["train.max_steps=100000", "log.interval=1",
                                                        "checkpoint.interval=100000", f"run.dir={run_dir}"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGTERM received" in stderr
    saved = latest(run_dir)
    assert saved is not None
    train, _ = read_metrics(run_dir)
    assert int(saved.split("_")[1]) >= max(train)
    # the same LR schedule as the interrupted run, ending two steps after the checkpoint
    result = run_python(SMOKE + [f"train.max_steps={int(saved.split('_')[1]) + 2}", "optim.decay_steps=100000",
                                 "optim.warmup_steps=0", f"run.dir={run_dir}"])
    assert "resumed from" in result.stderr


def test_async_save_gives_the_same_run_and_resumable_checkpoints(straight_run, tmp_path):
    straight_dir, _ = straight_run
    expected, _ = read_metrics(straight_dir)
    run_dir = tmp_path / "async"
    run_python(SMOKE + SHORT + ["checkpoint.async_save=true", f"run.dir={run_dir}"])
    got, _ = read_metrics(run_dir)
    assert all(got[step]["loss"] == expected[step]["loss"] for step in expected)
    assert latest(run_dir) == "iter_0000012"
    # a checkpoint written in the background resumes exactly
    resumed_dir = tmp_path / "resumed"
    run_python(SMOKE + SHORT + [f"checkpoint.resume={run_dir}/checkpoints/iter_0000008", f"run.dir={resumed_dir}"])
    resumed, _ = read_metrics(resumed_dir)
    assert sorted(resumed) == list(range(9, 13))
    assert all(resumed[step]["loss"] == expected[step]["loss"] for step in resumed)


def test_bf16_mixed_precision_trains_checkpoints_and_exports(tmp_path, capsys):
    """bf16 parameters with fp32 master weights (Megatron's Float16Module + mixed-precision optimizer)."""
    run_dir = tmp_path / "bf16"
    run_python(SMOKE + ["train.max_steps=12", "checkpoint.interval=12", "log.interval=1", "eval.interval=12",
                        "eval.iters=1", "precision.dtype=bf16", f"run.dir={run_dir}"])
    train, _ = read_metrics(run_dir)
    assert train[12]["loss"] < 0.6 * train[1]["loss"]
    result = run_python(SMOKE + ["train.max_steps=14", "optim.decay_steps=12", "precision.dtype=bf16",
                                 f"run.dir={run_dir}"])
    assert "resumed from" in result.stderr and latest(run_dir) == "iter_0000014"
    out = _export(["--checkpoint", str(run_dir / "checkpoints"), "--output", str(tmp_path / "hf"), "--verify"], capsys)
    assert "verify:" in out and "OK" in out


def _straight_data(straight_dir) -> list[str]:
    return ["data.generate_corpus=false", f"data.paths=[{straight_dir}/data/corpus_text_document]",
            f"data.tokenizer_model={straight_dir}/data/tokenizer.model"]


@pytest.fixture(scope="module")
def named_data_run(straight_run, tmp_path_factory):
    """SHORT on the straight run's corpus named by path (no data.generate_corpus=false: naming a
    dataset is enough), a log line every 4 steps: the same training as the straight run."""
    straight_dir, _ = straight_run
    run_dir = tmp_path_factory.mktemp("named_data")
    run_python(SMOKE + SHORT + [f"data.paths=[{straight_dir}/data/corpus_text_document]",
                                f"data.tokenizer_model={straight_dir}/data/tokenizer.model", "log.interval=4",
                                f"run.dir={run_dir}"])
    return run_dir


def test_logged_loss_is_the_mean_over_the_log_interval(straight_run, named_data_run):
    straight_dir, _ = straight_run
    per_step, _ = read_metrics(straight_dir)  # log.interval=1: every step's own loss
    logged, _ = read_metrics(named_data_run)  # log.interval=4
    assert sorted(logged) == [4, 8, 12]
    for step, record in logged.items():
        window = [per_step[s]["loss"] for s in range(step - 3, step + 1)]
        assert record["loss"] == sum(window) / 4 and record["loss_steps"] == 4
        assert record["step_loss"] == per_step[step]["loss"]


def test_saves_and_the_end_of_the_run_are_reported(straight_run, tmp_path):
    straight_dir, result = straight_run
    for step in (4, 8, 12):
        assert f"saved checkpoint {straight_dir}/checkpoints/iter_{step:07d} in " in result.stderr
    assert "run finished: steps 0 -> 12 of 12, 12,288 tokens" in result.stderr
    _, val = read_metrics(straight_dir)
    best = min(val.values(), key=lambda v: v["val_loss"])
    assert f"(best {best['val_loss']:.4f} at step {best['step']})" in result.stderr
    assert f"python -m megatron_plugin.export --checkpoint {straight_dir}/checkpoints" in result.stderr
    # the same command again: nothing to do, and it says so
    run_dir = tmp_path / "copy"
    shutil.copytree(straight_dir, run_dir)
    again = run_python(SMOKE + SHORT + [f"run.dir={run_dir}"])
    assert "this run already finished" in again.stderr
    assert read_metrics(run_dir) == read_metrics(straight_dir)


def _damaged_copy(straight_dir, tmp_path, damage) -> str:
    """The straight run's checkpoints, copied, with `damage(iter_0000012 folder)` applied."""
    root = tmp_path / "checkpoints"
    shutil.copytree(straight_dir / "checkpoints", root)
    damage(root / "iter_0000012")
    return str(root)


def _largest_file(folder):
    files = [p for p in folder.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(straight_run, tmp_path):
    straight_dir, _ = straight_run
    truncated = {}

    def truncate(folder):
        victim = _largest_file(folder / "optimizer")
        truncated["path"] = victim
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)

    root = _damaged_copy(straight_dir, tmp_path, truncate)
    run_dir = tmp_path / "resumed"
    result = run_python(SMOKE + SHORT + _straight_data(straight_dir) + [f"checkpoint.resume={root}",
                                                                        f"run.dir={run_dir}"])
    assert f"{truncated['path']} has" in result.stderr and "is damaged" in result.stderr
    assert f"resumed from {root}/iter_0000008 at step 8" in result.stderr
    expected, _ = read_metrics(straight_dir)
    got, _ = read_metrics(run_dir)
    assert sorted(got) == list(range(9, 13))
    assert all(got[step]["loss"] == expected[step]["loss"] for step in got)


def test_damaged_checkpoint_named_by_path_is_refused(straight_run, tmp_path):
    straight_dir, _ = straight_run
    root = _damaged_copy(straight_dir, tmp_path, lambda folder: os.remove(folder / "train_state.json"))
    run_dir = tmp_path / "resumed"
    result = run_python(SMOKE + SHORT + _straight_data(straight_dir) + [f"checkpoint.resume={root}/iter_0000012",
                                                                        f"run.dir={run_dir}"], check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "iter_0000012 is damaged" in result.stderr and "train_state.json is missing" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run_dir / "metrics.jsonl").exists()


def test_smoke_trains_on_the_data_the_user_names(straight_run, named_data_run):
    straight_dir, _ = straight_run
    user_prefix = f"{straight_dir}/data/corpus_text_document"
    run_dir = named_data_run  # no data.generate_corpus=false: naming a dataset is enough
    assert latest(run_dir) == "iter_0000012"
    assert not (run_dir / "data").exists()  # nothing generated
    import yaml

    ran = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    saved = json.loads((run_dir / "checkpoints" / "iter_0000012" / "run_config.json").read_text())["data"]
    assert ran["paths"] == saved["paths"] == [user_prefix]
    # the generated corpus: config.yaml names what was generated, as the checkpoint does
    ran = yaml.safe_load((straight_dir / "config.yaml").read_text())["data"]
    saved = json.loads((straight_dir / "checkpoints" / "iter_0000012" / "run_config.json").read_text())["data"]
    assert ran["paths"] == saved["paths"] == [f"{straight_dir}/data/corpus_text_document"]


def test_smoke_refuses_a_dataset_that_does_not_exist(tmp_path):
    result = run_python(SMOKE + [f"data.paths=[{tmp_path}/nowhere_text_document]",
                                 f"data.tokenizer_model={tmp_path}/none.model", f"run.dir={tmp_path / 'run'}"],
                        check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{tmp_path}/nowhere_text_document" in result.stderr and "Traceback" not in result.stderr


def test_eval_prompts_log_greedy_continuations(straight_run, tmp_path, megatron_runtime, capsys):
    from megatron_plugin.generate.cli import main as generate_main

    straight_dir, _ = straight_run
    run_dir = tmp_path / "prompts"
    prompts = ["Story 3:", "The old"]
    result = run_python(SMOKE + _straight_data(straight_dir) + [
        "train.max_steps=6", "checkpoint.interval=6", "eval.interval=6", "eval.iters=1",
        f"eval.prompts=[{prompts[0]!r},{prompts[1]!r}]", "eval.prompt_tokens=8", f"run.dir={run_dir}"])
    _, val = read_metrics(run_dir)
    samples = val[6]["samples"]
    assert [s["prompt"] for s in samples] == prompts
    assert f"sample at step 6: {prompts[0]!r} -> {samples[0]['completion']!r}" in result.stderr
    # the same continuations as the generate command gives from the checkpoint of that step
    capsys.readouterr()
    assert generate_main(["--checkpoint", str(run_dir), "--max-new-tokens", "8",
                          "--prompts", str(_write_lines(tmp_path / "prompts.txt", prompts))]) == 0
    completions = [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert completions == [s["completion"] for s in samples]


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path
