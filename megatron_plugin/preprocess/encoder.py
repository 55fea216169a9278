"""Exact, fast SentencePiece encoding of documents into token bytes.

With SentencePiece's default normalizer and BPE trainer settings (extra whitespace removed, dummy
prefix added, whitespace as piece prefix, input split at whitespace before BPE), a document's ids
are the concatenation of the ids of its words, each encoded alone. Most words repeat, so a cache
from word to its token bytes turns encoding into dictionary look-ups and one ``bytes.join``.

Where to split decides exactness: we split on exactly the characters that this model's
normalizer turns into a word boundary (``word_separators``). Python's ``str.split()`` is used when
a document holds none of the characters on which it disagrees with that set (the common case),
because it is much faster than a regular expression.

Documents are encoded a chunk at a time: each word is looked up once (a missed word gets a
placeholder), the words missed anywhere in the chunk are encoded in one batched SentencePiece call
that fills the placeholders, and then every document is joined.

Models whose settings break the identity (no dummy prefix, kept extra whitespace, no whitespace
split, whitespace as suffix, non-BPE) use plain batched encoding instead. ``--verify`` re-encodes
random documents with plain SentencePiece either way.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
import json
import os
import re
import sys
import unicodedata
from array import array
from collections import deque
from itertools import accumulate, chain
from typing import Optional, Sequence

import numpy as np
import sentencepiece as spm

from .tokenizer import ModelSpec

DEFAULT_CACHE_WORDS = 200_000  # per generation, per worker: two generations stay near 60 MB
MISS_BATCH = 20_000  # missed words encoded per SentencePiece call
WS = "\u2581"  # SentencePiece's escaped whitespace


@dataclass(frozen=True)
class EncodingPlan:
    """Which encoder is exact for a model, and why; what the workers need to run it.

    * ``words``: SentencePiece's default shape (extra whitespace removed, dummy prefix). Words are
      cut at the characters the normalizer turns into a space and encoded by the model itself.
    * ``layout``: the identity rule with whitespace kept (Llama 2 style). The dummy space is added
      here, the text is cut into units of ``[spaces][non-spaces]`` (``SplitIntoWords``: a run of
      spaces joins the word after it) and at ``isolated`` characters, and each unit is encoded by
      the model with its dummy prefix turned off.
    * ``normalized``: any other normalizer. SentencePiece normalizes the document (its own C++
      normalizer, dummy prefix included), the result is cut the same way at ``▁`` and each
      unit is encoded by the model with normalization and dummy prefix turned off.
    * ``plain``: whole-document encoding.
    """

    mode: str
    why: str
    separators: str = ""  # words: characters the normalizer turns into a word boundary
    isolated: str = ""  # layout/normalized: characters that no mergeable piece contains
    dummy_prefix: bool = True  # layout: the model adds a dummy space in front of a document

    @property
    def per_word(self) -> bool:
        return self.mode != "plain"

    @property
    def label(self) -> str:
        return {"words": "per-word cache", "layout": "per-word cache, whitespace kept",
                "normalized": "per-word cache, normalized first", "plain": "plain"}[self.mode]


# Characters worth cutting out of a word when no piece contains them (a model trained on lines of
# text has no piece with a newline: it is a byte-fallback token that never merges).
ISOLATION_CANDIDATES = "\n\r\t\x0b\x0c"


def _crossing_piece(pieces: Sequence[str]) -> Optional[str]:
    """A piece that could merge across a word boundary: a non-space followed by U+2581, or a space."""
    for p in pieces:
        if " " in p:
            return p
        i = p.find(WS, 1)
        while i > 0:
            if p[i - 1] != WS:
                return p
            i = p.find(WS, i + 1)
    return None


def isolated_characters(spec: ModelSpec) -> str:
    """Candidates no multi-character piece contains, and that stay one symbol (a piece or bytes).

    BPE merges two symbols only into a piece of the vocabulary, so such a character is never part
    of a larger symbol: the text on either side of it encodes on its own. Without byte fallback
    an unknown character is not safe: SentencePiece joins runs of unknown pieces into one.
    """
    singles = {p for p in spec.pieces if len(p) == 1}
    longer = "".join(p for p in spec.pieces if len(p) > 1)
    return "".join(c for c in ISOLATION_CANDIDATES
                   if c not in longer and (c in singles or spec.byte_fallback))


def plan_encoding(spec: Optional[ModelSpec]) -> EncodingPlan:
    """Decide from the model's own normalizer and trainer settings and vocabulary."""
    if spec is None:
        return EncodingPlan("plain", "model spec unreadable (protobuf unavailable)")
    if spec.model_type != "BPE":
        # Viterbi over the whole text: with no piece across a word boundary the best path is the
        # concatenation of the best paths per word, but adding up scores in another order can
        # break near-ties differently in floating point, so exactness is not guaranteed.
        return EncodingPlan("plain", f"model type {spec.model_type}: Viterbi segmentation of the whole text, "
                                     "per-word scores can tie-break differently; encoded whole")
    checks = [
        (spec.escape_whitespaces, "escape_whitespaces=false"),
        (spec.split_by_whitespace, "split_by_whitespace=false (pieces may span words)"),
        (not spec.treat_whitespace_as_suffix, "treat_whitespace_as_suffix=true"),
        (not any(WS in p[1:] or " " in p for p in spec.user_defined),
         "a user-defined piece spans a word boundary"),
    ]
    for ok, why in checks:
        if not ok:
            return EncodingPlan("plain", why)
    crossing = _crossing_piece(spec.pieces)
    if crossing is not None:
        return EncodingPlan("plain", f"piece {crossing!r} spans a word boundary")
    if not spec.byte_fallback and WS not in spec.pieces:
        return EncodingPlan("plain", "no byte fallback and no \u2581 piece: unknown runs could join across words")
    isolated = isolated_characters(spec)
    if spec.remove_extra_whitespaces and spec.add_dummy_prefix:
        return EncodingPlan("words", "BPE, extra whitespace removed, dummy prefix: words encoded alone")
    if spec.normalization == "identity" and not spec.has_charsmap and not spec.has_rule_tsv:
        if not spec.remove_extra_whitespaces:
            return EncodingPlan("layout", "BPE, identity normalizer, whitespace kept: units of "
                                          "[spaces][word] encoded alone, dummy prefix added here",
                                isolated=isolated, dummy_prefix=spec.add_dummy_prefix)
    return EncodingPlan("normalized", f"BPE, {spec.normalization} normalizer"
                                      f"{', whitespace kept' if not spec.remove_extra_whitespaces else ''}"
                                      f"{', no dummy prefix' if not spec.add_dummy_prefix else ''}: normalized by "
                                      "SentencePiece, units of [spaces][word] encoded alone", isolated=isolated)


