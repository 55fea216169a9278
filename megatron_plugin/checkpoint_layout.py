"""What a run's checkpoints look like on disk, for every part of the package that reads or writes them.

    RUN/checkpoints/
        latest                   name of the newest complete checkpoint (replaced atomically)
        iter_0000100/            one checkpoint: a Megatron-Core dist checkpoint {"model": ...}
            optimizer/           optimizer, LR scheduler, RNG (resumable checkpoints only)
            train_state.json     step, consumed samples, the layout it was written with
            run_config.json      the resolved RunConfig
            tokenizer.model      the SentencePiece model the data was tokenized with
            files.json           every file with its size (and SHA-256 of the small ones)
        iter_0000200.partial/    a checkpoint being written

Training writes this layout; export, import, generation and evaluation read it. Which checkpoint a
training run resumes from (falling back past damaged ones) is training's own policy, built on the
names and helpers here. Only the standard library and the package's error base are used, so that
any module may import this one; `check_common_state` alone asks runtime.mcore_compat, when a
checkpoint was written by a Megatron-Core release (0.19+) that not every supported one reads.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import List, Optional, Tuple

from megatron_plugin.errors import UserError

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
RUN_CONFIG_FILE = "run_config.json"
TRAIN_STATE_FILE = "train_state.json"
TOKENIZER_FILE = "tokenizer.model"
FILES_MANIFEST = "files.json"
OPTIMIZER_DIR = "optimizer"
PARTIAL_SUFFIX = ".partial"
# RUN/initial_weights/: checkpoint.load's Hugging Face folder, converted once into this layout.
INITIAL_WEIGHTS_DIR = "initial_weights"
# A Hugging Face model folder (export's output, or checkpoint.load's / generate's input) is known
# by its config.json.
HF_CONFIG_FILE = "config.json"

ITER_PREFIX = "iter_"
# A checkpoint folder: iter_ and the step, written with 7 digits and read with any number of them
# (an imported checkpoint may be named iter_50 by hand).
ITER_DIR = re.compile(rf"^{ITER_PREFIX}(\d+)$")

# Written by dist_checkpointing.save: its own metadata, and the torch.distributed.checkpoint index.
MODEL_METADATA_FILE = "metadata.json"
DCP_INDEX_FILE = ".metadata"
MODEL_FILES = (MODEL_METADATA_FILE, DCP_INDEX_FILE)
MODEL_DATA_GLOB = "*.distcp"
# The common (non-tensor) state of a dist checkpoint, the optimizer folder's LR scheduler among
# it: megatron-core up to 0.18 writes it to common.pt; 0.19 stores it in the .distcp files as the
# object "common_state", which the index names by its key (and reads common.pt of older ones).
COMMON_STATE_FILE = "common.pt"
COMMON_STATE_KEY = b"common_state/shard_"
COMMON_BACKEND_FIELD = "common_backend"  # in metadata.json up to 0.18


def is_hf_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / HF_CONFIG_FILE).is_file() and not (path / MODEL_METADATA_FILE).exists()


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file or key and what to do."""


def iter_dir_name(step: int) -> str:
    return f"{ITER_PREFIX}{step:07d}"


def iter_step(name: str) -> Optional[int]:
    """The step of a checkpoint folder's name, None when the name is not one."""
    match = ITER_DIR.match(name)
    return int(match.group(1)) if match else None


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS_DIR)


def has_latest(root: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(root, LATEST_FILE))


def read_latest(root: str) -> Optional[str]:
    """Path of the checkpoint `latest` names, or None when there is none."""
    pointer = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if not ITER_DIR.match(name) or not os.path.isdir(path):
        raise CheckpointError(
            f"{pointer} names {name!r}, which is not a checkpoint folder in {root} (the checkpoint was "
            f"removed or never completed): point it at an existing {ITER_PREFIX}NNNNNNN folder, pass "
            f"that folder itself, or remove {LATEST_FILE} to start fresh"
        )
    return path


def write_latest(root: str, name: str) -> None:
    """Point `root/latest` at `name`, atomically and durably."""
    tmp = os.path.join(root, LATEST_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST_FILE))


