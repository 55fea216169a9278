"""Training throughput of the package's own training step, optionally beside `transformers`' Llama.

Runs `build_train_state` + `train_step` (the code path of `python -m megatron_plugin.recipes.run`)
on random tokens for a warm-up and a timed window, and prints step time, tokens/s, TFLOP/s per
device (the model's FLOPs function), MFU and peak memory. On CPU the MFU denominator is a fp32
matrix multiply measured in the same run on the same number of threads (printed beside it); on a
GPU it is the device's dense bf16 / fp8 peak.

    # TP=1, 1 process x 2 threads, beside transformers' LlamaForCausalLM (steps interleaved)
    python benchmarks/train_throughput.py --model small --seq 512 --micro-batch 4 --dtype fp32 \\
        --threads 2 --compare-hf
    # TP=2, 2 processes x 1 thread
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/train_throughput.py --model small \\
        --seq 512 --micro-batch 4 --dtype fp32 --threads 1 parallel.tensor=2
    # a preset's model, any run CLI override
    python benchmarks/train_throughput.py --preset production_8gpu --seq 1024 --micro-batch 8 \\
        --dtype bf16 optim.lr=1e-4

`--json` prints one JSON object (rank 0) instead of the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from megatron_plugin.config import ModelConfig, ParallelConfig, PrecisionConfig, RunConfig, TrainConfig  # noqa: E402


def small_model(seq: int) -> ModelConfig:
    """The benchmark's fixed ~100M Llama: 99,496,704 parameters."""
    return ModelConfig(vocab_size=32000, hidden_size=768, num_layers=8, num_attention_heads=12,
                       num_query_groups=4, ffn_hidden_size=2048, max_seq_length=seq,
                       tie_embeddings=False, make_vocab_size_divisible_by=128)


MODELS = {"small": small_model}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", help="take the model (and parallel layout) of this preset")
    source.add_argument("--model", choices=sorted(MODELS), help="a fixed benchmark model (default: small)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (per model with --compare-hf)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (per model)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: fp32 on CPU, the preset's (bf16) on GPU")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (CPU)")
    parser.add_argument("--compare-hf", action="store_true",
                        help="also time transformers' LlamaForCausalLM (SDPA) + torch.optim.AdamW on the "
                             "same batch, steps interleaved with ours; single process only")
    parser.add_argument("--hf-optimizer", choices=["default", "fused"], default="default",
                        help="with --compare-hf: torch.optim.AdamW with its defaults (on CPU the per-tensor "
                             "loop) or fused=True")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", help="run CLI key=value overrides, e.g. parallel.tensor=2")
    return parser


def make_config(args) -> RunConfig:
    """The run's RunConfig: a preset's (or the fixed model's) config, the flags, then overrides."""
    from megatron_plugin.recipes.overrides import apply_overrides
    from megatron_plugin.recipes.presets import get_preset

    if args.preset:
        cfg = get_preset(args.preset)
        cfg.model.max_seq_length = max(cfg.model.max_seq_length, args.seq)
    else:
        cfg = RunConfig(model=MODELS[args.model or "small"](args.seq), parallel=ParallelConfig(gpus=1),
                        precision=PrecisionConfig(dtype="fp32"), train=TrainConfig())
    if args.dtype:
        cfg.precision.dtype = args.dtype
    elif not torch.cuda.is_available():
        cfg.precision.dtype = "fp32"
    cfg.data.seq_length = args.seq
    cfg.train.micro_batch_size = args.micro_batch
    cfg.train.global_batch_size = -1  # one micro-batch per rank per step unless overridden
    cfg.optim.warmup_steps = 0
    cfg.optim.decay_steps = None
    cfg.train.max_steps = args.warmup + args.steps + 1
    cfg, _ = apply_overrides(cfg, list(args.overrides))
    return cfg


