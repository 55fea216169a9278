"""Input files: discovery, sharding, streaming into chunks (main process), parsing chunks (workers).

The main process only reads bytes and cuts them at line (or paragraph) boundaries; JSON decoding,
UTF-8 validation and key checks happen in the workers. Nothing holds more than a few chunks.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

from .errors import (
    EMPTY,
    INVALID_UTF8,
    MALFORMED_JSON,
    MISSING_KEY,
    NON_STRING,
    UNREADABLE_FILE,
    BadRecord,
    PreprocessError,
)

JSONL_EXT = (".jsonl", ".json", ".ndjson")
TEXT_EXT = (".txt", ".text")
PARQUET_EXT = (".parquet", ".pq")
COMPRESSED = (".gz", ".zst", ".zstd")
TEXT_UNITS = ("line", "paragraph", "file")


@dataclass(frozen=True)
class InputFile:
    path: str
    size: int
    mtime_ns: int
    kind: str  # "jsonl" | "text" | "parquet"
    compression: Optional[str]  # None | "gz" | "zst"

    def as_dict(self) -> dict:
        return {"path": self.path, "bytes": self.size, "kind": self.kind, "compression": self.compression}


def classify(path: str) -> tuple[Optional[str], Optional[str]]:
    name = path.lower()
    compression = None
    for ext in COMPRESSED:
        if name.endswith(ext):
            compression = "gz" if ext == ".gz" else "zst"
            name = name[: -len(ext)]
            break
    if name.endswith(JSONL_EXT):
        return "jsonl", compression
    if name.endswith(TEXT_EXT):
        return "text", compression
    if name.endswith(PARQUET_EXT) and compression is None:
        return "parquet", None
    return None, compression


def expand_inputs(inputs: Sequence[str]) -> list[InputFile]:
    """Files named by each input (a file, a directory searched recursively, or a glob), in order.

    Directories and globs are sorted, so every machine sees the same list in the same order.
    """
    files: list[str] = []
    for spec in inputs:
        if os.path.isdir(spec):
            found = []
            for root, dirs, names in os.walk(spec):
                dirs.sort()
                for n in sorted(names):
                    p = os.path.join(root, n)
                    if classify(p)[0] is not None:
                        found.append(p)
            if not found:
                raise PreprocessError(f"{spec}: directory holds no .jsonl/.json(.gz/.zst), .parquet or .txt files")
            files.extend(found)
        elif os.path.exists(spec):
            files.append(spec)
        else:
            matched = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matched:
                raise PreprocessError(f"{spec}: no such file, directory or matching glob")
            files.extend(matched)
    out = []
    seen = set()
    for p in files:
        ap = os.path.abspath(p)
        if ap in seen:
            continue
        seen.add(ap)
        kind, comp = classify(p)
        if kind is None:
            raise PreprocessError(
                f"{p}: unknown input type; expected .jsonl/.json/.ndjson (optionally .gz/.zst), "
                ".parquet or .txt"
            )
        st = os.stat(p)
        out.append(InputFile(ap, st.st_size, st.st_mtime_ns, kind, comp))
    return out


def shard_files(files: Sequence[InputFile], num_shards: int, shard_index: int) -> list[InputFile]:
    """A contiguous, size-balanced run of the file list for one shard (deterministic).

    Contiguous runs keep the corpus order: merging shards 0..N-1 gives a single run's output.
    File i goes to the shard in which the midpoint of its bytes falls.
    """
    if num_shards <= 1:
        return list(files)
    total = sum(max(f.size, 1) for f in files)
    out, start = [], 0
    for f in files:
        size = max(f.size, 1)
        mid = start + size / 2
        if min(num_shards - 1, int(mid * num_shards // total)) == shard_index:
            out.append(f)
        start += size
    return out


# ----------------------------------------------------------------------------------------------
# Chunks: what the main process sends to a worker.


@dataclass
class Chunk:
    index: int
    path: str
    kind: str  # "jsonl" | "text" | "parquet"
    first_line: int  # 1-based line (or row) number of the first record
    payload: object  # bytes for jsonl/text, a pyarrow RecordBatch for parquet
    raw_bytes: int  # input bytes this chunk accounts for (for progress and --verify spread)
    unit: str  # --text-unit (what a document is in a text file)
    file_start: bool = False
    verify: int = 0  # how many of its documents to re-encode with plain SentencePiece


class _Counting(io.RawIOBase):
    """Wraps a file and counts bytes read, so compressed inputs report on-disk progress."""

    def __init__(self, f) -> None:
        self.f = f
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.count += n or 0
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def _open_stream(f: InputFile):
    raw = _Counting(open(f.path, "rb", buffering=0))
    if f.compression == "gz":
        return gzip.GzipFile(fileobj=io.BufferedReader(raw, 1 << 20), mode="rb"), raw
    if f.compression == "zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(io.BufferedReader(raw, 1 << 20), read_size=1 << 20), raw
    return io.BufferedReader(raw, 1 << 20), raw


_PARA_END = re.compile(rb"\n[ \t\r]*\n")


def _cut(buf: bytes, unit: str) -> int:
    """Index after the last complete record in ``buf`` (0 when there is none yet)."""
    if unit == "paragraph":
        last = None
        for m in _PARA_END.finditer(buf):
            last = m
        return last.end() if last else 0
    return buf.rfind(b"\n") + 1


def _file_chunks(f: InputFile, chunk_bytes: int, unit: str) -> Iterator[tuple[int, object, int, bool]]:
    """(first_line, payload, raw_bytes, file_start) for one file."""
    if f.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f.path)
        rows = pf.metadata.num_rows or 1
        first, done_bytes = 1, 0
        batch_rows = 4096
        for batch in pf.iter_batches(batch_size=batch_rows):
            n = batch.num_rows
            end_bytes = int(f.size * min(1.0, (first - 1 + n) / rows))
            yield first, batch, end_bytes - done_bytes, first == 1
            done_bytes = end_bytes
            first += n
        return
    stream, raw = _open_stream(f)
    with stream:
        if f.kind == "text" and unit == "file":
            data = stream.read()
            yield 1, data, raw.count, True
            return
        carry = b""
        line = 1
        reported = 0
        first = True
        while True:
            block = stream.read(chunk_bytes)
            if not block:
                break
            buf = carry + block
            cut = _cut(buf, unit if f.kind == "text" else "line")
            if cut == 0:
                carry = buf
                continue
            data, carry = buf[:cut], buf[cut:]
            yield line, data, raw.count - reported, first
            first = False
            reported = raw.count
            line += data.count(b"\n")
        if carry or first:
            yield line, carry, raw.count - reported, first


def iter_chunks(files: Sequence[InputFile], chunk_bytes: int, unit: str, on_error: str, bad: list) -> Iterator[Chunk]:
    """All chunks of all files, in order. An unreadable file raises, or is recorded and skipped."""
    index = 0
    for f in files:
        try:
            for first_line, payload, raw_bytes, file_start in _file_chunks(f, chunk_bytes, unit):
                yield Chunk(index, f.path, f.kind, first_line, payload, raw_bytes, unit, file_start)
                index += 1
        except (OSError, EOFError, ValueError) as exc:
            if isinstance(exc, PreprocessError):
                raise
            rec = BadRecord(UNREADABLE_FILE, f.path, 0, f"cannot read the file: {type(exc).__name__}: {exc}")
            if on_error != "skip":
                raise PreprocessError(rec.message() + "; fix or remove the file, or pass --on-error skip") from exc
            bad.append(rec)
        except Exception as exc:  # zstandard / pyarrow raise their own error types
            rec = BadRecord(UNREADABLE_FILE, f.path, 0, f"cannot read the file: {type(exc).__name__}: {exc}")
            if on_error != "skip":
                raise PreprocessError(rec.message() + "; fix or remove the file, or pass --on-error skip") from exc
            bad.append(rec)


def check_readable(files: Sequence[InputFile]) -> list[BadRecord]:
    """Open every file up front so a missing permission fails before any work is done."""
    bad = []
    for f in files:
        try:
            with open(f.path, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            bad.append(BadRecord(UNREADABLE_FILE, f.path, 0, f"cannot open the file: {exc.strerror or exc}"))
    return bad


# ----------------------------------------------------------------------------------------------
# Parsing (worker side): chunk -> documents (one text per key) and bad records.


@dataclass
class Parsed:
    docs: list  # list of (line, tuple of texts, one per key)
    bad: list = field(default_factory=list)  # BadRecord
    blank_lines: int = 0


def _utf8_error(exc: UnicodeDecodeError) -> str:
    bad = exc.object[exc.start : exc.start + 4]
    return f"invalid UTF-8 at byte {exc.start} of the line ({bad!r}); re-encode the file as UTF-8"


def _decode_record(raw: bytes, lineno: int, strip_bom: bool, path: str, out: Parsed) -> Optional[str]:
    """One record's text, without a leading byte-order mark; None (recorded in ``out``) if not UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        out.bad.append(BadRecord(INVALID_UTF8, path, lineno, _utf8_error(exc)))
        return None
    return text[1:] if strip_bom and text.startswith("\ufeff") else text


