"""Where prompts come from (arguments, a file, stdin; conversations for chat) and how results are
written (JSONL)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Iterable, List, Optional, Tuple

from megatron_plugin.generate.engine import Generation
from megatron_plugin.generate.errors import GenerateError


def read_prompts_file(path: str | Path) -> List[str]:
    """One prompt per line, or JSONL with a "prompt" key (a file ending in .jsonl, or whose first
    non-empty line is a JSON object). Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"--prompts {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise GenerateError(f"--prompts {path}: not UTF-8 text ({err})") from None
    return parse_prompt_lines(lines, str(path))


def parse_prompt_lines(lines: Iterable[str], source: str) -> List[str]:
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise GenerateError(f"{source} has no prompts (it is empty): put one prompt per line, or JSONL with a 'prompt' key")
    is_jsonl = source.endswith(".jsonl") or numbered[0][1].lstrip().startswith("{")
    if not is_jsonl:
        return [line for _, line in numbered]
    prompts = []
    for n, line in numbered:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise GenerateError(f"{source}:{n}: not valid JSON ({err.msg}); use one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise GenerateError(f'{source}:{n}: needs a string "prompt" key, e.g. {{"prompt": "Once upon"}}')
        prompts.append(record["prompt"])
    return prompts


def read_messages_file(path: str | Path, system: Optional[str] = None) -> List[Tuple[str, List[dict]]]:
    """Scripted conversations for `--messages`: JSONL, one `{"messages": [{"role", "content"}, ...]}`
    per line (the SFT data's OpenAI format), the last message the user's. Returns ("FILE:LINE",
    messages) for each non-blank line; a conversation without a system message gets `system`."""
    from megatron_plugin.generate.chat import check_conversation

    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"--messages {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise GenerateError(f"--messages {path}: not UTF-8 text ({err})") from None
    conversations = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise GenerateError(f"{where}: not valid JSON ({err.msg}); use one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            raise GenerateError(
                f'{where}: needs a "messages" list, e.g. {{"messages": [{{"role": "user", "content": "Hi"}}]}}'
            )
        messages = record["messages"]
        if system and not (messages and isinstance(messages[0], dict) and messages[0].get("role") == "system"):
            messages = [{"role": "system", "content": system}] + messages
        conversations.append((where, check_conversation(messages, where)))
    if not conversations:
        raise GenerateError(f'--messages {path} has no conversations (it is empty): put one {{"messages": [...]}} per line')
    return conversations


def chat_record(messages: List[dict], reply) -> dict:
    """One `--messages` / `--chat --jsonl` result: the conversation and its reply (a ChatReply)."""
    return {
        "messages": messages,
        "reply": reply.text,
        "ended_turn": reply.ended_turn,
        "finish_reason": reply.finish_reason,
        "tokens": reply.tokens,
    }


def result_record(prompt: str, generation: Generation) -> dict:
    record = {
        "prompt": prompt,
        "completion": generation.text,
        "tokens": generation.tokens,
        "finish_reason": generation.finish_reason,
    }
    if generation.logprobs is not None:
        record["logprobs"] = generation.logprobs
    return record


def write_jsonl(records: Iterable[dict], out: IO[str]) -> None:
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()


class Streamer:
    """Prints one generation's text to `out` as its tokens arrive (decoding the whole completion
    each time, so multi-token characters and SentencePiece's spaces come out right)."""

    def __init__(self, tokenizer, out: IO[str]):
        self.tokenizer = tokenizer
        self.out = out
        self.printed = ""

    def __call__(self, row: int, generation: Generation) -> None:
        tokens = generation.tokens
        if generation.finish_reason == "eos" and tokens:
            tokens = tokens[:-1]
        text = generation.text if generation.finish_reason == "stop" else self.tokenizer.decode(tokens)
        if text.endswith("\ufffd"):
            return  # an incomplete UTF-8 sequence: wait for its remaining bytes (finish() prints all)
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def finish(self, generation: Optional[Generation]) -> None:
        if generation is not None and generation.text is not None and generation.text.startswith(self.printed):
            self.out.write(generation.text[len(self.printed):])
        self.out.write("\n")
        self.out.flush()
