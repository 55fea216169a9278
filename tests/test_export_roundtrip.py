"""HF -> our checkpoint -> HF gives the same bytes; unsupported HF models are refused by field;
the fused-tensor layouts and the streaming safetensors writer on their own."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_helpers as helpers  # noqa: E402

VOCAB = 320


def _hf_folder(path: Path, sp_model: Path, dtype: torch.dtype, tied: bool, kv_heads: int = 2) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():  # norms away from 1, every tensor distinct
            param.add_(0.1 * torch.randn_like(param))
    model.to(dtype).save_pretrained(str(path))
    shutil.copyfile(sp_model, path / "tokenizer.model")
    return path


def _tensors(folder: Path) -> dict:
    from safetensors import safe_open

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return helpers.train_sentencepiece(tmp_path_factory.mktemp("tokenizer"), vocab_size=VOCAB)


@pytest.mark.parametrize(
    "dtype, export_dtype, tied, tensor_parallel",
    [(torch.bfloat16, "bf16", False, 2), (torch.float32, "fp32", True, 1)],
)
def test_hf_to_checkpoint_to_hf_is_byte_identical(tmp_path, sp_model, dtype, export_dtype, tied, tensor_parallel):
    from megatron_plugin.export.from_hf import import_hf
    from megatron_plugin.export.to_hf import export_checkpoint

    source = _hf_folder(tmp_path / "hf", sp_model, dtype, tied)
    iter_dir = import_hf(source, tmp_path / "run" / "checkpoints", tensor_parallel=tensor_parallel)
    assert iter_dir == tmp_path / "run" / "checkpoints" / "iter_0000000"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "iter_0000000"
    run_config = json.loads((iter_dir / "run_config.json").read_text())
    assert run_config["model"]["num_query_groups"] == 2
    assert run_config["model"]["tie_embeddings"] is tied
    assert run_config["precision"]["dtype"] == export_dtype
    assert (iter_dir / "tokenizer.model").read_bytes() == sp_model.read_bytes()

    again = export_checkpoint(tmp_path / "run" / "checkpoints", tmp_path / "hf2", dtype=export_dtype)
    before, after = _tensors(source), _tensors(again)
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        assert after[name].shape == tensor.shape, name
        assert after[name].contiguous().view(torch.uint8).numpy().tobytes() == \
            tensor.contiguous().view(torch.uint8).numpy().tobytes(), name


def test_imported_checkpoint_loads_into_our_model(tmp_path, sp_model):
    """The import is a checkpoint our GPTModel loads; its logits are the HF model's."""
    from transformers import AutoModelForCausalLM

    from megatron_plugin.export.checkpoint import MegatronCheckpoint
    from megatron_plugin.export.from_hf import import_hf
    from megatron_plugin.export.session import megatron_session
    from megatron_plugin.export.verify import load_megatron_model, megatron_logits

    source = _hf_folder(tmp_path / "hf", sp_model, torch.float32, tied=False, kv_heads=1)
    iter_dir = import_hf(source, tmp_path / "run" / "checkpoints" / "iter_0000050")
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "iter_0000050"
    tokens = helpers.reference_tokens(VOCAB)
    with megatron_session():
        ours = megatron_logits(load_megatron_model(MegatronCheckpoint(iter_dir)), tokens, VOCAB)
    hf = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 32}, "head_dim"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}}, "rope_parameters"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"model_type": "mistral"}, "model_type"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ],
)
def test_unsupported_hf_models_are_refused_by_field(tmp_path, change, field):
    from megatron_plugin.export.from_hf import import_hf
    from megatron_plugin.export.hf_config import UnsupportedModelError

    folder = tmp_path / "hf"
    folder.mkdir()
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": 64,
        "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
    }
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run" / "checkpoints"
    with pytest.raises(UnsupportedModelError, match=field):
        import_hf(folder, out)
    assert not (out / "iter_0000000").exists()


