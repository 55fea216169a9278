"""Greedy continuations with the model being trained (what eval.prompts logs)."""

from __future__ import annotations

import torch

from generate_smoke_worker import smoke_run


def test_greedy_continuations_of_the_training_model(tmp_path_factory, megatron_runtime):
    from megatron_plugin.config import PrecisionConfig, RunConfig, TrainConfig
    from megatron_plugin.export.verify import megatron_greedy
    from megatron_plugin.generate import greedy_continuations
    from megatron_plugin.generate.tokenizer import Tokenizer
    from megatron_plugin.recipes.presets import tiny_model
    from megatron_plugin.training.optimizer import build_train_state

    smoke = smoke_run(tmp_path_factory)
    tokenizer = Tokenizer(smoke.iter_dir / "tokenizer.model")
    run = RunConfig(model=tiny_model(vocab_size=tokenizer.vocab_size), precision=PrecisionConfig(dtype="fp32"),
                    train=TrainConfig(micro_batch_size=2, global_batch_size=2))
    state = build_train_state(run, data_parallel=1)
    gpt = state.model[0].module
    assert gpt.training
    prompts = ["Story 3: 3 4", "The kelvar builds a stone bridge"]
    texts = greedy_continuations(state.model, tokenizer, prompts, max_new_tokens=12)
    assert gpt.training  # back in training mode
    for prompt, text in zip(prompts, texts):
        ids = tokenizer.encode(prompt)
        expected = megatron_greedy(gpt.eval(), torch.tensor([ids]), 12, tokenizer.vocab_size)[0, len(ids):].tolist()
        gpt.train()
        if tokenizer.eos_id in expected:
            expected = expected[: expected.index(tokenizer.eos_id)]
        assert text == tokenizer.decode(expected)
