"""Packed sequences on the local spec: a sequence's logits packed with others equal its logits alone,
and nothing attends across a boundary."""
from __future__ import annotations

import pytest
import torch

from megatron_plugin.config import BuildConfig, PrecisionConfig
from megatron_plugin.recipes.presets import tiny_model

LENGTHS = [7, 13, 1, 10, 5]  # a one-token sequence too


def _packed_params(lengths):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))


@pytest.fixture(scope="module")
def model(megatron_runtime):
    from megatron_plugin.model import build_gpt_model

    torch.manual_seed(0)
    return build_gpt_model(BuildConfig(tiny_model(vocab_size=256, seq=64), PrecisionConfig(dtype="fp32"))).eval()


def _alone(model, ids):
    tokens = torch.tensor([ids])
    positions = torch.arange(len(ids)).unsqueeze(0)
    with torch.no_grad():
        return model(tokens, positions, None)[0]


def _packed(model, sequences):
    tokens = torch.tensor([[t for ids in sequences for t in ids]])
    positions = torch.cat([torch.arange(len(ids)) for ids in sequences]).unsqueeze(0)
    with torch.no_grad():
        return model(tokens, positions, None, packed_seq_params=_packed_params([len(s) for s in sequences]))[0]


def test_packed_logits_equal_each_sequence_alone(model):
    gen = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in LENGTHS]
    packed = _packed(model, sequences)
    start = 0
    for ids in sequences:
        torch.testing.assert_close(packed[start:start + len(ids)], _alone(model, ids), rtol=1e-5, atol=1e-5)
        start += len(ids)
    assert start == packed.shape[0]


def test_no_attention_across_a_boundary(model):
    """Changing every token of the first sequence leaves the later sequences' logits bit-identical."""
    gen = torch.Generator().manual_seed(2)
    sequences = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in LENGTHS]
    changed = [[(t + 1) % 256 for t in sequences[0]]] + sequences[1:]
    a, b = _packed(model, sequences), _packed(model, changed)
    first = LENGTHS[0]
    assert not torch.equal(a[:first], b[:first])
    assert torch.equal(a[first:], b[first:])


def test_packed_sequences_must_cover_the_pack(model):
    from megatron_plugin.model.attention import SDPAttention

    core = next(m for m in model.modules() if isinstance(m, SDPAttention))
    q = torch.randn(6, core.config.num_attention_heads, core.config.kv_channels)
    k = torch.randn(6, core.config.num_query_groups, core.config.kv_channels)
    with pytest.raises(ValueError, match="cover tokens 0..5 of 6"):
        core(q, k, k, None, packed_seq_params=_packed_params([2, 3]))


def test_a_collated_micro_batch_runs_as_one_pack(model):
    """Two packed rows of a micro-batch (sft_packing's collate boundaries, padding as its own
    segment) run as one thd sequence: each conversation's logits equal its logits alone."""
    from megatron_plugin.data.sft_packing import packed_seq_params

    seq = 16
    rows = [[6, 9, 1], [4, 4, 8]]  # lengths per row, the last of the first row is padding
    cu = torch.tensor([[0, 6, 15, 16], [0, 4, 8, 16]], dtype=torch.int32)
    gen = torch.Generator().manual_seed(3)
    sequences = [torch.randint(0, 256, (n,), generator=gen).tolist() for row in rows for n in row]
    tokens = torch.tensor([[t for ids in sequences for t in ids]])
    assert tokens.shape[1] == 2 * seq
    params = packed_seq_params(cu, torch.tensor([4, 4], dtype=torch.int32), seq)
    positions = torch.cat([torch.arange(len(ids)) for ids in sequences]).unsqueeze(0)
    with torch.no_grad():
        packed = model(tokens, positions, None, packed_seq_params=params)[0]
    start = 0
    for ids in sequences:
        torch.testing.assert_close(packed[start:start + len(ids)], _alone(model, ids), rtol=1e-5, atol=1e-5)
        start += len(ids)
