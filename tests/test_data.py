"""GPTDataset wiring: blends, splits, index cache, deterministic micro-batches."""

import os

import numpy as np
import pytest
import torch

from megatron_plugin.config import ConfigError, DataConfig
from megatron_plugin.data.gpt_dataset import MicroBatches, build_datasets, megatron_tokenizer, parse_blend
from megatron_plugin.preprocess.generated_corpus import prepare_generated_corpus


def test_parse_blend():
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend([0.7, "a", "0.3", "b"]) == (["a", "b"], [0.7, 0.3])
    with pytest.raises(ConfigError, match="pairs"):
        parse_blend([0.7, "a", 0.3])
    with pytest.raises(ConfigError, match="empty"):
        parse_blend([])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, megatron_runtime):  # BlendedDataset asks torch.distributed for its rank
    root = tmp_path_factory.mktemp("corpus")
    prefix, tokenizer = prepare_generated_corpus(str(root / "a"), vocab_size=400, num_documents=400)
    # A second dataset of different documents: the same tokens, each document reversed.
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    source = IndexedDataset(prefix)
    reversed_prefix = str(root / "reversed")
    builder = IndexedDatasetBuilder(reversed_prefix + ".bin", dtype=np.uint16)
    for i in range(len(source)):
        doc = torch.from_numpy(source[i].astype(np.int64))
        builder.add_document(doc.flip(0), [len(doc)])
    builder.finalize(reversed_prefix + ".idx")
    return prefix, reversed_prefix, tokenizer


def test_blend_draws_from_both_datasets_by_weight(corpus, tmp_path):
    prefix, reversed_prefix, tokenizer = corpus
    data = DataConfig(paths=[0.75, prefix, 0.25, reversed_prefix], split="90,10,0")
    train, valid, test = build_datasets(data, 64, (400, 40, 0), 1, str(tmp_path / "cache"), megatron_tokenizer(tokenizer))
    assert len(train) >= 400 and valid is not None and test is None
    assert type(train).__name__ == "BlendedDataset"
    counts = np.bincount(train.dataset_index[:400], minlength=2)
    assert abs(counts[0] / 400 - 0.75) < 0.05
    assert os.listdir(tmp_path / "cache")  # the index cache was written
    sample = train[0]
    assert sample["tokens"].shape == (64,) and torch.equal(sample["tokens"][1:], sample["labels"][:-1])


def test_micro_batches_resume_where_they_stopped(corpus, tmp_path):
    prefix, _, tokenizer = corpus
    data = DataConfig(paths=[prefix], split="100,0,0")
    train, _, _ = build_datasets(data, 32, (64, 0, 0), 1, str(tmp_path / "cache"), megatron_tokenizer(tokenizer))
    straight = MicroBatches(train, micro_batch_size=2, dp_rank=0, dp_size=2)
    batches = [next(straight)["tokens"] for _ in range(4)]
    resumed = MicroBatches(train, micro_batch_size=2, dp_rank=0, dp_size=2, consumed_samples=2 * 2 * 2)
    assert torch.equal(next(resumed)["tokens"], batches[2])
    other_rank = MicroBatches(train, micro_batch_size=2, dp_rank=1, dp_size=2)
    assert not torch.equal(next(other_rank)["tokens"], batches[0])
