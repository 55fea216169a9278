"""A short smoke-trained run and its fp32 export, made once per test session for the generation
and evaluation tests (`smoke_run`). Run as a script it makes them into a given folder:

    python tests/generate_smoke_worker.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# 30 steps of the smoke recipe, one checkpoint and one validation (2 global batches) at the end.
TRAIN_OVERRIDES = ["train.max_steps=30", "checkpoint.interval=30", "log.interval=10", "eval.interval=30",
                   "eval.iters=2"]


@dataclass(frozen=True)
class SmokeRun:
    run_dir: Path
    checkpoints: Path  # RUN/checkpoints (latest -> iter_0000030)
    hf_dir: Path  # fp32 export

    @property
    def iter_dir(self) -> Path:
        return self.checkpoints / "iter_0000030"


def make(out: Path) -> SmokeRun:
    from conftest import run_python

    run = SmokeRun(out / "run", out / "run" / "checkpoints", out / "hf")
    if not (run.checkpoints / "latest").exists():
        run_python(["-m", "megatron_plugin.recipes.run", "smoke", *TRAIN_OVERRIDES, f"run.dir={run.run_dir}"])
    if not (run.hf_dir / "config.json").exists():
        run_python(["-m", "megatron_plugin.export", "--checkpoint", str(run.checkpoints), "--output",
                    str(run.hf_dir), "--dtype", "fp32"])
    return run


def smoke_run(tmp_path_factory) -> SmokeRun:
    """The session's smoke run (made by the first test module that asks)."""
    return make(tmp_path_factory.getbasetemp() / "generate_smoke")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: generate_smoke_worker.py OUT_DIR")
    print(make(Path(os.path.abspath(sys.argv[1]))))
