"""The chat template: one definition used by SFT preprocessing, chat generation and the HF export.

A conversation is rendered as ChatML without separators between turns::

    <|im_start|>system\\n{content}<|im_end|><|im_start|>user\\n{content}<|im_end|><|im_start|>assistant\\n{content}<|im_end|>

and a generation prompt is the conversation so far followed by ``<|im_start|>assistant\\n``.
``<|im_start|>`` and ``<|im_end|>`` are SentencePiece *control* pieces: ``encode`` never produces
them, so their ids are inserted here directly, and each stretch of text between two of them
("role\\ncontent") is encoded on its own. Text inside a message therefore can never become a
control token: a user who types ``<|im_end|>`` gets the ordinary pieces of those characters.

Why this whitespace:

* The exported Hugging Face tokenizer splits a rendered chat at its added tokens and encodes every
  stretch in between like ``SentencePieceProcessor.encode`` does, dummy prefix included (legacy
  Llama behaviour). Encoding exactly the same stretches here gives the same ids whatever the
  model's normalizer (``identity`` keeps the newline as a byte piece, ``nmt_nfkc`` turns it into a
  word boundary).
* Nothing between ``<|im_end|>`` and the next ``<|im_start|>``: a newline there would be a stretch
  of its own, costing two tokens per turn (the dummy ``▁`` and the newline byte) under ``identity``
  normalization, for nothing.
* A newline after the role: no trained piece spans it (identity models learn from single lines,
  NFKC models see a space), so the role's tokens end where the content's begin and the loss mask
  can be cut there exactly; it is also what ChatML-trained tools expect.

Only the standard library, the package's errors and (lazily) sentencepiece are imported.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from megatron_plugin.errors import UserError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # the end-of-turn token: generation stops at it, training predicts it
CONTROL_TOKENS = (IM_START, IM_END)
ROLES = ("system", "user", "assistant")
ROLE_SEPARATOR = "\n"  # between the role and the content, inside the same text stretch

TEMPLATE_ID = "chatml-nosep"
TEMPLATE_VERSION = 1

# The Jinja template written to tokenizer_config.json. It must render exactly what
# `ChatTokenizer.render_text` renders; tests compare the two through `apply_chat_template`.
JINJA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' and not loop.first -%}"
    "{{- raise_exception('a system message must come first') -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Why a conversation is refused (the SFT manifest counts each by name).
UNKNOWN_ROLE = "unknown_role"
EMPTY_CONTENT = "empty_content"
WRONG_TYPE = "wrong_type"
SYSTEM_NOT_FIRST = "system_not_first"


class ChatTemplateError(UserError):
    """The tokenizer cannot carry the template (no control pieces, or the wrong kind)."""


class ConversationError(ValueError):
    """One conversation that does not fit the template; ``reason`` is one of the names above."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def check_messages(messages: Sequence[Any]) -> list[Message]:
    """Validate a conversation (dicts with ``role`` and ``content``, or `Message`), in order.

    A system message may only come first; every content must be a string with some
    non-whitespace text (an empty turn teaches nothing and, under NFKC, encodes to nothing).
    """
    if not isinstance(messages, (list, tuple)):
        raise ConversationError(WRONG_TYPE, f"messages must be a list, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            role, content = m.role, m.content
        elif isinstance(m, Mapping):
            role, content = m.get("role"), m.get("content")
        else:
            raise ConversationError(WRONG_TYPE, f"message {i} is a {type(m).__name__}, not an object")
        if not isinstance(role, str):
            raise ConversationError(WRONG_TYPE, f"message {i}: role is a {type(role).__name__}, not a string")
        if role not in ROLES:
            raise ConversationError(UNKNOWN_ROLE, f"message {i}: unknown role {role!r} (use {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ConversationError(WRONG_TYPE,
                                    f"message {i} ({role}): content is a {type(content).__name__}, not a string")
        if not content.strip():
            raise ConversationError(EMPTY_CONTENT, f"message {i} ({role}): empty content")
        if role == "system" and i != 0:
            raise ConversationError(SYSTEM_NOT_FIRST, f"message {i}: a system message must be the first one")
        out.append(Message(role, content))
    return out


def render_text(messages: Sequence[Any], add_generation_prompt: bool = False) -> str:
    """The template as text: what `JINJA_TEMPLATE` renders (for display; encode with `ChatTokenizer`)."""
    parts = [f"{IM_START}{m.role}{ROLE_SEPARATOR}{m.content}{IM_END}" for m in check_messages(messages)]
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant{ROLE_SEPARATOR}")
    return "".join(parts)


@dataclass
class EncodedConversation:
    """Token ids, the loss mask (1 on assistant content and its end-of-turn token) and where each
    message ends (``ends[k]``: tokens up to and including message k's ``<|im_end|>``)."""

    ids: list[int]
    loss_mask: list[int]
    ends: list[int] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)

    def cut(self, messages: int) -> "EncodedConversation":
        """The first ``messages`` messages (whole turns: the template has no cross-turn context)."""
        n = self.ends[messages - 1] if messages else 0
        return EncodedConversation(self.ids[:n], self.loss_mask[:n], self.ends[:messages], self.roles[:messages])


