"""Prepare Megatron-LM's tools/preprocess_data.py for the side-by-side benchmark (outside the repo).

    python benchmarks/preprocess_megatron_setup.py --mirror /work/.mirror/NVIDIA+Megatron-LM/repo \
        --dest /tmp/megatron-lm --venv /tmp/mlm-venv --shim /tmp/mlm-shim

1. ``git archive`` the tool and the ``megatron`` package from a Megatron-LM clone into ``--dest``
   (never into this repository).
2. Make a Python 3.11 virtualenv that sees this project's environment (torch CPU, sentencepiece,
   numpy, ...) through a ``.pth`` file and adds the two imports Megatron-LM needs at import time
   and that this project does not: ``triton`` and ``einops`` (from the configured package index).
   A CPU torch wheel for Python 3.12 is not on the local index, and Megatron-LM's tool only needs
   torch to import, so reusing the 3.11 environment is the lightest way to run it.
3. Megatron-LM targets Python 3.12 and imports ``typing.override`` (3.12+); ``--shim`` gets a
   ``sitecustomize.py`` that defines it as the identity decorator under 3.11. Nothing else of the
   tool is changed. Pass ``--megatron-pythonpath SHIM`` to the benchmark.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

SHIM = '''# Python 3.11 compatibility shim for running Megatron-LM's tools (it targets 3.12).
import typing
if not hasattr(typing, "override"):
    def override(f):
        return f
    typing.override = override
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mirror", required=True, help="a Megatron-LM git repository (bare is fine)")
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--dest", default="/tmp/megatron-lm")
    ap.add_argument("--venv", default="/tmp/mlm-venv")
    ap.add_argument("--shim", default="/tmp/mlm-shim")
    args = ap.parse_args()

    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", args.mirror, "archive", args.rev, "tools/preprocess_data.py", "megatron"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)

    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not Path(args.venv).exists():
        subprocess.run([str(base), "-m", "venv", args.venv], check=True)
    site = Path(args.venv) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / "project_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(Path(args.venv) / "bin" / "pip"), "install", "-q", "triton", "einops"], check=True)

    Path(args.shim).mkdir(parents=True, exist_ok=True)
    (Path(args.shim) / "sitecustomize.py").write_text(SHIM)
    print(f"Megatron-LM tool: {dest}/tools/preprocess_data.py\npython: {args.venv}/bin/python\n"
          f"benchmark flags: --megatron-lm {dest} --megatron-python {args.venv}/bin/python "
          f"--megatron-pythonpath {args.shim}")


if __name__ == "__main__":
    main()
