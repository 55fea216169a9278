"""Benchmark: export the 1.2B preset model (random weights) to a Hugging Face folder on CPU.

    PYTHONPATH=. python benchmarks/export_1b.py --workdir /tmp/export_bench [--dtype bf16]

1. Builds the default ModelConfig (1.2B) in bf16 with random weights and saves it in the
   trainer's checkpoint layout (dist_checkpointing, TP=1) — skipped when the workdir already
   holds it.
2. Runs `python -m megatron_plugin.export` on it in a child process and reports the child's
   wall time and peak RSS (ru_maxrss), against the DESIGN.md target of 1.5x the bf16 weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(workdir: Path) -> Path:
    import torch
    from megatron.core import dist_checkpointing

    sys.path.insert(0, str(REPO / "tests"))
    import export_helpers

    from megatron_plugin.config import ModelConfig, ParallelConfig, PrecisionConfig, RunConfig
    from megatron_plugin.model.build import build_gpt_model
    from megatron_plugin.runtime.distributed import init_distributed, shutdown

    ckpt_root = workdir / "run" / "checkpoints"
    ckpt = ckpt_root / "iter_0000100"
    if (ckpt_root / "latest").exists():
        return ckpt_root
    model_cfg = ModelConfig(transformer_impl="local")
    parallel = ParallelConfig(tensor=1)
    precision = PrecisionConfig(dtype="bf16")
    started = time.time()
    init_distributed(parallel)
    model = build_gpt_model(model_cfg, parallel, precision)
    params = sum(p.numel() for p in model.parameters())
    print(f"built {params:,} parameters in {time.time() - started:.0f}s", flush=True)
    ckpt.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        dist_checkpointing.save({"model": model.sharded_state_dict()}, str(ckpt))
    (ckpt / "run_config.json").write_text(
        json.dumps(RunConfig(model=model_cfg, parallel=parallel, precision=precision).to_dict(), indent=2)
    )
    # Any SentencePiece model with at most vocab_size pieces serves for timing the weights.
    sp_model = export_helpers.train_sentencepiece(workdir / "tokenizer", vocab_size=320)
    shutil.copyfile(sp_model, ckpt / "tokenizer.model")
    (ckpt_root / "latest").write_text("iter_0000100\n")
    print(f"saved checkpoint in {time.time() - started:.0f}s", flush=True)
    del model
    shutdown()
    return ckpt_root


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/export_bench")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    ckpt_root = make_checkpoint(workdir)
    out = workdir / f"hf_{args.dtype}"
    shutil.rmtree(out, ignore_errors=True)

    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cli_args = ["--checkpoint", str(ckpt_root), "--output", str(out), "--dtype", args.dtype,
                "--max-shard-size", args.max_shard_size]
    # The CLI in a fresh child that reports its own peak RSS (RUSAGE_CHILDREN here would also
    # count the checkpoint writer's forked processes, which share the whole model's pages).
    probe = ("import resource, sys; from megatron_plugin.export.__main__ import main; code = main(sys.argv[1:]); "
             "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")
    started = time.time()
    result = subprocess.run([sys.executable, "-c", probe, *cli_args], env=env, check=True,
                            stdout=subprocess.PIPE, text=True)
    wall = time.time() - started
    print(result.stdout, end="")
    peak_kib = int(result.stdout.split("PEAK_RSS_KIB")[1].split()[0])  # Linux: KiB
    command = [sys.executable, "-m", "megatron_plugin.export", *cli_args]
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    from megatron_plugin.config import ModelConfig
    from megatron_plugin.model import parameter_count

    bf16_weights = 2 * parameter_count(ModelConfig())  # the model's bf16 weights, in bytes
    print(json.dumps({
        "command": " ".join(command),
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(peak_kib * 1024 / 1e9, 2),
        "peak_rss_over_bf16_weights": round(peak_kib * 1024 / bf16_weights, 2),
        "output_weights_gb": round(weights / 1e9, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
