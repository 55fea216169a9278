"""Byte format of the indexed dataset writer against Megatron-Core's reader; merge; large offsets."""
from __future__ import annotations

import numpy as np
import pytest

from megatron_plugin.data import indexed as ix


def _docs(rng, vocab, n=40):
    docs = []
    for i in range(n):
        length = 0 if i % 7 == 3 else int(rng.integers(1, 50))
        docs.append(rng.integers(0, vocab, size=length))
    docs[-1] = np.array([vocab - 1, 0], dtype=np.int64)  # extreme ids survive the dtype
    return docs


@pytest.mark.parametrize("vocab,dtype", [(65_499, np.uint16), (65_500, np.int32), (65_536, np.int32)])
def test_dtype_rule_and_megatron_reader(tmp_path, vocab, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert ix.optimal_dtype(vocab) == np.dtype(dtype)
    rng = np.random.default_rng(vocab)
    docs = _docs(rng, vocab)
    prefix = str(tmp_path / "ds")
    w = ix.IndexedDatasetWriter(prefix, ix.optimal_dtype(vocab))
    for d in docs:
        w.add_document(d)
    written = w.finalize()
    nonempty = [d for d in docs if len(d)]
    assert written.documents == len(docs) and written.sequences == len(nonempty)
    assert written.tokens == sum(len(d) for d in docs)

    ds = IndexedDataset(prefix, mmap=True)
    assert ds.index.dtype == dtype
    assert len(ds) == len(nonempty)
    np.testing.assert_array_equal(ds.sequence_lengths, [len(d) for d in nonempty])
    isz = np.dtype(dtype).itemsize
    np.testing.assert_array_equal(ds.index.sequence_pointers, np.concatenate([[0], np.cumsum([len(d) * isz for d in nonempty])[:-1]]))
    expected_doc_idx = np.concatenate([[0], np.cumsum([1 if len(d) else 0 for d in docs])])
    np.testing.assert_array_equal(ds.document_indices, expected_doc_idx)
    for i, d in enumerate(nonempty):
        np.testing.assert_array_equal(ds[i], d)
    # our reader agrees
    np.testing.assert_array_equal(ix.document_lengths(prefix), [len(d) for d in docs])
    np.testing.assert_array_equal(ix.read_document(prefix, len(docs) - 1), docs[-1])
    assert ix.check_dataset(prefix).documents == len(docs)


def test_same_bytes_as_megatron_builder(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    docs = _docs(rng, 1000)
    ref = str(tmp_path / "ref")
    b = IndexedDatasetBuilder(ref + ".bin", dtype=np.uint16)
    for d in docs:
        b.add_document(d, [len(d)] if len(d) else [])
    b.finalize(ref + ".idx")
    ours = str(tmp_path / "ours")
    w = ix.IndexedDatasetWriter(ours, np.uint16)
    for d in docs:
        w.add_document(d)
    w.finalize()
    for ext in (".bin", ".idx"):
        assert open(ref + ext, "rb").read() == open(ours + ext, "rb").read()


def test_merge_equals_single_write(tmp_path):
    rng = np.random.default_rng(1)
    docs = _docs(rng, 500, n=90)
    single = str(tmp_path / "single")
    w = ix.IndexedDatasetWriter(single, np.uint16)
    for d in docs:
        w.add_document(d)
    w.finalize()
    parts = []
    for i, sl in enumerate((slice(0, 10), slice(10, 10), slice(10, 55), slice(55, None))):
        p = str(tmp_path / f"part{i}")
        w = ix.IndexedDatasetWriter(p, np.uint16)
        for d in docs[sl]:
            w.add_document(d)
        w.finalize()
        parts.append(p)
    merged = str(tmp_path / "merged")
    ix.merge_datasets(parts, merged)
    for ext in (".bin", ".idx"):
        assert open(single + ext, "rb").read() == open(merged + ext, "rb").read()


def test_pointers_past_2_to_31_bytes(tmp_path):
    """The index is built in int64: byte offsets beyond 2**31 (and 2**32) stay exact."""
    lengths = np.array([2**30, 0, 2**30, 2**30 + 5, 7, 2**29], dtype=np.int32)  # int32 tokens
    lens_file = tmp_path / "lens"
    lens_file.write_bytes(lengths.tobytes())
    prefix = str(tmp_path / "big")
    with open(prefix + ".idx", "wb") as out:
        seqs, toks = ix._write_index(out, np.dtype(np.int32), str(lens_file), lengths.size)
    arr = ix.read_index(prefix)
    nz = lengths[lengths != 0].astype(np.int64)
    np.testing.assert_array_equal(arr.pointers, np.concatenate([[0], np.cumsum(nz * 4)[:-1]]))
    assert int(arr.pointers[-1]) > 2**32
    assert toks == int(lengths.sum(dtype=np.int64)) and seqs == nz.size


def test_abort_leaves_no_final_files(tmp_path):
    prefix = str(tmp_path / "ds")
    w = ix.IndexedDatasetWriter(prefix, np.uint16)
    w.add_document([1, 2, 3])
    w.abort()
    assert list(tmp_path.iterdir()) == []
