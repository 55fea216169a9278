"""Greedy continuations of a few prompts with the model being trained (`eval.prompts`).

The training loop calls `greedy_continuations(state.model, tokenizer, prompts)` at a validation
step, on every rank (tensor and pipeline stages take part in each forward; data-parallel
replicas compute the same text). The model is put in eval mode for the call and back in the mode
it was in afterwards; no gradient is recorded, and the KV cache lives only for the call.
"""

from __future__ import annotations

import os
from typing import List, Sequence, Union

from megatron_plugin.generate.engine import Generator, SamplingOptions
from megatron_plugin.generate.errors import GenerateError
from megatron_plugin.generate.tokenizer import Tokenizer


def greedy_continuations(model_chunks, tokenizer: Union[Tokenizer, str, os.PathLike], prompts: Sequence[str],
                         max_new_tokens: int = 32) -> List[str]:
    """The greedy completion (text, EOS or `max_new_tokens` ends it) of each prompt, by the model
    in `model_chunks` (the training state's list: Megatron DDP / Float16Module around a GPTModel)."""
    from megatron.core.utils import unwrap_model

    if len(model_chunks) != 1:
        raise GenerateError("eval.prompts: interleaved (virtual) pipeline chunks are not supported")
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer(tokenizer)
    gpt = unwrap_model(model_chunks[0])
    was_training = gpt.training
    # Leave room for the new tokens: keep the end of a prompt too long for the context.
    keep = max(gpt.max_sequence_length - max_new_tokens, 1)
    ids = [tokenizer.encode(p)[-keep:] or [tokenizer.bos_id if tokenizer.bos_id is not None else 0] for p in prompts]
    generator = Generator(gpt, vocab_size=tokenizer.vocab_size, tokenizer=tokenizer)
    try:
        results = generator.generate(ids, SamplingOptions(max_new_tokens=max_new_tokens))
    finally:
        gpt.train(was_training)
    return [r.text for r in results]


def chat_task_scores(model_chunks, tokenizer_model: str, count: int, max_new_tokens: int = 32) -> dict:
    """Greedy replies of the model being trained to `count` held-out prompts of the generated chat
    task (`data.synthetic_chat`): the share answered exactly, and the share whose reply ended
    its turn (<|im_end|>) rather than running to `max_new_tokens`."""
    from megatron.core.utils import unwrap_model

    from megatron_plugin.data.synthetic_chat import exact_match, held_out_prompts
    from megatron_plugin.generate.chat import ChatGenerator

    if len(model_chunks) != 1:
        raise GenerateError("eval.task_prompts: interleaved (virtual) pipeline chunks are not supported")
    tokenizer = Tokenizer(tokenizer_model)
    gpt = unwrap_model(model_chunks[0])
    was_training = gpt.training
    prompts = held_out_prompts(count)
    chat = ChatGenerator(Generator(gpt, vocab_size=tokenizer.vocab_size, tokenizer=tokenizer), tokenizer_model)
    try:
        replies = chat.reply([p.messages for p in prompts], SamplingOptions(max_new_tokens=max_new_tokens))
    finally:
        gpt.train(was_training)
    return {
        "task_exact_match": sum(exact_match(r.text, p) for r, p in zip(replies, prompts)) / count,
        "task_ended_turn": sum(r.ended_turn for r in replies) / count,
    }
