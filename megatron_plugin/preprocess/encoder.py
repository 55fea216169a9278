"""Exact, fast SentencePiece encoding of documents into token bytes.

With SentencePiece's default normalizer and BPE trainer settings (extra whitespace removed, dummy
prefix added, whitespace as piece prefix, input split at whitespace before BPE), a document's ids
are the concatenation of the ids of its words, each encoded alone. Most words repeat, so a cache
from word to its token bytes turns encoding into dictionary look-ups and one ``bytes.join``.

Where to split decides exactness: we split on exactly the characters that this model's
normalizer turns into a word boundary, measured once per model by normalizing ``"a" + c + "b"``
for every code point. Python's ``str.split()`` is used when a document holds none of the
characters on which it disagrees with that set (the common case), because it is much faster than
a regular expression.

Models whose settings break the identity (no dummy prefix, kept extra whitespace, no whitespace
split, whitespace as suffix, non-BPE) use plain batched encoding instead. ``--verify`` re-encodes
random documents with plain SentencePiece either way.
"""
from __future__ import annotations

import functools
import re
from array import array
import sys
import unicodedata
from typing import Optional, Sequence

import numpy as np
import sentencepiece as spm

from .tokenizer import ModelSpec

DEFAULT_CACHE_WORDS = 200_000  # per generation, per worker: ~40-60 MB at typical word lengths


def per_word_exact(spec: Optional[ModelSpec]) -> tuple[bool, str]:
    """Whether concatenating per-word encodings equals whole-document encoding for this model."""
    if spec is None:
        return False, "model spec unreadable (protobuf unavailable)"
    checks = [
        (spec.model_type == "BPE", f"model type {spec.model_type} is not BPE"),
        (spec.add_dummy_prefix, "add_dummy_prefix=false"),
        (spec.remove_extra_whitespaces, "remove_extra_whitespaces=false"),
        (spec.escape_whitespaces, "escape_whitespaces=false"),
        (spec.split_by_whitespace, "split_by_whitespace=false"),
        (not spec.treat_whitespace_as_suffix, "treat_whitespace_as_suffix=true"),
    ]
    for ok, why in checks:
        if not ok:
            return False, why
    return True, "per-word cache"


# Normalization rules built into SentencePiece: their character maps come from Unicode data, so
# unassigned and private-use code points map to themselves and need no probe.
BUILTIN_RULES = {"nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "identity"}


@functools.lru_cache(maxsize=8)
def _separators_cached(model_path: str, sha256: str, all_code_points: bool) -> str:
    sp = spm.SentencePieceProcessor(model_file=model_path)
    ref = sp.normalize("a b")
    cps = [c for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000]
    if not all_code_points:
        cat = unicodedata.category
        cps = [c for c in cps if cat(chr(c)) not in ("Cn", "Co")]
    probes = sp.normalize(["a" + chr(c) + "b" for c in cps])
    return "".join(chr(c) for c, r in zip(cps, probes) if r == ref)


def word_separators(model_path: str, sha256: str, normalization: str = "") -> str:
    """Characters this model's normalizer turns into a word boundary (``a<c>b`` == ``a b``)."""
    return _separators_cached(model_path, sha256, normalization not in BUILTIN_RULES)


@functools.lru_cache(maxsize=1)
def _python_whitespace() -> frozenset[str]:
    # Every character Python calls whitespace is at or below U+3000 (ideographic space).
    return frozenset(chr(c) for c in range(0x3001) if chr(c).isspace())


class WordCacheEncoder:
    """Per-word cached encoder; ``encode(text)`` returns the document's token bytes (no EOD)."""

    def __init__(
        self,
        sp: spm.SentencePieceProcessor,
        dtype: np.dtype,
        separators: str,
        cache_words: int = DEFAULT_CACHE_WORDS,
    ) -> None:
        self.sp = sp
        self.dtype = np.dtype(dtype)
        self.cache_words = max(1, cache_words)
        # Two generations approximate an LRU at dictionary speed: when ``hot`` is full it becomes
        # ``old``; words found in ``old`` are promoted. Memory stays bounded by two generations.
        self.hot: dict[str, bytes] = {}
        self.old: dict[str, bytes] = {}
        self._typecode = {np.dtype(np.uint16): "H", np.dtype(np.int32): "i"}[self.dtype]
        assert array(self._typecode).itemsize == self.dtype.itemsize
        sep = set(separators)
        diff = sep ^ _python_whitespace()
        self._diff = "".join(sorted(diff))
        self._diff_ascii = "".join(c for c in self._diff if c < "\x80")
        self._split = re.compile("[" + re.escape("".join(sorted(sep))) + "]+").split
        self.misses = 0
        self.lookups = 0

    def words(self, text: str) -> list[str]:
        check = self._diff_ascii if text.isascii() else self._diff
        for c in check:
            if c in text:
                return [w for w in self._split(text) if w]
        return text.split()

    def encode(self, text: str) -> bytes:
        words = self.words(text)
        self.lookups += len(words)
        try:
            # hot.get gives None for a miss, and join rejects None before copying anything.
            return b"".join(map(self.hot.get, words))
        except TypeError:
            self._fill(words)
            return b"".join(map(self.hot.__getitem__, words))

    def _fill(self, words: Sequence[str]) -> None:
        """Add this document's missing words: promote from the old generation, encode the rest."""
        uniq = set(words)
        if len(self.hot) + len(uniq) > self.cache_words:
            self.old = self.hot
            self.hot = {}
        hot, old = self.hot, self.old
        encode = []
        for w in uniq.difference(hot):
            v = old.get(w)
            if v is None:
                encode.append(w)
            else:
                hot[w] = v
        if encode:
            self.misses += len(encode)
            tc = self._typecode
            for w, ids in zip(encode, self.sp.encode(encode, num_threads=1)):
                hot[w] = array(tc, ids).tobytes()


class PlainEncoder:
    """Whole-document SentencePiece encoding, for models where the per-word identity fails."""

    def __init__(self, sp: spm.SentencePieceProcessor, dtype: np.dtype) -> None:
        self.sp = sp
        self.dtype = np.dtype(dtype)
        self.misses = 0
        self.lookups = 0

    def encode(self, text: str) -> bytes:
        return np.array(self.sp.encode(text), dtype=self.dtype).tobytes()


def plain_ids(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    return sp.encode(text)