def control_token_ids(model_path: str, sp=None) -> Optional[dict[str, int]]:
    """``{token: id}`` for the template's control pieces, None if the model lacks any of them.

    Raises `ChatTemplateError` if a control string is in the vocabulary as another kind of piece
    (a user-defined piece would match the literal text typed in a message). ``sp``: the model
    already loaded.
    """
    sp = sp if sp is not None else _processor(model_path)
    ids = {}
    for token in CONTROL_TOKENS:
        i = sp.piece_to_id(token)
        if i == sp.unk_id():  # not in the vocabulary
            return None
        if not sp.is_control(i):
            raise ChatTemplateError(
                f"{model_path}: {token!r} is an ordinary or user-defined piece (id {i}), not a control "
                "piece, so the same text typed in a message would become that token; retrain the "
                "tokenizer with python -m megatron_plugin.preprocess train-tokenizer (it reserves the "
                "chat control pieces)"
            )
        ids[token] = i
    return ids


def _processor(model_path: str):
    import sentencepiece as spm

    if not os.path.isfile(model_path):
        raise ChatTemplateError(f"tokenizer model {model_path!r} not found")
    try:
        return spm.SentencePieceProcessor(model_file=model_path)
    except Exception as exc:
        raise ChatTemplateError(f"{model_path}: not a SentencePiece model ({exc})") from exc


class ChatTokenizer:
    """Encodes conversations with the template and a SentencePiece model that has its control pieces."""

    def __init__(self, model_path: str) -> None:
        self.model_path = os.fspath(model_path)
        self.sp = _processor(self.model_path)
        ids = control_token_ids(self.model_path, self.sp)
        if ids is None:
            raise ChatTemplateError(
                f"{self.model_path}: this SentencePiece model has no chat control pieces "
                f"({', '.join(CONTROL_TOKENS)}), which the chat template needs. Tokenizers trained by "
                "python -m megatron_plugin.preprocess train-tokenizer (or --train-tokenizer) reserve them; "
                "the model must be pretrained with such a tokenizer to be fine-tuned for chat. There is "
                "no plain-text marker fallback: with markers that are text, a message could forge a turn."
            )
        self.im_start = ids[IM_START]
        self.im_end = ids[IM_END]
        self.end_of_turn_id = self.im_end
        self.vocab_size = self.sp.get_piece_size()
        self._headers = {r: self.sp.encode(r + ROLE_SEPARATOR) for r in ROLES}

    # One stretch of text between control tokens. The role header and the content are encoded
    # together, as the exported HF tokenizer does; the header's own encoding must be a prefix of
    # it for the loss mask to start exactly at the content.
    def _message_ids(self, role: str, content: str, header: list[int]) -> tuple[list[int], int]:
        ids = self.sp.encode(role + ROLE_SEPARATOR + content)
        if ids[: len(header)] != header:
            raise ChatTemplateError(
                f"{self.model_path}: a piece of this model spans the role header and the message text "
                f"({role!r} + newline + {content[:20]!r}), so the loss mask cannot start at the text; "
                "use a tokenizer trained by python -m megatron_plugin.preprocess train-tokenizer"
            )
        return ids, len(header)

    def encode(self, messages: Sequence[Any]) -> EncodedConversation:
        """Ids and loss mask of a whole conversation (each message closed by ``<|im_end|>``)."""
        msgs = check_messages(messages)
        headers = self._headers
        out = EncodedConversation([], [])
        for m in msgs:
            ids, head = self._message_ids(m.role, m.content, headers[m.role])
            trained = 1 if m.role == "assistant" else 0
            out.ids.append(self.im_start)
            out.ids.extend(ids)
            out.ids.append(self.im_end)
            out.loss_mask.append(0)
            out.loss_mask.extend([0] * head + [trained] * (len(ids) - head))
            out.loss_mask.append(trained)
            out.ends.append(len(out.ids))
            out.roles.append(m.role)
        return out

    def generation_prompt(self, messages: Sequence[Any]) -> list[int]:
        """The conversation so far plus the assistant header: what the model continues from.

        Its output ends at `end_of_turn_id`; decode the ids before it with ``sp.decode``.
        """
        return self.encode(messages).ids + [self.im_start] + self._headers["assistant"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (self.im_start, self.im_end)])


__all__ = [
    "IM_START", "IM_END", "CONTROL_TOKENS", "ROLES", "ROLE_SEPARATOR", "TEMPLATE_ID", "TEMPLATE_VERSION",
    "JINJA_TEMPLATE", "ChatTemplateError", "ConversationError", "Message", "EncodedConversation",
    "ChatTokenizer", "check_messages", "control_token_ids", "render_text",
    "UNKNOWN_ROLE", "EMPTY_CONTENT", "WRONG_TYPE", "SYSTEM_NOT_FIRST",
]
