"""GPU path (needs CUDA and Transformer Engine; skipped otherwise). docs/gpu.md says how to run.

Each test starts its own process group so they also run one by one: pytest -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_python
from megatron_plugin.config import BuildConfig, ParallelConfig, PrecisionConfig
from megatron_plugin.recipes.presets import tiny_model

pytestmark = pytest.mark.gpu


@pytest.fixture
def gpu_runtime():
    pytest.importorskip("transformer_engine")
    from megatron_plugin.runtime.distributed import init_distributed, shutdown

    runtime = init_distributed(ParallelConfig(), seed=1)
    yield runtime
    shutdown()


def _batch(vocab: int, seq: int = 64, batch: int = 4):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=generator).cuda()
    positions = torch.arange(seq, device="cuda").unsqueeze(0).expand(batch, -1)
    return tokens, positions


def _train(model, tokens, positions, steps: int = 10) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_te_spec_matches_local_spec_logits(gpu_runtime, tmp_path):
    """Same weights (moved between the specs by distributed checkpointing, which maps the local
    norm names onto TE's fused ones) give the same logits."""
    from megatron.core import dist_checkpointing

    from megatron_plugin.model import build_gpt_model

    model_cfg = tiny_model(vocab_size=256, seq=64)
    precision = PrecisionConfig(dtype="bf16")
    local_cfg = type(model_cfg)(**{**model_cfg.__dict__, "transformer_impl": "local"})
    te_cfg = type(model_cfg)(**{**model_cfg.__dict__, "transformer_impl": "transformer_engine"})
    local = build_gpt_model(BuildConfig(local_cfg, precision))
    te = build_gpt_model(BuildConfig(te_cfg, precision))
    (tmp_path / "ckpt").mkdir()
    dist_checkpointing.save({"model": local.sharded_state_dict()}, str(tmp_path / "ckpt"))
    loaded = dist_checkpointing.load({"model": te.sharded_state_dict()}, str(tmp_path / "ckpt"))
    te.load_state_dict(loaded["model"], strict=False)
    tokens, positions = _batch(256)
    local.eval(), te.eval()
    with torch.no_grad():
        a = local(tokens[:, :-1], positions, None).float()
        b = te(tokens[:, :-1], positions, None).float()
    torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)  # bf16 kernels differ in rounding


def test_bf16_steps_lower_the_loss(gpu_runtime):
    from megatron_plugin.model import build_gpt_model, uses_transformer_engine

    model_cfg = tiny_model(vocab_size=256, seq=64)
    assert uses_transformer_engine(model_cfg)
    model = build_gpt_model(BuildConfig(model_cfg, PrecisionConfig(dtype="bf16")))
    losses = _train(model, *_batch(256))
    assert losses[-1] < 0.8 * losses[0]


def test_fp8_steps_stay_near_bf16(gpu_runtime):
    major, _ = torch.cuda.get_device_capability()
    if major < 9:
        pytest.skip("FP8 needs compute capability 9.0+")
    from megatron_plugin.model import build_gpt_model
    from megatron_plugin.runtime.distributed import seed_everything

    # FP8 GEMMs need dimensions divisible by 16: hidden 128, ffn 352, seq 64, batch 4 are.
    model_cfg = tiny_model(vocab_size=256, seq=64)
    seed_everything(5)
    bf16 = _train(build_gpt_model(BuildConfig(model_cfg, PrecisionConfig(dtype="bf16"))), *_batch(256))
    seed_everything(5)
    fp8 = _train(build_gpt_model(BuildConfig(model_cfg, PrecisionConfig(dtype="bf16", fp8="hybrid"))), *_batch(256))
    assert fp8[-1] < fp8[0]
    assert abs(fp8[-1] - bf16[-1]) < 0.15 * bf16[-1]


TE_RUN_STEPS = 20


def test_te_bf16_run_exports_and_transformers_reproduces_its_logits(tmp_path):
    """The smoke run trained in bf16 on the Transformer Engine spec (fused-norm weight names),
    exported in fp32: transformers' logits match our TE model's on a few sequences."""
    pytest.importorskip("transformer_engine")
    from megatron_plugin.checkpoint_layout import iter_dir_name
    from megatron_plugin.export import mapping
    from megatron_plugin.export.checkpoint import MegatronCheckpoint
    from megatron_plugin.export.verify import DEFAULT_TOLERANCE, load_hf_model, load_megatron_model, sample_tokens
    from megatron_plugin.runtime.distributed import init_distributed, shutdown

    run = tmp_path / "run"
    run_python(["-m", "megatron_plugin.recipes.run", "smoke", f"run.dir={run}", "precision.dtype=bf16",
                "model.transformer_impl=transformer_engine", f"train.max_steps={TE_RUN_STEPS}",
                f"checkpoint.interval={TE_RUN_STEPS}", "optim.warmup_steps=2", "eval.interval=0"], timeout=600)
    ckpt_dir = run / "checkpoints" / iter_dir_name(TE_RUN_STEPS)
    saved = json.loads((ckpt_dir / "run_config.json").read_text())
    assert (saved["model"]["transformer_impl"], saved["precision"]["dtype"]) == ("transformer_engine", "bf16")
    hf = tmp_path / "hf"
    run_python(["-m", "megatron_plugin.export", "--checkpoint", str(run / "checkpoints"), "--output", str(hf),
                "--dtype", "fp32"])

    sequences, length = 3, 64
    # As export --verify does (verify_export), but with the tokens on the model's device: the TE
    # model lives on the GPU. Started only now: the runs above had the GPU to themselves.
    init_distributed(ParallelConfig(), seed=1)
    try:
        ckpt = MegatronCheckpoint(ckpt_dir)
        # What was trained: the TE spec's fused norm names, weights stored in bf16.
        assert mapping.stacked_layer_key("self_attention.linear_qkv.layer_norm_weight") in ckpt.metadata
        assert ckpt.dtype(mapping.EMBEDDING) == torch.bfloat16
        vocab = ckpt.model_config.vocab_size
        tokens = sample_tokens(vocab, sequences, length)
        model = load_megatron_model(ckpt)  # the TE spec again (run_config.json), fp32, on the GPU
        device = next(model.parameters()).device
        assert device.type == "cuda"
        positions = torch.arange(length, device=device).unsqueeze(0).expand(sequences, -1)
        with torch.no_grad():
            ours = model(tokens.to(device), positions, None)[..., :vocab].float().cpu()
        del model
    finally:
        shutdown()
    theirs_model = load_hf_model(hf)  # fp32 on the CPU, the export's weights exactly (bf16 upcast)
    with torch.no_grad():
        theirs = theirs_model(input_ids=tokens).logits.float()
    assert theirs.shape == ours.shape == (sequences, length, vocab)
    # TE runs fp32 GEMMs in TF32 (fp16's 10-bit mantissa): export --verify's fp16 tolerance, not fp32's.
    tolerance = DEFAULT_TOLERANCE["fp16"]
    diff = (ours - theirs).abs().max().item()
    assert diff <= tolerance, f"max |logit difference| {diff:.3e} > {tolerance}"
    # Logits well above the tolerance (about 5 after 20 smoke steps on CPU): a weight mapped to
    # the wrong place would show.
    assert ours.abs().max().item() > 20 * tolerance
