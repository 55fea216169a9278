"""Supervised fine-tuning runs on CPU: initial weights, the assistant-only loss and its weighting
over micro-batches and data-parallel ranks, exact resume, and what the smoke_sft recipe learns."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from conftest import kill_after_checkpoint, latest, read_metrics, run_python

RUN = ["-m", "megatron_plugin.recipes.run"]
SMOKE_SFT = RUN + ["smoke_sft"]
# A short fine-tuning from the module's base checkpoint: a step per log line, validation at the start.
SHORT = ["train.max_steps=12", "optim.warmup_steps=2", "optim.decay_steps=12", "checkpoint.interval=6", "log.interval=1",
         "eval.interval=6", "eval.iters=1", "eval.task_prompts=0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A short smoke pretraining: the model every fine-tuning here starts from."""
    run_dir = tmp_path_factory.mktemp("base")
    run_python(RUN + ["smoke", f"run.dir={run_dir}", "train.max_steps=20", "checkpoint.interval=20",
                      "eval.interval=0"])
    return run_dir


@pytest.fixture(scope="module")
def straight(base, tmp_path_factory):
    """SHORT from the base checkpoint, validating before the first step too (which changes no
    training step: validation reads its own split, without dropout)."""
    run_dir = tmp_path_factory.mktemp("straight")
    result = _sft(base, run_dir, "eval.at_start=true")
    return run_dir, result


def _sft(base, run_dir, *overrides, nproc=1, check=True):
    return run_python(SMOKE_SFT + [f"run.dir={run_dir}", f"checkpoint.load={base}"] + SHORT + list(overrides),
                      nproc=nproc, check=check)


def test_smoke_sft_learns_the_held_out_task(tmp_path):
    """The whole recipe from nothing: pretraining, the generated chat task, fine-tuning. On prompts
    whose word sets never occur in training, exact match rises from the base model's to most
    answers, and nearly every reply ends its turn."""
    run_dir = tmp_path / "smoke_sft"
    started = time.perf_counter()
    result = run_python(SMOKE_SFT + [f"run.dir={run_dir}"], timeout=600)
    seconds = time.perf_counter() - started
    _, val = read_metrics(run_dir)
    first, last = val[min(val)], val[max(val)]
    print(f"smoke_sft: {seconds:.0f} s; held-out exact match {first['task_exact_match']:.3f} at step "
          f"{first['step']} -> {last['task_exact_match']:.3f} at step {last['step']}; ended turn "
          f"{last['task_ended_turn']:.3f}")
    assert first["step"] == 0 and last["step"] == 150
    assert last["task_exact_match"] >= first["task_exact_match"] + 0.5
    assert last["task_ended_turn"] >= 0.95
    assert last["val_loss"] < 0.5 * first["val_loss"]
    assert "base model first: preset smoke" in result.stderr
    assert "task exact match" in result.stderr  # the run report
    assert latest(run_dir / "base") == "iter_0000060" and latest(run_dir) == "iter_0000150"
    # The fine-tuned checkpoint carries the tokenizer the chat template needs: `generate
    # --messages` answers held-out prompts from it.
    assert os.path.isfile(run_dir / "checkpoints" / "iter_0000150" / "tokenizer.model")
    from megatron_plugin.data.synthetic_chat import held_out_prompts

    prompts = held_out_prompts(6, seed=99)
    messages = tmp_path / "messages.jsonl"
    messages.write_text("".join(json.dumps({"messages": p.messages}) + "\n" for p in prompts))
    chat = run_python(["-m", "megatron_plugin.generate", "--checkpoint", str(run_dir), "--messages", str(messages),
                       "--max-new-tokens", "8"])
    replies = [json.loads(line) for line in chat.stdout.splitlines()]
    assert len(replies) == len(prompts) and all(r["ended_turn"] for r in replies)
    assert sum(r["reply"].strip() == p.answer for r, p in zip(replies, prompts)) >= 5
    # Its validation is over assistant tokens; evaluate's pretraining split refuses it by name.
    refused = run_python(["-m", "megatron_plugin.evaluate", "--checkpoint", str(run_dir), "--split", "valid"],
                         check=False)
    assert refused.returncode == 2 and "data.format=chat" in refused.stderr


def test_initial_weights_are_the_base_model_and_the_schedule_is_fresh(straight):
    run_dir, result = straight
    assert "initial weights from" in result.stderr and "checkpoint.load" in result.stderr
    train, val = read_metrics(run_dir)
    assert sorted(train) == list(range(1, 13))  # step 1 onwards, not the base run's steps
    assert train[1]["consumed_samples"] == 8
    assert train[1]["lr"] < train[2]["lr"]  # a new warmup
    assert val[12]["val_loss"] < val[0]["val_loss"]