def test_missing_or_extra_hf_tensors_are_refused(tmp_path, sp_model):
    from safetensors.torch import load_file, save_file

    from megatron_plugin.export.from_hf import import_hf
    from megatron_plugin.export.hf_config import UnsupportedModelError

    folder = _hf_folder(tmp_path / "hf", sp_model, torch.float32, tied=False)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="q_proj.bias"):
        import_hf(folder, tmp_path / "run" / "checkpoints")
    del tensors["model.layers.0.self_attn.q_proj.bias"], tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="up_proj"):
        import_hf(folder, tmp_path / "run" / "checkpoints")
    assert not (tmp_path / "run" / "checkpoints" / "iter_0000000").exists()


@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2), (8, 1)])
def test_qkv_and_fc1_layouts(heads, groups):
    from megatron_plugin.export import mapping

    shapes = mapping.Shapes(hidden_size=32, num_attention_heads=heads, num_query_groups=groups,
                            ffn_hidden_size=48, head_dim=4)
    d, qpg = 4, heads // groups
    # Build the fused tensor row by row from labelled heads: row value = tag of (kind, head, row).
    q = torch.arange(heads * d, dtype=torch.float32)[:, None].expand(-1, 32).clone()
    k = 1000 + torch.arange(groups * d, dtype=torch.float32)[:, None].expand(-1, 32).clone()
    v = 2000 + torch.arange(groups * d, dtype=torch.float32)[:, None].expand(-1, 32).clone()
    rows = []
    for g in range(groups):
        rows += [q[(g * qpg + i) * d:(g * qpg + i + 1) * d] for i in range(qpg)]
        rows += [k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
    fused = torch.cat(rows)
    q2, k2, v2 = mapping.split_qkv(fused, shapes)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)
    assert torch.equal(mapping.join_qkv(q, k, v, shapes), fused)
    gate, up = torch.randn(48, 32), torch.randn(48, 32)
    assert all(torch.equal(a, b) for a, b in zip(mapping.split_fc1(mapping.join_fc1(gate, up), shapes), (gate, up)))


def test_streaming_writer_matches_safetensors(tmp_path):
    from safetensors import safe_open

    from megatron_plugin.export.safetensors_writer import Entry, ShardedSafetensorsWriter

    tensors = {
        "a": torch.randn(10, 7),
        "b": torch.randn(3).to(torch.bfloat16),
        "c": torch.randn(50, 20).to(torch.float16),
        "d": torch.randn(4, 4),
    }
    entries = [Entry(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path, entries, max_shard_bytes=2000)
    for name in ("d", "c", "a", "b"):  # any order
        writer.write(name, tensors[name])
    files = writer.close()
    assert len(files) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    for name, tensor in tensors.items():
        with safe_open(str(tmp_path / index["weight_map"][name]), "pt") as handle:
            assert torch.equal(handle.get_tensor(name), tensor)


@pytest.mark.parametrize(
    "options",
    [
        {},  # SentencePiece defaults: NFKC, whitespace collapsed, dummy prefix
        {"normalization_rule_name": "identity", "remove_extra_whitespaces": False},  # Llama-style
        {"model_type": "unigram", "vocab_size": 340},
        {"add_dummy_prefix": False, "user_defined_symbols": ["<sep>"]},
    ],
)
def test_tokenizer_files_encode_like_sentencepiece(tmp_path, options):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from megatron_plugin.export.tokenizer import write_hf_tokenizer

    sp_path = helpers.train_sentencepiece(tmp_path / "sp", **{"vocab_size": 400, **options})
    write_hf_tokenizer(sp_path, tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    texts = helpers.SAMPLE_TEXT + ["a <sep> b", "  x  ", ""]
    if options.get("model_type") == "unigram":  # known gap: control-token strings typed in text
        texts = [text for text in texts if "</s>" not in text]
    for text in texts:
        assert tokenizer(text)["input_ids"] == sp.encode(text), text
