"""Fixtures for the export tests: a tiny SentencePiece model and training checkpoints in the
trainer's layout (RUN/checkpoints/{latest, iter_N/}) saved at TP/PP > 1 by real gloo processes.

`make_checkpoint` starts `tp * pp * dp` processes of this file (`worker` below) with torchrun's
environment variables; each builds its part of a GPTModel with the package's training state
(Megatron DDP + optimizer), trains a few steps, computes reference logits on fixed tokens with the
sharded model itself (PP=1), and saves model + optimizer state with dist_checkpointing.
`make_checkpoints` has one set of processes save several such checkpoints one after the other
(layouts of the same number of processes), each with a fresh parallel state, seeds and model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from megatron_plugin.runtime.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
REFERENCE_FILE = "reference_logits.pt"
SAMPLE_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "Megatron trains llama models; export them to Hugging Face!",
    "  leading and trailing spaces  ",
    "numbers 12345 and punctuation: (a, b) [c] {d}",
    "line one\nline two\n\nparagraph\ttab",
    "naïve café — ünïcödé, 日本語 🙂",
    "</s> and <s> typed as text",
]


def train_sentencepiece(directory: Path, vocab_size: int = 320, **options) -> Path:
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = (
        "the quick brown fox jumps over lazy dog model train data export hugging face megatron "
        "llama token checkpoint layer weight tensor parallel pipeline"
    ).split()
    lines = [" ".join(rng.choice(words) for _ in range(14)) for _ in range(1500)] + SAMPLE_TEXT
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    prefix = directory / "sp"
    settings = dict(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        minloglevel=2,
    )
    spm.SentencePieceTrainer.train(**{**settings, **options})
    return prefix.with_suffix(".model")


def tiny_model_config(**overrides):
    from megatron_plugin.config import ModelConfig

    base = dict(
        vocab_size=320,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=160,
        max_seq_length=64,
        rotary_base=10000.0,
        norm_epsilon=1e-5,
        tie_embeddings=False,
        make_vocab_size_divisible_by=64,
        transformer_impl="local",
    )
    base.update(overrides)
    return ModelConfig(**base)


def reference_tokens(vocab_size: int, batch: int = 2, seq: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(3, vocab_size, (batch, seq), generator=gen)


def checkpoint_job(run_dir: Path, model, tokenizer: Path, tp: int = 1, pp: int = 1, dp: int = 1,
                   iteration: int = 3, dtype: str = "fp32", ddp_keys: bool = False) -> dict:
    """One checkpoint for `make_checkpoints`: of `model` (a ModelConfig) at TP=tp, PP=pp, DP=dp
    into run_dir/checkpoints (DP > 1 uses Megatron's distributed optimizer). ddp_keys: save the
    model through Megatron's DDP wrapper, whose keys carry a "module." prefix, instead of the bare
    GPTModel (the checkpoint contract's default keys)."""
    return {
        "run_dir": str(run_dir),
        "model": dataclasses.asdict(model),
        "tokenizer": str(tokenizer),
        "tp": tp,
        "pp": pp,
        "iteration": iteration,
        "dtype": dtype,
        "ddp_keys": ddp_keys,
        "dp": dp,
    }


def make_checkpoint(run_dir: Path, model, tokenizer: Path, tp: int = 1, pp: int = 1, dp: int = 1,
                    iteration: int = 3, dtype: str = "fp32", ddp_keys: bool = False, timeout: int = 240) -> Path:
    """Save one checkpoint (see `checkpoint_job`); returns its iter_N folder."""
    make_checkpoints([checkpoint_job(run_dir, model, tokenizer, tp, pp, dp, iteration, dtype, ddp_keys)], timeout)
    return run_dir / "checkpoints" / f"iter_{iteration:07d}"


def make_checkpoints(jobs: list[dict], timeout: int = 240) -> None:
    """Save the checkpoints of `jobs` (`checkpoint_job`s needing the same number of processes,
    TP x PP x DP) one after the other with one set of gloo processes."""
    worlds = {job["tp"] * job["pp"] * job["dp"] for job in jobs}
    assert len(worlds) == 1, f"one number of processes for all jobs, not {sorted(worlds)}"
    for job in jobs:
        Path(job["run_dir"]).mkdir(parents=True, exist_ok=True)
    spec_path = Path(jobs[0]["run_dir"]) / "fixture_spec.json"
    spec_path.write_text(json.dumps(jobs))
    world = worlds.pop()
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ)
        env.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world), PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen([sys.executable, __file__, "worker", str(spec_path)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        outputs.append(out)
    if any(p.returncode for p in procs):
        raise RuntimeError("checkpoint fixture failed:\n" + "\n".join(o[-4000:] for o in outputs))


def _batches(vocab_size: int, micro_batch: int, seq: int, seed: int = 11):
    gen = torch.Generator().manual_seed(seed)
    while True:
        sample = torch.randint(0, vocab_size, (micro_batch, seq + 1), generator=gen)
        yield {
            "tokens": sample[:, :-1],
            "labels": sample[:, 1:],
            "loss_mask": torch.ones(micro_batch, seq),
            "position_ids": torch.arange(seq).unsqueeze(0).expand(micro_batch, seq),
        }


def _worker(spec_path: str) -> None:
    """One rank: each job of the spec in turn (the process group stays; the parallel state,
    seeds and training state are made anew for each)."""
    from megatron_plugin.runtime.distributed import shutdown

    for spec in json.loads(Path(spec_path).read_text()):
        _save_checkpoint(spec)
    shutdown()


def _save_checkpoint(spec: dict) -> None:
    """The package's own training path (Megatron DDP, optimizer, pipeline schedule), a few steps
    at a high LR so that every weight, norms included, moves off its init, then a resumable
    checkpoint in the trainer's layout (model + optimizer + iteration)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, tensor_parallel

    from megatron_plugin.config import (ModelConfig, OptimConfig, ParallelConfig, PrecisionConfig, RunConfig,
                                        TrainConfig)
    from megatron_plugin.runtime.distributed import init_distributed
    from megatron_plugin.training.optimizer import build_train_state
    from megatron_plugin.training.step import BatchShape, train_step

    model_cfg = ModelConfig(**spec["model"])
    seq = 16
    run = RunConfig(
        model=model_cfg,
        parallel=ParallelConfig(tensor=spec["tp"], pipeline=spec["pp"], distributed_optimizer=True),
        precision=PrecisionConfig(dtype=spec["dtype"]),
        train=TrainConfig(max_steps=100, micro_batch_size=2, global_batch_size=4 * spec["dp"], seed=1234),
        optim=OptimConfig(lr=2e-2, weight_decay=0.0),
    )
    runtime = init_distributed(run.parallel, seed=run.train.seed)
    state = build_train_state(run, runtime.data_parallel)
    data = _batches(model_cfg.vocab_size, run.train.micro_batch_size, seq)
    for _ in range(3):
        train_step(state, data, BatchShape(num_microbatches=2, micro_batch_size=2, seq_length=seq, device=runtime.device))
    gpt = state.model[0].module
    if spec["pp"] == 1:
        tokens = reference_tokens(model_cfg.vocab_size)
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        gpt.eval()
        with torch.no_grad():
            logits = gpt(tokens, positions, None)
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        if runtime.rank == 0:
            torch.save(logits[..., : model_cfg.vocab_size].float(), Path(spec["run_dir"]) / REFERENCE_FILE)

    ckpt_root = Path(spec["run_dir"]) / "checkpoints"
    name = f"iter_{spec['iteration']:07d}"
    ckpt_dir = ckpt_root / name
    if runtime.rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    model_state = (state.model[0] if spec["ddp_keys"] else gpt).sharded_state_dict()
    checkpoint = {
        "model": model_state,
        # The trainer's settings for a reshardable distributed-optimizer state (DESIGN.md §6).
        "optimizer": state.optimizer.sharded_state_dict(
            model_state, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
        ),
        "iteration": spec["iteration"],
    }
    dist_checkpointing.save(checkpoint, str(ckpt_dir))
    dist.barrier()
    if runtime.rank == 0:
        (ckpt_dir / "run_config.json").write_text(json.dumps(run.to_dict(), indent=2))
        shutil.copyfile(spec["tokenizer"], ckpt_dir / "tokenizer.model")
        (ckpt_root / "latest").write_text(name + "\n")
    dist.barrier()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        _worker(sys.argv[2])
    else:
        raise SystemExit("usage: export_helpers.py worker SPEC.json")
