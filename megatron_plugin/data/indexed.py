"""Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``): streaming writer, reader, merge.

Format (the one Megatron-Core's ``IndexedDataset`` reads, see DESIGN.md section 5)::

    .idx  b"MMIDIDX\\x00\\x00"  <Q version=1  <B dtype code  <Q sequence count  <Q document count
          int32[sequences] lengths  int64[sequences] byte pointers  int64[documents] doc indices
    .bin  the tokens, back to back, no header

One sequence per non-empty document (no sentence splitting). An empty document adds a document
boundary but no sequence, exactly as Megatron-LM's ``tools/preprocess_data.py`` does.

The writer never holds per-document arrays in memory: it appends one int32 length per document to
a side file and builds the index from it in blocks at ``finalize``. Both files are written under
temporary names and renamed only when complete, so a final name never holds a half-written file.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Optional, Sequence

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# Megatron-Core's DType codes (megatron/core/datasets/indexed_dataset.py).
DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_HEADER_SIZE = len(INDEX_HEADER) + 8 + 1 + 8 + 8  # 34 bytes
_BLOCK = 1 << 20  # entries per block when streaming index arrays


def optimal_dtype(vocab_size: Optional[int]) -> np.dtype:
    """Megatron's rule: uint16 when the vocabulary has fewer than 65,500 entries, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def bin_path(prefix: str) -> str:
    return f"{prefix}.bin"


def idx_path(prefix: str) -> str:
    return f"{prefix}.idx"


@dataclass(frozen=True)
class IndexHeader:
    dtype: np.dtype
    sequence_count: int
    document_count: int  # number of entries in the document index = documents + 1

    @property
    def documents(self) -> int:
        return self.document_count - 1


def read_header(prefix: str) -> IndexHeader:
    path = idx_path(prefix)
    with open(path, "rb") as f:
        head = f.read(_HEADER_SIZE)
    if len(head) < _HEADER_SIZE or head[: len(INDEX_HEADER)] != INDEX_HEADER:
        raise ValueError(f"{path}: not a Megatron indexed dataset index (bad magic or truncated)")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != INDEX_VERSION:
        raise ValueError(f"{path}: unsupported index version {version}")
    code = head[17]
    if code not in CODE_DTYPES:
        raise ValueError(f"{path}: unknown dtype code {code}")
    seqs, docs = struct.unpack("<QQ", head[18:34])
    return IndexHeader(CODE_DTYPES[code], seqs, docs)


@dataclass
class IndexArrays:
    """Memory-mapped views of an index; nothing is loaded until touched."""

    header: IndexHeader
    lengths: np.ndarray  # int32[sequences]
    pointers: np.ndarray  # int64[sequences]
    document_indices: np.ndarray  # int64[documents + 1]


def read_index(prefix: str) -> IndexArrays:
    header = read_header(prefix)
    path = idx_path(prefix)
    n, d = header.sequence_count, header.document_count
    expected = _HEADER_SIZE + 4 * n + 8 * n + 8 * d
    size = os.path.getsize(path)
    if size < expected:
        raise ValueError(f"{path}: truncated index ({size} bytes, expected at least {expected})")
    mm = np.memmap(path, mode="r", dtype=np.uint8)
    lengths = mm[_HEADER_SIZE : _HEADER_SIZE + 4 * n].view(np.int32)
    pointers = mm[_HEADER_SIZE + 4 * n : _HEADER_SIZE + 12 * n].view(np.int64)
    docs = mm[_HEADER_SIZE + 12 * n : _HEADER_SIZE + 12 * n + 8 * d].view(np.int64)
    return IndexArrays(header, lengths, pointers, docs)


def check_dataset(prefix: str) -> IndexHeader:
    """Cheap consistency check of a finished dataset: header, sizes, last pointer; raises ValueError."""
    arrays = read_index(prefix)
    h = arrays.header
    itemsize = h.dtype.itemsize
    bsize = os.path.getsize(bin_path(prefix))
    if h.sequence_count:
        end = int(arrays.pointers[-1]) + int(arrays.lengths[-1]) * itemsize
    else:
        end = 0
    if end != bsize:
        raise ValueError(f"{bin_path(prefix)}: {bsize} bytes, but the index ends at byte {end}")
    if h.document_count < 1 or int(arrays.document_indices[0]) != 0:
        raise ValueError(f"{idx_path(prefix)}: document index does not start at 0")
    if int(arrays.document_indices[-1]) != h.sequence_count:
        raise ValueError(f"{idx_path(prefix)}: document index does not end at the sequence count")
    return h