def test_a_hugging_face_folder_gives_the_same_initial_weights(base, straight, tmp_path):
    """checkpoint.load=HF folder (converted once into RUN/initial_weights) starts from exactly the
    weights of the checkpoint it was exported from: the same validation loss before any step."""
    hf = tmp_path / "hf"
    run_python(["-m", "megatron_plugin.export", "--checkpoint", str(base), "--output", str(hf), "--dtype", "fp32"])
    from_hf = tmp_path / "from_hf"
    result = run_python(SMOKE_SFT + [f"run.dir={from_hf}", f"checkpoint.load={hf}"] + SHORT +
                        ["train.max_steps=2", "eval.at_start=true", "checkpoint.interval=0"])
    assert "is a Hugging Face folder: converting it" in result.stderr
    assert os.path.isdir(from_hf / "initial_weights")
    _, val_ckpt = read_metrics(straight[0])
    _, val_hf = read_metrics(from_hf)
    assert val_hf[0]["val_loss"] == pytest.approx(val_ckpt[0]["val_loss"], rel=1e-6)


def test_resume_after_sigkill_is_exact(base, straight, tmp_path):
    killed = tmp_path / "killed"
    args = SMOKE_SFT + [f"run.dir={killed}", f"checkpoint.load={base}"] + SHORT
    resumed_from = kill_after_checkpoint(args, killed, ("iter_0000006",))
    assert resumed_from == 6
    result = _sft(base, killed)
    assert "resumed from" in result.stderr and "initial weights from" not in result.stderr
    expected, _ = read_metrics(straight[0])
    got, _ = read_metrics(killed)
    for step in range(7, 13):
        assert got[step]["step_loss"] == expected[step]["step_loss"], f"step {step}"
        assert got[step]["lr"] == expected[step]["lr"]


# Three steps over global batches of 8 rows, with the plain optimizer (so that every layout below
# holds whole gradients).
LAYOUT_RUN = ["train.max_steps=3", "checkpoint.interval=0", "eval.interval=0", "parallel.distributed_optimizer=false"]


@pytest.fixture(scope="module")
def whole_batch(base, tmp_path_factory):
    """The reference: each global batch as one micro-batch in one process, so the loss is the
    mean over its assistant tokens by construction."""
    run_dir = tmp_path_factory.mktemp("whole_batch")
    _sft(base, run_dir, *LAYOUT_RUN, "train.micro_batch_size=8")
    return run_dir


@pytest.mark.parametrize("layout, nproc", [([], 1), ([], 2), (["parallel.pipeline=2"], 2), (["parallel.tensor=2"], 2)],
                         ids=["accumulation", "dp2", "pp2", "tp2"])
def test_the_loss_is_the_token_mean_of_the_global_batch_in_every_layout(base, whole_batch, tmp_path, layout, nproc):
    """Micro-batches of 4 rows, whose assistant-token counts differ (checked below): two of them
    accumulated in one process, one per data-parallel rank, passed between pipeline stages, or
    split over tensor-parallel ranks. Each gives the loss and gradient norm of the whole batch at
    every step, so the same updates; a mean of per-micro-batch or per-rank means would not."""
    run_dir = tmp_path / "split"
    _sft(base, run_dir, *LAYOUT_RUN, "train.micro_batch_size=4", *layout, nproc=nproc)
    expected, _ = read_metrics(whole_batch)
    got, _ = read_metrics(run_dir)
    # Tolerances: these layouts agree to within 6e-8 (loss) and 4e-6 (gradient norm, TP=2); a
    # mean of micro-batch means is 1e-4 away in gradient norm on this data.
    for step in range(1, 4):
        assert got[step]["step_loss"] == pytest.approx(expected[step]["step_loss"], rel=1e-6), f"step {step}"
        assert got[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=2e-5), f"step {step}"


def test_the_micro_batches_of_a_global_batch_hold_different_token_counts(base, whole_batch):
    from megatron_plugin.data.training_data import build_training_data
    from megatron_plugin.recipes.run import resolve

    cfg, _ = resolve("smoke_sft", [f"data.paths=[{whole_batch}/data/chat]", "data.generate_corpus=false",
                                   f"data.tokenizer_model={base}/checkpoints/iter_0000020/tokenizer.model"])
    train = build_training_data(cfg).train
    counts = [sum(float(train[i]["loss_mask"].sum()) for i in rows) for rows in (range(0, 4), range(4, 8))]
    assert counts[0] != counts[1]