def per_word_exact(spec: Optional[ModelSpec]) -> tuple[bool, str]:
    """Whether some per-word cache is exact for this model, and the reason."""
    plan = plan_encoding(spec)
    return plan.per_word, plan.why


def unit_processor(model_path: str, keep_normalizer: bool) -> spm.SentencePieceProcessor:
    """The model with its dummy prefix off (and, unless ``keep_normalizer``, no normalization).

    Units after the first of a document have no dummy space in front; this processor encodes
    them exactly as they are, with the model's pieces and scores unchanged.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    ns = proto.normalizer_spec
    ns.add_dummy_prefix = False
    ns.remove_extra_whitespaces = False
    if not keep_normalizer:
        ns.name = "identity"
        ns.precompiled_charsmap = b""
        ns.normalization_rule_tsv = ""
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


# Normalization rules built into SentencePiece: their character maps come from Unicode data, so
# unassigned and private-use code points map to themselves and need no probe.
BUILTIN_RULES = {"nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "identity"}
# Past this code point only planes 14-16 (tags, variation selectors, private use) are assigned.
_LAST_ASSIGNED_BELOW_PLANE_14 = 0x323AF


def _probe_code_points(all_code_points: bool) -> list[int]:
    if all_code_points:
        return [c for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000]
    cat = unicodedata.category
    cps = [c for c in range(_LAST_ASSIGNED_BELOW_PLANE_14 + 1) if not 0xD800 <= c < 0xE000]
    cps += range(0xE0000, 0xE01F0)
    return [c for c in cps if cat(chr(c)) not in ("Cn", "Co")]


def _probe_cache_file(sha256: str, all_code_points: bool) -> str:
    # Keyed by the model's content and by what decides the probe's answer: SentencePiece's
    # normalizer and the Unicode data that picks the code points to probe.
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    scope = "all" if all_code_points else "assigned"
    name = f"separators-{sha256}-{scope}-sp{spm.__version__}-unicode{unicodedata.unidata_version}.json"
    return os.path.join(root, "megatron_plugin", name)


@functools.lru_cache(maxsize=8)
def _separators_cached(model_path: str, sha256: str, all_code_points: bool) -> str:
    cache_file = _probe_cache_file(sha256, all_code_points)
    try:
        with open(cache_file, encoding="utf-8") as f:
            return "".join(map(chr, json.load(f)["separators"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    sp = spm.SentencePieceProcessor(model_file=model_path)
    ref = sp.normalize("a b")
    cps = _probe_code_points(all_code_points)
    probes = sp.normalize(["a" + chr(c) + "b" for c in cps])
    seps = [c for c, r in zip(cps, probes) if r == ref]
    try:  # best effort: an unwritable cache directory only costs the probe next time
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        tmp = f"{cache_file}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"model_sha256": sha256, "separators": seps}, f)
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return "".join(map(chr, seps))


def word_separators(model_path: str, sha256: str, normalization: str = "", custom_rules: bool = False) -> str:
    """Characters this model's normalizer turns into a word boundary (``a<c>b`` == ``a b``).

    Measured by normalizing ``"a" + c + "b"`` for every assigned code point (every code point for
    custom normalization rules), about 0.1 s; the answer is kept per model checksum in memory and
    under ``~/.cache/megatron_plugin`` (``$XDG_CACHE_HOME``).
    """
    return _separators_cached(model_path, sha256, custom_rules or normalization not in BUILTIN_RULES)


@functools.lru_cache(maxsize=1)
def _python_whitespace() -> frozenset[str]:
    # Every character Python calls whitespace is at or below U+3000 (ideographic space).
    return frozenset(chr(c) for c in range(0x3001) if chr(c).isspace())


class _WordCache(dict):
    """Word -> token bytes, in two generations, that records the words it does not hold.

    Two generations approximate an LRU at dictionary speed: when the current one is full it
    becomes ``old``, and words found in ``old`` move back. A word in neither gets an empty
    ``bytearray`` placeholder, which the look-up returns at once; the encoder fills every
    placeholder of a chunk after one batched SentencePiece call. So each word of a document is
    looked up exactly once, and ``bytes.join`` reads the placeholders as they were filled.
    """

    __slots__ = ("old", "capacity", "pending_words", "pending_slots")

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.old: dict = {}
        self.capacity = capacity
        self.pending_words: list[str] = []
        self.pending_slots: list[bytearray] = []

    def __missing__(self, word: str):
        value = self.old.get(word)
        if value is None:
            value = bytearray()
            # A fresh copy as key: the words from ``split`` lie scattered among the chunk's other,
            # soon freed, strings. Look-ups are bound by memory latency; keys allocated one after
            # another, in order of first occurrence (frequent words first), halve their cost.
            word = (word + " ")[:-1]
            self.pending_words.append(word)
            self.pending_slots.append(value)
        if len(self) >= self.capacity:
            self.old = dict(self)
            self.clear()
        self[word] = value
        return value

    def forget_pending(self, words: Sequence[str]) -> None:
        """Drop placeholders that will never be filled (their batch failed to encode)."""
        for w in words:
            self.pop(w, None)
            self.old.pop(w, None)


class WordCacheEncoder:
    """Per-word cached encoder; ``encode_many(texts)`` gives each document's token bytes (no EOD)."""

    def __init__(
        self,
        sp: spm.SentencePieceProcessor,
        dtype: np.dtype,
        separators: str,
        cache_words: int = DEFAULT_CACHE_WORDS,
    ) -> None:
        self.sp = sp
        self.dtype = np.dtype(dtype)
        self.cache = _WordCache(max(1, cache_words))
        # array.array builds the token bytes straight from Python ints; same layout as the dtype.
        self._typecode = {np.dtype(np.uint16): "H", np.dtype(np.int32): "i"}[self.dtype]
        assert array(self._typecode).itemsize == self.dtype.itemsize
        sep = set(separators)
        diff = sep ^ _python_whitespace()
        self._diff = "".join(sorted(diff))
        self._diff_ascii = "".join(c for c in self._diff if c < "\x80")
        self._split = re.compile("[" + re.escape("".join(sorted(sep))) + "]+").split
        self.unit_sp = sp  # what encodes a cached word
        self.misses = 0
        self.lookups = 0

    def words(self, text: str) -> list[str]:
        check = self._diff_ascii if text.isascii() else self._diff
        for c in check:
            if c in text:
                return [w for w in self._split(text) if w]
        return text.split()

    def encode(self, text: str) -> bytes:
        return self.encode_many([text])[0]

    def encode_many(self, texts: Sequence[str]) -> list[bytes]:
        cache = self.cache
        lookup = cache.__getitem__
        word_lists = [self.words(t) for t in texts]
        found = [list(map(lookup, words)) for words in word_lists]
        if cache.pending_words:
            self._encode_pending()
        # Counted once the batch is encoded: a batch that fails is looked up again one document
        # at a time, and the manifest's hit rate must not count it twice.
        self.lookups += sum(map(len, word_lists))
        return list(map(b"".join, found))

    def _encode_pending(self) -> None:
        cache = self.cache
        words, slots = cache.pending_words, cache.pending_slots
        cache.pending_words, cache.pending_slots = [], []
        try:
            for start in range(0, len(words), MISS_BATCH):
                batch = words[start : start + MISS_BATCH]
                values = self._encode_words(batch)
                deque(map(bytearray.extend, slots[start : start + MISS_BATCH], values), maxlen=0)
                cache.update(zip(batch, values))  # immutable bytes replace the placeholders
        except BaseException:
            cache.forget_pending(words)
            raise
        self.misses += len(words)

    def _encode_words(self, words: list) -> list[bytes]:
        return self._sp_encode(self.unit_sp, words)

    def _sp_encode(self, sp: spm.SentencePieceProcessor, words: list) -> list[bytes]:
        # One SentencePiece call per batch of words, then one array for all their ids, cut into
        # per-word byte strings by C-level slicing. (Encoding the words as one space-joined string
        # would give the same ids but is slower: BPE's cost grows with the string's length.)
        ids = sp.encode(words, num_threads=1)
        data = array(self._typecode, chain.from_iterable(ids)).tobytes()
        isz = self.dtype.itemsize
        ends = [n * isz for n in accumulate(map(len, ids), initial=0)]
        return list(map(data.__getitem__, map(slice, ends, ends[1:])))


