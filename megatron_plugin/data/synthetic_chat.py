"""A generated instruction task with checkable answers, for the smoke SFT recipe.

The user gives a list of words and asks how many there are; the assistant answers with the
number. The words are those of the generated pretraining corpus (`synthetic`), so
its tokenizer knows them. One word set in eight is held out: no training conversation contains
those words together, in any order, so a held-out prompt (and its answer) was never seen.
Exact match on held-out prompts then measures what fine-tuning taught, not what it memorised.
"""

from __future__ import annotations

import json
import os
import random
import zlib
from dataclasses import dataclass
from typing import List, Sequence

TASK_WORDS = ("kelvar", "dorn", "mirel", "tasko", "brin", "vol", "stone", "bridge", "river", "lamps",
              "green", "jars", "north", "gate", "quiet", "drum", "market", "hill", "winter", "valley",
              "dawn", "bells", "festival", "seven")
MIN_WORDS, MAX_WORDS = 2, 9
INSTRUCTIONS = ("Count the words: {words}", "How many words are here: {words}",
                "How many words? {words}", "Please count this list: {words}")
SYSTEM_PROMPT = "You answer with a number only."
_HELD_OUT_ONE_IN = 8


@dataclass(frozen=True)
class TaskPrompt:
    messages: List[dict]  # the conversation up to the user's request
    answer: str  # the one correct reply


def is_held_out(words: Sequence[str]) -> bool:
    """Whether this set of words is reserved for evaluation (order does not matter)."""
    key = " ".join(sorted(words)).encode()
    return zlib.crc32(key) % _HELD_OUT_ONE_IN == 0


def _draw(rng: random.Random, held_out: bool) -> tuple[list[dict], str]:
    while True:
        words = [rng.choice(TASK_WORDS) for _ in range(rng.randint(MIN_WORDS, MAX_WORDS))]
        if is_held_out(words) == held_out:
            break
    messages = []
    if rng.random() < 0.25:
        messages.append({"role": "system", "content": SYSTEM_PROMPT})
    messages.append({"role": "user", "content": rng.choice(INSTRUCTIONS).format(words=" ".join(words))})
    return messages, str(len(words))


def write_task_corpus(path: str, num_conversations: int, seed: int = 0) -> str:
    """`num_conversations` training conversations ({"messages": [...]}, JSONL) at `path`; none
    holds a held-out word set."""
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for _ in range(num_conversations):
            messages, answer = _draw(rng, held_out=False)
            out.write(json.dumps({"messages": messages + [{"role": "assistant", "content": answer}]}) + "\n")
    os.replace(tmp, path)
    return path


def held_out_prompts(count: int, seed: int = 1) -> List[TaskPrompt]:
    """`count` evaluation prompts over held-out word sets, the same ones for a given seed."""
    rng = random.Random(seed)
    return [TaskPrompt(*_draw(rng, held_out=True)) for _ in range(count)]


def exact_match(reply: str, prompt: TaskPrompt) -> bool:
    """The reply is the answer (surrounding whitespace aside)."""
    return reply.strip() == prompt.answer