class SyntheticBatches:
    """Random tokens in the dict the real loader yields (tokens, labels, loss_mask, position_ids).

    Every rank of a tensor-parallel group draws the same batches (the seed depends on the
    data-parallel rank only)."""

    def __init__(self, vocab_size: int, seq: int, micro_batch: int, seed: int, pool: int = 4):
        generator = torch.Generator().manual_seed(seed)
        self.batches = []
        for _ in range(pool):
            stream = torch.randint(0, vocab_size, (micro_batch, seq + 1), generator=generator)
            self.batches.append({
                "tokens": stream[:, :-1].contiguous(),
                "labels": stream[:, 1:].contiguous(),
                "loss_mask": torch.ones(micro_batch, seq, dtype=torch.float),
                "position_ids": torch.arange(seq).unsqueeze(0).expand(micro_batch, seq).contiguous(),
            })
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        return batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class HFLlama:
    """The same model as `transformers`' LlamaForCausalLM with SDPA attention, trained with
    torch.optim.AdamW (its defaults) and the same gradient clipping as ours."""

    def __init__(self, cfg: RunConfig, dtype: torch.dtype, device: torch.device, fused_adamw: bool = False):
        from transformers import LlamaConfig, LlamaForCausalLM

        m = cfg.model
        config = LlamaConfig(
            vocab_size=m.padded_vocab_size(1), hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_query_groups, max_position_embeddings=max(m.max_seq_length, cfg.data.seq_length),
            rms_norm_eps=m.norm_epsilon, rope_parameters={"rope_type": "default", "rope_theta": m.rotary_base},
            tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False,
            initializer_range=m.init_std, use_cache=False,
        )
        torch.manual_seed(cfg.train.seed)
        self.model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype).to(device)
        self.model.train()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr,
                                           betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                                           weight_decay=cfg.optim.weight_decay,
                                           **({"fused": True} if fused_adamw else {}))
        self.optimizer_name = "torch.optim.AdamW(fused=True)" if fused_adamw else "torch.optim.AdamW (defaults)"
        self.grad_clip = cfg.train.grad_clip
        self.device = device

    def step(self, batch: dict) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        tokens = batch["tokens"].to(self.device)
        # transformers shifts the labels itself: give it the input ids.
        out = self.model(input_ids=tokens, position_ids=batch["position_ids"].to(self.device), labels=tokens)
        out.loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return float(out.loss.detach())


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("megatron").setLevel(logging.ERROR)

    from megatron_plugin.config import ConfigError, data_parallel_size
    from megatron_plugin.model import flops_per_token, parameter_count
    from megatron_plugin.recipes.validate import validate
    from megatron_plugin.runtime.distributed import init_distributed, shutdown
    from megatron_plugin.runtime.peak import device_peak_flops
    from megatron_plugin.training.optimizer import build_train_state
    from megatron_plugin.training.step import BatchShape, train_step

    try:
        cfg = make_config(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.compare_hf and (world > 1 or cfg.parallel.tensor > 1 or cfg.parallel.pipeline > 1):
        print("error: --compare-hf runs one process at TP=PP=1", file=sys.stderr)
        return 2
    # Checked before torch.distributed starts, so that a bad layout is a message, not a traceback.
    try:
        dp = data_parallel_size(cfg.parallel, world)
        if cfg.train.global_batch_size <= 0:
            cfg.train.global_batch_size = cfg.train.micro_batch_size * dp
        validate(cfg, world_size=world, check_data=False)
    except ConfigError as error:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2
    runtime = init_distributed(cfg.parallel, cfg.train.seed)
    from megatron.core import parallel_state

    num_micro = cfg.train.grad_accumulation_steps(dp)
    seq, mbs = cfg.data.seq_length, cfg.train.micro_batch_size
    device = runtime.device
    threads = torch.get_num_threads()

    def barrier():
        if torch.distributed.is_initialized() and runtime.world_size > 1:
            torch.distributed.barrier()

    # The CPU peak is measured on every rank at once (each on its own threads), before and after
    # the timed window; the best of the two is the denominator.
    barrier()
    peak, peak_source = device_peak_flops(cfg.precision.dtype, cfg.precision.fp8 is not None)

    state = build_train_state(cfg, dp)
    shape = BatchShape(num_micro, mbs, seq, device)
    data = SyntheticBatches(cfg.model.vocab_size, seq, mbs, cfg.train.seed + 1000 * parallel_state.get_data_parallel_rank())

    def ours() -> tuple[float, float]:
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        result = train_step(state, data, shape)
        _sync(device)
        cpu_times.append(time.process_time() - cpu_start)
        barrier()
        return time.perf_counter() - start, result.loss

    ours_times, hf_times, ours_losses, hf_losses = [], [], [], []
    cpu_times, hf_cpu_times = [], []
    for _ in range(args.warmup):
        ours()
    del cpu_times[:]
    ours_memory = _peak_memory_bytes(device)
    hf = None
    if args.compare_hf:
        from megatron_plugin.runtime.cpu_mode import suspended

        with suspended():
            hf = HFLlama(cfg, cfg.precision.torch_dtype, device, fused_adamw=args.hf_optimizer == "fused")
            hf_data = SyntheticBatches(cfg.model.vocab_size, seq, mbs, cfg.train.seed + 1000)

            def theirs() -> tuple[float, float]:
                _sync(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                loss = hf.step(next(hf_data))
                _sync(device)
                hf_cpu_times.append(time.process_time() - cpu_start)
                return time.perf_counter() - start, loss

            for _ in range(args.warmup):
                theirs()
            del hf_cpu_times[:]
    for _ in range(args.steps):
        elapsed, loss = ours()
        ours_times.append(elapsed)
        ours_losses.append(loss)
        if hf is not None:
            with suspended():
                elapsed, loss = theirs()
            hf_times.append(elapsed)
            hf_losses.append(loss)
    barrier()
    if device.type == "cpu":
        peak = max(peak, device_peak_flops(cfg.precision.dtype)[0])

    tokens_per_step = cfg.train.global_batch_size * seq
    fpt = flops_per_token(cfg.model, seq, cfg.parallel.tensor)

    def figures(times: list) -> dict:
        step_time = statistics.median(times)
        tokens_per_s = tokens_per_step / step_time
        tflops = fpt * tokens_per_s / runtime.world_size / 1e12
        return {"step_time_s": step_time, "step_time_min_s": min(times), "step_time_max_s": max(times),
                "tokens_per_s": tokens_per_s, "tflops_per_device": tflops, "mfu": tflops * 1e12 / peak}

    result = {
        "model": args.preset or args.model or "small",
        "params": parameter_count(cfg.model, padded_vocab=True, tensor_parallel=cfg.parallel.tensor),
        "seq": seq, "micro_batch": mbs, "global_batch": cfg.train.global_batch_size,
        "dtype": cfg.precision.dtype, "tensor_parallel": cfg.parallel.tensor, "data_parallel": dp,
        "world_size": runtime.world_size, "threads_per_process": threads,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU: {cpu_model_name()}, {os.cpu_count()} cores",
        "peak_flops": peak, "peak_source": peak_source,
        "steps": args.steps, "warmup": args.warmup,
        **figures(ours_times),
        "peak_memory_gb": ours_memory / 2**30,
        # CPU seconds (all threads) per step: less sensitive than wall time to other processes
        # time-sharing the cores.
        "cpu_time_s": statistics.median(cpu_times) if device.type == "cpu" else None,
        "step_times_s": ours_times, "losses": ours_losses,
        "load_average": list(os.getloadavg()),
    }
    if hf is not None:
        theirs_fig = figures(hf_times)
        result["hf"] = {**theirs_fig, "params": hf.params, "step_times_s": hf_times, "losses": hf_losses,
                        "cpu_time_s": statistics.median(hf_cpu_times) if device.type == "cpu" else None,
                        "optimizer": hf.optimizer_name, "grad_clip": hf.grad_clip}
        result["ratio_ours_over_hf"] = result["step_time_s"] / theirs_fig["step_time_s"]
        result["ratio_pairwise_median"] = statistics.median(o / h for o, h in zip(ours_times, hf_times))
        if device.type == "cpu":
            result["cpu_time_ratio"] = result["cpu_time_s"] / result["hf"]["cpu_time_s"]
    if runtime.is_main:
        if args.json:
            print(json.dumps(result))
        else:
            print(format_table(result))
    shutdown()
    return 0


def format_table(r: dict) -> str:
    lines = [
        f"model {r['model']} ({r['params']:,} params) | seq {r['seq']} | micro batch {r['micro_batch']} | "
        f"global batch {r['global_batch']} | {r['dtype']} | TP {r['tensor_parallel']} x DP {r['data_parallel']} | "
        f"{r['world_size']} process(es) x {r['threads_per_process']} thread(s)",
        f"device: {r['device']} | peak {r['peak_flops'] / 1e12:.3f} TFLOP/s per device ({r['peak_source']})",
        f"timed {r['steps']} steps after {r['warmup']} warm-up; medians | load average "
        + " ".join(f"{x:.2f}" for x in r["load_average"]),
        f"{'':14s} {'step s':>8s} {'min':>7s} {'max':>7s} {'tokens/s':>9s} {'TFLOP/s/dev':>11s} {'MFU':>7s}",
    ]

    def row(name, f):
        return (f"{name:14s} {f['step_time_s']:8.3f} {f['step_time_min_s']:7.3f} {f['step_time_max_s']:7.3f} "
                f"{f['tokens_per_s']:9.0f} {f['tflops_per_device']:11.3f} {100 * f['mfu']:6.1f}%")

    lines.append(row("megatron_plugin", r))
    if "hf" in r:
        lines.append(row("transformers", r["hf"]))
        lines.append(f"transformers: LlamaForCausalLM (SDPA), {r['hf']['optimizer']}, grad clip {r['hf']['grad_clip']}")
        lines.append(f"ratio ours / transformers: {r['ratio_ours_over_hf']:.3f} (median of per-pair ratios "
                     f"{r['ratio_pairwise_median']:.3f})")
        if r.get("cpu_time_ratio"):
            lines.append(f"CPU seconds per step: ours {r['cpu_time_s']:.3f}, transformers {r['hf']['cpu_time_s']:.3f}, "
                         f"ratio {r['cpu_time_ratio']:.3f}")
    lines.append(f"peak memory (ours): {r['peak_memory_gb']:.2f} GiB")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
