"""The one-screen summary of a run printed at start (the full config is in RUN/config.yaml)."""

from __future__ import annotations

import os

from megatron_plugin.config import RunConfig, data_parallel_size
from megatron_plugin.model import parameter_count


def _count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:,.2f}B"
    return f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n:,}"


def _data_line(cfg: RunConfig) -> str:
    data = cfg.data
    if data.generate_corpus:
        return f"generated corpus and tokenizer in {os.path.join(cfg.run_dir, 'data')}"
    paths = ", ".join(str(p) for p in data.paths) or "(none: set data.paths=[PREFIX])"
    return f"{paths} | tokenizer {data.tokenizer_model or '(none)'} | split {data.split}"


def run_summary(cfg: RunConfig, world_size: int, config_path: str | None = None) -> str:
    """About fifteen lines: what will be trained, on what, for how long, and where it is written."""
    m, p, t, o, c = cfg.model, cfg.parallel, cfg.train, cfg.optim, cfg.checkpoint
    dp = data_parallel_size(p, world_size)
    accum = t.grad_accumulation_steps(dp)
    seq = cfg.data.seq_length
    params = parameter_count(m)
    precision = cfg.precision.dtype + (f" + fp8 {cfg.precision.fp8}" if cfg.precision.fp8 else "")
    description = (cfg.run.description or "").strip().split("\n")[0]
    resume = {"auto": "auto (the newest one, if any)", "none": "none (fresh start)"}
    lines = [
        f"run {cfg.run.name}" + (f": {description}" if description else ""),
        f"  model        {params / 1e6:,.1f}M parameters: {m.num_layers} layers, hidden {m.hidden_size}, "
        f"{m.num_attention_heads} heads / {m.num_query_groups} KV groups, FFN {m.ffn_hidden_size}, vocab {m.vocab_size}",
        f"  layout       {world_size} process(es): TP={p.tensor} PP={p.pipeline} CP={p.context} DP={dp}",
        f"  batch        {t.global_batch_size} sequences x {seq} tokens = {t.global_batch_size * seq:,} tokens/step "
        f"(micro {t.micro_batch_size} x accum {accum} x DP {dp})",
        f"  steps        {t.max_steps:,} ({_count(t.max_steps * t.global_batch_size * seq)} tokens)",
        f"  optimizer    AdamW lr {o.lr:g}, warmup {o.warmup_steps:,} steps, cosine to {o.lr * o.min_lr_ratio:g}, "
        f"weight decay {o.weight_decay:g}, grad clip {t.grad_clip:g}",
        f"  precision    {precision}",
        f"  data         {_data_line(cfg)}",
        f"  checkpoints  {os.path.join(cfg.run_dir, 'checkpoints')} every {c.interval:,} steps, keep {c.keep}; "
        f"resume {resume.get(c.resume, c.resume)}",
        f"  logging      every {cfg.log.interval:,} steps to {os.path.join(cfg.run_dir, 'metrics.jsonl')}"
        + (" and TensorBoard" if cfg.log.tensorboard else ""),
        f"  validation   every {cfg.eval.interval:,} steps, {cfg.eval.iters} batches" if cfg.eval.interval > 0
        else "  validation   off",
    ]
    if config_path:
        lines.append(f"  full config  {config_path}")
    return "\n".join(lines)
