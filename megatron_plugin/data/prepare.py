"""The smoke recipe's data: a generated corpus, a small SentencePiece model, an indexed dataset."""

from __future__ import annotations

import logging
import os

from megatron_plugin.data.synthetic import write_corpus

logger = logging.getLogger(__name__)


def prepare_generated_corpus(data_dir: str, vocab_size: int, num_documents: int = 2000) -> tuple[str, str]:
    """Write the generated corpus, train its tokenizer and preprocess it into `data_dir`.
    Returns (dataset prefix, tokenizer model path). Reuses a complete earlier result."""
    os.makedirs(data_dir, exist_ok=True)
    prefix = os.path.join(data_dir, "corpus_text_document")
    tokenizer_model = os.path.join(data_dir, "tokenizer.model")
    if os.path.exists(prefix + ".idx") and os.path.exists(tokenizer_model):
        return prefix, tokenizer_model
    corpus = write_corpus(os.path.join(data_dir, "corpus.jsonl"), num_documents=num_documents)
    logger.info("generated corpus: %s (%d documents)", corpus, num_documents)
    _train_tokenizer(corpus, tokenizer_model, vocab_size)
    _encode(corpus, prefix, tokenizer_model)
    return prefix, tokenizer_model


def _train_tokenizer(corpus: str, model_path: str, vocab_size: int) -> None:
    import json

    import sentencepiece as spm

    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=model_path[: -len(".model")],
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )


def _encode(corpus: str, prefix: str, model_path: str) -> None:
    import json

    import numpy as np
    import sentencepiece as spm
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    sp = spm.SentencePieceProcessor(model_file=model_path)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            ids = sp.encode(json.loads(line)["text"]) + [sp.eos_id()]
            builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(prefix + ".idx")
