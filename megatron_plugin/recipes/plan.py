"""`--plan`: what a run will cost, computed from the resolved config and the real dataset."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from typing import Optional

import numpy as np

from megatron_plugin.config import ConfigError, RunConfig, data_parallel_size
from megatron_plugin.data.gpt_dataset import parse_blend
from megatron_plugin.data.indexed import read_index
from megatron_plugin.model import flops_per_token, parameter_count
from megatron_plugin.runtime.peak import GPU_PEAKS

CPU = "cpu"  # --gpu cpu: plan with this machine's measured CPU peak

SEED_CORPUS_TOKENS = 51_000_000_000
# What the seed document claimed for production_8gpu, shown beside the computed figure.
SEED_CLAIMS = {"hours": 8.2, "initial_loss": "3.5-4.0", "checkpoint_storage_gb": 70}

# Preprocessing throughput per core, measured on the 2-core development machine (docs/benchmarks.md,
# "Throughput for planning"): used to estimate the time to prepare the corpus.
PREPROCESS_TOKENS_PER_CORE_S = 2.5e6

# Bytes per parameter: bf16 weights; plus fp32 master weights and two fp32 Adam moments.
WEIGHT_BYTES = 2
RESUMABLE_BYTES = 2 + 4 + 4 + 4


def idx_token_count(prefix: str) -> int:
    """Tokens in a Megatron indexed dataset, from its .idx sequence lengths."""
    return int(read_index(prefix).lengths.sum(dtype=np.int64))


def chat_training_rows(cfg: RunConfig) -> tuple[Optional[int], str]:
    """Packed training rows of a chat run's data (one epoch is rows / global batch steps)."""
    from megatron_plugin.data.training_data import build_training_data, chat_prefix

    data = cfg.data
    if data.uses_generated_corpus:
        from megatron_plugin.preprocess.generated_corpus import generated_chat_corpus_prefix

        data = dataclasses.replace(data, paths=[generated_chat_corpus_prefix(cfg.run_dir)])
    try:
        chat_prefix(data)
    except ConfigError:
        return None, "conversations not preprocessed yet: size unknown"
    stats = build_training_data(dataclasses.replace(cfg, data=data)).train.stats
    return stats.rows, (f"{stats.conversations:,} training conversations in {stats.rows:,} packed rows of "
                        f"{cfg.data.seq_length + 1} tokens ({100 * stats.fill:.0f}% filled)")


def dataset_tokens(cfg: RunConfig) -> tuple[Optional[int], str]:
    if cfg.data.generate_corpus:
        from megatron_plugin.preprocess.generated_corpus import generated_corpus_paths

        prefix, _ = generated_corpus_paths(cfg.run_dir)
        if os.path.isfile(prefix + ".idx"):
            return idx_token_count(prefix), f"the corpus generated in {os.path.dirname(prefix)}"
        return None, "a corpus generated at the start of the run (not written yet: size unknown)"
    if cfg.data.paths:
        prefixes, _ = parse_blend(cfg.data.paths)
        present = [p for p in prefixes if os.path.isfile(p + ".idx")]
        if len(present) == len(prefixes):
            return sum(idx_token_count(p) for p in prefixes), f"counted in {len(prefixes)} .idx file(s)"
    return SEED_CORPUS_TOKENS, "no dataset given: the seed's 51B-token corpus is assumed"


def measured_tokens_per_s(run_dir: str) -> Optional[float]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    rates = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "tokens_per_s" in record:
                rates.append(record["tokens_per_s"])
    # The first window includes start-up; use the median of the rest when there is more than one.
    rates = rates[1:] if len(rates) > 1 else rates
    return statistics.median(rates) if rates else None


def _peak(cfg: RunConfig, gpu: str) -> tuple[float, str, str]:
    """(peak FLOP/s of one device, where it comes from, the device's name)."""
    if gpu == CPU:
        import torch

        from megatron_plugin.runtime.peak import cpu_model, cpu_peak_flops

        peak, source = cpu_peak_flops(cfg.precision.dtype)
        return peak, source, f"CPU ({cpu_model()}, {torch.get_num_threads()} threads)"
    peak_key = "fp8" if cfg.precision.fp8 else cfg.precision.dtype
    return GPU_PEAKS[gpu][peak_key], f"{gpu.upper()} dense {peak_key} peak (data sheet)", gpu.upper()


