"""Chat replies from a checkpoint: conversations in, the assistant's next turn out.

    from megatron_plugin.generate import SamplingOptions
    from megatron_plugin.generate.chat import load_chat_generator
    chat = load_chat_generator("runs/sft")
    [reply] = chat.reply([[{"role": "user", "content": "Hello"}]], SamplingOptions(max_new_tokens=64))
    print(reply.text, reply.ended_turn)

Prompts are `ChatTokenizer.generation_prompt` (megatron_plugin/chat/template.py, the package's one
chat template): the conversation so far followed by the assistant header. A reply ends where the
model closes its turn with `<|im_end|>` (or emits EOS): the engine is given those ids as ids that
end a sequence, so decoding stops there for each row of a batch, as `transformers` stops at the
export's generation_config `eos_token_id` list.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

from megatron_plugin.chat.template import ChatTokenizer, ConversationError, check_messages
from megatron_plugin.checkpoint_layout import TOKENIZER_FILE
from megatron_plugin.config import ParallelConfig
from megatron_plugin.generate.engine import Generation, Generator, SamplingOptions
from megatron_plugin.generate.errors import GenerateError

# finish_reason of a reply: the model closed its turn, emitted EOS, met a --stop string, or ran out
# of --max-new-tokens.
END_OF_TURN = "end_of_turn"


@dataclass
class ChatReply:
    text: str  # the reply, without the end-of-turn token
    tokens: List[int]  # generated ids (the end-of-turn id included when it ended the reply)
    ended_turn: bool  # True when the model produced <|im_end|> (or EOS) itself
    finish_reason: str = "length"  # end_of_turn | eos | stop | length (| interrupted, see ChatSession)


def check_conversation(messages: Any, where: str) -> List[dict]:
    """`messages` as plain {"role", "content"} dicts, checked against the template and ending with
    the user's turn (what a reply answers). `where` names the conversation in errors."""
    try:
        checked = check_messages(messages)
    except ConversationError as err:
        raise GenerateError(f"{where}: {err.detail}") from None
    if not checked:
        raise GenerateError(f"{where}: no messages; give at least one user message")
    if checked[-1].role != "user":
        raise GenerateError(
            f"{where}: the last message is the {checked[-1].role}'s; a reply answers a user message, so "
            "end the conversation with one"
        )
    return [{"role": m.role, "content": m.content} for m in checked]


