"""The checkpoint's SentencePiece model, as generation and evaluation use it.

Prompts are encoded as the data was (no BOS; the trainer appends EOS at the end of each
document), so generation stops at EOS. The exported Hugging Face tokenizer encodes the same way.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence


class Tokenizer:
    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        self.path = str(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self.sp.get_piece_size()

        def valid(i: int) -> Optional[int]:
            return i if i >= 0 else None

        self.eos_id = valid(self.sp.eos_id())
        self.bos_id = valid(self.sp.bos_id())

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    # The names Megatron-Core's inference code calls (`tokenize`, `detokenize`, `eod`, `bos`).
    def tokenize(self, text: str) -> List[int]:
        return self.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.decode(ids)

    @property
    def eod(self) -> Optional[int]:
        return self.eos_id

    @property
    def bos(self) -> Optional[int]:
        return self.bos_id