def list_checkpoints(root: str) -> List[Tuple[int, str]]:
    """(step, path) of every complete checkpoint folder in `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        step = iter_step(name)
        if step is not None:
            found.append((step, os.path.join(root, name)))
    return sorted(found)


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoint folder `path` stands for: an iter_N folder (or any folder holding a model
    checkpoint) as it is, `RUN/checkpoints` through its `latest`, or the run folder `RUN` through
    `RUN/checkpoints/latest`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not has_latest(path) and has_latest(path / CHECKPOINTS_DIR):
        path = path / CHECKPOINTS_DIR
    if (path / MODEL_METADATA_FILE).exists() or ITER_DIR.match(path.name):
        return path
    latest = read_latest(str(path))
    if latest is not None:
        return Path(latest)
    candidates = sorted(p.name for p in path.iterdir() if p.is_dir() and ITER_DIR.match(p.name))
    hint = f" (found {', '.join(candidates)}; pass one of them)" if candidates else ""
    raise CheckpointError(
        f"{path} is neither a checkpoint directory (no {MODEL_METADATA_FILE}) nor a checkpoints folder "
        f"with a {LATEST_FILE!r} file{hint}"
    )


def check_complete(ckpt_dir: Path) -> None:
    """Fail early, naming the missing file, on a checkpoint that was interrupted while saving."""
    missing = [name for name in MODEL_FILES if not (ckpt_dir / name).exists()]
    if missing:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} is incomplete: missing {', '.join(missing)} (the save was "
            "interrupted or files were removed); use an earlier iter_N directory"
        )
    if not any(ckpt_dir.glob(MODEL_DATA_GLOB)):
        raise CheckpointError(
            f"checkpoint {ckpt_dir} has no {MODEL_DATA_GLOB} data files; it is incomplete, use an "
            "earlier iter_N directory"
        )
    if not (ckpt_dir / RUN_CONFIG_FILE).exists():
        raise CheckpointError(
            f"checkpoint {ckpt_dir} has no {RUN_CONFIG_FILE}, which holds the model sizes; it was "
            "not written by megatron_plugin's trainer (or the save was interrupted)"
        )
    check_common_state(ckpt_dir)


def common_state_in_data_files(folder: str | os.PathLike) -> Optional[bool]:
    """Where the dist checkpoint in `folder` keeps its common state: False in common.pt (written
    by megatron-core 0.18 or earlier), True in its data files (0.19 or later: the index names
    the object, and metadata.json no longer names a common backend), None in neither (a
    checkpoint of an older writer that lost its common.pt) or when the files cannot tell."""
    folder = Path(folder)
    if (folder / COMMON_STATE_FILE).is_file():
        return False
    try:
        if COMMON_STATE_KEY in (folder / DCP_INDEX_FILE).read_bytes():
            return True
        config = json.loads((folder / MODEL_METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None
    return True if isinstance(config, dict) and COMMON_BACKEND_FIELD not in config else None


def check_common_state(ckpt_dir: str | os.PathLike, with_optimizer: bool = False) -> None:
    """Fail early on a checkpoint (and, `with_optimizer`, its optimizer folder) whose common state
    this Megatron-Core cannot read: kept in the data files by 0.19+ and read here by 0.16, or
    missing altogether. Megatron-Core is asked (runtime.mcore_compat) only in the first case."""
    ckpt_dir = Path(ckpt_dir)
    folders = [ckpt_dir] + ([ckpt_dir / OPTIMIZER_DIR] if with_optimizer else [])
    for folder in folders:
        if not all((folder / name).is_file() for name in MODEL_FILES):
            continue  # no dist checkpoint here, or one missing more than this (check_complete's)
        in_data_files = common_state_in_data_files(folder)
        if in_data_files is None:
            raise CheckpointError(
                f"checkpoint {folder} is incomplete: missing {COMMON_STATE_FILE} (and its index names "
                "no common state in the data files either: the save was interrupted or files were "
                "removed); use an earlier iter_N directory"
            )
        if in_data_files:
            from megatron_plugin.runtime import mcore_compat  # imports Megatron-Core: only here

            mcore_compat.check_reads_common_state_in_data_files(ckpt_dir)


def read_run_config(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / RUN_CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