def parse_chunk(chunk: Chunk, keys: Sequence[str]) -> Parsed:
    if chunk.kind == "jsonl":
        return _parse_jsonl(chunk, keys)
    if chunk.kind == "parquet":
        return _parse_parquet(chunk, keys)
    return _parse_text(chunk)


def _parse_jsonl(chunk: Chunk, keys: Sequence[str]) -> Parsed:
    out = Parsed([])
    lines = chunk.payload.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    path = chunk.path
    loads = json.loads
    single = keys[0] if len(keys) == 1 else None
    for i, raw in enumerate(lines):
        lineno = chunk.first_line + i
        text = _decode_record(raw, lineno, chunk.file_start and i == 0, path, out)
        if text is None:
            continue
        try:
            obj = loads(text)
        except ValueError as exc:
            if not text.strip():
                out.blank_lines += 1
                continue
            out.bad.append(BadRecord(MALFORMED_JSON, path, lineno, f"malformed JSON: {exc}"))
            continue
        if not isinstance(obj, dict):
            out.bad.append(
                BadRecord(MALFORMED_JSON, path, lineno, f"expected a JSON object per line, got {type(obj).__name__}")
            )
            continue
        if single is not None:
            v = obj.get(single)
            if type(v) is str:
                out.docs.append((lineno, (v,)))
                continue
            vals = None
            missing = [single] if single not in obj else []
        else:
            vals = tuple(obj.get(k) for k in keys)
            missing = [k for k in keys if k not in obj]
        if missing:
            out.bad.append(
                BadRecord(
                    MISSING_KEY, path, lineno,
                    f"missing key {missing[0]!r} (keys present: {sorted(obj)[:8]}); choose the field with --json-keys",
                )
            )
            continue
        vals = vals if vals is not None else (obj[single],)
        wrong = [(k, v) for k, v in zip(keys, vals) if not isinstance(v, str)]
        if wrong:
            k, v = wrong[0]
            out.bad.append(
                BadRecord(NON_STRING, path, lineno, f"key {k!r} holds a {type(v).__name__}, not a string")
            )
            continue
        out.docs.append((lineno, vals))
    return out


