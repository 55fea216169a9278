"""Packing SFT conversations into fixed-length rows that never leak between conversations.

A row holds ``seq_length + 1`` token ids, like a pretraining sample of Megatron-Core's
GPTDataset: ``tokens = row[:-1]``, ``labels = row[1:]``. Several whole conversations share a row
(greedy first-fit, in a seeded shuffled order); the tail is padding. Each sample also says where
its conversations begin and end (``cu_seqlens``), so the attention can be restricted to one
conversation (a block-diagonal causal mask on the local spec, ``PackedSeqParams`` on the TE spec)
and positions restart at 0 for each. See docs/sft.md, *Packing*.

Sample ``i`` of a :class:`PackedSFTDataset` is valid for every ``i >= 0``: epoch ``i // len``
presents the same rows in its own seeded order, so a run can draw any number of samples and a
resumed run finds sample ``consumed_samples`` again without state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from megatron_plugin.data.sft_dataset import SFTDataset

# Distinct random streams derived from the one seed: changing how one is drawn never shifts another.
_SPLIT_STREAM, _PACK_STREAM, _EPOCH_STREAM = 1, 2, 3
SPLIT_NAMES = ("train", "valid", "test")
DEFAULT_PAD_ID = 0
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


# --------------------------------------------------------------------------------------- splits

def split_conversations(num_conversations: int, split: str = "969,30,1", seed: int = 1234) -> List[np.ndarray]:
    """Conversation indices of the train, valid and test splits (sorted, disjoint, covering all).

    ``split`` is read as ``data.split`` is for pretraining (Megatron-Core's ``parse_and_normalize_
    split`` and its book-ends, ``int(round(edge * n))``), but over a seeded permutation of the
    conversations instead of their stored order: preprocessing keeps input order, and chat dumps
    are often grouped by source or topic, so contiguous ranges would hold out one source."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    perm = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(num_conversations)
    out = []
    for bookend in matrix:
        if bookend is None:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        beg = int(round(bookend[0] * num_conversations))
        end = int(round(bookend[1] * num_conversations))
        out.append(np.sort(perm[beg:end]).astype(np.int64))
    return out


# -------------------------------------------------------------------------------------- packing

def first_fit(lengths: Sequence[int], capacity: int) -> np.ndarray:
    """Row of each item under greedy first-fit in the given order: each item goes into the
    lowest-numbered row with room for it. O(n log n) with a max-tree over the rows' free space
    (at most n rows; an unused row has all ``capacity`` free, so "open a new row" is the same
    search)."""
    n = len(lengths)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    size = 1
    while size < n:
        size *= 2
    free = [capacity] * (2 * size)
    rows = np.empty(n, dtype=np.int64)
    for k, length in enumerate(lengths):
        length = int(length)
        if not 0 < length <= capacity:
            raise ValueError(f"item {k} has length {length}, outside 1..{capacity}")
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        rows[k] = node - size
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


@dataclass(frozen=True)
class PackingStats:
    """What one epoch of a packed split holds (every epoch holds the same rows)."""

    conversations: int  # packed (after drops)
    rows: int
    tokens: int  # conversation tokens placed in rows (after truncation)
    padding_tokens: int  # pad ids in the rows' seq_length + 1 slots
    truncated: int  # longer than seq_length + 1, cut to their first seq_length + 1 tokens
    dropped: int  # nothing left to learn (no target after the first token once truncated)

    @property
    def fill(self) -> float:
        """Share of row slots holding conversation tokens."""
        return self.tokens / max(1, self.tokens + self.padding_tokens)


