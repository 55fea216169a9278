"""The training loop: data, steps, logging, validation, checkpoints, failures."""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_plugin.config import ConfigError, RunConfig
from megatron_plugin.data.gpt_dataset import check_tokenizer_fits
from megatron_plugin.data.training_data import TrainingData, build_training_data, chat_data_tokenizer_sha256, chat_prefix
from megatron_plugin.model import flops_per_token
from megatron_plugin.runtime.distributed import Runtime, decided_on_rank0, init_distributed
from megatron_plugin.runtime.peak import device_peak_flops
from megatron_plugin.training import checkpoint as ckpt
from megatron_plugin.training.metrics import MetricsWriter, Throughput, console_line, format_duration
from megatron_plugin.training.optimizer import build_train_state
from megatron_plugin.training.run_lock import hold_run_dir
from megatron_plugin.training.step import BatchShape, LossTotal, StepResult, eval_step, train_step

logger = logging.getLogger("megatron_plugin.train")


class NonFiniteLoss(RuntimeError):
    pass


class _StopSignal:
    """SIGTERM / SIGINT (a preemption) sets a flag; the loop saves and exits cleanly."""

    def __init__(self):
        self.received = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def any_rank(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def with_prepared_data(cfg: RunConfig, runtime: Runtime, initial_weights: Optional[str]) -> RunConfig:
    """The config the run trains with. A chat run without data.tokenizer_model takes the
    tokenizer of its initial weights. When the user names no dataset, the smoke recipes'
    generated corpus (rank 0 writes it, the others wait) goes into data.paths (and, for text,
    its own tokenizer into data.tokenizer_model)."""
    data = cfg.data
    if data.is_chat and not data.tokenizer_model and initial_weights:
        tokenizer_model = os.path.join(initial_weights, ckpt.TOKENIZER_FILE)
        if not os.path.isfile(tokenizer_model):
            raise ConfigError(f"checkpoint.load={cfg.checkpoint.load} has no {ckpt.TOKENIZER_FILE}: set "
                              "data.tokenizer_model to the SentencePiece model the base model was trained with")
        data = dataclasses.replace(data, tokenizer_model=tokenizer_model)
    if data.uses_generated_corpus:
        from megatron_plugin.preprocess import generated_corpus

        if data.is_chat:
            if not data.tokenizer_model:
                raise ConfigError("data.generate_corpus with data.format=chat needs the tokenizer of the model "
                                  "to fine-tune: set checkpoint.load (or data.tokenizer_model)")
            if runtime.is_main:
                generated_corpus.prepare_generated_chat_corpus(cfg.run_dir, data.tokenizer_model)
            data = dataclasses.replace(data, paths=[generated_corpus.generated_chat_corpus_prefix(cfg.run_dir)])
        else:
            if runtime.is_main:
                generated_corpus.prepare_generated_corpus(cfg.run_dir, cfg.model.vocab_size)
            prefix, tokenizer_model = generated_corpus.generated_corpus_paths(cfg.run_dir)
            data = dataclasses.replace(data, paths=[prefix], tokenizer_model=tokenizer_model)
        if dist.is_initialized():
            dist.barrier()
    return dataclasses.replace(cfg, data=data)


def check_chat_data_tokenizer(cfg: RunConfig) -> None:
    """A chat dataset must have been made with the tokenizer of the model it fine-tunes."""
    from megatron_plugin.files import file_sha256

    prefix = chat_prefix(cfg.data)
    made_with = chat_data_tokenizer_sha256(prefix)
    if made_with is not None and made_with != file_sha256(cfg.data.tokenizer_model):
        raise ConfigError(
            f"data.paths={prefix} was preprocessed with another tokenizer than {cfg.data.tokenizer_model} "
            "(the model's): run `preprocess sft` again with --tokenizer-model set to the model's tokenizer"
        )


def _dp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank()


def train(cfg: RunConfig) -> dict:
    """Run training as configured, owning its run directory; returns the last step and the
    samples consumed."""
    runtime = init_distributed(cfg.parallel, cfg.train.seed)
    lock = hold_run_dir(cfg.run_dir)
    try:
        return _train(cfg, runtime)
    finally:
        if lock is not None:
            lock.release()


def _write_config(cfg: RunConfig, runtime: Runtime) -> None:
    """RUN/config.yaml: the config as it runs (after the data it trains on is known)."""
    if runtime.is_main:
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(cfg.to_yaml())


def _train(cfg: RunConfig, runtime: Runtime) -> dict:
    initial_weights = decided_on_rank0(ckpt.resolve_initial_weights, cfg)
    cfg = with_prepared_data(cfg, runtime, initial_weights)
    _write_config(cfg, runtime)
    check_tokenizer_fits(cfg.data, cfg.model)
    if cfg.data.is_chat:
        check_chat_data_tokenizer(cfg)
    dp, gbs, seq = runtime.data_parallel, cfg.train.global_batch_size, cfg.data.seq_length
    shape = BatchShape.of_run(cfg, dp, runtime.device)
    data = build_training_data(cfg)
    if data.packed and runtime.is_main:
        stats = data.train.stats
        logger.info("chat data: %d training conversations packed into %d rows of %d tokens (%.1f%% filled, "
                    "%d truncated); one epoch = %.1f steps", stats.conversations, stats.rows, seq + 1,
                    100 * stats.fill, stats.truncated, stats.rows / gbs)
    state = build_train_state(cfg, dp)

    step, consumed = 0, 0
    resume_path = decided_on_rank0(ckpt.resolve_resume, cfg)
    if resume_path:
        resumed = ckpt.load_checkpoint(cfg, state, resume_path)
        step, consumed = resumed.step, resumed.consumed_samples
        if runtime.is_main and not resumed.weights_only:
            logger.info("resumed from %s at step %d (%d samples consumed)%s", resume_path, step,
                        consumed, ", resharded to the new TP/PP layout" if resumed.layout_changed else "")
    elif initial_weights:
        ckpt.load_checkpoint(cfg, state, initial_weights, weights_only=True)
    if step >= cfg.train.max_steps:
        if runtime.is_main:
            logger.info("this run already finished: %s is at step %d of train.max_steps=%d. Raise "
                        "train.max_steps to train further, or use another run.dir", resume_path, step,
                        cfg.train.max_steps)
        return {"step": step, "consumed_samples": consumed}

    train_iter = data.micro_batches(data.train, shape.micro_batch_size, _dp_rank(), dp, consumed)
    peak, peak_source = device_peak_flops(cfg.precision.dtype, cfg.precision.fp8 is not None)
    fpt = flops_per_token(cfg.model, seq, cfg.parallel.tensor)
    throughput = Throughput(gbs * seq, fpt, runtime.world_size, peak)
    metrics = MetricsWriter(cfg.run_dir, runtime.is_main, cfg.log.tensorboard)
    if runtime.is_main:
        logger.info("training %d -> %d steps | global batch %d = micro %d x accum %d x DP %d | "
                    "seq %d | %.3g FLOPs/token | peak %.3g FLOP/s (%s)", step, cfg.train.max_steps,
                    gbs, shape.micro_batch_size, shape.num_microbatches, dp, seq, fpt, peak, peak_source)
    stop = _StopSignal()
    collector = _GarbageCollector(cfg.train.manual_gc_interval)
    first_step = step
    checkpointer = ckpt.Checkpointer(cfg, cfg.data.tokenizer_model, saved_at=step if resume_path else None)
    evaluator = Evaluator(cfg, state, data, shape, runtime, metrics)
    progress = ProgressLog(cfg, runtime, metrics, throughput)
    try:
        if cfg.eval.at_start:
            evaluator.run(step)
            throughput.restart()
        while step < cfg.train.max_steps:
            result = train_step(state, train_iter, shape)
            step += 1
            consumed += gbs
            if not math.isfinite(result.loss):
                checkpointer.wait()  # publish a save still in flight: it holds good weights
                raise NonFiniteLoss(
                    f"loss is {result.loss} at step {step}; stopping. The last good checkpoint "
                    f"({ckpt.read_latest(ckpt.checkpoint_root(cfg)) or 'none'}) stays `latest`: "
                    "lower optim.lr or check the data, then resume"
                )
            progress.step(step, consumed, result)
            checkpointer.poll()
            collector.step(step)
            if evaluator.due(step):
                evaluator.run(step)
                throughput.restart()
            if checkpointer.due(step):
                checkpointer.save(state, step, consumed)
                throughput.restart()
            if stop.any_rank(runtime.device):
                checkpointer.save_unless_saved(state, step, consumed)
                if runtime.is_main:
                    logger.info("%s received: checkpoint at step %d saved, exiting", stop.received or "stop", step)
                break
        else:
            if cfg.checkpoint.interval > 0:
                checkpointer.save_unless_saved(state, step, consumed)
        checkpointer.wait()
    finally:
        stop.restore()
        metrics.close()
        collector.close()
    if runtime.is_main:
        logger.info("%s", run_report(cfg, first_step, step, consumed, progress.elapsed_s(), evaluator, checkpointer))
    return {"step": step, "consumed_samples": consumed}


class _GarbageCollector:
    """With train.manual_gc_interval=N, Python's collector runs every N steps on every rank at
    once instead of at random points (where one rank's pause stalls the others)."""

    def __init__(self, interval: int):
        self.interval = interval
        if interval:
            gc.disable()

    def step(self, step: int) -> None:
        if self.interval and step % self.interval == 0:
            gc.collect()

    def close(self) -> None:
        if self.interval:
            gc.enable()


class ProgressLog:
    """The training log line and metrics record, every log.interval steps and at the last step."""

    def __init__(self, cfg: RunConfig, runtime: Runtime, metrics: MetricsWriter, throughput: Throughput):
        self.max_steps, self.interval = cfg.train.max_steps, cfg.log.interval
        self.runtime, self.metrics, self.throughput = runtime, metrics, throughput
        self.losses = LossWindow()
        self._start = time.perf_counter()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self._start

    def step(self, step: int, consumed: int, result: StepResult) -> None:
        self.throughput.step()
        self.losses.add(result.loss)
        if step % self.interval and step != self.max_steps:
            return
        record = {"step": step, **self.losses.take(), "step_loss": result.loss, "lr": result.lr,
                  "grad_norm": result.grad_norm, **self.throughput.measure(),
                  "consumed_samples": consumed, "elapsed_s": self.elapsed_s()}
        if self.runtime.is_main:
            logger.info(console_line(record, self.max_steps, self.throughput.eta_s(self.max_steps - step)))
        self.metrics.write(record)


class LossWindow:
    """The training losses since the last log line. The logged `loss` is their mean (as
    Megatron-LM logs it), so that consecutive log lines show the trend rather than one step's
    noise; `loss_steps` says how many steps it covers, `step_loss` is the logged step's own."""

    def __init__(self):
        self._losses: list[float] = []

    def add(self, loss: float) -> None:
        self._losses.append(loss)

    def take(self) -> dict:
        losses, self._losses = self._losses, []
        return {"loss": sum(losses) / len(losses), "loss_steps": len(losses)}


class Evaluator:
    """Validation every eval.interval steps and at the last step: the mean loss over eval.iters
    global batches of the validation split (always the same ones). Keeps the last and best loss."""

    def __init__(self, cfg: RunConfig, state, data: TrainingData, shape: BatchShape, runtime: Runtime,
                 metrics: MetricsWriter):
        self.cfg, self.state, self.data, self.shape = cfg, state, data, shape
        self.runtime, self.metrics = runtime, metrics
        self.last: Optional[tuple[int, float]] = None
        self.best: Optional[tuple[int, float]] = None
        self.task_scores: list[dict] = []  # eval.task_prompts: one record per validation

    def due(self, step: int) -> bool:
        interval = self.cfg.eval.interval
        return interval > 0 and (step % interval == 0 or step == self.cfg.train.max_steps)

    def run(self, step: int) -> float:
        val_loss = self.loss()
        record = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
        if self.runtime.is_main:
            logger.info("validation at step %d: loss %.4f | ppl %.2f", step, val_loss, record["val_ppl"])
        if math.isfinite(val_loss):
            self.last = (step, val_loss)
            if self.best is None or val_loss < self.best[1]:
                self.best = (step, val_loss)
        if self.cfg.eval.prompts:
            record["samples"] = self._samples(step)
        if self.cfg.eval.task_prompts:
            record.update(self._task_scores(step))
        self.metrics.write(record)
        return val_loss

    def _task_scores(self, step: int) -> dict:
        """Greedy replies to the generated chat task's held-out prompts, scored (all ranks take part)."""
        from megatron_plugin.generate.during_training import chat_task_scores

        scores = chat_task_scores(self.state.model, self.cfg.data.tokenizer_model, self.cfg.eval.task_prompts,
                                  max_new_tokens=self.cfg.eval.prompt_tokens)
        self.task_scores.append({"step": step, **scores})
        if self.runtime.is_main:
            logger.info("task at step %d: exact match %.1f%% | replies ending their turn %.1f%% (%d held-out "
                        "prompts)", step, 100 * scores["task_exact_match"], 100 * scores["task_ended_turn"],
                        self.cfg.eval.task_prompts)
        return scores

    def loss(self) -> float:
        """Mean per-token loss over eval.iters global batches of the validation split (always the
        same ones), each batch weighted by its target tokens."""
        if self.data.valid is None:
            return float("nan")
        iterator = self.data.micro_batches(self.data.valid, self.shape.micro_batch_size, _dp_rank(),
                                           self.runtime.data_parallel, 0)
        total = LossTotal(0.0, 0.0)
        for _ in range(self.cfg.eval.iters):
            total = total + eval_step(self.state, iterator, self.shape)
        return total.mean if total.tokens else float("nan")

    def _samples(self, step: int) -> list[dict]:
        """Greedy continuations of eval.prompts by the model as it is now (all ranks take part)."""
        from megatron_plugin.generate.during_training import greedy_continuations

        prompts = [str(p) for p in self.cfg.eval.prompts]
        completions = greedy_continuations(self.state.model, self.cfg.data.tokenizer_model, prompts,
                                           max_new_tokens=self.cfg.eval.prompt_tokens)
        samples = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
        if self.runtime.is_main:
            for sample in samples:
                logger.info("sample at step %d: %r -> %r", step, sample["prompt"], sample["completion"])
            self.metrics.write_text("samples", "\n\n".join(
                f"**{s['prompt']}**{s['completion']}" for s in samples), step)
        return samples


def run_report(cfg: RunConfig, first_step: int, step: int, consumed: int, seconds: float,
               evaluator: Evaluator, checkpointer: "ckpt.Checkpointer") -> str:
    """What the run did and where its results are, with the command to run next."""
    tokens = (step - first_step) * cfg.train.global_batch_size * cfg.data.seq_length
    lines = [f"run {'finished' if step >= cfg.train.max_steps else 'stopped'}: steps {first_step} -> {step} "
             f"of {cfg.train.max_steps}, {tokens:,} tokens in {format_duration(seconds)} "
             f"({consumed:,} samples consumed in all)"]
    if evaluator.last:
        lines.append(f"  validation loss  {evaluator.last[1]:.4f} at step {evaluator.last[0]} "
                     f"(best {evaluator.best[1]:.4f} at step {evaluator.best[0]})")
    if len(evaluator.task_scores) > 1:
        first, last = evaluator.task_scores[0], evaluator.task_scores[-1]
        lines.append(f"  task exact match {100 * last['task_exact_match']:.1f}% at step {last['step']} "
                     f"({100 * first['task_exact_match']:.1f}% at step {first['step']}); "
                     f"{100 * last['task_ended_turn']:.1f}% of replies end their turn")
    newest = ckpt.read_latest(checkpointer.root)
    lines.append(f"  checkpoints      {checkpointer.root} (latest: {os.path.basename(newest) if newest else 'none'})")
    lines.append(f"  metrics          {os.path.join(cfg.run_dir, 'metrics.jsonl')}")
    if newest:
        lines.append(f"  next             python -m megatron_plugin.export --checkpoint {checkpointer.root} "
                     f"--output {os.path.join(cfg.run_dir, 'hf')}")
    return "\n".join(lines)
