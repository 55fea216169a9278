"""Fixtures for the export tests: a tiny SentencePiece model and training checkpoints in the
trainer's layout (RUN/checkpoints/{latest, iter_N/}) saved at TP/PP > 1 by real gloo processes.

`make_checkpoint` starts `tp * pp` processes of this file (`worker` below) with torchrun's
environment variables; each builds its part of a GPTModel, trains it a few steps (PP=1) or
perturbs it (PP>1, so that no weight keeps its initial value, e.g. RMSNorm weights of 1), computes
reference logits on fixed tokens with the sharded model itself, and saves with dist_checkpointing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch

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


def train_sentencepiece(directory: Path, vocab_size: int = 320) -> Path:
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
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        minloglevel=2,
    )
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_checkpoint(run_dir: Path, model, tokenizer: Path, tp: int = 1, pp: int = 1, iteration: int = 3,
                    dtype: str = "fp32", timeout: int = 240) -> Path:
    """Save a checkpoint of `model` (a ModelConfig) at TP=tp, PP=pp into run_dir/checkpoints."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "run_dir": str(run_dir),
        "model": dataclasses.asdict(model),
        "tokenizer": str(tokenizer),
        "tp": tp,
        "pp": pp,
        "iteration": iteration,
        "dtype": dtype,
    }
    spec_path = run_dir / "fixture_spec.json"
    spec_path.write_text(json.dumps(spec))
    world = tp * pp
    port = _free_port()
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
    return run_dir / "checkpoints" / f"iter_{iteration:07d}"


def _worker(spec_path: str) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

    from megatron_plugin.config import ModelConfig, ParallelConfig, PrecisionConfig, RunConfig
    from megatron_plugin.model.build import build_gpt_model
    from megatron_plugin.runtime.distributed import init_distributed, shutdown

    spec = json.loads(Path(spec_path).read_text())
    model_cfg = ModelConfig(**spec["model"])
    parallel = ParallelConfig(tensor=spec["tp"], pipeline=spec["pp"])
    precision = PrecisionConfig(dtype=spec["dtype"])
    runtime = init_distributed(parallel, seed=1234)
    model = build_gpt_model(model_cfg, parallel, precision)
    tokens = reference_tokens(model_cfg.vocab_size)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    if spec["pp"] == 1:
        # A few real optimizer steps, so every weight (norms included) moves off its init.
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
        gen = torch.Generator().manual_seed(11)
        for _ in range(3):
            batch = torch.randint(0, model_cfg.vocab_size, (2, 17), generator=gen)
            loss = model(batch[:, :-1], positions, None, labels=batch[:, 1:])
            loss.float().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            logits = model(tokens, positions, None)
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        if runtime.rank == 0:
            torch.save(logits[..., : model_cfg.vocab_size].float(), Path(spec["run_dir"]) / REFERENCE_FILE)
    else:
        # No pipeline schedule here: perturb instead. Replicated weights (norms) get the same
        # noise on every TP rank, as training would keep them equal.
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        with torch.no_grad():
            for index, (name, param) in enumerate(model.named_parameters()):
                sharded = getattr(param, "tensor_model_parallel", False)
                seed = 1000 * pp_rank + 10 * index + (tp_rank if sharded else 0)
                gen = torch.Generator().manual_seed(seed)
                param.add_(0.05 * torch.randn(param.shape, generator=gen).to(param.dtype))

    ckpt_root = Path(spec["run_dir"]) / "checkpoints"
    name = f"iter_{spec['iteration']:07d}"
    ckpt_dir = ckpt_root / name
    if runtime.rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": spec["iteration"]}, str(ckpt_dir))
    dist.barrier()
    if runtime.rank == 0:
        run = RunConfig(model=model_cfg, parallel=parallel, precision=precision)
        (ckpt_dir / "run_config.json").write_text(json.dumps(run.to_dict(), indent=2))
        shutil.copyfile(spec["tokenizer"], ckpt_dir / "tokenizer.model")
        (ckpt_root / "latest").write_text(name + "\n")
    shutdown()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        _worker(sys.argv[2])
    else:
        raise SystemExit("usage: export_helpers.py worker SPEC.json")
