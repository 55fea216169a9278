"""Packing SFT conversations into rows: nothing lost, nothing leaks, deterministic and resumable."""
from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_plugin.data.gpt_dataset import MicroBatches
from megatron_plugin.data.sft_dataset import SFTDataset
from megatron_plugin.data.sft_packing import (
    PackedMicroBatches,
    PackedSFTDataset,
    attention_mask,
    build_packed_sft_datasets,
    collate,
    first_fit,
    micro_batch_indices,
    packed_seq_params,
    segment_ids,
    split_conversations,
)
from megatron_plugin.preprocess import preprocess_sft

SEQ = 128
PAD = 0
WORDS = "the quick brown fox jumps over lazy dog tensor array layer function model loss batch row".split()


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    from megatron_plugin.preprocess.tokenizer import TrainerOptions, train_sentencepiece

    tmp = tmp_path_factory.mktemp("sft_pack")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(500)]
    model = train_sentencepiece(docs, str(tmp / "tok"), TrainerOptions(vocab_size=400, threads=1))

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    records = []
    for _ in range(80):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": text(1, 4)})
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": text(1, 8)}, {"role": "assistant", "content": text(1, 10)}]
        records.append({"messages": messages})
    # Longer than a row: cut to its first SEQ + 1 tokens, which still hold targets.
    records.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text(150, 150)}]})
    # Longer than a row with its only reply beyond the first SEQ + 1 tokens: nothing to learn.
    records.append({"messages": [{"role": "user", "content": text(150, 150)}, {"role": "assistant", "content": "ok"}]})
    src = tmp / "chats.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    preprocess_sft([str(src)], tmp / "chat", model)
    return str(tmp / "chat")


@pytest.fixture(scope="module")
def sft(prefix):
    return SFTDataset(prefix)


@pytest.fixture(scope="module")
def packed(sft):
    return PackedSFTDataset(sft, SEQ, seed=7, pad_id=PAD)