class ChatGenerator:
    """Replies to conversations with a loaded generator and the SentencePiece model it was trained
    with (which must have the template's control pieces, else `ChatTemplateError`)."""

    def __init__(self, generator: Generator, tokenizer_model: str | os.PathLike):
        self.generator = generator
        self.tokenizer = ChatTokenizer(os.fspath(tokenizer_model))
        self.end_of_turn_id = self.tokenizer.end_of_turn_id
        if self.end_of_turn_id >= generator.vocab_size:
            raise GenerateError(
                f"{tokenizer_model}: its end-of-turn id {self.end_of_turn_id} is outside the model's "
                f"vocabulary of {generator.vocab_size} ids; use the tokenizer the model was trained with"
            )
        eos = self.tokenizer.sp.eos_id()
        self.eos_id: Optional[int] = eos if eos >= 0 else None
        # Tokens a generation prompt adds after the conversation (<|im_start|> and the assistant header).
        probe = [{"role": "user", "content": "x"}]
        self._prompt_suffix = len(self.tokenizer.generation_prompt(probe)) - len(self.tokenizer.encode(probe).ids)

    @property
    def max_sequence_length(self) -> int:
        return self.generator.max_sequence_length

    def prompt_ids(self, messages: Sequence[dict]) -> List[int]:
        """The generation prompt of a conversation (checked: template rules, last message the user's)."""
        return self.tokenizer.generation_prompt(check_conversation(messages, "conversation"))

    def check_fits(self, prompt: Sequence[int], max_new_tokens: int, where: str) -> None:
        if len(prompt) + max_new_tokens > self.max_sequence_length:
            raise GenerateError(
                f"{where} is {len(prompt)} tokens with the assistant header; with --max-new-tokens "
                f"{max_new_tokens} that exceeds the model's context of {self.max_sequence_length} tokens: "
                "shorten it, drop earlier turns or lower --max-new-tokens"
            )

    def fit_history(self, messages: Sequence[dict], max_new_tokens: int) -> Tuple[List[dict], int]:
        """(messages, dropped): the conversation with its oldest turns removed until its prompt and
        `max_new_tokens` fit the model's context. A leading system message is kept; the kept part
        starts with a user message. Raises GenerateError when even the last user message (with the
        system message) does not fit."""
        messages = check_conversation(messages, "conversation")
        encoded = self.tokenizer.encode(messages)
        budget = self.max_sequence_length - max_new_tokens - self._prompt_suffix
        # The template has no context across turns, so the tokens of messages[k:] are the
        # conversation's total minus what ends at message k - 1.
        first = 1 if messages[0]["role"] == "system" else 0
        system_tokens = encoded.ends[0] if first else 0

        def tokens_from(k: int) -> int:
            return system_tokens + len(encoded.ids) - (encoded.ends[k - 1] if k else 0)

        start = first
        while start < len(messages) - 1 and (messages[start]["role"] != "user" or tokens_from(start) > budget):
            start += 1
        if tokens_from(start) > budget:
            what = "the system message and the last user message" if first else "the last user message"
            raise GenerateError(
                f"{what} alone take {tokens_from(start) + self._prompt_suffix} tokens with the assistant "
                f"header; with --max-new-tokens {max_new_tokens} that exceeds the model's context of "
                f"{self.max_sequence_length} tokens: send a shorter message or lower --max-new-tokens"
            )
        return messages[:first] + messages[start:], start - first

    def reply(self, conversations: Sequence[Sequence[dict]], options: SamplingOptions, batch_size: int = 8,
              on_token: Optional[Callable[[int, Generation], None]] = None) -> List[ChatReply]:
        """The assistant's next turn for each conversation (lists of {"role", "content"} messages,
        the last one the user's), decoded `batch_size` at a time. on_token(index, generation) after
        each new token, `index` into `conversations`. Reply tokens stop at <|im_end|>, at EOS when
        `options.stop_at_eos`, at a stop string of `options.stop`, or after `options.max_new_tokens`."""
        options.check()
        if batch_size < 1:
            raise GenerateError(f"--batch-size {batch_size}: must be at least 1")
        if not conversations:
            raise GenerateError("no conversations given")
        prompts = []
        for i, messages in enumerate(conversations):
            prompt = self.tokenizer.generation_prompt(check_conversation(messages, f"conversation {i + 1}"))
            self.check_fits(prompt, options.max_new_tokens, f"conversation {i + 1}")
            prompts.append(prompt)
        end_ids = [self.end_of_turn_id]
        if options.stop_at_eos and self.eos_id is not None:
            end_ids.append(self.eos_id)
        options = dataclasses.replace(
            options, stop_token_ids=tuple(dict.fromkeys([*options.stop_token_ids, *end_ids]))
        )
        replies: List[ChatReply] = []
        for start in range(0, len(prompts), batch_size):
            callback = None
            if on_token is not None:
                callback = (lambda offset: (lambda row, gen: on_token(offset + row, gen)))(start)
            for generation in self.generator.generate(prompts[start:start + batch_size], options, callback):
                replies.append(self.to_reply(generation))
        return replies

    def to_reply(self, generation: Generation) -> ChatReply:
        """A finished (or interrupted) generation as a reply."""
        tokens = list(generation.tokens)
        last = tokens[-1] if tokens else None
        if generation.finish_reason == "eos" and last in (self.end_of_turn_id, self.eos_id):
            reason = END_OF_TURN if last == self.end_of_turn_id else "eos"
            return ChatReply(self.tokenizer.decode(tokens[:-1]), tokens, True, reason)
        if generation.finish_reason == "eos":  # a caller's own stop_token_ids
            return ChatReply(self.tokenizer.decode(tokens[:-1]), tokens, False, "stop")
        if generation.finish_reason == "stop" and generation.text is not None:
            return ChatReply(generation.text, tokens, False, "stop")
        return ChatReply(self.tokenizer.decode(tokens), tokens, False, "length")


