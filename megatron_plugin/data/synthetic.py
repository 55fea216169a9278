"""A small corpus the package writes itself, so the smoke run needs no download.

The text is generated from a tiny grammar over invented words, with a fixed seed: it has enough
structure (agreement, recurring phrases, numbers that count) for a small model's loss to fall
quickly, and it ships no third-party text.
"""

from __future__ import annotations

import json
import os
import random

_SUBJECTS = ["the kelvar", "a small dorn", "every mirel", "the old tasko", "our brin", "the red vol"]
_VERBS = ["builds", "finds", "carries", "paints", "counts", "follows", "opens", "trades"]
_OBJECTS = ["a stone bridge", "the river lamps", "seven green jars", "the north gate", "a quiet drum"]
_PLACES = ["near the market", "under the hill", "before the winter", "across the valley", "at dawn"]
_ENDINGS = ["and rests.", "while the bells ring.", "for the festival.", "again and again."]


def _sentence(rng: random.Random) -> str:
    return " ".join(
        [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_PLACES), rng.choice(_ENDINGS)]
    )


def _document(rng: random.Random, index: int) -> str:
    start = rng.randint(1, 50)
    count = rng.randint(3, 8)
    lines = [f"Story {index}: {' '.join(str(start + i) for i in range(count))}."]
    lines += [_sentence(rng).capitalize() for _ in range(rng.randint(3, 12))]
    return " ".join(lines)


def write_corpus(path: str, num_documents: int = 2000, seed: int = 0) -> str:
    """Write `num_documents` generated documents as JSONL ({"text": ...}) to `path`."""
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for index in range(num_documents):
            out.write(json.dumps({"text": _document(rng, index)}) + "\n")
    os.replace(tmp, path)
    return path
