"""Command line: ``python -m megatron_plugin.preprocess [encode|sft|train-tokenizer|merge|inspect] ...``.

Without a sub-command the arguments are those of ``encode``, whose flags keep the names of
Megatron-LM's ``tools/preprocess_data.py`` (``--input``, ``--output-prefix``, ``--tokenizer-model``,
``--json-keys``, ``--append-eod``, ``--workers``), so its command lines work as they are.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

from megatron_plugin.errors import UserError, report_user_error

from .errors import PreprocessError
from .pipeline import PreprocessOptions, preprocess, train_tokenizer
from .readers import TEXT_UNITS
from .tokenizer import NORMALIZATIONS

SUBCOMMANDS = ("encode", "sft", "train-tokenizer", "merge", "inspect")
SP_TYPES = ("GPTSentencePieceTokenizer", "SentencePieceTokenizer", "Llama2Tokenizer")
# The encode flags' argparse dests are PreprocessOptions field names, so the parsed arguments
# become the options as they are and every default is the dataclass's own.
OPTION_FIELDS = {f.name: f for f in dataclasses.fields(PreprocessOptions)}


def _default(name: str):
    return OPTION_FIELDS[name].default


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", dest="inputs", metavar="INPUT", nargs="+", required=True,
                   help="files, directories or globs: .jsonl/.json(.gz/.zst), .parquet, .txt")
    p.add_argument("--json-keys", nargs="+", default=list(_default("json_keys")),
                   help="field(s) holding the text (JSONL keys or Parquet columns); "
                        f"default: {' '.join(_default('json_keys'))}")
    p.add_argument("--text-unit", choices=TEXT_UNITS, default=_default("text_unit"),
                   help="what one document is in .txt inputs (default: %(default)s)")
    p.add_argument("--on-error", choices=("stop", "skip"), default=_default("on_error"),
                   help="bad records: stop naming file and line, or skip and count them (default: %(default)s)")
    p.add_argument("--workers", type=int, default=_default("workers"),
                   help="worker processes (default %(default)s: all cores)")
    p.add_argument("--seed", type=int, default=_default("seed"))


def _add_tokenizer_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocab-size", type=int, default=_default("vocab_size"),
                   help="pieces of a trained tokenizer (default %(default)s)")
    p.add_argument("--tokenizer-sample", type=int, default=_default("tokenizer_sample"),
                   help="lines of text sampled (reservoir) to train the tokenizer "
                        f"(default {_default('tokenizer_sample'):,})")
    p.add_argument("--normalization", choices=tuple(NORMALIZATIONS), default=_default("normalization"),
                   help="of a trained tokenizer: identity (Llama 2 settings, newlines, indentation and repeated "
                        "spaces kept) or nmt_nfkc (SentencePiece's default: NFKC, whitespace collapsed); "
                        "default: %(default)s")


def build_parser(cmd: str) -> argparse.ArgumentParser:
    prog = "python -m megatron_plugin.preprocess"
    if cmd == "merge":
        p = argparse.ArgumentParser(prog=f"{prog} merge", description="Join datasets (in order) into one.")
        p.add_argument("prefixes", nargs="+", help="dataset prefixes (or globs of them), in order")
        p.add_argument("--output-prefix", required=True)
        return p
    if cmd == "inspect":
        p = argparse.ArgumentParser(prog=f"{prog} inspect", description="Describe a dataset.")
        p.add_argument("prefix")
        p.add_argument("--tokenizer-model", default=None, help="to decode (default: from the manifest)")
        p.add_argument("--show", type=int, default=3, help="documents to decode (default 3)")
        return p
    if cmd == "sft":
        from .sft import DEFAULT_MAX_LENGTH, TOO_LONG_POLICIES

        p = argparse.ArgumentParser(
            prog=f"{prog} sft",
            description="Chat data (messages, ShareGPT conversations, prompt/completion) -> token ids and "
                        "a loss mask (PREFIX_tokens_document + PREFIX_loss_mask_document + .json manifest).",
        )
        p.add_argument("--input", dest="inputs", metavar="INPUT", nargs="+", required=True,
                       help="files, directories or globs: .jsonl/.json(.gz/.zst), .parquet; one conversation each")
        p.add_argument("--output-prefix", required=True,
                       help="writes {prefix}_tokens_document and {prefix}_loss_mask_document (.bin/.idx/.json)")
        p.add_argument("--tokenizer-model", required=True,
                       help="SentencePiece .model with the chat control pieces (train-tokenizer reserves them)")
        p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                       help="most tokens per conversation (default %(default)s)")
        p.add_argument("--too-long", choices=TOO_LONG_POLICIES, default="truncate",
                       help="longer conversations: truncate (drop the last whole turns that do not fit) "
                            "or drop them; counted by reason in the manifest (default: %(default)s)")
        p.add_argument("--on-error", choices=("stop", "skip"), default=_default("on_error"),
                       help="bad records: stop naming file and line, or skip and count them (default: %(default)s)")
        p.add_argument("--chunk-bytes", type=int, default=_default("chunk_bytes"),
                       help=f"input bytes read at a time (default {_default('chunk_bytes'):,})")
        p.add_argument("--overwrite", action="store_true", help="redo an output that is already complete")
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
        return p
    if cmd == "train-tokenizer":
        p = argparse.ArgumentParser(prog=f"{prog} train-tokenizer",
                                    description="Train a BPE SentencePiece model on a bounded sample.")
        _add_input_args(p)
        p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
        _add_tokenizer_training_args(p)
        return p
    p = argparse.ArgumentParser(
        prog=prog,
        description="Raw corpora -> SentencePiece tokens -> Megatron indexed dataset "
                    "(PREFIX_KEY_document.bin/.idx + .json manifest).",
        epilog="Other sub-commands: sft, train-tokenizer, merge, inspect (see --help of each).",
    )
    _add_input_args(p)
    p.add_argument("--output-prefix", required=True,
                   help="writes {prefix}_{key}_document.bin/.idx/.json, as Megatron-LM does")
    p.add_argument("--tokenizer-model", default=_default("tokenizer_model"),
                   help="SentencePiece .model to use (or to write with --train-tokenizer)")
    p.add_argument("--tokenizer-type", default="GPTSentencePieceTokenizer",
                   help="accepted for Megatron-LM compatibility; only SentencePiece types are supported")
    p.add_argument("--train-tokenizer", action="store_true", default=_default("train_tokenizer"),
                   help="train a BPE model (byte fallback, --normalization) on a sample of the input, written as PREFIX.model")
    _add_tokenizer_training_args(p)
    p.add_argument("--append-eod", action="store_true", default=_default("append_eod"),
                   help="append the eos id after each non-empty document")
    p.add_argument("--empty-documents", choices=("keep", "skip", "error"), default=_default("empty_documents"),
                   help="documents with no tokens: keep as Megatron-LM does, skip, or stop (default: %(default)s)")
    p.add_argument("--verify", type=int, default=_default("verify"), metavar="N",
                   help="re-encode N random documents with plain SentencePiece; fail on any difference")
    p.add_argument("--num-shards", type=int, default=_default("num_shards"),
                   help="split the input files into N deterministic shards")
    p.add_argument("--shard-index", type=int, default=_default("shard_index"),
                   help="process only this shard (0-based) into its own prefix; without it, all shards "
                        "run here one after another (each resumable) and are merged")
    p.add_argument("--encoder", choices=("auto", "plain"), default=_default("encoder"),
                   help="auto: per-word cache where exact for the model, else plain; plain: always plain SentencePiece")
    p.add_argument("--cache-words", type=int, default=_default("cache_words"),
                   help="per-worker word cache size (entries per generation; default %(default)s)")
    p.add_argument("--chunk-bytes", type=int, default=_default("chunk_bytes"),
                   help=f"input bytes per work item (default {_default('chunk_bytes'):,})")
    p.add_argument("--overwrite", action="store_true", default=_default("overwrite"),
                   help="redo outputs that are already complete")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=_default("progress"),
                   help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv and argv[0] in SUBCOMMANDS else "encode"
    if argv and argv[0] in SUBCOMMANDS:
        argv = argv[1:]
    args = build_parser(cmd).parse_args(argv)
    try:
        return _run(cmd, args)
    except UserError as exc:  # PreprocessError and every other user error of the package
        return report_user_error(exc)
    except KeyboardInterrupt:
        print("interrupted: no dataset was written under its final name", file=sys.stderr)
        return 130


def _run(cmd: str, args: argparse.Namespace) -> int:
    if cmd == "inspect":
        from .inspect import inspect_dataset

        try:
            print(inspect_dataset(args.prefix, args.tokenizer_model, args.show))
        except (OSError, ValueError) as exc:
            raise PreprocessError(f"{args.prefix}: {exc}") from exc
        return 0
    if cmd == "merge":
        from . import manifest as mf
        from .merge import expand_prefixes, merge_prefixes

        m = merge_prefixes(expand_prefixes(args.prefixes), args.output_prefix)
        print(mf.summary_line(m), file=sys.stderr)
        return 0
    if cmd == "sft":
        from .sft import SFTOptions, preprocess_sft_job

        preprocess_sft_job(SFTOptions(**vars(args)))
        return 0
    if cmd == "train-tokenizer":
        path = train_tokenizer(args.inputs, args.model_prefix, vocab_size=args.vocab_size,
                               json_keys=args.json_keys, sample_lines=args.tokenizer_sample,
                               text_unit=args.text_unit, seed=args.seed, workers=args.workers,
                               normalization=args.normalization)
        print(path)
        return 0
    if args.tokenizer_type not in SP_TYPES:
        raise PreprocessError(f"--tokenizer-type {args.tokenizer_type}: only SentencePiece models are supported "
                              f"({', '.join(SP_TYPES)})")
    values = {k: v for k, v in vars(args).items() if k in OPTION_FIELDS}
    opts = PreprocessOptions(**{
        **values,
        "json_keys": tuple(args.json_keys),
        "cache_words": args.cache_words or _default("cache_words"),  # --cache-words 0 has always meant the default
    })
    if not args.append_eod:
        # As Megatron-LM's tool does; for pretraining data it is almost always a mistake.
        print("warning: no --append-eod: documents are written without an end-of-document token, so a "
              "training dataset made this way runs them together; add --append-eod for pretraining data",
              file=sys.stderr)
    preprocess(opts)
    return 0
