"""What a complete checkpoint holds, recorded when it is published and checked before a resume.

The manifest (checkpoint_layout.FILES_MANIFEST) lists every file of the checkpoint folder with its
size, and the SHA-256 of the small ones (metadata, JSON, the tokenizer: where a flipped or
truncated byte changes the meaning); the large tensor files are checked by size, which catches the
truncation a full disk or an interrupted copy leaves, without reading gigabytes before every
start. A folder whose files do
not match is damaged: the resume names the file and falls back to an earlier checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from megatron_plugin.checkpoint_layout import FILES_MANIFEST, OPTIMIZER_DIR
from megatron_plugin.files import file_sha256

# Files up to this size are checksummed as well as sized.
CHECKSUM_MAX_BYTES = 1 << 20


def write_file_manifest(folder: str) -> None:
    """Record every file under `folder` (call once all of it is written, before it is published)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative == FILES_MANIFEST:
                continue
            size = os.path.getsize(path)
            files[relative] = {"bytes": size, **({"sha256": file_sha256(path)} if size <= CHECKSUM_MAX_BYTES else {})}
    tmp = os.path.join(folder, FILES_MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"files": dict(sorted(files.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, FILES_MANIFEST))


def find_damage(folder: str) -> Optional[str]:
    """None if `folder` holds every file its manifest lists, unchanged; else what is wrong, naming
    the file. Checkpoints written before manifests were recorded pass unchecked."""
    manifest_path = os.path.join(folder, FILES_MANIFEST)
    if not os.path.isfile(manifest_path):
        return None
    try:
        with open(manifest_path, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as error:
        return f"{manifest_path} is unreadable ({error})"
    # A weights-only snapshot lost its optimizer folder to pruning by design; the files recorded
    # under it are then not expected.
    weights_only = not os.path.isdir(os.path.join(folder, OPTIMIZER_DIR))
    for relative, expected in files.items():
        if weights_only and relative.split(os.sep, 1)[0] == OPTIMIZER_DIR:
            continue
        path = os.path.join(folder, relative)
        if not os.path.isfile(path):
            return f"{path} is missing"
        size = os.path.getsize(path)
        if size != expected["bytes"]:
            return f"{path} has {size:,} bytes, {expected['bytes']:,} were written"
        if "sha256" in expected and file_sha256(path) != expected["sha256"]:
            return f"{path} differs from what was written (SHA-256 mismatch)"
    return None
