"""Generation speed on CPU: the package's generator against transformers' `generate`, side by side.

The `small` model of the training-throughput benchmark (~100M Llama, fp32) with fixed random
weights is written once as a Hugging Face folder; transformers loads that folder
(LlamaForCausalLM, SDPA attention, its default dynamic KV cache), and ours reads the same folder
through the package's importer (Megatron-Core GPTModel, static KV cache). Greedy decoding of
random prompts, no EOS, runs interleaved (ours, theirs, ours, ...), medians reported:

- TTFT: wall time of a generation of 1 new token (prefill + the first sample);
- decode tokens/s: batch x (new - 1) / (time of `new` tokens - time of 1 token);
- per-token step time, and beside it the GEMM-only floor: one decode step's matrix multiplies
  alone (every linear layer and the output layer at this batch size), so that what each stack
  spends per token beyond the model's own compute is visible.

    python benchmarks/generate_bench.py --threads 2 --prompt 128 --new 128 --batch 1 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per stack and batch size")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def make_hf_folder(folder: str, seq: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from train_throughput import small_model

    m = small_model(seq)
    config = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, max_position_embeddings=seq, rms_norm_eps=m.norm_epsilon,
        rope_theta=m.rotary_base, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(folder, safe_serialization=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gemm_floor(hf_model, batch: int, reps: int = 5) -> float:
    """Seconds of one decode step's matrix multiplies alone (x [batch, hidden] through every
    Linear of the model, output layer included)."""
    weights = [m.weight for m in hf_model.modules() if isinstance(m, torch.nn.Linear)]
    hidden = hf_model.config.hidden_size
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in weights}
    assert hidden in inputs

    def step():
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    step()
    return statistics.median(timed(step) for _ in range(reps))


def main() -> int:
    args = _parser().parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from megatron_plugin.generate import SamplingOptions, load_generator
    from megatron_plugin.runtime import cpu_mode
    from transformers import AutoModelForCausalLM

    seq = args.prompt + args.new
    folder = tempfile.mkdtemp(prefix="generate_bench_hf_")
    make_hf_folder(folder, seq)
    ours = load_generator(folder, dtype="fp32")
    with cpu_mode.suspended():
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
        theirs.generation_config.eos_token_id = None
        theirs.generation_config.pad_token_id = 0

    def run_ours(prompts, new):
        return ours.generate(prompts.tolist(), SamplingOptions(max_new_tokens=new, stop_at_eos=False))

    def run_theirs(prompts, new):
        with cpu_mode.suspended(), torch.no_grad():
            return theirs.generate(prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    results = {"threads": args.threads, "prompt": args.prompt, "new": args.new, "cpu": platform.processor() or
               platform.machine(), "torch": torch.__version__, "by_batch": {}}
    for batch in args.batch:
        gen = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, theirs.config.vocab_size, (batch, args.prompt), generator=gen)
        # Warm-up, and the tokens both produce.
        ours_tokens = [g.tokens for g in run_ours(prompts, args.new)]
        their_tokens = run_theirs(prompts, args.new)[:, args.prompt:].tolist()
        same = sum(a == b for a, b in zip(ours_tokens, their_tokens))
        times = {"ours": {"first": [], "full": []}, "transformers": {"first": [], "full": []}}
        for _ in range(args.reps):
            for name, run in (("ours", run_ours), ("transformers", run_theirs)):
                times[name]["first"].append(timed(lambda: run(prompts, 1)))
                times[name]["full"].append(timed(lambda: run(prompts, args.new)))
        with cpu_mode.suspended():
            floor = gemm_floor(theirs, batch)
        row = {"same_tokens": f"{same}/{batch}", "gemm_floor_ms": 1e3 * floor}
        for name, t in times.items():
            first, full = statistics.median(t["first"]), statistics.median(t["full"])
            step = (full - first) / (args.new - 1)
            row[name] = {"ttft_s": first, "decode_tokens_per_s": batch / step, "step_ms": 1e3 * step,
                         "beyond_gemm_ms": 1e3 * (step - floor), "full_s": full}
        row["decode_ratio"] = row["ours"]["decode_tokens_per_s"] / row["transformers"]["decode_tokens_per_s"]
        row["ttft_ratio"] = row["transformers"]["ttft_s"] / row["ours"]["ttft_s"]
        results["by_batch"][batch] = row
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"small model (fp32), {args.threads} threads, prompt {args.prompt}, {args.new} new tokens, greedy, "
          f"medians of {args.reps} | torch {torch.__version__}")
    header = f"{'batch':>5} {'stack':<13} {'TTFT s':>8} {'decode tok/s':>13} {'step ms':>8} {'beyond GEMM ms':>15}"
    print(header)
    for batch, row in results["by_batch"].items():
        for name in ("ours", "transformers"):
            r = row[name]
            print(f"{batch:>5} {name:<13} {r['ttft_s']:>8.3f} {r['decode_tokens_per_s']:>13.1f} {r['step_ms']:>8.2f} "
                  f"{r['beyond_gemm_ms']:>15.2f}")
        print(f"{'':>5} decode ours/transformers {row['decode_ratio']:.2f}x | TTFT transformers/ours "
              f"{row['ttft_ratio']:.2f}x | GEMM-only floor {row['gemm_floor_ms']:.2f} ms/step | same greedy "
              f"tokens {row['same_tokens']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
