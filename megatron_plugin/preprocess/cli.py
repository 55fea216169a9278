"""Command line: ``python -m megatron_plugin.preprocess [encode|train-tokenizer|merge|inspect] ...``.

Without a sub-command the arguments are those of ``encode``, whose flags keep the names of
Megatron-LM's ``tools/preprocess_data.py`` (``--input``, ``--output-prefix``, ``--tokenizer-model``,
``--json-keys``, ``--append-eod``, ``--workers``), so its command lines work as they are.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_plugin.errors import UserError, report_user_error

from .errors import PreprocessError

SUBCOMMANDS = ("encode", "train-tokenizer", "merge", "inspect")
SP_TYPES = ("GPTSentencePieceTokenizer", "SentencePieceTokenizer", "Llama2Tokenizer")


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True,
                   help="files, directories or globs: .jsonl/.json(.gz/.zst), .parquet, .txt")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="field(s) holding the text (JSONL keys or Parquet columns); default: text")
    p.add_argument("--text-unit", choices=("line", "paragraph", "file"), default="line",
                   help="what one document is in .txt inputs (default: line)")
    p.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                   help="bad records: stop naming file and line (default), or skip and count them")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0)


def _add_normalization_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--normalization", choices=("identity", "nmt_nfkc"), default="identity",
                   help="of a trained tokenizer: identity (default; Llama 2 settings, newlines, indentation and "
                        "repeated spaces kept) or nmt_nfkc (SentencePiece's default: NFKC, whitespace collapsed)")


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
    if cmd == "train-tokenizer":
        p = argparse.ArgumentParser(prog=f"{prog} train-tokenizer",
                                    description="Train a BPE SentencePiece model on a bounded sample.")
        _add_input_args(p)
        p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
        p.add_argument("--vocab-size", type=int, default=32000)
        p.add_argument("--tokenizer-sample", type=int, default=1_000_000, help="lines sampled (default 1M)")
        _add_normalization_arg(p)
        return p
    p = argparse.ArgumentParser(
        prog=prog,
        description="Raw corpora -> SentencePiece tokens -> Megatron indexed dataset "
                    "(PREFIX_KEY_document.bin/.idx + .json manifest).",
        epilog="Other sub-commands: train-tokenizer, merge, inspect (see --help of each).",
    )
    _add_input_args(p)
    p.add_argument("--output-prefix", required=True,
                   help="writes {prefix}_{key}_document.bin/.idx/.json, as Megatron-LM does")
    p.add_argument("--tokenizer-model", default=None, help="SentencePiece .model to use (or to write with --train-tokenizer)")
    p.add_argument("--tokenizer-type", default="GPTSentencePieceTokenizer",
                   help="accepted for Megatron-LM compatibility; only SentencePiece types are supported")
    p.add_argument("--train-tokenizer", action="store_true",
                   help="train a BPE model (byte fallback, --normalization) on a sample of the input, written as PREFIX.model")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--tokenizer-sample", type=int, default=1_000_000,
                   help="lines of text sampled (reservoir) to train the tokenizer (default 1M)")
    _add_normalization_arg(p)
    p.add_argument("--append-eod", action="store_true", help="append the eos id after each non-empty document")
    p.add_argument("--empty-documents", choices=("keep", "skip", "error"), default="keep",
                   help="documents with no tokens: keep as Megatron-LM does (default), skip, or stop")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="re-encode N random documents with plain SentencePiece; fail on any difference")
    p.add_argument("--num-shards", type=int, default=1, help="split the input files into N deterministic shards")
    p.add_argument("--shard-index", type=int, default=None,
                   help="process only this shard (0-based) into its own prefix; without it, all shards "
                        "run here one after another (each resumable) and are merged")
    p.add_argument("--encoder", choices=("auto", "plain"), default="auto",
                   help="auto: per-word cache where exact for the model, else plain; plain: always plain SentencePiece")
    p.add_argument("--cache-words", type=int, default=None, help="per-worker word cache size (entries per generation)")
    p.add_argument("--chunk-bytes", type=int, default=1 << 20, help="input bytes per work item (default 1 MiB)")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that are already complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    if cmd == "train-tokenizer":
        from .pipeline import train_tokenizer

        path = train_tokenizer(args.input, args.model_prefix, vocab_size=args.vocab_size,
                               json_keys=args.json_keys, sample_lines=args.tokenizer_sample,
                               text_unit=args.text_unit, seed=args.seed, workers=args.workers,
                               normalization=args.normalization)
        print(path)
        return 0
    from .encoder import DEFAULT_CACHE_WORDS
    from .pipeline import PreprocessOptions, preprocess

    if args.tokenizer_type not in SP_TYPES:
        raise PreprocessError(f"--tokenizer-type {args.tokenizer_type}: only SentencePiece models are supported "
                              f"({', '.join(SP_TYPES)})")
    opts = PreprocessOptions(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer_model=args.tokenizer_model,
        train_tokenizer=args.train_tokenizer, vocab_size=args.vocab_size, tokenizer_sample=args.tokenizer_sample,
        normalization=args.normalization,
        json_keys=tuple(args.json_keys), append_eod=args.append_eod, workers=args.workers,
        text_unit=args.text_unit, on_error=args.on_error, empty_documents=args.empty_documents,
        verify=args.verify, num_shards=args.num_shards, shard_index=args.shard_index,
        chunk_bytes=args.chunk_bytes, cache_words=args.cache_words or DEFAULT_CACHE_WORDS,
        encoder=args.encoder, overwrite=args.overwrite, progress=not args.no_progress, seed=args.seed,
    )
    if not args.append_eod:
        # As Megatron-LM's tool does; for pretraining data it is almost always a mistake.
        print("warning: no --append-eod: documents are written without an end-of-document token, so a "
              "training dataset made this way runs them together; add --append-eod for pretraining data",
              file=sys.stderr)
    preprocess(opts)
    return 0
