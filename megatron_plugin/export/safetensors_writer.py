"""Write sharded safetensors files one tensor at a time, in any order.

`safetensors.torch.save_file` needs every tensor of a file in memory at once (and copies them to
bytes), which would put a whole output shard, twice, on top of the tensor being converted. The
format is simple enough to stream instead: an 8-byte little-endian header length, a JSON header
giving each tensor's dtype, shape and byte range, then the raw little-endian data. Since the
export knows every output shape before it reads any weight, the headers are written up front and
each tensor goes straight to its place in its file as soon as it is converted. The files are the
same format `safetensors` writes and read back with `safetensors.safe_open`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_plugin.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    try:
        for unit in sorted(units, key=len, reverse=True):
            if upper.endswith(unit):
                return int(float(upper[: -len(unit)]) * units[unit])
        return int(upper)
    except ValueError:
        raise UserError(f"size {text!r}: write a byte count or a number with a unit, e.g. 5GB, 500MB, 2GiB") from None


@dataclass(frozen=True)
class Entry:
    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


class ShardedSafetensorsWriter:
    """Plans shards of at most `max_shard_bytes` (a tensor larger than that gets a shard of its
    own), writes their headers, then accepts `write(name, tensor)` in any order."""

    def __init__(self, out_dir: Path, entries: Sequence[Entry], max_shard_bytes: int):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors data is little-endian; this writer needs a little-endian host")
        self.out_dir = Path(out_dir)
        self.entries = {e.name: e for e in entries}
        if len(self.entries) != len(entries):
            raise ValueError("duplicate tensor names")
        shards: List[List[Entry]] = [[]]
        size = 0
        for entry in entries:
            if shards[-1] and size + entry.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += entry.nbytes
        self.shards = shards
        count = len(shards)
        self.file_names = (
            [SINGLE_FILE]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._where: Dict[str, Tuple[int, int]] = {}  # name -> (shard index, absolute offset)
        self._files = []
        self._written = set()
        try:
            for index, (shard, file_name) in enumerate(zip(shards, self.file_names)):
                self._files.append(self._start_file(index, shard, self.out_dir / file_name))
        except Exception:
            self.abort()
            raise

    def _start_file(self, index: int, shard: List[Entry], path: Path):
        header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for entry in shard:
            if entry.dtype not in _DTYPE_NAMES:
                raise ValueError(f"{entry.name}: dtype {entry.dtype} has no safetensors name")
            header[entry.name] = {
                "dtype": _DTYPE_NAMES[entry.dtype],
                "shape": list(entry.shape),
                "data_offsets": [offset, offset + entry.nbytes],
            }
            offset += entry.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
        data_start = 8 + len(raw)
        for entry in shard:
            self._where[entry.name] = (index, data_start + header[entry.name]["data_offsets"][0])
        handle = open(path, "wb")
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        handle.truncate(data_start + offset)  # reserve the data area; filled by write()
        return handle

    def write(self, name: str, tensor: torch.Tensor) -> None:
        entry = self.entries.get(name)
        if entry is None:
            raise KeyError(f"{name} was not planned")
        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise ValueError(
                f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {entry.shape} {entry.dtype}"
            )
        if name in self._written:
            raise ValueError(f"{name} written twice")
        index, offset = self._where[name]
        handle = self._files[index]
        handle.seek(offset)
        data = tensor.detach().cpu().contiguous()
        # A uint8 view of the tensor's own memory: no byte copy of the data is made.
        handle.write(memoryview(data.view(torch.uint8).numpy()) if data.numel() else b"")
        self._written.add(name)

    def close(self) -> List[str]:
        """Check every planned tensor was written, close files, write the index if sharded."""
        missing = [name for name in self.entries if name not in self._written]
        if missing:
            self.abort()
            raise RuntimeError(f"tensors planned but never written: {missing[:5]}")
        for handle in self._files:
            handle.close()
        self._files = []
        if len(self.file_names) > 1:
            weight_map = {}
            for shard, file_name in zip(self.shards, self.file_names):
                for entry in shard:
                    weight_map[entry.name] = file_name
            index = {
                "metadata": {"total_size": sum(e.nbytes for e in self.entries.values())},
                "weight_map": weight_map,
            }
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return list(self.file_names)

    def abort(self) -> None:
        for handle in self._files:
            try:
                handle.close()
            except OSError:
                pass
        self._files = []


def list_safetensors(folder: Path) -> Tuple[List[Path], Optional[Dict[str, str]]]:
    """The safetensors files of an HF folder and its weight map (None for a single file)."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
        return files, weight_map
    single = folder / SINGLE_FILE
    if single.exists():
        return [single], None
    raise FileNotFoundError(folder)
