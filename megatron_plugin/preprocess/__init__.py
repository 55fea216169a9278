"""Preprocessing: raw corpora -> SentencePiece tokenizer -> Megatron indexed dataset.

Python API (what the CLI runs)::

    from megatron_plugin.preprocess import train_tokenizer, preprocess_files
    model = train_tokenizer(["corpus.jsonl"], "out/tok", vocab_size=1000)
    result = preprocess_files(["corpus.jsonl"], "out/data", model, append_eod=True)
    result.prefix        # "out/data_text_document" (pass to GPTDataset / the training config)
    result.tokens        # tokens written; also "tokens" in out/data_text_document.json

    from megatron_plugin.preprocess import preprocess_sft
    sft = preprocess_sft(["chats.jsonl"], "out/chat", model)   # docs/sft.md
    sft.tokens_prefix    # "out/chat_tokens_document"; the loss mask is sft.loss_mask_prefix
"""
from .errors import PreprocessError
from .pipeline import PreprocessOptions, PreprocessResult, dataset_prefix, preprocess, preprocess_files, train_tokenizer
from .sft import SFTOptions, SFTResult, preprocess_sft

__all__ = [
    "PreprocessError",
    "PreprocessOptions",
    "PreprocessResult",
    "dataset_prefix",
    "preprocess",
    "preprocess_files",
    "preprocess_sft",
    "SFTOptions",
    "SFTResult",
    "train_tokenizer",
]
