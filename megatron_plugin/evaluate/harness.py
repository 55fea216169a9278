"""lm-evaluation-harness over a Megatron checkpoint: an `lm_eval` model adapter.

`MegatronLM` is a `TemplateLM` (the harness's base for token-level models; `lm_eval --model hf`
is one too), so contexts and continuations are split and encoded by the harness's own rules, and
it scores them the way the `hf` model does: the last `max_length + 1` tokens of context +
continuation, one forward pass, the continuation's log-probabilities summed and whether each
token was the argmax. Rolling log-likelihoods use the harness's own disjoint windows with the
same prefix token (BOS when the tokenizer has one, else EOS). `generate_until` decodes through
the package's generator (KV cache, stop strings). `lm-eval` is the optional `[eval]` extra.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from megatron_plugin.checkpoint_layout import TOKENIZER_FILE
from megatron_plugin.generate.errors import GenerateError


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise GenerateError(
            "lm-evaluation-harness is not installed: pip install 'megatron_plugin[eval]' (or lm-eval)"
        ) from None
    return TemplateLM


def make_adapter(generator, batch_size: int = 8, max_gen_toks: int = 256):
    """An lm_eval model over `generator` (a generate.TextGenerator)."""
    TemplateLM = _lm_eval()

    class MegatronLM(TemplateLM):
        def __init__(self):
            super().__init__()
            self.generator = generator
            self.model = generator.model
            self.tok = generator.tokenizer
            if self.tok is None:
                raise GenerateError(f"{generator.loaded.checkpoint_dir} has no {TOKENIZER_FILE}; the harness needs it")
            self.batch_size = batch_size
            self.max_gen_toks = max_gen_toks
            self.max_length = generator.max_sequence_length

        # -- tokens ----------------------------------------------------------------------
        @property
        def eot_token_id(self) -> int:
            return self.tok.eos_id

        @property
        def prefix_token_id(self) -> int:
            return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

        def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
            return self.tok.encode(string)  # the data's encoding: no BOS / EOS added

        def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
            return self.tok.decode(tokens)

        # -- scoring ---------------------------------------------------------------------
        @torch.no_grad()
        def _logprobs(self, inputs: List[List[int]]) -> List[torch.Tensor]:
            """log_softmax over the real vocabulary at every position of each input (fp32)."""
            from megatron.core import tensor_parallel

            width = max(len(x) for x in inputs)
            tokens = torch.zeros(len(inputs), width, dtype=torch.long)
            for row, x in enumerate(inputs):
                tokens[row, : len(x)] = torch.tensor(x)  # right padding: causal, so unseen
            device = next(self.model.parameters()).device
            positions = torch.arange(width).unsqueeze(0).expand_as(tokens)
            self.model.eval()
            logits = self.model(tokens.to(device), positions.to(device), None)
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            logits = logits[..., : self.generator.vocab_size].float()
            logprobs = torch.log_softmax(logits, dim=-1).cpu()
            return [logprobs[row, : len(x)] for row, x in enumerate(inputs)]

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
            from tqdm import tqdm

            results: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
            # Longest first, so a batch holds inputs of similar length.
            order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
            bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm)
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                inputs, conts = [], []
                for i in chunk:
                    _, context_enc, continuation_enc = requests[i]
                    if len(continuation_enc) > self.max_length:
                        raise GenerateError(
                            f"a continuation of {len(continuation_enc)} tokens is longer than the "
                            f"model's context ({self.max_length})"
                        )
                    inputs.append((context_enc + continuation_enc)[-(self.max_length + 1):][:-1])
                    conts.append(continuation_enc)
                for i, x, cont, logprobs in zip(chunk, inputs, conts, self._logprobs(inputs)):
                    scored = logprobs[len(x) - len(cont):]
                    target = torch.tensor(cont)
                    greedy = bool((scored.argmax(-1) == target).all())
                    total = float(scored.gather(1, target[:, None]).sum())
                    results[i] = (total, greedy)
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], (total, greedy))
                bar.update(len(chunk))
            bar.close()
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
            from lm_eval import utils

            windows, owners = [], []
            for index, (string,) in enumerate(req.args for req in requests):
                for context, target in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                        token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length, context_len=1)):
                    windows.append((None, context, target))
                    owners.append(index)
            scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
            totals = [0.0] * len(requests)
            for index, (logprob, _) in zip(owners, scores):
                totals[index] += logprob
            for req, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return totals

        # -- generation ------------------------------------------------------------------
        def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
            from megatron_plugin.generate.engine import SamplingOptions

            outputs = []
            for req in requests:
                context, gen_kwargs = req.args
                gen_kwargs = dict(gen_kwargs or {})
                until = gen_kwargs.pop("until", None) or []
                if isinstance(until, str):
                    until = [until]
                max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
                do_sample = bool(gen_kwargs.pop("do_sample", False))
                temperature = float(gen_kwargs.pop("temperature", 0.0)) if do_sample else 0.0
                max_new = min(max_new, self.max_length - 1)
                ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
                options = SamplingOptions(max_new_tokens=max_new, temperature=temperature,
                                          stop=tuple(s for s in until if s))
                [generation] = self.generator.generate([ids], options)
                outputs.append(generation.text)
                self.cache_hook.add_partial("generate_until", (context, req.args[1]), generation.text)
            return outputs

    return MegatronLM()


def run_tasks(generator, tasks: Sequence[str], num_fewshot: Optional[int] = None,
              include_path: Optional[str] = None, limit: Optional[float] = None, batch_size: int = 8,
              log_samples: bool = False, seed: int = 1234) -> dict:
    """lm_eval.simple_evaluate with our adapter; returns the harness's results object."""
    _lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    return simple_evaluate(
        model=make_adapter(generator, batch_size=batch_size),
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=task_manager,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
