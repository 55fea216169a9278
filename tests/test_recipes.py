"""Presets, overrides, validation, plan and the launcher."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess

import numpy as np
import pytest

from megatron_plugin.config import ConfigError
from megatron_plugin.recipes.overrides import apply_overrides
from megatron_plugin.recipes import plan as plan_mod
from megatron_plugin.recipes.plan import format_plan, make_plan
from megatron_plugin.recipes.presets import PRESETS, get_preset
from megatron_plugin.recipes.run import main as run_main
from megatron_plugin.recipes.validate import validate
from megatron_plugin.runtime.peak import GPU_PEAKS

from conftest import REPO


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves_and_validates(name):
    cfg = get_preset(name)
    validate(cfg, world_size=cfg.parallel.gpus, check_data=False, cuda=True)
    assert cfg.run.name == name


@pytest.mark.parametrize("name,gpus,mbs,accum,gbs,steps", [
    ("production_8gpu", 8, 8, 4, 256, 590_625),
    ("fast_8gpu", 8, 8, 4, 256, 75_000),
    ("basic_2gpu", 2, 4, 4, 32, 25_000),
])
def test_gpu_presets_carry_the_seed_figures(name, gpus, mbs, accum, gbs, steps):
    cfg = get_preset(name)
    assert (cfg.parallel.gpus, cfg.train.micro_batch_size, cfg.train.global_batch_size) == (gpus, mbs, gbs)
    assert cfg.train.grad_accumulation_steps(gpus) == accum
    assert cfg.train.max_steps == steps and cfg.data.seq_length == 1024 and cfg.optim.lr == 3e-4
    assert cfg.optim.warmup_steps == int(0.02 * steps)
    assert (cfg.parallel.tensor, cfg.parallel.pipeline) == (1, 1) and cfg.parallel.distributed_optimizer


def test_production_plan_is_the_true_one():
    cfg = get_preset("production_8gpu")
    plan = make_plan(cfg, mfu=0.40, gpu="h100")
    assert plan["tokens_per_step"] == 262_144
    assert plan["total_tokens"] == 154_828_800_000
    assert round(plan["epochs"], 3) == 3.036
    assert plan["warmup_steps"] == 11_812
    assert plan["checkpoints"] == 29
    assert plan["log_points"] == 196
    assert 60 < plan["hours_at_mfu"] < 120
    # time = FLOPs / (GPUs x peak x MFU): recompute from the parts the plan reports
    expected_hours = plan["flops_per_token"] * plan["total_tokens"] / (8 * GPU_PEAKS["h100"]["bf16"] * 0.4) / 3600
    assert plan["hours_at_mfu"] == pytest.approx(expected_hours)
    assert plan["initial_loss"] == pytest.approx(math.log(32000))
    assert 16 < plan["checkpoint_resumable_gb"] < 18 and 2.3 < plan["checkpoint_weights_gb"] < 2.5
    assert plan["preprocess_hours"] == pytest.approx(51e9 / (plan_mod.PREPROCESS_TOKENS_PER_CORE_S * 64) / 3600)


@pytest.mark.parametrize("layout,dp", [([], 8), (["parallel.tensor=2"], 4), (["parallel.context=2", "parallel.tensor=2"], 2)])
def test_plan_batch_line_uses_the_data_parallel_size(layout, dp):
    cfg, _ = apply_overrides(get_preset("production_8gpu"), layout)
    plan = make_plan(cfg)
    assert plan["data_parallel"] == dp
    assert plan["micro_batch"] * plan["grad_accumulation"] * dp == plan["global_batch"] == 256
    assert f"x DP {dp} (TP={cfg.parallel.tensor}, PP=1, CP={cfg.parallel.context})" in format_plan(plan)


def test_plan_counts_tokens_of_a_real_dataset(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    import torch

    prefix = str(tmp_path / "d")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for length in (5, 7, 11):
        builder.add_document(torch.arange(length), [length])
    builder.finalize(prefix + ".idx")
    cfg, _ = apply_overrides(get_preset("smoke"), [f"data.paths=[{prefix}]", "data.generate_corpus=false"])
    plan = make_plan(cfg)
    assert plan["dataset_tokens"] == 23
    assert plan["epochs"] == pytest.approx(plan["total_tokens"] / 23)


def test_plan_json_cli(capsys):
    assert run_main(["production_8gpu", "--plan", "--json", "--mfu", "0.5", "--gpu", "h200"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["assumed_mfu"] == 0.5 and plan["gpu"] == "h200"
    assert plan["seed_claims"]["hours"] == 8.2


def test_plan_of_a_cpu_preset_uses_the_cpu_peak(capsys, monkeypatch):
    from megatron_plugin.runtime.peak import PEAK_ENV

    monkeypatch.setenv(PEAK_ENV, "1e11")
    assert run_main(["smoke", "--plan", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["gpu"] == "cpu" and plan["peak_flops_per_gpu"] == 1e11 and PEAK_ENV in plan["peak_source"]
    assert plan["hours_at_mfu"] == pytest.approx(plan["total_flops"] / (1e11 * 0.4) / 3600)
    assert run_main(["smoke", "--plan"]) == 0
    text = capsys.readouterr().out
    assert "H100" not in text and "0.0 h" not in text and "64 cores" not in text
    assert text.splitlines()[0].startswith("Plan for smoke on 1 process(es) on the CPU")
    assert "time                " in text and " s at 40% MFU of 100.0 GFLOP/s" in text


def test_plan_gpu_cpu_flag_and_overrides_after_flags(capsys, monkeypatch, tmp_path):
    from megatron_plugin.runtime.peak import PEAK_ENV

    monkeypatch.setenv(PEAK_ENV, "2e11")
    assert run_main(["production_8gpu", "--plan", "--json", "--gpu", "cpu", f"run.dir={tmp_path}"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # All processes of a CPU run share the machine's cores: its peak is not multiplied by them.
    assert plan["hours_at_mfu"] == pytest.approx(plan["total_flops"] / (2e11 * 0.4) / 3600)
    assert plan["preprocess_cores"] == (os.cpu_count() or 1)


def test_plan_uses_measured_throughput(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / "metrics.jsonl", "w") as f:
        for rate in (10.0, 1000.0, 1000.0, 2000.0):
            f.write(json.dumps({"step": 1, "tokens_per_s": rate}) + "\n")
    cfg, _ = apply_overrides(get_preset("production_8gpu"), [f"run.dir={run_dir}"])
    plan = make_plan(cfg)
    assert plan["measured_tokens_per_s"] == 1000.0  # median after the start-up window
    assert plan["hours_at_measured"] == pytest.approx(plan["total_tokens"] / 1000.0 / 3600)


def test_overrides_change_what_they_name_and_nothing_else():
    base = get_preset("production_8gpu")
    cfg, applied = apply_overrides(base, ["optim.lr=1e-4", "parallel.tensor=2", "run.dir=/tmp/x"])
    before, after = dataclasses.asdict(base), dataclasses.asdict(cfg)
    changed = {
        f"{section}.{key}"
        for section in before
        for key in before[section]
        if before[section][key] != after[section][key]
    }
    assert changed == {"optim.lr", "parallel.tensor", "run.dir"}
    assert cfg.optim.lr == 1e-4 and cfg.parallel.tensor == 2


def test_hf_trainer_aliases():
    cfg, applied = apply_overrides(get_preset("basic_2gpu"), [
        "max_steps=100", "save_steps=10", "logging_steps=5", "learning_rate=1e-3",
        "warmup_steps=7", "per_device_train_batch_size=2", "gradient_accumulation_steps=8",
    ])
    assert (cfg.train.max_steps, cfg.checkpoint.interval, cfg.log.interval) == (100, 10, 5)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.micro_batch_size) == (1e-3, 7, 2)
    assert cfg.train.global_batch_size == 2 * 8 * 2
    assert {a.alias: a.key for a in applied}["save_steps"] == "checkpoint.interval"


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "did you mean optim.lr"),
    ("optim.lr=fast", "optim.lr"),
    ("train.max_steps=1.5", "train.max_steps"),
    ("optim.lr", "optim.lr"),
    ("~optim.lr", "cannot be deleted"),
])
def test_bad_overrides_are_refused_clearly(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        apply_overrides(get_preset("smoke"), [override])


@pytest.mark.parametrize("override,message", [
    ("train.max_steps=ten", "train.max_steps takes an integer, got 'ten'; e.g. train.max_steps=10"),
    ("data.paths=/x", "data.paths is a list; write data.paths=[/x]"),
    ("data.paths=/a,/b", "data.paths is a list; write data.paths=[/a,/b]"),
    ("log.tensorboard=maybe", "log.tensorboard takes true or false, got 'maybe'"),
    ("train.max_steps=null", "train.max_steps cannot be null; give an integer"),
    ("train=5", "train is a group of keys, not a value"),
    ("gradient_accumulation_steps=x", "gradient_accumulation_steps takes a positive integer, got 'x'"),
])
def test_override_value_errors_name_key_type_and_value(override, message):
    with pytest.raises(ConfigError) as caught:
        apply_overrides(get_preset("smoke"), [override])
    assert message in str(caught.value)
    assert "ListConfig" not in str(caught.value) and "converted to" not in str(caught.value)


def test_all_override_errors_are_reported_together():
    with pytest.raises(ConfigError) as caught:
        apply_overrides(get_preset("smoke"), ["train.max_steps=ten", "optim.lr=1e-4", "data.paths=/x", "nokey=1"])
    text = str(caught.value)
    assert text.startswith("3 problems with the overrides")
    assert "train.max_steps" in text and "data.paths" in text and "'nokey'" in text


def test_all_validation_errors_are_reported_together():
    with pytest.raises(ConfigError) as caught:
        _invalid(["train.max_steps=0", "log.interval=0", "checkpoint.keep=0", "train.global_batch_size=100"])
    text = str(caught.value)
    assert text.startswith("4 problems with the config")
    for key in ("train.max_steps=0", "log.interval=0", "checkpoint.keep=0", "global_batch_size (100)"):
        assert key in text


def test_tensor_parallel_in_one_process_says_how_to_start_processes():
    cfg, _ = apply_overrides(get_preset("smoke"), ["parallel.tensor=2"])
    with pytest.raises(ConfigError) as caught:
        validate(cfg, world_size=1, check_data=False)
    text = str(caught.value)
    assert "torchrun --nproc-per-node 2 -m megatron_plugin.recipes.run smoke" in text
    assert "./start_training.sh --config smoke --gpus 2" in text


def test_run_summary_fits_one_screen():
    from megatron_plugin.recipes.summary import run_summary

    cfg = get_preset("production_8gpu")
    text = run_summary(cfg, world_size=8, config_path="runs/production_8gpu/config.yaml")
    lines = text.splitlines()
    assert len(lines) <= 15 and max(len(line) for line in lines) <= 140
    assert "TP=1 PP=1 CP=1 DP=8" in text and "262,144 tokens/step" in text
    assert "1,213.3M parameters" in text and "590,625 (154.83B tokens)" in text
    assert "runs/production_8gpu/config.yaml" in text


def _invalid(overrides, world_size=8, check_data=False, cuda=True):
    cfg, _ = apply_overrides(get_preset("production_8gpu"), overrides)
    validate(cfg, world_size=world_size, check_data=check_data, cuda=cuda)


@pytest.mark.parametrize("overrides,world_size,message", [
    (["parallel.tensor=3"], 8, "= 3 processes per model copy, but this run has 8: start 9 processes"),
    (["train.global_batch_size=100"], 8, "global_batch_size \\(100\\) is not divisible"),
    (["parallel.tensor=8", "model.num_query_groups=4"], 8, "num_attention_heads \\(16\\) is not divisible by parallel.tensor \\(8\\)|num_query_groups \\(4\\) is not divisible"),
    (["parallel.tensor=2", "model.num_query_groups=1"], 8, "num_query_groups \\(1\\) is not divisible by parallel.tensor"),
    (["data.seq_length=2048"], 8, "above model.max_seq_length"),
])
def test_validation_rules(overrides, world_size, message):
    with pytest.raises(ConfigError, match=message):
        _invalid(overrides, world_size)


def test_heads_not_divisible_by_tp():
    with pytest.raises(ConfigError, match="num_attention_heads \\(12\\) is not divisible by parallel.tensor \\(8\\)"):
        _invalid(["parallel.tensor=8", "model.num_attention_heads=12", "model.num_query_groups=4",
                  "model.hidden_size=1536"])


def test_missing_data_files_named(tmp_path):
    with pytest.raises(ConfigError, match="no PREFIX.bin / PREFIX.idx for .*nothing"):
        _invalid([f"data.paths=[{tmp_path}/nothing]", "data.tokenizer_model=x.model"], check_data=True)


def test_tokenizer_larger_than_vocab(tmp_path):
    from megatron_plugin.preprocess.generated_corpus import prepare_generated_corpus

    prefix, tokenizer = prepare_generated_corpus(str(tmp_path), vocab_size=400, num_documents=300)
    with pytest.raises(ConfigError, match="set model.vocab_size=400"):
        _invalid([f"data.paths=[{prefix}]", f"data.tokenizer_model={tokenizer}", "model.vocab_size=300"],
                 check_data=True)


def test_fp8_without_gpu_or_te():
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        _invalid(["precision.fp8=hybrid"], cuda=False)


def test_run_cli_reports_config_errors(capsys):
    assert run_main(["smoke", "optim.lrr=1"]) == 2
    assert "did you mean optim.lr" in capsys.readouterr().err
    assert run_main(["nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_list_presets(capsys):
    assert run_main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)


def _dry_run(*args):
    result = subprocess.run([os.path.join(REPO, "start_training.sh"), *args, "--dry-run"],
                            capture_output=True, text=True, check=True)
    return result.stdout.split()


def test_launcher_one_node():
    cmd = _dry_run("--config", "production_8gpu", "--gpus", "8", "optim.lr=1e-4")
    assert cmd[:2] == ["torchrun", "--nproc-per-node"] and cmd[2] == "8"
    assert cmd[cmd.index("--nnodes") + 1] == "1"
    assert cmd[-4:] == ["megatron_plugin.recipes.run", "production_8gpu", "parallel.gpus=8", "optim.lr=1e-4"]


def test_launcher_two_nodes():
    cmd = _dry_run("--config", "production_8gpu", "--gpus", "8", "--nodes", "2", "--node-rank", "1",
                   "--master-addr", "node0", "--master-port", "6000")
    assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--node-rank") + 1] == "1"
    assert cmd[cmd.index("--master-addr") + 1] == "node0" and cmd[cmd.index("--master-port") + 1] == "6000"
    assert "parallel.gpus=16" in cmd


def test_launcher_refuses_missing_config():
    result = subprocess.run([os.path.join(REPO, "start_training.sh"), "--gpus", "8"], capture_output=True, text=True)
    assert result.returncode == 2 and "--config NAME is required" in result.stderr