def _check_row(ds, sft, row):
    """Rebuild row `row` from its conversations and compare every field."""
    s = ds.seq_length
    sample = ds.row(row)
    tokens, labels, mask, pos, cu = (sample[k] for k in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens"))
    assert tokens.shape == labels.shape == mask.shape == pos.shape == (s,)
    assert tokens.dtype == labels.dtype == pos.dtype == torch.int64
    assert mask.dtype == torch.float32 and cu.dtype == torch.int32
    buf = torch.cat([tokens, labels[-1:]])
    assert torch.equal(labels, buf[1:])
    a, expected_cu = 0, [0]
    for conv in ds.row_conversations(row):
        ids, stored = (torch.from_numpy(x.astype(np.int64)) for x in sft[conv])
        n = min(len(ids), s + 1)
        assert torch.equal(buf[a:a + n], ids[:n])  # the conversation, intact (or its head)
        end = min(a + n, s)
        assert torch.equal(pos[a:end], torch.arange(end - a))  # positions restart
        # label j is tokens[j + 1]: its weight is the stored mask of that token, inside the conversation
        assert torch.equal(mask[a:a + n - 1], stored[1:n].float())
        if a + n - 1 < s:
            assert mask[a + n - 1] == 0  # the last token's label is the next conversation's (or padding)
        a += n
        expected_cu.append(end)
    assert torch.all(buf[a:] == PAD) and torch.all(mask[a:] == 0)
    if a < s:
        expected_cu.append(s)
        assert torch.equal(pos[a:], torch.arange(s - a))
    assert cu.tolist() == expected_cu
    return sample


def test_rows_hold_every_conversation_intact(packed, sft):
    for row in range(len(packed)):
        _check_row(packed, sft, row)
    placed = Counter(c for r in range(len(packed)) for c in packed.row_conversations(r))
    lengths = sft.lengths
    too_long = {i for i in range(len(sft)) if lengths[i] > SEQ + 1}
    assert len(too_long) == 2
    st = packed.stats
    assert st.truncated == 1 and st.dropped == 1
    dropped = set(range(len(sft))) - set(placed)
    assert len(dropped) == 1 and dropped <= too_long
    assert all(v == 1 for v in placed.values())
    assert st.conversations == len(placed) == len(sft) - 1
    assert st.tokens == sum(min(int(lengths[c]), SEQ + 1) for c in placed)
    assert st.padding_tokens == len(packed) * (SEQ + 1) - st.tokens
    # First-fit packs tightly: each row but one could take no further conversation of those after it.
    assert st.fill > 0.85 and st.rows < st.conversations
    assert packed.target_tokens() == sum(int(packed.row(r)["loss_mask"].sum()) for r in range(len(packed)))


def test_first_fit_matches_the_naive_rule():
    rng = random.Random(3)
    for _ in range(20):
        lengths = [rng.randint(1, 20) for _ in range(rng.randint(1, 60))]
        free, expected = [], []
        for n in lengths:
            row = next((r for r, f in enumerate(free) if f >= n), len(free))
            if row == len(free):
                free.append(20)
            free[row] -= n
            expected.append(row)
        assert first_fit(lengths, 20).tolist() == expected
    with pytest.raises(ValueError):
        first_fit([21], 20)


def test_attention_mask_is_block_diagonal_causal(packed, sft):
    batch = collate([packed[i] for i in range(4)])
    mask = attention_mask(batch["cu_seqlens"], SEQ)
    assert mask.shape == (4, 1, SEQ, SEQ) and mask.dtype == torch.bool
    for b in range(4):
        seg = segment_ids(batch["cu_seqlens"][b], SEQ)[0]
        row_cu = batch["cu_seqlens"][b, : batch["cu_seqlens_len"][b]].tolist()
        for i in range(SEQ):
            # the segment is the conversation holding position i (or the padding)
            k = next(k for k in range(len(row_cu) - 1) if row_cu[k] <= i < row_cu[k + 1])
            assert seg[i] == k
            allowed = torch.zeros(SEQ, dtype=torch.bool)
            allowed[row_cu[k]: i + 1] = True
            assert torch.equal(~mask[b, 0, i], allowed)

    # The masked SDPA over a packed row equals causal attention over each conversation alone.
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, SEQ, 8) for _ in range(3))
    packed_out = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask)
    assert torch.isfinite(packed_out).all()  # padding rows attend to themselves: no NaN
    for b in range(4):
        cu = batch["cu_seqlens"][b, : batch["cu_seqlens_len"][b]].tolist()
        for lo, hi in zip(cu[:-1], cu[1:]):
            alone = F.scaled_dot_product_attention(q[b:b + 1, :, lo:hi], k[b:b + 1, :, lo:hi], v[b:b + 1, :, lo:hi],
                                                   is_causal=True)
            torch.testing.assert_close(packed_out[b:b + 1, :, lo:hi], alone)


def test_collate_and_packed_seq_params(packed):
    from megatron.core.packed_seq_params import PackedSeqParams

    samples = [packed[i] for i in range(3)]
    batch = collate(samples)
    counts = [len(s["cu_seqlens"]) for s in samples]
    assert batch["cu_seqlens"].shape == (3, max(counts)) and batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens_len"].tolist() == counts
    for r, s in enumerate(samples):
        assert torch.equal(batch["cu_seqlens"][r, : counts[r]], s["cu_seqlens"])
        assert torch.all(batch["cu_seqlens"][r, counts[r]:] == SEQ)
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert batch[key].shape == (3, SEQ)
    assert batch["num_target_tokens"].dtype == torch.int64
    assert batch["num_target_tokens"].item() == int(batch["loss_mask"].sum())

    params = packed_seq_params(batch["cu_seqlens"], batch["cu_seqlens_len"], SEQ)
    assert isinstance(params, PackedSeqParams) and params.qkv_format == "thd"
    flat = params.cu_seqlens_q
    assert flat.dtype == torch.int32 and flat is params.cu_seqlens_kv
    expected = [0]
    for r, s in enumerate(samples):
        expected += [int(x) + r * SEQ for x in s["cu_seqlens"][1:]]
    assert flat.tolist() == expected and flat[-1] == 3 * SEQ
    seg_lengths = (flat[1:] - flat[:-1]).tolist()
    assert min(seg_lengths) > 0
    assert isinstance(params.max_seqlen_q, int) and params.max_seqlen_q == params.max_seqlen_kv == max(seg_lengths)
    # Positions of the flattened batch restart exactly at the thd boundaries.
    pos = batch["position_ids"].view(-1)
    assert all(pos[b] == 0 for b in expected[:-1])