def _write_index(
    out: BinaryIO,
    dtype: np.dtype,
    doc_lengths_path: str,
    documents: int,
    hasher=None,
) -> tuple[int, int]:
    """Write a full .idx from a file of int32 per-document lengths (0 = empty document).

    Streams the side file three times (lengths, pointers, document indices), one block at a time,
    so memory does not grow with the corpus. Returns (sequences, tokens).
    """
    itemsize = dtype.itemsize

    def blocks():
        lens = np.memmap(doc_lengths_path, mode="r", dtype=np.int32) if documents else np.zeros(0, np.int32)
        for start in range(0, documents, _BLOCK):
            yield np.asarray(lens[start : start + _BLOCK])

    sequences = 0
    tokens = 0
    for block in blocks():
        sequences += int(np.count_nonzero(block))
        tokens += int(block.sum(dtype=np.int64))

    def emit(data: bytes) -> None:
        out.write(data)
        if hasher is not None:
            hasher.update(data)

    emit(INDEX_HEADER)
    emit(struct.pack("<Q", INDEX_VERSION))
    emit(struct.pack("<B", DTYPE_CODES[dtype]))
    emit(struct.pack("<Q", sequences))
    emit(struct.pack("<Q", documents + 1))
    for block in blocks():  # sequence lengths
        emit(block[block != 0].astype(np.int32).tobytes())
    offset = 0
    for block in blocks():  # byte pointers: exclusive cumulative sum, int64 so > 2**31 stays exact
        nz = block[block != 0].astype(np.int64) * itemsize
        if nz.size:
            ptr = np.cumsum(nz) - nz + offset
            offset = int(ptr[-1] + nz[-1])
            emit(ptr.astype(np.int64).tobytes())
    emit(np.zeros(1, np.int64).tobytes())
    seen = 0
    for block in blocks():  # document indices: sequences seen after each document
        idx = np.cumsum(block != 0, dtype=np.int64) + seen
        if idx.size:
            seen = int(idx[-1])
        emit(idx.tobytes())
    return sequences, tokens


class IndexedDatasetWriter:
    """Append documents (token bytes already in the dataset dtype) and finalize atomically.

    ``add_chunk(data, lengths)`` takes the concatenated tokens of several documents as bytes and the
    int32 token count of each document (0 for an empty document), which is what the encoder
    workers produce; the writer does no per-token work. ``add_raw(src, nbytes, lengths)`` streams
    token bytes from a file instead (how ``merge_datasets`` copies whole datasets).
    """

    def __init__(self, prefix: str, dtype: np.dtype, tmp_suffix: Optional[str] = None) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported dtype {self.dtype}")
        suffix = tmp_suffix or f".tmp{os.getpid()}"
        self._bin_tmp = bin_path(prefix) + suffix
        self._idx_tmp = idx_path(prefix) + suffix
        self._lens_tmp = idx_path(prefix) + suffix + ".lengths"
        parent = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(parent, exist_ok=True)
        self._bin = open(self._bin_tmp, "wb", buffering=1 << 22)
        self._lens = open(self._lens_tmp, "wb", buffering=1 << 20)
        self._bin_hash = hashlib.sha256()
        self.documents = 0
        self.bin_bytes = 0
        self.closed = False

    def add_chunk(self, data: bytes, lengths: np.ndarray) -> None:
        lengths = np.asarray(lengths, dtype=np.int32)
        if int(lengths.sum(dtype=np.int64)) * self.dtype.itemsize != len(data):
            raise ValueError("token bytes and document lengths disagree")
        self._bin.write(data)
        self._bin_hash.update(data)
        self._lens.write(lengths.tobytes())
        self.documents += int(lengths.size)
        self.bin_bytes += len(data)

    def add_raw(self, src: BinaryIO, nbytes: int, lengths: np.ndarray) -> None:
        """Append ``nbytes`` of token bytes read from ``src`` (another dataset's ``.bin``, in this
        dtype) and the token count of each document they hold, without holding them in memory."""
        lengths = np.asarray(lengths, dtype=np.int32)
        if int(lengths.sum(dtype=np.int64)) * self.dtype.itemsize != nbytes:
            raise ValueError("token bytes and document lengths disagree")
        left = nbytes
        while left:
            buf = src.read(min(left, 1 << 24))
            if not buf:
                raise ValueError(f"{getattr(src, 'name', 'input')}: ends early")
            self._bin.write(buf)
            self._bin_hash.update(buf)
            self.bin_bytes += len(buf)
            left -= len(buf)
        self._lens.write(lengths.tobytes())
        self.documents += int(lengths.size)

    def add_document(self, tokens: Sequence[int]) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        self.add_chunk(arr.tobytes(), np.array([arr.size], np.int32))

    def finalize(self) -> "WrittenDataset":
        """Write the index, then rename both files to their final names (index last)."""
        self._bin.close()
        self._lens.close()
        idx_hash = hashlib.sha256()
        with open(self._idx_tmp, "wb", buffering=1 << 22) as out:
            sequences, tokens = _write_index(out, self.dtype, self._lens_tmp, self.documents, idx_hash)
            out.flush()
            os.fsync(out.fileno())
        os.remove(self._lens_tmp)
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(self._idx_tmp, idx_path(self.prefix))
        self.closed = True
        return WrittenDataset(
            prefix=self.prefix,
            dtype=str(self.dtype),
            documents=self.documents,
            sequences=sequences,
            tokens=tokens,
            bin_bytes=self.bin_bytes,
            idx_bytes=os.path.getsize(idx_path(self.prefix)),
            bin_sha256=self._bin_hash.hexdigest(),
            idx_sha256=idx_hash.hexdigest(),
        )

    def abort(self) -> None:
        """Close and delete the temporary files; the final names are never touched."""
        for f in (self._bin, self._lens):
            try:
                f.close()
            except Exception:
                pass
        for path in (self._bin_tmp, self._idx_tmp, self._lens_tmp):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        self.closed = True