class PackedSFTDataset:
    """Rows of ``seq_length + 1`` tokens packed from the conversations of an :class:`SFTDataset`.

    ``conversations`` selects the conversation indices to pack (one split; default all). Packing
    is done once, from the stored lengths: the conversations are shuffled with ``seed`` and
    placed by greedy first-fit into rows of ``seq_length + 1`` slots; the conversations of a row
    keep that shuffled order. ``len()`` is the number of rows (one epoch); ``self[i]`` for any
    ``i >= 0`` is row ``order(i // len)[i % len]``, a fresh seeded permutation of the rows per
    epoch.

    A conversation longer than ``seq_length + 1`` is cut to its first ``seq_length + 1`` tokens
    and fills a row alone (counted in ``stats.truncated``; preprocess with ``--max-length`` at
    most ``seq_length + 1`` to keep every conversation whole). One left with no target after its
    first token (a target at position 0 has no input predicting it) is dropped and counted.
    """

    def __init__(
        self,
        sft: Union[SFTDataset, str],
        seq_length: int,
        conversations: Optional[Sequence[int]] = None,
        seed: int = 1234,
        pad_id: int = DEFAULT_PAD_ID,
        name: str = "train",
    ) -> None:
        if seq_length < 1:
            raise ValueError(f"seq_length must be positive, got {seq_length}")
        self.sft = sft if isinstance(sft, SFTDataset) else SFTDataset(sft)
        self.seq_length = int(seq_length)
        self.capacity = self.seq_length + 1
        self.seed = int(seed)
        self.pad_id = int(pad_id)
        self.name = name
        all_lengths = np.asarray(self.sft.lengths, dtype=np.int64)
        if conversations is None:
            conversations = np.arange(len(all_lengths), dtype=np.int64)
        conversations = np.asarray(conversations, dtype=np.int64)
        if len(conversations) and (conversations.min() < 0 or conversations.max() >= len(all_lengths)):
            raise IndexError(f"{name}: conversation index outside 0..{len(all_lengths) - 1}")

        lengths = all_lengths[conversations]
        too_long = lengths > self.capacity
        keep = lengths >= 2  # one token predicts nothing inside its own conversation
        # Only a truncated conversation can lose all its targets (preprocessing ends every stored
        # one with a target <|im_end|>), so only those masks are read here.
        for k in np.flatnonzero(too_long):
            mask = self.sft.loss_mask[int(conversations[k])]
            keep[k] &= bool(np.any(mask[1 : self.capacity]))
        kept = conversations[keep]
        capped = np.minimum(lengths[keep], self.capacity)

        order = np.random.default_rng([self.seed, _PACK_STREAM]).permutation(len(kept))
        rows = first_fit(capped[order], self.capacity)
        num_rows = int(rows.max()) + 1 if len(rows) else 0
        # Stable sort by row keeps, inside each row, the shuffled order the conversations came in.
        by_row = np.argsort(rows, kind="stable")
        self._conv = kept[order][by_row]  # conversation index, row after row
        self._len = capped[order][by_row]  # its length in the row
        self._row_start = np.searchsorted(rows[by_row], np.arange(num_rows + 1))
        self._epoch_orders: Dict[int, np.ndarray] = {}

        self._target_tokens: Optional[int] = None
        placed = int(self._len.sum())
        self.stats = PackingStats(
            conversations=len(kept),
            rows=num_rows,
            tokens=placed,
            padding_tokens=num_rows * self.capacity - placed,
            truncated=int(np.sum(too_long & keep)),
            dropped=int(np.sum(~keep)),
        )

    def __len__(self) -> int:
        return self.stats.rows

    def target_tokens(self) -> int:
        """Sum of every sample's loss_mask over one epoch (reads every mask once, then cached)."""
        if self._target_tokens is None:
            # Each conversation's stored mask without its first token: the mask of its labels.
            masks = self.sft.loss_mask
            self._target_tokens = sum(int(np.sum(masks[int(c)][1:n])) for c, n in zip(self._conv, self._len))
        return self._target_tokens

    # Row r's conversations and their lengths in the row, in the order they sit in it.
    def row_conversations(self, row: int) -> List[int]:
        a, b = self._row_start[row], self._row_start[row + 1]
        return [int(c) for c in self._conv[a:b]]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row read at each position of ``epoch``: a permutation seeded by (seed, epoch)."""
        order = self._epoch_orders.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, _EPOCH_STREAM, epoch]).permutation(len(self))
            if len(self._epoch_orders) >= 2:  # a reader crosses at most one epoch boundary at a time
                self._epoch_orders.pop(next(iter(self._epoch_orders)))
            self._epoch_orders[epoch] = order
        return order

    def row_of_sample(self, index: int) -> int:
        if index < 0:
            raise IndexError(f"sample index {index} is negative")
        if not len(self):
            raise IndexError(f"{self.name}: no conversations to pack")
        epoch, k = divmod(int(index), len(self))
        return int(self.epoch_order(epoch)[k])

    def sample_conversations(self, index: int) -> List[int]:
        """Conversation indices held by sample ``index``, in row order."""
        return self.row_conversations(self.row_of_sample(index))

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return self.row(self.row_of_sample(index))

    def row(self, row: int) -> Dict[str, torch.Tensor]:
        """Row ``row`` as a sample: tokens, labels, loss_mask, position_ids, cu_seqlens."""
        s = self.seq_length
        buf = np.full(self.capacity, self.pad_id, dtype=np.int64)
        label_mask = np.zeros(s, dtype=np.float32)
        positions = np.zeros(self.capacity, dtype=np.int64)
        cu = [0]
        a = 0
        lo, hi = self._row_start[row], self._row_start[row + 1]
        for conv, n in zip(self._conv[lo:hi], self._len[lo:hi]):
            tokens, mask = self.sft[int(conv)]
            n = int(n)
            buf[a : a + n] = tokens[:n]
            positions[a : a + n] = np.arange(n)
            # Input j predicts row[j + 1]; that is a target of this conversation only while
            # j + 1 is still inside it, so its last token predicts nothing (0 across the boundary).
            label_mask[a : a + n - 1] = mask[1:n]
            a += n
            cu.append(min(a, s))  # a conversation filling the row's last slot appears there only as a label
        if a < s:
            # Padding is one more segment that attends only to itself: a query with no key at all
            # would make the softmax NaN, and NaN * 0 in the loss still poisons the gradients.
            positions[a:s] = np.arange(s - a)
            cu.append(s)
        return {
            "tokens": torch.from_numpy(buf[:-1].copy()),
            "labels": torch.from_numpy(buf[1:].copy()),
            "loss_mask": torch.from_numpy(label_mask),
            "position_ids": torch.from_numpy(positions[:-1].copy()),
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        }


def build_packed_sft_datasets(
    prefix: Union[SFTDataset, str],
    seq_length: int,
    split: str = "969,30,1",
    seed: int = 1234,
    pad_id: int = DEFAULT_PAD_ID,
) -> Tuple[Optional[PackedSFTDataset], Optional[PackedSFTDataset], Optional[PackedSFTDataset]]:
    """(train, valid, test) packed datasets over disjoint conversations; ``None`` for an empty split."""
    sft = prefix if isinstance(prefix, SFTDataset) else SFTDataset(prefix)
    out = []
    for name, indices in zip(SPLIT_NAMES, split_conversations(len(sft), split, seed)):
        ds = PackedSFTDataset(sft, seq_length, indices, seed=seed, pad_id=pad_id, name=name) if len(indices) else None
        out.append(ds if ds is not None and len(ds) else None)
    return tuple(out)


# ----------------------------------------------------------------------------- batches

def collate(samples: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack samples into a micro-batch.

    ``cu_seqlens`` has one more entry than the row has segments, different per row, so it is
    padded to ``[b, max]`` with ``seq_length`` (zero-length segments at the end, so every row
    stays a valid non-decreasing ``cu_seqlens``); ``cu_seqlens_len[r]`` is row r's real count.
    ``num_target_tokens`` is ``loss_mask.sum()`` as an exact integer, for token-weighted loss."""
    batch = {key: torch.stack([s[key] for s in samples]) for key in BATCH_KEYS}
    seq_length = batch["tokens"].shape[1]
    counts = [len(s["cu_seqlens"]) for s in samples]
    cu = torch.full((len(samples), max(counts)), seq_length, dtype=torch.int32)
    for r, s in enumerate(samples):
        cu[r, : counts[r]] = s["cu_seqlens"]
    batch["cu_seqlens"] = cu
    batch["cu_seqlens_len"] = torch.tensor(counts, dtype=torch.int32)
    batch["num_target_tokens"] = batch["loss_mask"].sum(dtype=torch.float64).round().to(torch.int64)
    return batch


