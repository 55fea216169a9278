"""SFT data on disk: conversations as token ids plus a loss mask, two Megatron indexed datasets.

``python -m megatron_plugin.preprocess sft --output-prefix P`` writes (see docs/sft.md)::

    P_tokens_document.bin/.idx     token ids (uint16 below 65,500 pieces, else int32)
    P_loss_mask_document.bin/.idx  uint8, 1 where the token is a training target
    P_tokens_document.json         the manifest (P_loss_mask_document.json mirrors it)

Document i of both is conversation i, one sequence per document, with identical lengths.
``loss_mask[j]`` is about ``tokens[j]`` itself: 1 on the assistant's text and its ``<|im_end|>``,
0 on system and user turns, role headers and every ``<|im_start|>``. A trainer predicting
``tokens[j + 1]`` from position j uses ``loss_mask[j + 1]`` as that position's weight.
"""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np

TOKENS_KEY = "tokens"
LOSS_MASK_KEY = "loss_mask"
LOSS_MASK_DTYPE = np.dtype(np.uint8)
_SUFFIXES = (f"_{TOKENS_KEY}_document", f"_{LOSS_MASK_KEY}_document")


def tokens_prefix(output_prefix: str) -> str:
    return f"{os.fspath(output_prefix)}_{TOKENS_KEY}_document"


def loss_mask_prefix(output_prefix: str) -> str:
    return f"{os.fspath(output_prefix)}_{LOSS_MASK_KEY}_document"


def output_prefix_of(prefix: str) -> str:
    """``P`` from ``P``, ``P_tokens_document`` or ``P_loss_mask_document``."""
    prefix = os.fspath(prefix)
    for suffix in _SUFFIXES:
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


class SFTDataset:
    """Conversation i as ``(tokens, loss_mask)``, read through Megatron-Core's ``IndexedDataset``.

    ``prefix`` is the ``--output-prefix`` of preprocessing (or either dataset's prefix).
    """

    def __init__(self, prefix: str) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        base = output_prefix_of(prefix)
        self.tokens = IndexedDataset(tokens_prefix(base))
        self.loss_mask = IndexedDataset(loss_mask_prefix(base))
        if len(self.tokens) != len(self.loss_mask) or not np.array_equal(
            self.tokens.sequence_lengths, self.loss_mask.sequence_lengths
        ):
            raise ValueError(f"{base}: the token and loss-mask datasets have different lengths; rerun preprocessing")
        # One sequence per conversation (a conversation is never empty), so sequence i is conversation i.
        if len(self.tokens.document_indices) != len(self.tokens) + 1:
            raise ValueError(f"{tokens_prefix(base)}: not one sequence per conversation")

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        return self.tokens[i], self.loss_mask[i]

    @property
    def lengths(self) -> np.ndarray:
        return self.tokens.sequence_lengths


def read_conversation(prefix: str, i: int) -> Tuple[np.ndarray, np.ndarray]:
    """(token ids, loss mask) of conversation ``i`` of the SFT dataset at ``prefix``."""
    return SFTDataset(prefix)[i]


__all__ = ["SFTDataset", "read_conversation", "tokens_prefix", "loss_mask_prefix", "output_prefix_of",
           "TOKENS_KEY", "LOSS_MASK_KEY", "LOSS_MASK_DTYPE"]