class UnitCacheEncoder(WordCacheEncoder):
    """Per-unit cached encoder for the ``layout`` and ``normalized`` plans (whitespace kept).

    A document is cut where SentencePiece's ``SplitIntoWords`` cuts its normalized text (before
    every run of U+2581 that follows another character) and around ``isolated`` characters. No
    mergeable piece crosses such a cut (checked on the vocabulary), so BPE on the whole text is
    BPE on each unit, and each unit is encoded alone by the model without its dummy prefix.
    """

    def __init__(self, sp: spm.SentencePieceProcessor, dtype: np.dtype, plan: EncodingPlan, model_path: str,
                 cache_words: int = DEFAULT_CACHE_WORDS) -> None:
        super().__init__(sp, dtype, " ", cache_words)
        self.normalize_first = plan.mode == "normalized"
        self.unit_sp = unit_processor(model_path, keep_normalizer=not self.normalize_first)
        # Identity rule: a space and U+2581 itself are the only characters that become U+2581.
        space = re.escape(WS) if self.normalize_first else re.escape(" " + WS)
        if plan.isolated:
            iso = re.escape(plan.isolated)
            pattern = f"[{iso}]+|[{space}]+[^{space}{iso}]*|[^{space}{iso}]+"
        else:
            pattern = f"[{space}]+[^{space}]*|[^{space}]+"
        self._units = re.compile(pattern).findall
        self._dummy = " " if plan.dummy_prefix and not self.normalize_first else ""

    def words(self, text: str) -> list[str]:
        if not text:
            return []  # SentencePiece adds no dummy prefix to an empty text
        return self._units(self._dummy + text)

    def encode_many(self, texts: Sequence[str]) -> list[bytes]:
        if self.normalize_first:
            texts = self.sp.normalize(list(texts))
        return super().encode_many(texts)


def make_encoder(sp: spm.SentencePieceProcessor, dtype: np.dtype, plan: EncodingPlan, model_path: str,
                 cache_words: int = DEFAULT_CACHE_WORDS):
    """The encoder ``plan`` calls for (``plan.separators`` filled in for the ``words`` plan)."""
    if plan.mode == "words":
        return WordCacheEncoder(sp, dtype, plan.separators, cache_words)
    if plan.per_word:
        return UnitCacheEncoder(sp, dtype, plan, model_path, cache_words)
    return PlainEncoder(sp, dtype)


class PlainEncoder:
    """Whole-document SentencePiece encoding, for models where the per-word identity fails."""

    def __init__(self, sp: spm.SentencePieceProcessor, dtype: np.dtype) -> None:
        self.sp = sp
        self.dtype = np.dtype(dtype)
        self.misses = 0
        self.lookups = 0

    def encode(self, text: str) -> bytes:
        return np.array(self.sp.encode(text), dtype=self.dtype).tobytes()

    def encode_many(self, texts: Sequence[str]) -> list[bytes]:
        dtype = self.dtype
        return [np.array(ids, dtype=dtype).tobytes() for ids in self.sp.encode(list(texts), num_threads=1)]
