"""Batched autoregressive decoding with a KV cache, on Megatron-Core's inference building blocks.

- `StaticInferenceContext` holds the KV cache: each attention layer allocates its
  [max_seq, batch, groups, head_dim] key and value buffers on the first forward and appends to
  them at the context's sequence offset.
- `GPTInferenceWrapper` builds positions (and a mask where the attention backend needs one),
  slices the context window of each step, runs the forward (TP: logits gathered on every rank;
  PP: activations sent stage to stage) and advances the cache offset.
- `TextGenerationController` samples: greedy (top-k 1), temperature, top-k, top-p, from its own
  seeded generator.

The loop follows the controller's static-batch schedule: the first forward reads every prompt up
to the shortest one's length, then each step feeds one position per row; a row whose prompt is
longer keeps reading its own tokens until they run out, so prompts of different lengths decode
together without padding inside any prompt. It is ours rather than the controller's
`generate_all_output_tokens_static_batch` because that one has no stop strings, streams only
through asyncio and times each step with CUDA events.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_plugin.checkpoint_layout import TOKENIZER_FILE
from megatron_plugin.generate.errors import GenerateError
from megatron_plugin.runtime import cpu_mode, mcore_compat

logger = logging.getLogger(__name__)

DEFAULT_SEED = 1234


@dataclass
class SamplingOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 0.0  # 0: off
    seed: int = DEFAULT_SEED
    stop: Sequence[str] = ()  # stop strings; the completion ends before the first one
    stop_at_eos: bool = True
    # More ids that end a generation as EOS does (finish_reason "eos", the id kept as the last of
    # `tokens`, left out of `text`), e.g. a chat template's end-of-turn token; ended on whatever
    # `stop_at_eos` says.
    stop_token_ids: Sequence[int] = ()
    logprobs: bool = False  # log-probability of each generated token

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerateError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise GenerateError(f"--temperature {self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise GenerateError(f"--top-k {self.top_k}: must be >= 0 (0 is off)")
        if not 0.0 <= self.top_p <= 1.0:
            raise GenerateError(f"--top-p {self.top_p}: must be in [0, 1] (0 is off)")
        if self.top_k > 0 and self.top_p > 0:
            raise GenerateError("--top-k and --top-p together: Megatron-Core's sampler takes one of them")
        if any(not s for s in self.stop):
            raise GenerateError("--stop '': a stop string must not be empty")
        if any(not isinstance(i, int) or i < 0 for i in self.stop_token_ids):
            raise GenerateError(f"stop_token_ids {list(self.stop_token_ids)}: token ids must be integers >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class Generation:
    prompt_tokens: List[int]
    tokens: List[int] = field(default_factory=list)  # generated ids (an EOS / stop id that ended it included)
    logprobs: Optional[List[float]] = None
    finish_reason: str = "length"  # length | eos (EOS or one of stop_token_ids) | stop (a stop string)
    text: Optional[str] = None  # the completion, cut before a stop string (with a tokenizer)


# on_token(row, generation) after each new token of `row`
TokenCallback = Callable[[int, Generation], None]


class Generator:
    """Decodes batches of token-id prompts with a model loaded by `loading.load_model` (or any
    GPTModel on the current parallel layout)."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, tokenizer=None,
                 max_sequence_length: Optional[int] = None):
        from megatron.core import parallel_state
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.inference.text_generation_controllers.text_generation_controller import (
            TextGenerationController,
        )
        from megatron.core.utils import get_model_config

        self.model = model
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        config = get_model_config(model)
        self.max_sequence_length = max_sequence_length or model.max_sequence_length
        self.params_dtype = config.params_dtype
        self._context_class = StaticInferenceContext
        self.wrapper = mcore_compat.inference_wrapper(model, StaticInferenceContext(1, 1))
        self.controller = TextGenerationController(self.wrapper, tokenizer)
        self.pipeline_parallel = parallel_state.get_pipeline_model_parallel_world_size() > 1
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_src = parallel_state.get_tensor_model_parallel_src_rank()

    # -- the loop -------------------------------------------------------------------------
    def check_prompts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        if not prompts:
            raise GenerateError("no prompts given")
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise GenerateError(f"prompt {i + 1} is empty (no tokens): give it some text")
            if len(prompt) + max_new_tokens > self.max_sequence_length:
                raise GenerateError(
                    f"prompt {i + 1} has {len(prompt)} tokens; with --max-new-tokens {max_new_tokens} "
                    f"that exceeds the model's context of {self.max_sequence_length} tokens: shorten "
                    "the prompt or lower --max-new-tokens"
                )

    # no_grad rather than inference_mode (which the wrapper's run_one_forward_step uses): Megatron's
    # RotaryEmbedding caches its frequencies per length (lru_cache), and an inference tensor left
    # in that cache breaks a later training step or the CPU RoPE kernel, which reads `_version`.
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], options: SamplingOptions,
                 on_token: Optional[TokenCallback] = None) -> List[Generation]:
        from megatron.core.inference.sampling_params import SamplingParams

        options.check()
        self.check_prompts(prompts, options.max_new_tokens)
        end_ids = self._end_ids(options)
        if options.stop and self.tokenizer is None:
            raise GenerateError(f"stop strings need the checkpoint's {TOKENIZER_FILE}")
        device = next(self.model.parameters()).device
        batch = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts])
        shortest, longest = int(lengths.min()), int(lengths.max())
        total = longest + options.max_new_tokens
        tokens = torch.zeros(batch, total, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
        tokens = tokens.to(device)

        context = self._context_class(batch, total)
        self.wrapper.inference_context = context
        self.wrapper.prep_model_for_inference()  # eval mode, cache offsets at 0
        inputs = self.wrapper.prep_inference_input(tokens)
        sampling = SamplingParams(
            temperature=1.0 if options.greedy else options.temperature,
            top_k=1 if options.greedy else options.top_k,
            top_p=0.0 if options.greedy else float(options.top_p),
        )
        self.controller.sampling_rng.manual_seed(options.seed)

        results = [Generation(prompt_tokens=list(p), logprobs=[] if options.logprobs else None) for p in prompts]
        active = [True] * batch
        start, end = 0, shortest
        while True:
            # The step's torch calls need none of CPU mode's CUDA->CPU redirections (the model and
            # its KV cache already live on their device): without that TorchFunctionMode they do not
            # each pass through Python (about 13% of a CPU decode step at batch 8).
            with cpu_mode.redirect_paused():
                window = self.wrapper.get_batch_for_context_window(inputs, start, end)
                logits = self._forward(window)
                last = self._last_token_logits(logits, batch)
                next_tokens = self.controller.sample_from_logits(last, sampling)
                next_tokens = self._same_on_tensor_ranks(next_tokens)
                logprobs = None
                if options.logprobs:
                    logprobs = torch.log_softmax(last, dim=-1).gather(1, next_tokens[:, None])[:, 0].tolist()
                chosen = next_tokens.tolist()
            started = (lengths <= end).tolist()
            for row in range(batch):
                if not (started[row] and active[row]):
                    continue
                tokens[row, end] = chosen[row]
                result = results[row]
                result.tokens.append(chosen[row])
                if logprobs is not None:
                    result.logprobs.append(logprobs[row])
                active[row] = self._still_active(result, chosen[row], end_ids, options)
                if on_token is not None:
                    on_token(row, result)
            if not any(active) or end + 1 >= total:
                break
            if all(started):
                context.enable_decode_mode()
            start, end = end, end + 1
        if self.tokenizer is not None:
            for result in results:
                if result.text is None:
                    result.text = self.tokenizer.decode(self._text_tokens(result))
        return results

    def _forward(self, window: dict) -> Optional[torch.Tensor]:
        """The wrapper's run_one_forward_step without its inference_mode (see `generate`); the
        whole batch goes through the pipeline at once."""
        if self.pipeline_parallel:
            return mcore_compat.pipeline_forward(self.wrapper)(window)
        return self.wrapper.forward_pass_without_pipeline_parallel(window)

    def _last_token_logits(self, logits: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        """[batch, vocab] logits of each row's last position (real vocabulary only: the padded
        rows are not tokens), on every rank."""
        if self.pipeline_parallel:
            from megatron.core.inference.communication_utils import broadcast_from_last_pipeline_stage

            last = logits[:, -1, :].contiguous() if logits is not None else None
            last = broadcast_from_last_pipeline_stage(
                [batch, self.model.vocab_size], dtype=self.params_dtype, tensor=last
            )
        else:
            last = logits[:, -1, :]
        return last[:, : self.vocab_size].float()

    def _same_on_tensor_ranks(self, sampled: torch.Tensor) -> torch.Tensor:
        """Tensor-parallel ranks sample from identical gathered logits with identically seeded
        generators; the first rank's choice is still broadcast so that no rounding can make them
        disagree."""
        if self.tp_size == 1:
            return sampled
        sampled = sampled.contiguous()
        dist.broadcast(sampled, src=self.tp_src, group=self.tp_group)
        return sampled

    def _end_ids(self, options: SamplingOptions) -> frozenset:
        """The ids that end a generation: EOS (unless `stop_at_eos` is off) and `stop_token_ids`."""
        for i in options.stop_token_ids:
            if i >= self.vocab_size:
                raise GenerateError(
                    f"stop token id {i} is outside the model's vocabulary of {self.vocab_size} ids"
                )
        ids = set(options.stop_token_ids)
        if options.stop_at_eos and self.tokenizer is not None and self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        return frozenset(ids)

    def _text_tokens(self, result: Generation) -> List[int]:
        if result.finish_reason == "eos":
            return result.tokens[:-1]
        return result.tokens

    def _still_active(self, result: Generation, token: int, end_ids: frozenset, options: SamplingOptions) -> bool:
        if token in end_ids:
            result.finish_reason = "eos"
            return False
        if options.stop:
            text = self.tokenizer.decode(result.tokens)
            cut = min((i for i in (text.find(s) for s in options.stop) if i >= 0), default=-1)
            if cut >= 0:
                result.finish_reason = "stop"
                result.text = text[:cut]
                return False
        if len(result.tokens) >= options.max_new_tokens:
            result.finish_reason = "length"
            return False
        return True