def make_plan(cfg: RunConfig, mfu: float = 0.40, gpu: str = "h100", preprocess_cores: int = 64) -> dict:
    """The run's figures. gpu: a GPU_PEAKS name, or "cpu" for this machine's CPU, whose measured
    peak is shared by all the run's processes (they run on the same cores)."""
    if gpu not in GPU_PEAKS and gpu != CPU:
        raise ValueError(f"--gpu {gpu}: choose one of {', '.join(list(GPU_PEAKS) + [CPU])}")
    gpus = cfg.parallel.gpus
    dp = data_parallel_size(cfg.parallel, gpus)
    seq = cfg.data.seq_length
    steps = cfg.train.max_steps
    params = parameter_count(cfg.model)
    tokens_per_step = cfg.train.global_batch_size * seq
    total_tokens = steps * tokens_per_step
    if cfg.data.is_chat:
        rows, corpus_source = chat_training_rows(cfg)
        corpus_tokens = rows * seq if rows else None  # an epoch: every packed row once
    else:
        corpus_tokens, corpus_source = dataset_tokens(cfg)
    fpt = flops_per_token(cfg.model, seq, cfg.parallel.tensor)
    total_flops = fpt * total_tokens
    peak, peak_source, device = _peak(cfg, gpu)
    devices = 1 if gpu == CPU else gpus
    hours_at_mfu = total_flops / (devices * peak * mfu) / 3600
    interval = cfg.checkpoint.interval
    periodic = steps // interval if interval > 0 else 0
    saves = periodic + (1 if interval > 0 and steps % interval else 0)
    weights_gb = params * WEIGHT_BYTES / 1e9
    resumable_gb = params * RESUMABLE_BYTES / 1e9
    kept = min(cfg.checkpoint.keep, saves)
    storage_gb = kept * resumable_gb + (saves - kept) * weights_gb * cfg.checkpoint.weights_only_snapshots
    measured = measured_tokens_per_s(cfg.run_dir)
    plan = {
        "preset": cfg.run.name,
        "gpus": gpus,
        "parameters": params,
        "global_batch": cfg.train.global_batch_size,
        "micro_batch": cfg.train.micro_batch_size,
        "grad_accumulation": cfg.train.grad_accumulation_steps(dp),
        "data_parallel": dp,
        "layout": f"TP={cfg.parallel.tensor}, PP={cfg.parallel.pipeline}, CP={cfg.parallel.context}",
        "seq_length": seq,
        "tokens_per_step": tokens_per_step,
        "max_steps": steps,
        "total_tokens": total_tokens,
        "dataset_tokens": corpus_tokens,
        "dataset_source": corpus_source,
        "epochs": total_tokens / corpus_tokens if corpus_tokens else None,
        "steps_per_epoch": corpus_tokens / tokens_per_step if corpus_tokens else None,
        "warmup_steps": cfg.optim.warmup_steps,
        "lr_schedule": f"linear warmup to {cfg.optim.lr:g}, cosine decay to {cfg.optim.lr * cfg.optim.min_lr_ratio:g}",
        "checkpoints": periodic,
        "checkpoint_saves_total": saves,
        "log_points": steps // cfg.log.interval,
        "flops_per_token": fpt,
        "total_flops": total_flops,
        "checkpoint_weights_gb": weights_gb,
        "checkpoint_resumable_gb": resumable_gb,
        "checkpoint_storage_gb": storage_gb,
        "checkpoint_storage_all_resumable_gb": saves * resumable_gb,
        "gpu": gpu,
        "device": device,
        "peak_flops_per_gpu": peak,
        "peak_source": peak_source,
        "assumed_mfu": mfu,
        "hours_at_mfu": hours_at_mfu,
        # A fine-tuning starts from its base model's loss, which only a run can tell.
        "initial_loss": None if cfg.data.is_chat else math.log(cfg.model.vocab_size),
        "preprocess_cores": preprocess_cores,
        "preprocess_hours": (corpus_tokens / (PREPROCESS_TOKENS_PER_CORE_S * preprocess_cores) / 3600
                             if corpus_tokens and not cfg.data.is_chat else None),
        "measured_tokens_per_s": measured,
        "hours_at_measured": total_tokens / measured / 3600 if measured else None,
        "seed_claims": SEED_CLAIMS if cfg.run.name == "production_8gpu" else None,
    }
    return plan


def format_hours(hours: float) -> str:
    """A duration for people: 95.3 h (4.0 days), 2.5 h, 12 min, 40 s."""
    if hours >= 24:
        return f"{hours:,.1f} h ({hours / 24:.1f} days)"
    if hours >= 1:
        return f"{hours:.1f} h"
    if hours * 60 >= 1:
        return f"{hours * 60:.0f} min"
    return f"{hours * 3600:.0f} s"


