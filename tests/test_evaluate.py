"""Evaluation of a smoke-trained checkpoint: perplexity against the training loop's validation,
raw files against indexed datasets, and the harness adapter against `lm_eval --model hf`."""

from __future__ import annotations

import json
import math
import os

import pytest

from conftest import REPO
from generate_smoke_worker import smoke_run

TASK_DIR = os.path.join(REPO, "examples", "lm_eval")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return smoke_run(tmp_path_factory)


@pytest.fixture(scope="module")
def generator(smoke, megatron_runtime):
    from megatron_plugin.generate import load_generator

    return load_generator(smoke.checkpoints)


def _run_config(smoke) -> dict:
    return json.loads((smoke.iter_dir / "run_config.json").read_text())


def test_split_valid_perplexity_equals_training_validation_loss(generator, smoke):
    from megatron_plugin.evaluate import perplexity

    records = [json.loads(line) for line in (smoke.run_dir / "metrics.jsonl").read_text().splitlines()]
    [validation] = [r for r in records if "val_loss" in r and r["step"] == 30]
    result = perplexity(generator.loaded, split="valid", progress=False)
    cfg = _run_config(smoke)
    assert result.tokens == cfg["eval"]["iters"] * cfg["train"]["global_batch_size"] * cfg["data"]["seq_length"]
    assert abs(result.loss - validation["val_loss"]) < 1e-5
    assert result.ppl == pytest.approx(math.exp(result.loss))
    assert 0 < result.bits_per_byte < result.loss / math.log(2)


def test_raw_file_and_its_indexed_dataset_give_the_same_perplexity(generator, smoke, capsys):
    """The run's generated corpus as JSONL and as the indexed dataset preprocessing made of it."""
    from megatron_plugin.evaluate.cli import main

    prefix = _run_config(smoke)["data"]["paths"][0]
    corpus = os.path.join(os.path.dirname(prefix), "corpus.jsonl")
    outputs = []
    for data in (prefix, corpus):
        assert main(["--checkpoint", str(smoke.checkpoints), "--data", data, "--max-tokens", "3000", "--json",
                     "--no-progress"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    indexed, raw = outputs
    assert set(indexed) >= {"loss", "ppl", "bits_per_byte", "tokens"}
    assert indexed["tokens"] == raw["tokens"] == 3000
    assert indexed["loss"] == pytest.approx(raw["loss"], abs=1e-9)
    assert indexed["bits_per_byte"] == pytest.approx(raw["bits_per_byte"], abs=1e-9)
    assert main(["--checkpoint", str(smoke.checkpoints), "--data", corpus + ".missing"]) == 2
    assert "corpus.jsonl.missing" in capsys.readouterr().err


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No hub: the task data are local files; the datasets cache goes to a temporary folder."""
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_CACHE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                      HF_DATASETS_CACHE=str(tmp_path_factory.mktemp("datasets_cache")))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_harness_adapter_matches_lm_eval_hf_on_the_export(generator, smoke, offline, monkeypatch):
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megatron_plugin.evaluate.harness import run_tasks
    from megatron_plugin.runtime import cpu_mode

    monkeypatch.chdir(REPO)  # the task's data_files are relative to the repository root
    ours = run_tasks(generator, ["smoke_story"], num_fewshot=2, include_path=TASK_DIR, log_samples=True)
    with cpu_mode.suspended():
        theirs = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={smoke.hf_dir},dtype=float32", tasks=["smoke_story"],
            num_fewshot=2, task_manager=TaskManager(include_path=TASK_DIR), log_samples=True, batch_size=1,
            device="cpu", random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234,
            fewshot_random_seed=1234)
    ours_samples, their_samples = ours["samples"]["smoke_story"], theirs["samples"]["smoke_story"]
    assert len(ours_samples) == len(their_samples) == 24
    for a, b in zip(ours_samples, their_samples):
        assert a["arguments"] == b["arguments"]  # same few-shot prompts and choices
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip([r[0] for r in a["resps"]], [r[0] for r in b["resps"]]):
            assert abs(ll_a - ll_b) < 1e-4 and greedy_a == greedy_b
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["smoke_story"][metric] == theirs["results"]["smoke_story"][metric]


def test_rolling_loglikelihood_and_generate_until_match_lm_eval_hf(generator, smoke, offline):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from megatron_plugin.evaluate.harness import make_adapter
    from megatron_plugin.runtime import cpu_mode

    long_text = " ".join(f"The red vol carries seven green jars {i} times." for i in range(40))
    assert len(generator.tokenizer.encode(long_text)) > 2 * generator.max_sequence_length  # several windows
    texts = ["Story 5: 5 6 7 8. The kelvar builds a stone bridge at dawn.", long_text]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    until = [Instance("generate_until", {}, ("Story 9: 9 10", {"until": ["."], "max_gen_toks": 24}), 0),
             Instance("generate_until", {}, ("The old tasko", {"until": ["\n", "bells"], "max_gen_toks": 16}), 1)]
    ours = make_adapter(generator)
    ours_rolling = ours.loglikelihood_rolling(rolling, disable_tqdm=True)
    ours_until = ours.generate_until(until, disable_tqdm=True)
    with cpu_mode.suspended():
        hf = HFLM(pretrained=str(smoke.hf_dir), dtype="float32", device="cpu", batch_size=1)
        their_rolling = hf.loglikelihood_rolling(rolling, disable_tqdm=True)
        their_until = hf.generate_until(until, disable_tqdm=True)
    assert ours_rolling == pytest.approx(their_rolling, abs=1e-3)
    assert all(abs(a - b) / len(generator.tokenizer.encode(t)) < 1e-5
               for a, b, t in zip(ours_rolling, their_rolling, texts))
    assert ours_until == their_until