def _parse_parquet(chunk: Chunk, keys: Sequence[str]) -> Parsed:
    import pyarrow as pa

    out = Parsed([])
    batch = chunk.payload
    names = batch.schema.names
    cols = []
    for k in keys:
        if k not in names:
            # Every row of the file lacks the key: one record per row would be noise, one per batch.
            out.bad.extend(
                BadRecord(MISSING_KEY, chunk.path, chunk.first_line + r,
                          f"missing column {k!r} (columns: {names[:8]}); choose it with --json-keys")
                for r in range(batch.num_rows)
            )
            return out
        col = batch.column(names.index(k))
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            out.bad.extend(
                BadRecord(NON_STRING, chunk.path, chunk.first_line + r, f"column {k!r} has type {col.type}, not string")
                for r in range(batch.num_rows)
            )
            return out
        cols.append(col.to_pylist())
    for r, vals in enumerate(zip(*cols)):
        row = chunk.first_line + r
        if any(v is None for v in vals):
            k = keys[[v is None for v in vals].index(True)]
            out.bad.append(BadRecord(NON_STRING, chunk.path, row, f"key {k!r} is null, not a string"))
            continue
        out.docs.append((row, tuple(vals)))
    return out


def _parse_text(chunk: Chunk) -> Parsed:
    out = Parsed([])
    data: bytes = chunk.payload
    path = chunk.path
    if chunk.unit == "file":
        pieces = [(1, data)]
    elif chunk.unit == "paragraph":
        pieces = []
        line = chunk.first_line
        pos = 0
        for m in _PARA_END.finditer(data):
            pieces.append((line, data[pos : m.start()]))
            line += data.count(b"\n", pos, m.end())
            pos = m.end()
        if pos < len(data):
            pieces.append((line, data[pos:]))
    else:
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        pieces = [(chunk.first_line + i, l) for i, l in enumerate(lines)]
    for i, (lineno, raw) in enumerate(pieces):
        text = _decode_record(raw, lineno, chunk.file_start and i == 0, path, out)
        if text is None:
            continue
        if chunk.unit == "line":
            text = text.rstrip("\r")
        if not text.strip():
            out.blank_lines += 1  # blank lines separate documents in text files; they are not documents
            continue
        out.docs.append((lineno, (text,)))
    return out


__all__ = [
    "InputFile", "Chunk", "Parsed", "expand_inputs", "shard_files", "iter_chunks", "parse_chunk",
    "check_readable", "TEXT_UNITS", "EMPTY",
]
