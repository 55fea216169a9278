"""Benchmark: export the 1.2B preset model (random weights) to a Hugging Face folder on CPU.

    PYTHONPATH=. python benchmarks/export_1b.py --workdir /tmp/export_bench [--dtype bf16]

1. Builds the default ModelConfig (1.2B) in bf16 with random weights and saves it in the
   trainer's checkpoint layout (dist_checkpointing, TP=1) in this process, as training does —
   skipped when the workdir already holds it.
2. Runs `python -m megatron_plugin.export` on it twice, each in a fresh child process: the first
   export right after the save (the common case: training has just written the checkpoint, its
   pages are still dirty in the page cache), then a second one of the same checkpoint.
   For each it reports the wall time and the child's own peak RSS (VmHWM of /proc/self/status)
   against the DESIGN.md target of 1.5x the bf16 weights.

Why VmHWM and not getrusage's ru_maxrss: Linux carries ru_maxrss across execve, so a child started
by a process that once held the whole model (step 1) reports the parent's peak as its own. The
benchmark prints ru_maxrss beside VmHWM to show the difference.
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

    from megatron_plugin.config import BuildConfig, ModelConfig, ParallelConfig, PrecisionConfig, RunConfig
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
    model = build_gpt_model(BuildConfig(model_cfg, precision, parallel))
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


PROBE = (
    "import resource, sys\n"
    "from megatron_plugin.export.__main__ import main\n"
    "code = main(sys.argv[1:])\n"
    "status = dict(line.split(':', 1) for line in open('/proc/self/status') if ':' in line)\n"
    "print('PEAK_HWM_KIB', int(status['VmHWM'].split()[0]))\n"
    "print('PEAK_MAXRSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    "sys.exit(code)\n"
)


def own_peak_rss_kib() -> int:
    """This process's own peak RSS (its address space only; not inherited through exec)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM (Linux only)")


def timed_export(cli_args: list[str], out: Path, env: dict) -> dict:
    """The export CLI in a fresh child; its wall time and its own peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.time()
    result = subprocess.run([sys.executable, "-c", PROBE, *cli_args], env=env, check=True,
                            stdout=subprocess.PIPE, text=True)
    wall = time.time() - started
    print(result.stdout, end="")
    hwm_kib = int(result.stdout.split("PEAK_HWM_KIB")[1].split()[0])
    maxrss_kib = int(result.stdout.split("PEAK_MAXRSS_KIB")[1].split()[0])  # Linux: KiB
    return {"wall_s": wall, "peak_rss_bytes": hwm_kib * 1024, "ru_maxrss_bytes": maxrss_kib * 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/export_bench")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    fresh = not (workdir / "run" / "checkpoints" / "latest").exists()
    ckpt_root = make_checkpoint(workdir)
    out = workdir / f"hf_{args.dtype}"

    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cli_args = ["--checkpoint", str(ckpt_root), "--output", str(out), "--dtype", args.dtype,
                "--max-shard-size", args.max_shard_size]
    parent_peak = own_peak_rss_kib() * 1024
    first = timed_export(cli_args, out, env)
    second = timed_export(cli_args, out, env)
    command = [sys.executable, "-m", "megatron_plugin.export", *cli_args]
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    from megatron_plugin.config import ModelConfig
    from megatron_plugin.model import parameter_count

    bf16_weights = 2 * parameter_count(ModelConfig())  # the model's bf16 weights, in bytes

    def figures(run: dict) -> dict:
        return {
            "wall_s": round(run["wall_s"], 1),
            "peak_rss_gb": round(run["peak_rss_bytes"] / 1e9, 2),
            "peak_rss_over_bf16_weights": round(run["peak_rss_bytes"] / bf16_weights, 2),
            "ru_maxrss_gb": round(run["ru_maxrss_bytes"] / 1e9, 2),
        }

    print(json.dumps({
        "command": " ".join(command),
        "checkpoint_written_by_this_run": fresh,
        "benchmark_process_peak_rss_gb": round(parent_peak / 1e9, 2),
        "bf16_weights_gb": round(bf16_weights / 1e9, 2),
        "first_export": figures(first),
        "second_export": figures(second),
        "output_weights_gb": round(weights / 1e9, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
