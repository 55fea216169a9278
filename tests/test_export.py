"""Checkpoint -> Hugging Face export on CPU: checkpoints trained at TP=2, PP=2 (tied embeddings)
and DP=2 (distributed optimizer) by gloo processes; GQA throughout."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_helpers as helpers  # noqa: E402
from conftest import REPO  # noqa: E402

pytestmark = pytest.mark.slow

VOCAB = 320  # padded to 384 at TP=2 (make_vocab_size_divisible_by=64): rows to drop


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return helpers.train_sentencepiece(tmp_path_factory.mktemp("tokenizer"), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sp_model) -> dict:
    """The three checkpoints, saved one after the other by one pair of gloo processes: TP=2, PP=2
    with tied embeddings (saved through the DDP wrapper) and DP=2 (the distributed optimizer)."""
    root = tmp_path_factory.mktemp("runs")
    jobs = {
        "tp2": dict(model=helpers.tiny_model_config(vocab_size=VOCAB, num_attention_heads=4, num_query_groups=2),
                    tp=2),
        "pp2_tied": dict(model=helpers.tiny_model_config(vocab_size=VOCAB, num_layers=4, num_attention_heads=4,
                                                         num_query_groups=1, tie_embeddings=True),
                         pp=2, ddp_keys=True),
        "dp2": dict(model=helpers.tiny_model_config(vocab_size=VOCAB), dp=2),
    }
    helpers.make_checkpoints([helpers.checkpoint_job(root / name, tokenizer=sp_model, **job)
                              for name, job in jobs.items()])
    return {name: root / name for name in jobs}


@pytest.fixture(scope="module")
def tp2_run(runs) -> Path:
    return runs["tp2"]


@pytest.fixture(scope="module")
def tp2_export(tmp_path_factory, tp2_run) -> Path:
    from megatron_plugin.export.to_hf import export_checkpoint

    out = tmp_path_factory.mktemp("exports") / "tp2"
    # A small shard size so that the sharded layout (index + several files) is what gets loaded.
    return export_checkpoint(tp2_run / "checkpoints", out, dtype="fp32", max_shard_size="100KB")


def _load_hf(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def test_folder_layout_and_config(tp2_export):
    names = {p.name for p in tp2_export.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "tokenizer.model"} <= names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    config = json.loads((tp2_export / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == VOCAB
    assert config["num_key_value_heads"] == 2 and config["num_attention_heads"] == 4
    assert config["rope_theta"] == 10000.0 and config["rms_norm_eps"] == 1e-5
    assert config["max_position_embeddings"] == 64
    assert config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    generation = json.loads((tp2_export / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    index = json.loads((tp2_export / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" in index["weight_map"]


def test_loads_without_missing_or_unexpected_weights(tp2_export, capfd):
    capfd.readouterr()
    model, info = _load_hf(tp2_export)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # transformers prints a "LOAD REPORT" table (MISSING / UNEXPECTED / MISMATCH rows) otherwise.
    printed = capfd.readouterr()
    for word in ("LOAD REPORT", "MISSING", "UNEXPECTED", "MISMATCH", "newly initialized"):
        assert word not in printed.err + printed.out
    # Padded vocabulary rows are gone.
    assert model.model.embed_tokens.weight.shape == (VOCAB, 64)
    assert model.lm_head.weight.shape == (VOCAB, 64)


def test_logits_match_the_tp2_model(tp2_run, tp2_export):
    model, _ = _load_hf(tp2_export)
    reference = torch.load(tp2_run / helpers.REFERENCE_FILE)  # computed by the TP=2 model itself
    with torch.no_grad():
        logits = model(input_ids=helpers.reference_tokens(VOCAB)).logits
    assert logits.shape == reference.shape
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_ours(tp2_run, tp2_export):
    from megatron_plugin.export.checkpoint import MegatronCheckpoint
    from megatron_plugin.export.session import megatron_session
    from megatron_plugin.export.verify import load_megatron_model, megatron_greedy

    prompt = helpers.reference_tokens(VOCAB, batch=2, seq=6)
    new_tokens = 10
    with megatron_session():
        ours = megatron_greedy(load_megatron_model(MegatronCheckpoint(tp2_run / "checkpoints")), prompt,
                               new_tokens, VOCAB)
    model, _ = _load_hf(tp2_export)
    theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                            max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    assert torch.equal(theirs, ours)


def test_tokenizer_gives_sentencepiece_ids(sp_model, tp2_export):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tokenizer = AutoTokenizer.from_pretrained(str(tp2_export))
    for text in helpers.SAMPLE_TEXT:
        ids = tokenizer(text)["input_ids"]
        assert ids == sp.encode(text), text  # no BOS, no EOS: as our data was tokenized
        assert tokenizer.decode(ids) == sp.decode(ids)
    assert tokenizer.eos_token_id == sp.eos_id()
    assert tokenizer.bos_token_id == sp.bos_id()


@pytest.fixture(scope="module")
def pp2_tied_run(runs) -> Path:
    return runs["pp2_tied"]


def test_cli_exports_pp2_tied_checkpoint_and_verifies(pp2_tied_run, tmp_path, capsys):
    from megatron_plugin.export.__main__ import main

    out = tmp_path / "hf"
    code = main(["--checkpoint", str(pp2_tied_run / "checkpoints"), "--output", str(out), "--dtype", "fp32",
                 "--verify"])
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    assert "verify:" in printed.out and "OK" in printed.out
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["num_key_value_heads"] == 1
    model, info = _load_hf(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert "lm_head.weight" not in handle.keys()
    from megatron_plugin.export.checkpoint import MegatronCheckpoint, process_group

    with process_group():  # the fixture saved through the DDP wrapper: keys carry "module."
        assert MegatronCheckpoint(pp2_tied_run / "checkpoints").key_prefix == "module."


def test_corrupt_data_file_fails_and_leaves_no_output(tp2_run, tmp_path):
    import shutil

    from megatron_plugin.export.checkpoint import CheckpointError
    from megatron_plugin.export.to_hf import export_checkpoint

    broken = tmp_path / "iter_0000003"
    shutil.copytree(tp2_run / "checkpoints" / "iter_0000003", broken)
    data = sorted(broken.glob("*.distcp"))[0]
    # A tenth, not a third: megatron-core 0.19 writes one file per rank (thread_count 1, was 2)
    # with the model's tensors in its first ~quarter and the optimizer's after them, so a cut at a
    # third would leave every tensor the export reads intact.
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 10])
    out = tmp_path / "hf"
    with pytest.raises(CheckpointError, match="missing or damaged"):
        export_checkpoint(broken, out, dtype="fp32")
    assert not out.exists()
    assert not any(p.name.startswith(".hf.partial") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "damage, message",
    [("metadata.json", "incomplete: missing metadata.json"), (".metadata", "incomplete: missing .metadata"),
     ("run_config.json", "has no run_config.json")],
)
def test_incomplete_checkpoint_fails_clearly(tp2_run, tmp_path, damage, message):
    import shutil

    from megatron_plugin.export.checkpoint import CheckpointError
    from megatron_plugin.export.to_hf import export_checkpoint

    broken = tmp_path / "iter_0000003"
    shutil.copytree(tp2_run / "checkpoints" / "iter_0000003", broken)
    (broken / damage).unlink()
    out = tmp_path / "hf"
    with pytest.raises(CheckpointError, match=message):
        export_checkpoint(broken, out, dtype="fp32")
    assert not out.exists()


def test_latest_naming_a_missing_checkpoint(tmp_path):
    from megatron_plugin.export.checkpoint import CheckpointError
    from megatron_plugin.export.to_hf import export_checkpoint

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("iter_0000100\n")
    with pytest.raises(CheckpointError, match="iter_0000100"):
        export_checkpoint(tmp_path / "checkpoints", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_iter_folder_names_are_one_rule_for_export_and_training(tmp_path):
    # import_hf accepts an output named iter_N of any width; training must then resume from it.
    from megatron_plugin.export.checkpoint import resolve_checkpoint_dir
    from megatron_plugin.training.checkpoint import list_checkpoints, read_latest, write_latest

    root = tmp_path / "checkpoints"
    (root / "iter_50").mkdir(parents=True)
    (root / "iter_0000100").mkdir()
    write_latest(str(root), "iter_50")
    assert read_latest(str(root)) == str(root / "iter_50")
    assert resolve_checkpoint_dir(root) == root / "iter_50"
    assert [step for step, _ in list_checkpoints(str(root))] == [50, 100]


def test_cli_reports_errors_without_traceback(tmp_path):
    from megatron_plugin.export.__main__ import main

    (tmp_path / "checkpoints").mkdir()
    assert main(["--checkpoint", str(tmp_path / "checkpoints"), "--output", str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "hf").exists()


def test_checkpoint_paths_resolve(tp2_run):
    from megatron_plugin.export.checkpoint import resolve_checkpoint_dir

    expected = tp2_run / "checkpoints" / "iter_0000003"
    for path in (tp2_run, tp2_run / "checkpoints", expected):
        assert resolve_checkpoint_dir(path) == expected


def test_dp2_distributed_optimizer_checkpoint_exports(runs, tmp_path):
    """DP=2 with Megatron's distributed optimizer: optimizer state sharded over DP is skipped."""
    from megatron_plugin.export.to_hf import export_checkpoint

    run = runs["dp2"]
    out = export_checkpoint(run, tmp_path / "hf", dtype="fp32")
    model, info = _load_hf(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        logits = model(input_ids=helpers.reference_tokens(VOCAB)).logits
    torch.testing.assert_close(logits, torch.load(run / helpers.REFERENCE_FILE), atol=1e-4, rtol=1e-4)


def test_export_benchmark_reports_the_export_process_own_peak(tp2_run, tmp_path):
    """The export benchmark's first export runs right after this process held the whole model;
    Linux carries getrusage's ru_maxrss across exec, so the child must report its own VmHWM."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_1b", os.path.join(REPO, "benchmarks", "export_1b.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    held = bytearray(1_500_000_000)  # as the training process that just wrote the checkpoint
    held[::4096] = b"\x01" * len(held[::4096])
    parent_peak = bench.own_peak_rss_kib() * 1024
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
    args = ["--checkpoint", str(tp2_run / "checkpoints"), "--output", str(tmp_path / "hf"), "--dtype", "fp32"]
    run = bench.timed_export(args, tmp_path / "hf", env)
    del held
    assert (tmp_path / "hf" / "config.json").exists()
    # The figure the benchmark used to print: at least what this process held, not the export.
    assert run["ru_maxrss_bytes"] >= 1_500_000_000
    assert run["peak_rss_bytes"] < parent_peak - 1_000_000_000
