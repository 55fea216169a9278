"""SentencePiece models: load, describe (spec flags, EOD id, checksum), and train on a bounded sample."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import sentencepiece as spm

from megatron_plugin.chat.template import CONTROL_TOKENS
from megatron_plugin.config import DEFAULT_VOCAB_SIZE
from megatron_plugin.files import file_sha256

from .errors import PreprocessError

# SentencePiece skips training sentences longer than this (bytes); we cut long lines to fit.
MAX_SENTENCE_BYTES = 8192


@dataclass(frozen=True)
class ModelSpec:
    """The normalizer and trainer settings that decide whether per-word encoding is exact."""

    model_type: str  # "BPE", "UNIGRAM", ...
    normalization: str
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool
    split_by_whitespace: bool
    treat_whitespace_as_suffix: bool
    user_defined: tuple[str, ...] = ()
    has_rule_tsv: bool = False
    allow_whitespace_only_pieces: bool = False
    byte_fallback: bool = False
    has_charsmap: bool = True  # False for the identity rule: every character maps to itself
    # Every piece BPE can merge into (NORMAL, USER_DEFINED and UNUSED types): which character
    # pairs can never be merged decides where a text may be cut without changing its encoding.
    pieces: tuple[str, ...] = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class TokenizerInfo:
    path: str
    sha256: str
    vocab_size: int
    eod_id: int  # -1 when the model has no end-of-document (eos) piece
    spec: Optional[ModelSpec]

    def as_dict(self) -> dict:
        return {
            "model": os.path.abspath(self.path),
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
            "normalization": self.spec.normalization if self.spec else None,
        }


def read_spec(model_path: str) -> Optional[ModelSpec]:
    """Parse the model proto; None when protobuf is unavailable (then only plain encoding is used)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except Exception:  # protobuf missing or incompatible
        return None
    proto = pb.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    kinds = pb.ModelProto.SentencePiece
    user = tuple(p.piece for p in proto.pieces if p.type == kinds.USER_DEFINED)
    mergeable = tuple(p.piece for p in proto.pieces if p.type in (kinds.NORMAL, kinds.USER_DEFINED, kinds.UNUSED))
    return ModelSpec(
        model_type=pb.TrainerSpec.ModelType.Name(ts.model_type),
        normalization=ns.name,
        add_dummy_prefix=ns.add_dummy_prefix,
        remove_extra_whitespaces=ns.remove_extra_whitespaces,
        escape_whitespaces=ns.escape_whitespaces,
        split_by_whitespace=ts.split_by_whitespace,
        treat_whitespace_as_suffix=ts.treat_whitespace_as_suffix,
        user_defined=user,
        has_rule_tsv=bool(ns.normalization_rule_tsv),
        allow_whitespace_only_pieces=ts.allow_whitespace_only_pieces,
        byte_fallback=ts.byte_fallback,
        has_charsmap=bool(ns.precompiled_charsmap),
        pieces=mergeable,
    )


def load_processor(model_path: str) -> spm.SentencePieceProcessor:
    if not os.path.isfile(model_path):
        raise PreprocessError(
            f"tokenizer model {model_path!r} not found: pass an existing SentencePiece .model with "
            "--tokenizer-model, or --train-tokenizer to train one"
        )
    try:
        return spm.SentencePieceProcessor(model_file=model_path)
    except Exception as exc:
        raise PreprocessError(f"{model_path}: not a SentencePiece model ({exc})") from exc


def describe(model_path: str) -> TokenizerInfo:
    sp = load_processor(model_path)
    return TokenizerInfo(
        path=model_path,
        sha256=file_sha256(model_path),
        vocab_size=sp.get_piece_size(),
        eod_id=sp.eos_id(),
        spec=read_spec(model_path),
    )


def require_eod(info: TokenizerInfo) -> int:
    if info.eod_id < 0:
        raise PreprocessError(
            f"{info.path}: --append-eod needs an end-of-document id, but this SentencePiece model "
            "has no eos piece (it was trained with eos_id=-1). Retrain it with an eos piece "
            "(the default, eos_id=2), or run without --append-eod."
        )
    return info.eod_id


# ----------------------------------------------------------------------------------------------
# Training


# Llama 2's published trainer settings: the text's layout (newlines, indentation, repeated spaces)
# survives encoding, which code and chat need. Digits are split one by one.
LAYOUT_SETTINGS = dict(
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    split_by_unicode_script=True,
    split_by_number=True,
    max_sentencepiece_length=16,
)
# SentencePiece's own default: NFKC, runs of whitespace (newlines and tabs included) become one space.
NFKC_SETTINGS = dict(normalization_rule_name="nmt_nfkc")
NORMALIZATIONS = {"identity": LAYOUT_SETTINGS, "nmt_nfkc": NFKC_SETTINGS}


