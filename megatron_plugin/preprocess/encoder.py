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

DEFAULT_CACHE_WORDS = 100_000  # per generation, per worker: two generations stay under ~60 MB


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
        sp_no_prefix: Optional[spm.SentencePieceProcessor] = None,
    ) -> None:
        self.sp = sp
        # When given (see ``segments_exact``), a missed word is cut between ASCII letters and other
        # ASCII characters; its first segment is looked up as a word, the others in ``mid`` and
        # encoded without the dummy prefix. Most rare words ("foo," "(bar)" "x.y_z") are then
        # built from cached parts instead of being encoded by SentencePiece.
        self.sp_mid = sp_no_prefix
        self.mid: dict[str, bytes] = {}
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
        if len(words) > 64:
            # A long document almost always holds a rare word: find misses with one set
            # difference instead of a join attempt that would fail.
            if set(words).difference(self.hot):
                self._fill(words)
            return b"".join(map(self.hot.__getitem__, words))
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
            if self.sp_mid is not None:
                encode = self._from_segments(encode)
            self._encode_words(encode)

    def _encode_words(self, words: list) -> None:
        if not words:
            return
        self.misses += len(words)
        tc = self._typecode
        hot = self.hot
        for w, ids in zip(words, self.sp.encode(words, num_threads=1)):
            hot[w] = array(tc, ids).tobytes()

    def _from_segments(self, words: list) -> list:
        """Build the words that split into several segments from cached segments; return the rest."""
        split = _SEGMENT.split
        whole, multi = [], []
        for w in words:
            parts = split(w)
            if len(parts) == 1:
                whole.append(w)
            else:
                multi.append((w, parts))
        if not multi:
            return whole
        hot, old, mid = self.hot, self.old, self.mid
        firsts = []
        for _, parts in multi:
            f = parts[0]
            if f not in hot:
                v = old.get(f)
                if v is None:
                    firsts.append(f)
                else:
                    hot[f] = v
        self._encode_words(list(set(firsts)))
        need = {p for _, parts in multi for p in parts[1:] if p not in mid}
        if len(mid) + len(need) > self.cache_words:
            mid.clear()  # bounded: start again, then every segment of these words is needed
            need = {p for _, parts in multi for p in parts[1:]}
        need = list(need)
        if need:
            self.misses += len(need)
            tc = self._typecode
            for p, ids in zip(need, self.sp_mid.encode(need, num_threads=1)):
                mid[p] = array(tc, ids).tobytes()
        for w, parts in multi:
            hot[w] = hot[parts[0]] + b"".join([mid[p] for p in parts[1:]])
        return whole


# Cut points inside a word: between an ASCII letter and another printable ASCII character.
_LETTER = "A-Za-z"
_OTHER = "!-@\\[-`{-~"
_SEGMENT = re.compile(f"(?<=[{_LETTER}])(?=[{_OTHER}])|(?<=[{_OTHER}])(?=[{_LETTER}])")
_CROSSES = re.compile(f"[{_LETTER}][{_OTHER}]|[{_OTHER}][{_LETTER}]")


def segments_exact(model_path: str) -> tuple[bool, str]:
    """Whether a word's ids are its segments' ids (first with, others without the dummy prefix).

    True when no piece the encoder may produce contains a letter/other boundary (BPE can then
    never merge across one, so each segment is encoded independently), every printable ASCII
    character normalizes to itself, and none of them can become <unk> (adjacent unknowns would
    merge). SentencePiece's default ``split_by_unicode_script`` training gives such vocabularies.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except Exception:
        return False, "protobuf unavailable"
    proto = pb.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    T = pb.ModelProto.SentencePiece
    usable = (T.NORMAL, T.USER_DEFINED, T.UNUSED)
    for p in proto.pieces:
        if p.type in usable and _CROSSES.search(p.piece):
            return False, f"piece {p.piece!r} crosses a letter/punctuation boundary"
    sp = spm.SentencePieceProcessor(model_file=model_path)
    ascii_chars = [chr(c) for c in range(0x21, 0x7F)]
    probes = sp.normalize(["a" + c + "b" for c in ascii_chars])
    if any(r != "\u2581a" + c + "b" for c, r in zip(ascii_chars, probes)):
        return False, "the normalizer changes printable ASCII"
    if not proto.trainer_spec.byte_fallback and any(sp.piece_to_id(c) == sp.unk_id() for c in ascii_chars):
        return False, "some printable ASCII characters are unknown to the model"
    return True, "per-word cache with word segments"


def no_prefix_processor(model_path: str) -> spm.SentencePieceProcessor:
    """The same model without the dummy prefix: encodes a segment that does not start a word."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


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