def test_loss_counts_assistant_tokens_only(megatron_runtime, base):
    """A hand-built conversation through the real model and the trainer's loss: changing the
    label of an assistant token changes the loss; changing a user token's label does not."""
    from megatron_plugin.chat.template import ChatTokenizer
    from megatron_plugin.config import BuildConfig, PrecisionConfig
    from megatron_plugin.model import build_gpt_model
    from megatron_plugin.recipes.presets import tiny_model
    from megatron_plugin.training.step import _loss_func

    chat = ChatTokenizer(str(base / "checkpoints" / "iter_0000020" / "tokenizer.model"))
    encoded = chat.encode([{"role": "user", "content": "Count the words: dorn vol"},
                           {"role": "assistant", "content": "2"}])
    tokens = torch.tensor(encoded.ids)
    mask = torch.tensor(encoded.loss_mask, dtype=torch.float32)
    inputs, labels, label_mask = tokens[None, :-1], tokens[None, 1:].clone(), mask[None, 1:]
    torch.manual_seed(0)
    model = build_gpt_model(BuildConfig(tiny_model(), PrecisionConfig(dtype="fp32"))).eval()
    positions = torch.arange(inputs.shape[1])[None]

    def loss(labels):
        with torch.no_grad():
            per_token = model(inputs, positions, None, labels=labels)
        loss_sum, count, _ = _loss_func(label_mask, per_token)
        return float(loss_sum / count)

    reference = loss(labels)
    assistant = int(torch.nonzero(label_mask[0])[0])
    user = int(torch.nonzero(label_mask[0] == 0)[0])
    changed = labels.clone()
    changed[0, assistant] = (changed[0, assistant] + 7) % 512
    assert loss(changed) != reference
    changed = labels.clone()
    changed[0, user] = (changed[0, user] + 7) % 512
    assert loss(changed) == reference


def test_data_made_with_another_tokenizer_is_refused(base, tmp_path):
    from megatron_plugin.preprocess.generated_corpus import prepare_generated_chat_corpus
    from megatron_plugin.preprocess.pipeline import train_tokenizer
    from megatron_plugin.data.synthetic import write_corpus

    corpus = write_corpus(str(tmp_path / "other.jsonl"), num_documents=300, seed=7)
    train_tokenizer([corpus], str(tmp_path / "other"), vocab_size=400)
    prefix = prepare_generated_chat_corpus(str(tmp_path / "other_run"), str(tmp_path / "other.model"), 50)
    result = _sft(base, tmp_path / "sft", f"data.paths=[{prefix}]", "data.generate_corpus=false", check=False)
    assert result.returncode == 2
    assert "preprocessed with another tokenizer" in result.stderr and "--tokenizer-model" in result.stderr


def test_a_missing_initial_checkpoint_is_named(tmp_path):
    missing = tmp_path / "nothing"
    result = run_python(SMOKE_SFT + [f"run.dir={tmp_path / 'sft'}", f"checkpoint.load={missing}"], check=False)
    assert result.returncode == 2
    assert f"checkpoint.load={missing}: {missing} does not exist" in result.stderr


def test_chat_data_that_does_not_exist_is_refused_before_training(tmp_path):
    result = run_python(SMOKE_SFT + [f"run.dir={tmp_path / 'sft'}", f"data.paths=[{tmp_path}/chat]",
                                     "data.generate_corpus=false", f"data.tokenizer_model={tmp_path}/t.model"],
                        check=False)
    assert result.returncode == 2
    assert f"{tmp_path}/chat_tokens_document" in result.stderr
    assert not os.path.exists(tmp_path / "sft" / "base")  # nothing was trained


def test_sft_preset_settings_are_documented():
    from megatron_plugin.recipes.presets import get_preset

    cfg = get_preset("sft_1b2")
    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "sft.md"), encoding="utf-8").read()
    assert cfg.data.format == "chat" and cfg.checkpoint.load
    for fact in (f"{cfg.optim.lr:.0e}".replace("e-0", "e-"), str(cfg.optim.warmup_steps), str(cfg.train.global_batch_size),
                 str(cfg.train.max_steps), f"{cfg.optim.beta2:g}"):
        assert fact in docs, fact
    json.dumps(cfg.to_dict())  # plain data all the way down