@dataclass
class TrainerOptions:
    vocab_size: int = DEFAULT_VOCAB_SIZE
    model_type: str = "bpe"
    byte_fallback: bool = True
    character_coverage: float = 0.9995
    # "identity": Llama 2 style, whitespace kept; "nmt_nfkc": SentencePiece's default, whitespace collapsed
    normalization: str = "identity"
    sample_sentences: int = 1_000_000  # reservoir size (lines of text)
    seed: int = 0
    threads: int = 0  # 0: all cores
    # The chat template's control pieces (ids 3 and 4, right after unk/bos/eos). Control pieces,
    # not user-defined ones: encode never produces them, so text typed in a message cannot
    # become one. Reserved in every model so that a pretrained model can be fine-tuned for chat.
    control_symbols: tuple = CONTROL_TOKENS
    extra: dict = field(default_factory=dict)  # any other SentencePieceTrainer option

    @property
    def keeps_layout(self) -> bool:
        return self.normalization == "identity"


def _lines(doc: str, keep_indent: bool = False) -> Iterator[str]:
    for line in doc.split("\n"):
        # Kept whitespace is part of the text to learn (indentation pieces); a blank line is not.
        line = line.rstrip("\r") if keep_indent else line.strip()
        if not line.strip():
            continue
        while len(line.encode("utf-8")) > MAX_SENTENCE_BYTES:
            cut = MAX_SENTENCE_BYTES // 4  # characters: at most 4 bytes each
            yield line[:cut]
            line = line[cut:]
        yield line


def reservoir_sample(docs: Iterable[str], size: int, seed: int, keep_indent: bool = False) -> list[str]:
    """Uniform random sample of ``size`` lines from a stream of documents (Algorithm R).

    Memory is bounded by ``size`` lines whatever the corpus size; the sample is deterministic for
    a given seed and input order.
    """
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for doc in docs:
        for line in _lines(doc, keep_indent):
            seen += 1
            if len(sample) < size:
                sample.append(line)
            else:
                j = rng.randrange(seen)
                if j < size:
                    sample[j] = line
    return sample


def train_sentencepiece(docs: Iterable[str], model_prefix: str, opts: TrainerOptions) -> str:
    """Train a SentencePiece model on a bounded random sample of ``docs``; returns the .model path.

    The default is Llama 2's whitespace-preserving shape (``LAYOUT_SETTINGS``); ``normalization=
    "nmt_nfkc"`` gives SentencePiece's default normalizer instead. Both have byte fallback, so no
    input byte is ever unknown, and both keep the per-word encoder exact. The model is written to
    a temporary prefix and renamed, so a killed run never leaves a truncated ``.model`` behind.
    """
    if opts.normalization not in NORMALIZATIONS:
        raise PreprocessError(f"normalization {opts.normalization!r}: use one of {', '.join(NORMALIZATIONS)}")
    sample = reservoir_sample(docs, opts.sample_sentences, opts.seed, keep_indent=opts.keeps_layout)
    if not sample:
        raise PreprocessError("cannot train a tokenizer: the input has no non-empty text")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    tmp_prefix = f"{model_prefix}.tmp{os.getpid()}"
    kwargs = dict(
        sentence_iterator=iter(sample),
        model_prefix=tmp_prefix,
        vocab_size=opts.vocab_size,
        model_type=opts.model_type,
        byte_fallback=opts.byte_fallback,
        character_coverage=opts.character_coverage,
        max_sentence_length=MAX_SENTENCE_BYTES,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=opts.threads or (os.cpu_count() or 1),
        minloglevel=2,
        **NORMALIZATIONS[opts.normalization],
    )
    if opts.control_symbols:
        kwargs["control_symbols"] = list(opts.control_symbols)
    kwargs.update(opts.extra)
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as exc:
        msg = str(exc)
        hint = ""
        if "smaller than required_chars" in msg:
            hint = " (the text has more distinct characters than this --vocab-size allows: raise it)"
        elif "Vocabulary size" in msg or "vocab_size" in msg:
            hint = " (the sample is too small for this --vocab-size: lower it or add text)"
        raise PreprocessError(f"tokenizer training failed: {msg}{hint}") from exc
    for ext in (".model", ".vocab"):
        os.replace(tmp_prefix + ext, model_prefix + ext)
    return model_prefix + ".model"
