"""The smoke recipe's data: a generated corpus, a small SentencePiece model, an indexed dataset,
made by the same preprocessing job users run on their own corpora, in RUN/data."""

from __future__ import annotations

import logging
import os

from megatron_plugin.data.synthetic import write_corpus

logger = logging.getLogger(__name__)


def generated_corpus_paths(run_dir: str) -> tuple[str, str]:
    """(dataset prefix, tokenizer model path) of the generated corpus of the run in `run_dir`."""
    from megatron_plugin.preprocess.pipeline import dataset_prefix

    data_dir = os.path.join(run_dir, "data")
    return dataset_prefix(os.path.join(data_dir, "corpus"), "text"), os.path.join(data_dir, "tokenizer.model")


def prepare_generated_corpus(run_dir: str, vocab_size: int, num_documents: int = 2000) -> tuple[str, str]:
    """Write the generated corpus, train its tokenizer and preprocess it into RUN/data.
    Returns (dataset prefix, tokenizer model path). Reuses a complete earlier result."""
    from megatron_plugin.preprocess.pipeline import preprocess_files, train_tokenizer

    prefix, tokenizer_model = generated_corpus_paths(run_dir)
    data_dir = os.path.dirname(prefix)
    if os.path.exists(prefix + ".idx") and os.path.exists(tokenizer_model):
        return prefix, tokenizer_model
    os.makedirs(data_dir, exist_ok=True)
    corpus = write_corpus(os.path.join(data_dir, "corpus.jsonl"), num_documents=num_documents)
    logger.info("generated corpus: %s (%d documents)", corpus, num_documents)
    train_tokenizer([corpus], tokenizer_model[: -len(".model")], vocab_size=vocab_size)
    result = preprocess_files([corpus], os.path.join(data_dir, "corpus"), tokenizer_model, append_eod=True)
    logger.info("preprocessed: %s (%d tokens)", result.prefix, result.tokens)
    return result.prefix, tokenizer_model


def generated_chat_corpus_prefix(run_dir: str) -> str:
    """The `preprocess sft` output prefix of the generated chat task of the run in `run_dir`."""
    return os.path.join(run_dir, "data", "chat")


def prepare_generated_chat_corpus(run_dir: str, tokenizer_model: str, num_conversations: int = 6000) -> str:
    """Write the generated instruction task (`data.synthetic_chat`) and preprocess it with the
    tokenizer of the model being fine-tuned into RUN/data/chat. Returns the prefix. Reuses an
    earlier result made with the same tokenizer."""
    from megatron_plugin.data.synthetic_chat import write_task_corpus
    from megatron_plugin.data.training_data import chat_data_tokenizer_sha256
    from megatron_plugin.files import file_sha256
    from megatron_plugin.preprocess.sft import preprocess_sft

    prefix = generated_chat_corpus_prefix(run_dir)
    if chat_data_tokenizer_sha256(prefix) == file_sha256(tokenizer_model):
        return prefix
    source = write_task_corpus(prefix + ".jsonl", num_conversations)
    logger.info("generated chat task: %s (%d conversations)", source, num_conversations)
    result = preprocess_sft([source], prefix, tokenizer_model)
    logger.info("preprocessed: %s (%d conversations, %d tokens)", prefix, result.conversations, result.tokens)
    return prefix