@dataclass
class WrittenDataset:
    prefix: str
    dtype: str
    documents: int
    sequences: int
    tokens: int
    bin_bytes: int
    idx_bytes: int
    bin_sha256: str
    idx_sha256: str


def document_lengths(prefix: str) -> np.ndarray:
    """Token count per document (0 for an empty document), from the index alone."""
    arr = read_index(prefix)
    per_doc_seq = np.diff(np.asarray(arr.document_indices))
    out = np.zeros(per_doc_seq.size, dtype=np.int64)
    # Each document holds 0 or more sequences; sum the lengths of its sequences.
    ends = np.asarray(arr.document_indices[1:])
    csum = np.concatenate([[0], np.cumsum(np.asarray(arr.lengths), dtype=np.int64)])
    starts = np.asarray(arr.document_indices[:-1])
    out[:] = csum[ends] - csum[starts]
    return out


def read_document(prefix: str, index: int, arrays: Optional[IndexArrays] = None) -> np.ndarray:
    """Tokens of document ``index`` (all its sequences), read with a memory map."""
    arrays = arrays or read_index(prefix)
    dtype = arrays.header.dtype
    s, e = int(arrays.document_indices[index]), int(arrays.document_indices[index + 1])
    if s == e:
        return np.zeros(0, dtype=dtype)
    start = int(arrays.pointers[s])
    count = int(arrays.lengths[s:e].sum(dtype=np.int64))
    return np.fromfile(bin_path(prefix), dtype=dtype, count=count, offset=start)


def merge_datasets(prefixes: Iterable[str], output_prefix: str) -> WrittenDataset:
    """Concatenate datasets in the given order into ``output_prefix`` with bounded memory.

    The .bin parts are streamed with a fixed buffer; each part's per-document lengths are
    recovered from its index block by block, so the merged index is written by the same code as a
    single run: merging the shards of a corpus gives the bytes a single run over it gives.
    """
    prefixes = list(prefixes)
    if not prefixes:
        raise ValueError("merge needs at least one input prefix")
    headers = [check_dataset(p) for p in prefixes]
    dtypes = {str(h.dtype) for h in headers}
    if len(dtypes) != 1:
        raise ValueError(f"cannot merge datasets with different dtypes: {sorted(dtypes)}")
    writer = IndexedDatasetWriter(output_prefix, headers[0].dtype)
    try:
        for prefix in prefixes:
            arrays = read_index(prefix)
            docs = arrays.header.documents
            lengths = arrays.lengths
            dindex = arrays.document_indices
            with open(bin_path(prefix), "rb") as src:
                for start in range(0, docs, _BLOCK):
                    stop = min(docs, start + _BLOCK)
                    d = np.asarray(dindex[start : stop + 1])
                    seq_lo, seq_hi = int(d[0]), int(d[-1])
                    seq_lens = np.asarray(lengths[seq_lo:seq_hi]).astype(np.int64)
                    csum = np.concatenate([[0], np.cumsum(seq_lens)])
                    doc_lens = (csum[d[1:] - seq_lo] - csum[d[:-1] - seq_lo]).astype(np.int32)
                    writer.add_raw(src, int(csum[-1]) * writer.dtype.itemsize, doc_lens)
        return writer.finalize()
    except BaseException:
        writer.abort()
        raise


def remove_dataset(prefix: str) -> None:
    for path in (bin_path(prefix), idx_path(prefix)):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


__all__ = [
    "IndexHeader",
    "IndexArrays",
    "IndexedDatasetWriter",
    "WrittenDataset",
    "optimal_dtype",
    "read_header",
    "read_index",
    "read_document",
    "document_lengths",
    "check_dataset",
    "merge_datasets",
    "remove_dataset",
    "bin_path",
    "idx_path",
]
