"""The Python API: load a checkpoint (or HF folder) once, generate text for lists of prompts.

    from megatron_plugin.generate import SamplingOptions, load_generator
    gen = load_generator("runs/smoke")                      # TP/PP from the process layout
    [out] = gen.generate_text(["Story 1:"], SamplingOptions(max_new_tokens=32))
    print(out.text)
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence

from megatron_plugin.checkpoint_layout import TOKENIZER_FILE
from megatron_plugin.config import ParallelConfig
from megatron_plugin.generate.engine import Generation, Generator, SamplingOptions
from megatron_plugin.generate.errors import GenerateError
from megatron_plugin.generate.loading import LoadedModel, ensure_runtime, load_model, resolve_source


class TextGenerator(Generator):
    """A Generator that also encodes text prompts with the checkpoint's tokenizer."""

    def __init__(self, loaded: LoadedModel):
        super().__init__(loaded.model, loaded.vocab_size, loaded.tokenizer, loaded.max_sequence_length)
        self.loaded = loaded

    def encode_prompts(self, prompts: Sequence[str]) -> List[List[int]]:
        if self.tokenizer is None:
            raise GenerateError(
                f"{self.loaded.checkpoint_dir} has no {TOKENIZER_FILE}: text prompts need it (copy "
                f"the SentencePiece model there as {TOKENIZER_FILE})"
            )
        return [self.tokenizer.encode(p) for p in prompts]

    def generate_text(self, prompts: Sequence[str], options: Optional[SamplingOptions] = None,
                      batch_size: int = 8,
                      on_token: Optional[Callable[[int, Generation], None]] = None) -> List[Generation]:
        """Completions of `prompts`, decoded `batch_size` at a time; on_token(index, generation)
        after each new token (index into `prompts`)."""
        options = options or SamplingOptions()
        encoded = self.encode_prompts(prompts)
        for i, ids in enumerate(encoded):
            if not ids:
                raise GenerateError(f"prompt {i + 1} ({prompts[i]!r}) encodes to no tokens: give it some text")
        results: List[Generation] = []
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            callback = None
            if on_token is not None:
                callback = (lambda offset: (lambda row, gen: on_token(offset + row, gen)))(start)
            results += self.generate(chunk, options, callback)
        return results


def load_generator(source: str | os.PathLike, dtype: Optional[str] = None, tensor_parallel: int = 1,
                   pipeline_parallel: int = 1) -> TextGenerator:
    """A TextGenerator over `source` (RUN, RUN/checkpoints, iter_N or a Hugging Face folder).
    Starts torch.distributed / Megatron's parallel state when they are not running (under
    torchrun every rank calls this)."""
    ckpt_dir = resolve_source(source, tensor_parallel)
    ensure_runtime(ParallelConfig(tensor=tensor_parallel, pipeline=pipeline_parallel))
    return TextGenerator(load_model(ckpt_dir, dtype))
