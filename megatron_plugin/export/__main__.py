"""`python -m megatron_plugin.export`: training checkpoint <-> Hugging Face Llama folder.

    python -m megatron_plugin.export --checkpoint RUN/checkpoints[/iter_N] --output DIR \
        [--dtype bf16|fp16|fp32] [--max-shard-size 5GB] [--tokenizer SP.model] [--verify]
    python -m megatron_plugin.export --from-hf DIR --output RUN/checkpoints[/iter_N] \
        [--tensor-parallel N] [--dtype ...] [--verify]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import List, Optional

from megatron_plugin.checkpoint_layout import LATEST_FILE, TOKENIZER_FILE, CheckpointError, read_run_config
from megatron_plugin.config import DTYPE_NAMES
from megatron_plugin.errors import UserError, report_user_error
from megatron_plugin.export.to_hf import DEFAULT_MAX_SHARD_SIZE
from megatron_plugin.export.verify import DEFAULT_TOLERANCE
from megatron_plugin.runtime import expected_warnings

logger = logging.getLogger("megatron_plugin.export")

EXIT_VERIFY_FAILED = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_plugin.export",
        description="Export a training checkpoint to a Hugging Face LlamaForCausalLM folder, or "
        "import such a folder as a checkpoint to continue pretraining from.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help=f"RUN/checkpoints (uses its {LATEST_FILE!r}) or RUN/checkpoints/iter_N")
    source.add_argument("--from-hf", metavar="DIR", help="a Hugging Face Llama folder to import")
    parser.add_argument("--output", required=True,
                        help="export: the new HF folder; import: RUN/checkpoints or RUN/checkpoints/iter_N")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES),
                        help="weights dtype (export default bf16; import default: the folder's)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="largest safetensors file, e.g. 2GB, 500MB (default %(default)s)")
    parser.add_argument("--tokenizer",
                        help=f"SentencePiece model to ship instead of the checkpoint's {TOKENIZER_FILE}")
    parser.add_argument("--tensor-parallel", type=int, default=1,
                        help="import: TP size training will resume with (sets vocabulary padding)")
    parser.add_argument("--verify", action="store_true",
                        help="compare logits of the result under transformers with our model (CPU)")
    parser.add_argument("--verify-sequences", type=int, default=3)
    parser.add_argument("--verify-tolerance", type=float,
                        help="largest accepted max |logit difference| (default by dtype: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_TOLERANCE.items()) + ")")
    return parser


def _quiet_libraries() -> None:
    # The Apex/TE fallback and deprecation warnings Megatron-Core gives on CPU (the package's one
    # list); its INFO logging says nothing about a conversion.
    expected_warnings.install()
    for name in ("megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _verify(checkpoint: str, hf_dir: str, dtype: str, args) -> int:
    from megatron_plugin.export.verify import verify_export

    started = time.time()
    result = verify_export(checkpoint, hf_dir, sequences=args.verify_sequences)
    tolerance = args.verify_tolerance if args.verify_tolerance is not None else DEFAULT_TOLERANCE[dtype]
    ok = result.max_abs_diff <= tolerance
    print(
        f"verify: {result.sequences} sequences x {result.seq_length} tokens, max |logit difference| "
        f"{result.max_abs_diff:.3e} (largest |logit| {result.max_abs_logit:.3g}, tolerance "
        f"{tolerance:g}, {dtype}): {'OK' if ok else 'FAILED'} [{time.time() - started:.1f}s]"
    )
    if not ok:
        print(f"error: the result at {hf_dir} does not reproduce the checkpoint's logits; it was kept "
              "for inspection", file=sys.stderr)
    return 0 if ok else EXIT_VERIFY_FAILED


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _quiet_libraries()
    started = time.time()
    try:
        if args.checkpoint:
            from megatron_plugin.export.to_hf import export_checkpoint

            dtype = args.dtype or "bf16"
            export_checkpoint(args.checkpoint, args.output, dtype=dtype,
                              max_shard_size=args.max_shard_size, tokenizer=args.tokenizer)
            print(f"exported {args.checkpoint} -> {args.output} ({dtype}) in {time.time() - started:.1f}s")
            if args.verify:
                return _verify(args.checkpoint, args.output, dtype, args)
        else:
            from megatron_plugin.export.from_hf import import_hf

            iter_dir = import_hf(args.from_hf, args.output, tensor_parallel=args.tensor_parallel,
                                 dtype=args.dtype)
            print(f"imported {args.from_hf} -> {iter_dir} in {time.time() - started:.1f}s")
            if args.verify:
                dtype = read_run_config(iter_dir)["precision"]["dtype"]
                return _verify(str(iter_dir), args.from_hf, dtype, args)
    except (UserError, CheckpointError) as err:
        return report_user_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