def micro_batch_indices(consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> List[int]:
    """Sample indices of the next micro-batch of ``dp_rank``: its contiguous slice of the global
    stream at ``consumed_samples`` (the rule of ``gpt_dataset.MicroBatches``)."""
    start = consumed_samples + dp_rank * micro_batch_size
    return [start + i for i in range(micro_batch_size)]


class PackedMicroBatches:
    """Deterministic micro-batches of packed rows for one data-parallel rank, from a consumed-
    sample offset; the same slicing as ``gpt_dataset.MicroBatches``. Unlike it, indices are not
    taken modulo ``len(dataset)``: the packed dataset maps them to epochs itself, each with its
    own row order."""

    def __init__(self, dataset: PackedSFTDataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{dp_size - 1}")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        indices = micro_batch_indices(self.consumed_samples, self.micro_batch_size, self.dp_rank, self.dp_size)
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return collate([self.dataset[i] for i in indices])


# ------------------------------------------------------------------- attention side helpers

def segment_ids(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """[b, s] index of the segment (conversation or padding) each position belongs to.
    Works on collated (padded with ``seq_length``) cu_seqlens, or one row's [n]."""
    cu = cu_seqlens if cu_seqlens.dim() == 2 else cu_seqlens.unsqueeze(0)
    positions = torch.arange(seq_length, device=cu.device, dtype=cu.dtype).expand(cu.shape[0], seq_length)
    return torch.searchsorted(cu[:, 1:].contiguous(), positions.contiguous(), right=True)


def attention_mask(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Boolean block-diagonal causal mask [b, 1, s, s] in Megatron-Core's convention: True =
    masked (``attention_mask_func`` does ``scores.masked_fill_(mask, -10000)``; GPTDataset's
    ``attention_mask < 0.5``). Query i may attend key j exactly when j <= i and both lie in the
    same segment. SDPA's boolean ``attn_mask`` means the opposite (True = attend): pass ``~mask``."""
    seg = segment_ids(cu_seqlens, seq_length)
    same = seg.unsqueeze(2) == seg.unsqueeze(1)
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool, device=seg.device).tril()
    return ~(same & causal).unsqueeze(1)


def packed_seq_params(cu_seqlens: torch.Tensor, cu_seqlens_len: torch.Tensor, seq_length: int,
                      device: Optional[torch.device] = None):
    """Megatron-Core ``PackedSeqParams`` (``qkv_format="thd"``) for a collated micro-batch.

    The thd path has no batch dimension (attention squeezes a batch of 1), so the b rows are one
    sequence of ``b * seq_length`` tokens: the trainer feeds ``tokens.view(1, -1)`` (and the same
    for position_ids, labels, loss_mask). Row r's boundaries shift by ``r * seq_length``; every
    row ends at ``seq_length``, so they join without a gap. ``max_seqlen_q/kv`` are Python ints
    (RoPE sizes its table from them). TE needs the tensors on the GPU: pass ``device``."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens if cu_seqlens.dim() == 2 else cu_seqlens.unsqueeze(0)
    counts = cu_seqlens_len.reshape(-1).tolist()
    parts = [cu[0, : counts[0]].to(torch.int32)]
    for r in range(1, cu.shape[0]):
        parts.append(cu[r, 1 : counts[r]].to(torch.int32) + r * seq_length)
    flat = torch.cat(parts)
    if device is not None:
        flat = flat.to(device)
    max_seqlen = int((flat[1:] - flat[:-1]).max().item())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=flat,
        cu_seqlens_kv=flat,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )


__all__ = [
    "PackedSFTDataset", "PackedMicroBatches", "PackingStats", "build_packed_sft_datasets",
    "split_conversations", "first_fit", "collate", "micro_batch_indices", "segment_ids",
    "attention_mask", "packed_seq_params", "DEFAULT_PAD_ID", "SPLIT_NAMES",
]