def load_chat_generator(source: str | os.PathLike, dtype: Optional[str] = None, tensor_parallel: int = 1,
                        pipeline_parallel: int = 1) -> ChatGenerator:
    """A ChatGenerator over `source` (RUN, RUN/checkpoints, iter_N or a Hugging Face folder), with
    the checkpoint's own tokenizer.model (an HF folder's is carried over by the importer). The
    tokenizer is checked for the chat control pieces before the model is loaded."""
    from megatron_plugin.generate.api import TextGenerator
    from megatron_plugin.generate.loading import ensure_runtime, load_model, resolve_source

    ckpt_dir = resolve_source(source, tensor_parallel)
    tokenizer_model = Path(ckpt_dir) / TOKENIZER_FILE
    if not tokenizer_model.is_file():
        raise GenerateError(
            f"{source}: no {TOKENIZER_FILE} (looked in {ckpt_dir}); chat needs the SentencePiece model "
            f"the model was trained with: copy it there as {TOKENIZER_FILE}"
        )
    ChatTokenizer(str(tokenizer_model))  # ChatTemplateError now rather than after the load
    ensure_runtime(ParallelConfig(tensor=tensor_parallel, pipeline=pipeline_parallel))
    return ChatGenerator(TextGenerator(load_model(ckpt_dir, dtype)), tokenizer_model)


class ChatSession:
    """One conversation's history, as the interactive CLI keeps it: an optional system message,
    then user and assistant turns. `send` answers a user message in the context of the history,
    dropping the oldest turns first when the history would not fit the model's context."""

    def __init__(self, chat: ChatGenerator, options: SamplingOptions, system: Optional[str] = None):
        self.chat = chat
        self.options = options
        self.system = system
        self.history: List[dict] = []
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def fit(self, text: str) -> Tuple[List[dict], int]:
        """(conversation, dropped): the history plus the user message `text`, with as many of the
        oldest turns dropped (`dropped` messages) as the model's context needs; the history itself
        is not changed yet."""
        return self.chat.fit_history(self.history + [{"role": "user", "content": text}], self.options.max_new_tokens)

    def answer(self, conversation: List[dict], dropped: int = 0,
               on_token: Optional[Callable[[int, Generation], None]] = None) -> "Turn":
        """The reply to `conversation` (from `fit`); it becomes the history, with the reply as the
        assistant's turn (an empty reply cannot be a template turn: then the user message is left
        out too). A KeyboardInterrupt while the reply is decoded ends the reply there; what was
        decoded of it is kept."""
        latest: List[Generation] = []

        def track(row: int, generation: Generation) -> None:
            latest[:] = [generation]
            if on_token is not None:
                on_token(row, generation)

        interrupted = False
        try:
            [reply] = self.chat.reply([conversation], self.options, on_token=track)
        except KeyboardInterrupt:
            interrupted = True
            reply = self.chat.to_reply(latest[0]) if latest else ChatReply("", [], False)
            reply.finish_reason = "interrupted"
        kept = bool(reply.text.strip())
        if kept:
            self.history = conversation + [{"role": "assistant", "content": reply.text}]
        else:
            self.history = conversation[:-1]  # the dropped turns stay dropped
        return Turn(conversation, reply, dropped, interrupted, kept)

    def send(self, text: str, on_token: Optional[Callable[[int, Generation], None]] = None) -> "Turn":
        """`fit` and `answer`: the reply to the user message `text` in the context of the history."""
        conversation, dropped = self.fit(text)
        return self.answer(conversation, dropped, on_token)


@dataclass
class Turn:
    messages: List[dict]  # the conversation the reply answers (after any dropped turns)
    reply: ChatReply
    dropped_messages: int  # oldest messages removed from the history to fit the context
    interrupted: bool
    kept: bool  # the exchange joined the history (False for an empty reply)
