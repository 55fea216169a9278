"""`python -m megatron_plugin.evaluate`: perplexity and lm-evaluation-harness tasks of a checkpoint.

    python -m megatron_plugin.evaluate --checkpoint runs/smoke --split valid --json
    python -m megatron_plugin.evaluate --checkpoint runs/smoke --data corpus.jsonl --max-tokens 100000
    python -m megatron_plugin.evaluate --checkpoint runs/smoke --tasks smoke_story --num-fewshot 4 \\
        --include-path examples/lm_eval
"""

from __future__ import annotations

import argparse
import json
import os
from typing import List, Optional

from megatron_plugin.generate.console import quiet_libraries, run_cli
from megatron_plugin.generate.errors import GenerateError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_plugin.evaluate",
        description="Perplexity (--data / --split) or lm-evaluation-harness tasks (--tasks) of a "
                    "training checkpoint or a Hugging Face Llama folder.",
    )
    parser.add_argument("--checkpoint", "-c", required=True, help="RUN, RUN/checkpoints, iter_N or an HF folder")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="perplexity on an indexed dataset PREFIX or a raw .jsonl / .txt file")
    what.add_argument("--split", choices=["train", "valid", "test"],
                      help="perplexity on this split of the checkpoint's own run (GPTDataset as in training)")
    what.add_argument("--tasks", help="comma-separated lm-evaluation-harness task names")
    parser.add_argument("--max-tokens", type=int, help="perplexity: score at most N tokens")
    parser.add_argument("--samples", type=int,
                        help="--split: samples to score (default for valid: eval.iters global batches, "
                             "what the training loop validates on; else the whole split)")
    parser.add_argument("--seq-length", type=int, help="perplexity window (default: the run's data.seq_length)")
    parser.add_argument("--json-key", default="text", help="raw JSONL: the text field (default text)")
    parser.add_argument("--num-fewshot", type=int, help="--tasks: few-shot examples per prompt")
    parser.add_argument("--include-path", help="--tasks: a folder of task YAML files (e.g. examples/lm_eval)")
    parser.add_argument("--limit", type=float, help="--tasks: at most N documents per task (or a fraction < 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--tensor-parallel", "--tp", type=int, default=None,
                        help="tensor-parallel size (default: the number of processes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()

    def body() -> int:
        from megatron_plugin.generate.api import load_generator

        if args.batch_size < 1:
            raise GenerateError(f"--batch-size {args.batch_size}: must be at least 1")
        if args.data is not None and not (os.path.exists(args.data) or os.path.exists(args.data + ".idx")):
            raise GenerateError(f"--data {args.data}: no such file and no {args.data}.bin / {args.data}.idx")
        if args.include_path is not None and not os.path.isdir(args.include_path):
            raise GenerateError(f"--include-path {args.include_path}: no such folder")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        tp = args.tensor_parallel or world
        if tp != world:
            raise GenerateError(f"--tensor-parallel {tp} but {world} processes run: start {tp} (torchrun --nproc-per-node {tp})")
        generator = load_generator(args.checkpoint, args.dtype, tp, 1)
        main_rank = int(os.environ.get("RANK", "0")) == 0
        if args.tasks:
            from megatron_plugin.evaluate.harness import run_tasks

            tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
            results = run_tasks(generator, tasks, num_fewshot=args.num_fewshot, include_path=args.include_path,
                                limit=args.limit, batch_size=args.batch_size)
            if main_rank and results is not None:
                if args.json:
                    print(json.dumps({k: results[k] for k in ("results", "versions", "n-shot", "configs") if k in results},
                                     indent=2, default=str))
                else:
                    from lm_eval.utils import make_table

                    print(make_table(results))
            return 0
        from megatron_plugin.evaluate.perplexity import perplexity

        result = perplexity(generator.loaded, data=args.data, split=args.split, max_tokens=args.max_tokens,
                            num_samples=args.samples, batch_size=args.batch_size, json_key=args.json_key,
                            seq_length=args.seq_length, progress=main_rank and not args.no_progress)
        if main_rank:
            if args.json:
                print(json.dumps(result.to_dict()))
            else:
                print(f"loss {result.loss:.6f} | ppl {result.ppl:.4f} | bits/byte {result.bits_per_byte:.4f} | "
                      f"{result.tokens:,} tokens")
        return 0

    return run_cli(body)
