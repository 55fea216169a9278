"""Generation from a smoke-trained checkpoint: KV cache vs full recompute vs transformers, batches,
sampling, stops, TP=2, the CLI and its errors."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from conftest import run_python
from generate_smoke_worker import smoke_run

PROMPTS = ["Story 3: 3 4", "The kelvar builds", "Every mirel counts seven green jars near the market and"]
NEW = 48


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return smoke_run(tmp_path_factory)


@pytest.fixture(scope="module")
def generator(smoke, megatron_runtime):
    from megatron_plugin.generate import load_generator

    return load_generator(smoke.checkpoints)


def greedy(max_new_tokens=NEW, **kwargs):
    from megatron_plugin.generate import SamplingOptions

    kwargs.setdefault("stop_at_eos", False)
    return SamplingOptions(max_new_tokens=max_new_tokens, **kwargs)


def test_kv_cache_greedy_matches_full_recompute_and_transformers(generator, smoke):
    from megatron_plugin.export.verify import load_hf_model, megatron_greedy
    from megatron_plugin.runtime import cpu_mode

    hf = load_hf_model(smoke.hf_dir)
    hf.generation_config.eos_token_id = None
    for ids in generator.encode_prompts(PROMPTS):
        [ours] = generator.generate([ids], greedy())
        prompt = torch.tensor([ids])
        recomputed = megatron_greedy(generator.model, prompt, NEW, generator.vocab_size)[0, len(ids):].tolist()
        with cpu_mode.suspended(), torch.no_grad():
            theirs = hf.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[0, len(ids):].tolist()
        assert len(ours.tokens) == NEW
        assert ours.tokens == recomputed
        assert ours.tokens == theirs


def test_batch_of_different_lengths_gives_each_prompt_its_own_tokens(generator):
    ids = generator.encode_prompts(PROMPTS)
    assert len({len(x) for x in ids}) == len(ids)
    batch = generator.generate(ids, greedy())
    alone = [generator.generate([x], greedy())[0] for x in ids]
    assert [b.tokens for b in batch] == [a.tokens for a in alone]
    assert [b.text for b in batch] == [a.text for a in alone]


def test_decode_steps_run_without_the_cpu_mode_and_give_the_same_tokens(generator):
    """The steps drop CPU mode's CUDA->CPU TorchFunctionMode; with it kept on (another function mode
    entered above it) and inside `cpu_mode.suspended()` the tokens and log-probabilities are the
    same."""
    from torch.overrides import TorchFunctionMode

    from megatron_plugin.runtime import cpu_mode

    class PassThrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    modes_in_forward = []

    def record_modes(module, args):
        stack = [torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack())]
        modes_in_forward.append(cpu_mode._mode is not None and cpu_mode._mode in stack)

    ids = generator.encode_prompts(PROMPTS)
    options = greedy(logprobs=True)
    hook = generator.model.register_forward_pre_hook(record_modes)
    try:
        paused = generator.generate(ids, options)
        steps = len(modes_in_forward)
        with PassThrough():
            kept = generator.generate(ids, options)
        with cpu_mode.suspended():
            suspended = generator.generate(ids, options)
    finally:
        hook.remove()
    assert not any(modes_in_forward[:steps])
    if cpu_mode._mode is not None:
        assert all(modes_in_forward[steps:2 * steps])
    for other in (kept, suspended):
        assert [g.tokens for g in other] == [g.tokens for g in paused]
        assert [g.logprobs for g in other] == [g.logprobs for g in paused]


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.8, top_k=20),
                                      dict(temperature=1.2, top_p=0.9)])
def test_seeded_sampling_is_reproducible(generator, sampling):
    ids = generator.encode_prompts(PROMPTS)
    first = generator.generate(ids, greedy(24, seed=11, **sampling))
    again = generator.generate(ids, greedy(24, seed=11, **sampling))
    other = generator.generate(ids, greedy(24, seed=12, **sampling))
    plain = generator.generate(ids, greedy(24))
    assert [g.tokens for g in first] == [g.tokens for g in again]
    assert [g.tokens for g in first] != [g.tokens for g in other]
    assert [g.tokens for g in first] != [g.tokens for g in plain]
    assert all(0 <= t < generator.vocab_size for g in first for t in g.tokens)


def test_stop_string_and_eos_end_generation(generator):
    [ids] = generator.encode_prompts(PROMPTS[1:2])
    [full] = generator.generate([ids], greedy())
    stop = full.text[12:17]
    assert stop.strip()
    [stopped] = generator.generate([ids], greedy(stop=(stop,)))
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.find(stop)]
    assert stopped.tokens == full.tokens[: len(stopped.tokens)] and len(stopped.tokens) < NEW
    # EOS is whatever id the tokenizer names: make it a token the greedy continuation produces.
    k = 10
    eos_generator = copy.copy(generator)
    eos_generator.tokenizer = copy.copy(generator.tokenizer)
    eos_generator.tokenizer.eos_id = full.tokens[k]
    first = full.tokens.index(full.tokens[k])
    [ended] = eos_generator.generate([ids], greedy(stop_at_eos=True))
    assert ended.finish_reason == "eos"
    assert ended.tokens == full.tokens[: first + 1]
    assert ended.text == generator.tokenizer.decode(full.tokens[:first])


def test_hugging_face_folder_gives_the_same_tokens(generator, smoke):
    from megatron_plugin.generate import load_generator

    from_hf = load_generator(smoke.hf_dir)
    ids = generator.encode_prompts(PROMPTS)
    assert [g.tokens for g in from_hf.generate(ids, greedy(16))] == [g.tokens for g in generator.generate(ids, greedy(16))]


@pytest.mark.parametrize("layout", [["--tensor-parallel", "2"], ["--pipeline-parallel", "2"]], ids=["tp2", "pp2"])
def test_two_process_layouts_give_the_same_tokens_as_one_process(generator, smoke, tmp_path, layout):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    result = run_python(["-m", "megatron_plugin.generate", "--checkpoint", str(smoke.checkpoints), "--prompts",
                         str(prompts), "--max-new-tokens", str(NEW), "--ignore-eos", *layout], nproc=2)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    expected = generator.generate_text(PROMPTS, greedy())
    assert [r["prompt"] for r in records] == PROMPTS
    assert [r["tokens"] for r in records] == [g.tokens for g in expected]
    assert [r["completion"] for r in records] == [g.text for g in expected]


def test_cli_streams_one_prompt_and_writes_jsonl(generator, smoke, tmp_path, capsys):
    from megatron_plugin.generate.cli import main

    assert main(["--checkpoint", str(smoke.checkpoints), "-n", "20", "--ignore-eos", PROMPTS[0]]) == 0
    [expected] = generator.generate_text(PROMPTS[:1], greedy(20))
    assert capsys.readouterr().out == PROMPTS[0] + expected.text + "\n"

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n\n")
    out = tmp_path / "out.jsonl"
    assert main(["--checkpoint", str(smoke.iter_dir), "--prompts", str(prompts), "-n", "8", "--ignore-eos",
                 "--logprobs", "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected = generator.generate_text(PROMPTS[:2], greedy(8, logprobs=True))
    assert [r["tokens"] for r in records] == [g.tokens for g in expected]
    for record, gen in zip(records, expected):
        assert record["completion"] == gen.text and record["finish_reason"] == "length"
        assert len(record["logprobs"]) == 8 and all(lp <= 0 for lp in record["logprobs"])
        assert record["logprobs"] == pytest.approx(gen.logprobs, abs=1e-6)


def test_bad_input_is_one_line_error_with_exit_status_2(generator, smoke, tmp_path, capsys):
    from megatron_plugin.generate.cli import main

    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    shutil.copyfile(smoke.hf_dir / "model.safetensors", weights_only / "model.safetensors")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    incomplete = tmp_path / "run_copy" / "iter_0000030"
    shutil.copytree(smoke.iter_dir, incomplete)
    (incomplete / "run_config.json").unlink()
    cases = [
        (["--checkpoint", str(tmp_path / "missing"), "hi"], str(tmp_path / "missing")),
        (["--checkpoint", str(weights_only), "hi"], "config.json"),
        (["--checkpoint", str(incomplete), "hi"], "run_config.json"),
        (["--checkpoint", str(smoke.checkpoints), "--prompts", str(empty)], str(empty)),
        (["--checkpoint", str(smoke.checkpoints), "word " * 200], "context of 128 tokens"),
        (["--checkpoint", str(smoke.checkpoints), "-n", "0", "hi"], "--max-new-tokens 0"),
    ]
    for argv, named in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], (argv, err)