def _billions(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.2f}M"


def format_plan(plan: dict) -> str:
    def gb(x):
        return f"{x:,.1f} GB" if x >= 0.1 else f"{1000 * x:,.1f} MB"

    cpu = plan["gpu"] == CPU
    where = (f"{plan['gpus']} process(es) on the {plan['device']}" if cpu
             else f"{plan['gpus']} x {plan['device']}")
    per = "" if cpu else " per GPU"
    peak = plan["peak_flops_per_gpu"]
    peak_text = f"{peak / 1e9:,.1f} GFLOP/s" if cpu else f"{peak / 1e12:,.0f} TFLOP/s"
    if plan["dataset_tokens"]:
        dataset = f"{plan['dataset_tokens']:,} tokens ({plan['dataset_source']})"
        epochs = f"{plan['epochs']:.3f} ({plan['steps_per_epoch']:,.0f} steps per epoch)"
    else:
        dataset, epochs = plan["dataset_source"], "unknown until the corpus exists"
    lines = [
        f"Plan for {plan['preset']} on {where}",
        f"  parameters          {plan['parameters']:,} ({plan['parameters'] / 1e9:.3f}B)",
        f"  global batch        {plan['global_batch']} sequences = micro {plan['micro_batch']} x accum "
        f"{plan['grad_accumulation']} x DP {plan['data_parallel']} ({plan['layout']})",
        f"  tokens / step       {plan['tokens_per_step']:,}",
        f"  steps               {plan['max_steps']:,}",
        f"  total tokens        {plan['total_tokens']:,} ({_billions(plan['total_tokens'])})",
        f"  dataset             {dataset}",
        f"  epochs              {epochs}",
        f"  warmup              {plan['warmup_steps']:,} steps; {plan['lr_schedule']}",
        f"  checkpoints         {plan['checkpoints']} periodic ({plan['checkpoint_saves_total']} saves with the final one)",
        f"  log points          {plan['log_points']}",
        f"  FLOPs / token       {plan['flops_per_token']:.4g} (training: forward + backward)",
        f"  total FLOPs         {plan['total_flops']:.4g}",
        f"  checkpoint size     {gb(plan['checkpoint_weights_gb'])} weights only (bf16), "
        f"{gb(plan['checkpoint_resumable_gb'])} resumable (+ fp32 master weights and Adam moments)",
        f"  storage             {gb(plan['checkpoint_storage_gb'])} keeping the newest resumable ones "
        f"and weights-only snapshots of the rest ({gb(plan['checkpoint_storage_all_resumable_gb'])} if all were resumable)",
        f"  time                {format_hours(plan['hours_at_mfu'])} at {100 * plan['assumed_mfu']:.0f}% MFU of "
        f"{peak_text}{per} ({plan['peak_source']})",
    ]
    if plan["hours_at_measured"] is not None:
        lines.append(f"  time (measured)     {format_hours(plan['hours_at_measured'])} at the last run's "
                     f"{plan['measured_tokens_per_s']:,.0f} tokens/s")
    if plan["initial_loss"] is not None:
        lines.append(f"  initial loss        ~{plan['initial_loss']:.2f} (ln of the vocabulary size, a fresh model)")
    else:
        lines.append("  initial loss        the base model's on this data (checkpoint.load; eval.at_start=true shows it)")
    if plan["preprocess_hours"] is not None:
        lines.append(f"  preprocessing       ~{format_hours(plan['preprocess_hours'])} for the dataset on "
                     f"{plan['preprocess_cores']} cores ({PREPROCESS_TOKENS_PER_CORE_S / 1e6:.1f}M tokens/s per core)")
    claims = plan.get("seed_claims")
    if claims:
        lines += [
            "  The seed document's figures that are wrong:",
            f"    training time     claimed {claims['hours']} h -> {plan['hours_at_mfu']:,.0f} h at "
            f"{100 * plan['assumed_mfu']:.0f}% MFU",
            f"    initial loss      claimed {claims['initial_loss']} -> ~{plan['initial_loss']:.1f}",
            f"    checkpoints       claimed {claims['checkpoint_storage_gb']} GB -> "
            f"{gb(plan['checkpoint_storage_gb'])} ({gb(plan['checkpoint_storage_all_resumable_gb'])} all resumable)",
        ]
    return "\n".join(lines)