def test_two_builds_are_identical_and_epochs_reshuffle(sft, packed):
    again = PackedSFTDataset(sft, SEQ, seed=7, pad_id=PAD)
    n = len(packed)
    for i in list(range(n)) + [n, n + 1, 5 * n + 3]:
        assert packed.sample_conversations(i) == again.sample_conversations(i)
        a, b = packed[i], again[i]
        assert all(torch.equal(a[k], b[k]) for k in a)
    epoch0 = [packed.row_of_sample(i) for i in range(n)]
    epoch1 = [packed.row_of_sample(n + i) for i in range(n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n)) and epoch0 != epoch1
    other = PackedSFTDataset(sft, SEQ, seed=8, pad_id=PAD)
    assert [other.sample_conversations(i) for i in range(n)] != [packed.sample_conversations(i) for i in range(n)]


def _batches(it, steps):
    return [next(it) for _ in range(steps)]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_at_consumed_samples_continues_the_stream(packed):
    mbs, dp = 2, 2
    steps = len(packed)  # crosses into later epochs
    full = [_batches(PackedMicroBatches(packed, mbs, r, dp), steps) for r in range(dp)]
    consumed = 7 * mbs * dp
    resumed = [_batches(PackedMicroBatches(packed, mbs, r, dp, consumed_samples=consumed), steps - 7) for r in range(dp)]
    for r in range(dp):
        assert all(_same(x, y) for x, y in zip(full[r][7:], resumed[r]))


def test_dp2_reads_the_samples_dp1_reads(packed):
    one = _batches(PackedMicroBatches(packed, 4, 0, 1), 6)
    two = [_batches(PackedMicroBatches(packed, 2, r, 2), 6) for r in range(2)]
    for step in range(6):
        joined = collate([packed[i] for i in micro_batch_indices(step * 4, 2, 0, 2) + micro_batch_indices(step * 4, 2, 1, 2)])
        assert _same(one[step], joined)
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(one[step][key], torch.cat([two[0][step][key], two[1][step][key]]))
        assert one[step]["num_target_tokens"] == two[0][step]["num_target_tokens"] + two[1][step]["num_target_tokens"]


def test_slicing_rule_is_the_pretraining_one():
    class Indices:
        def __len__(self):
            return 10_000

        def __getitem__(self, i):
            return {k: torch.tensor([i]) for k in ("tokens", "labels", "loss_mask", "position_ids")}

    for mbs, dp, consumed in ((2, 1, 0), (3, 2, 12), (1, 4, 40)):
        for rank in range(dp):
            ref = MicroBatches(Indices(), mbs, rank, dp, consumed)
            for step in range(3):
                got = micro_batch_indices(consumed + step * mbs * dp, mbs, rank, dp)
                assert next(ref)["tokens"].view(-1).tolist() == got


def test_splits_are_disjoint_by_conversation(sft, prefix):
    n = len(sft)
    train, valid, test = split_conversations(n, "80,15,5", seed=3)
    assert len(train) + len(valid) + len(test) == n
    assert sorted(np.concatenate([train, valid, test]).tolist()) == list(range(n))
    assert [len(x) for x in (train, valid, test)] == [round(0.8 * n), round(0.95 * n) - round(0.8 * n),
                                                      n - round(0.95 * n)]
    again = split_conversations(n, "80,15,5", seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, valid, test), again))
    assert not np.array_equal(split_conversations(n, "80,15,5", seed=4)[1], valid)

    dtrain, dvalid, dtest = build_packed_sft_datasets(prefix, SEQ, "80,15,5", seed=3)
    convs = [{c for r in range(len(d)) for c in d.row_conversations(r)} for d in (dtrain, dvalid, dtest)]
    assert not (convs[0] & convs[1]) and not (convs[0] & convs[2]) and not (convs[1] & convs[2])
    for got, want in zip(convs, (train, valid, test)):
        assert got <= set(want.tolist()) and len(set(want.tolist()) - got) <= 1  # the one dropped
    assert build_packed_sft_datasets(prefix, SEQ, "100,0,0", seed=3)[1:] == (None, None)
