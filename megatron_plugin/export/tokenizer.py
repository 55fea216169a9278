"""SentencePiece model -> the tokenizer files `AutoTokenizer` loads offline.

The folder gets the SentencePiece model itself (`tokenizer.model`) and a `tokenizer.json` built
from it that encodes exactly like `SentencePieceProcessor.encode`: it follows the model's own
normalizer spec (NFKC charsmap, whitespace collapsing, dummy prefix) rather than the Llama
defaults, which assume a model trained without normalization. Special-token strings in text are
split like ordinary text, because SentencePiece never treats "</s>" typed in a document as EOS.

Our data is tokenized with no BOS and the EOS appended once per document, so the tokenizer adds
neither: encoding a prompt gives the same ids as SentencePiece, EOS is the `eos_token` that
generation stops at.

A model with the chat control pieces (`megatron_plugin.chat.template`) also gets the chat template
(`chat_template` in tokenizer_config.json) and the control tokens as added tokens, so that
`apply_chat_template` gives the ids our own chat encoding gives. They are added tokens but not
"special" in the `tokenizers` sense: the folder keeps `split_special_tokens=True` (so "</s>" typed
in text stays text, as in SentencePiece), and that setting would split special tokens in the
rendered template too. `chat_control_tokens` names them, so `apply_chat_template(...,
sanitize_control_tokens=True)` encodes the same strings typed inside a message as plain text.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_plugin.chat.template import CONTROL_TOKENS, IM_END, JINJA_TEMPLATE, TEMPLATE_ID, TEMPLATE_VERSION
from megatron_plugin.checkpoint_layout import TOKENIZER_FILE
from megatron_plugin.errors import UserError

UNIGRAM = 1  # sentencepiece TrainerSpec.ModelType
CONTROL = 3  # sentencepiece ModelProto.SentencePiece.Type


@dataclass(frozen=True)
class SpecialIds:
    bos: Optional[int]
    eos: Optional[int]
    pad: Optional[int]
    unk: Optional[int]
    vocab_size: int
    end_of_turn: Optional[int] = None  # the chat template's <|im_end|>, when the model has the control pieces


def special_ids(sp_model: Path) -> SpecialIds:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))

    def valid(i: int) -> Optional[int]:
        return i if i >= 0 else None

    chat = all(sp.piece_to_id(t) != sp.unk_id() and sp.is_control(sp.piece_to_id(t)) for t in CONTROL_TOKENS)
    return SpecialIds(
        bos=valid(sp.bos_id()),
        eos=valid(sp.eos_id()),
        pad=valid(sp.pad_id()),
        unk=valid(sp.unk_id()),
        vocab_size=sp.get_piece_size(),
        end_of_turn=sp.piece_to_id(IM_END) if chat else None,
    )


def _load_proto(sp_model: Path):
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(sp_model).read_bytes())
    return proto


def write_hf_tokenizer(sp_model: Path, out_dir: Path) -> SpecialIds:
    """Write the SentencePiece model, tokenizer.json and tokenizer_config.json into `out_dir`."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    if not hasattr(SpmConverter, "build_tokenizer_from_spm_proto"):
        raise UserError(
            "this transformers version cannot build tokenizer.json from a SentencePiece model "
            "(SpmConverter.build_tokenizer_from_spm_proto); install transformers>=5"
        )
    ids = special_ids(sp_model)
    proto = _load_proto(sp_model)
    # The converter builds a Unigram model from (piece, score) pairs and a BPE model from a
    # piece -> id map (merges ranked by piece score).
    if proto.trainer_spec.model_type == UNIGRAM:
        # Known gap: a Unigram lattice can still pick a control piece for its literal text
        # ("</s>" typed in a document), which SentencePiece never does. Our tokenizers are BPE.
        vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    else:
        vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    # legacy=True: SentencePiece prefixes the dummy "▁" even when the text starts with a space.
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if backend is None:
        raise RuntimeError(f"{sp_model}: unsupported SentencePiece model type")

    if ids.end_of_turn is not None:
        from tokenizers import AddedToken

        # Matched whole in the rendered template (never merged with the text around them);
        # normalized=False so the normalizer's space handling cannot change what they match.
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in CONTROL_TOKENS])

    def piece(i: Optional[int]) -> Optional[str]:
        return proto.pieces[i].piece if i is not None else None

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=piece(ids.bos),
        eos_token=piece(ids.eos),
        unk_token=piece(ids.unk),
        pad_token=piece(ids.pad),
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(
        {
            # The generic fast tokenizer loads tokenizer.json as is; LlamaTokenizer would rebuild
            # its normalizer with Llama's defaults instead of this model's.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": False,
            "add_eos_token": False,
        }
    )
    if ids.end_of_turn is not None:
        # Written here and only here, from the template module, so that preprocessing, generation
        # and the exported folder cannot drift apart.
        config["chat_template"] = JINJA_TEMPLATE
        config["chat_control_tokens"] = list(CONTROL_TOKENS)
        config["chat_template_id"] = f"{TEMPLATE_ID}/{TEMPLATE_VERSION}"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    shutil.copyfile(sp_model, out_dir / TOKENIZER_FILE)
    return ids
