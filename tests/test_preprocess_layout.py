"""Exact per-word encoding for every SentencePiece model shape, whitespace-preserving ones included,
and the default tokenizer that keeps a text's layout."""
from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import sentencepiece as spm

from megatron_plugin.data import indexed as ix
from megatron_plugin.preprocess import preprocess_files, train_tokenizer
from megatron_plugin.preprocess.encoder import make_encoder, plan_encoding, word_separators
from megatron_plugin.preprocess.tokenizer import describe
from megatron_plugin.preprocess.worker import ENCODE_ERRORS

# Llama 2's published trainer settings, written out here rather than taken from the package.
LLAMA2 = dict(
    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
    split_digits=True, byte_fallback=True, allow_whitespace_only_pieces=True,
    split_by_unicode_script=True, split_by_number=True, max_sentencepiece_length=16,
)
SHAPES = {
    # name: (trainer settings, encoder plan expected)
    "llama2": (LLAMA2, "layout"),
    "llama2_no_ws_pieces": ({**LLAMA2, "allow_whitespace_only_pieces": False}, "layout"),
    "llama2_no_byte_fallback": ({**LLAMA2, "byte_fallback": False}, "layout"),
    "nmt_nfkc_default": ({"byte_fallback": True}, "words"),
    "nmt_nfkc_keep_ws": ({"byte_fallback": True, "remove_extra_whitespaces": False,
                          "allow_whitespace_only_pieces": True}, "normalized"),
    "nmt_nfkc_no_dummy": ({"byte_fallback": True, "add_dummy_prefix": False}, "normalized"),
    "unigram": ({"model_type": "unigram", "byte_fallback": True}, "plain"),
}

CODE = [
    "def encode(self, text):\n    if not text:\n        return []\n    return self.sp.encode(text)\n",
    "class Writer:\n\tdef close(self):\n\t\tself.f.close()  # done\n",
    "<div class=\"x\">\n  <p>Hello,   world!</p>\n</div>\r\n",
    "user: how do I list files?\nassistant: Use `ls -la`:\n\n    $ ls -la /tmp\n",
    "| col a | col  b |\n|-------|--------|\n|   1   |   22   |\n",
]
PROSE = (
    "the of and to in is that for it as with was on be by this are from at an or have not which "
    "data model token train value error file line key cache merge shard index dataset writer"
).split()

ADVERSARIAL = (
    ["", " ", "\n", "\t", "\r", "\r\n", "   \t\n  ", " \n \n ", "\u00a0", "\u3000", "\u2581", "\u2581\u2581 x"]
    + [" " * k + "x" + " " * k + "y" + " " * k for k in range(1, 10)]
    + ["a" + " " * k + "b" for k in range(1, 10)]
    + [
        "  leading and trailing spaces  ",
        "tabs\tin\t\tthe\t middle \t",
        "windows\r\nline\r\nends\r\n\r\n",
        "lone\rcarriage\r returns\r",
        "no\u00a0break\u00a0spaces and\u3000ideographic\u3000space",
        "zero\u200bwidth\u200cnon\u200djoiner \u200d\u200d",
        "combining e\u0301 a\u0308 \u0301leading n\u0303o\u0308  \u0301 after spaces",
        "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 keycap 1️⃣ rainbow 🏳️‍🌈",
        "中文没有空格日本語のテキストと한국어텍스트",
        "digits 12345678901234567890 3.14159 1,000,000 0x1F2E v2.0.1",
        "byte fallback 𒀀𒀁 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ \x00\x01\x7f \ufffd",
        "full-width ＡＢＣ　ｄｅｆ １２３ compatibility ﬁ ① ½ ™ ¨x",
        "already\u2581escaped \u2581 meta\u2581\u2581symbols",
        "x" * 3000,
        "supercalifragilisticexpialidocious" * 40 + " end",
        " " * 200,
        "\n" * 50,
        " \t \n \r \u00a0 \u3000 ",
    ]
    + CODE
)


def _training_lines(rng: random.Random) -> list[str]:
    lines = []
    for _ in range(600):
        lines.append(" ".join(rng.choice(PROSE) for _ in range(rng.randint(4, 20))))
    for _ in range(40):
        for doc in CODE:
            lines.extend(doc.split("\n"))
    for text in ADVERSARIAL:
        lines.extend(text.split("\n"))
    return [line for line in lines if line.strip()]


@pytest.fixture(scope="module")
def shape_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    txt = root / "train.txt"
    txt.write_text("\n".join(_training_lines(random.Random(0))), encoding="utf-8")
    models = {}
    for name, (settings, _) in SHAPES.items():
        opts = {"model_type": "bpe", **settings}
        spm.SentencePieceTrainer.train(input=str(txt), model_prefix=str(root / name), vocab_size=600, hard_vocab_limit=False,
                                       minloglevel=2, num_threads=2, **opts)
        models[name] = str(root / name) + ".model"
    return models


def _encoder(model: str, cache_words: int):
    info = describe(model)
    plan = plan_encoding(info.spec)
    assert plan.per_word
    if plan.mode == "words":
        plan = replace(plan, separators=word_separators(info.path, info.sha256, info.spec.normalization))
    sp = spm.SentencePieceProcessor(model_file=model)
    return sp, make_encoder(sp, np.uint16, plan, model, cache_words)


def _texts() -> list[str]:
    rng = random.Random(1)
    texts = list(ADVERSARIAL)
    texts += [a + b for a in ADVERSARIAL[:40] for b in ADVERSARIAL[:40:3]]
    # Random mixtures: the cuts fall everywhere, including between two kinds of whitespace.
    pool = ADVERSARIAL + PROSE
    for _ in range(300):
        texts.append("".join(rng.choice(pool) + rng.choice(["", " ", "  ", "\n", "\t", "\r\n", "   "])
                             for _ in range(rng.randint(1, 12))))
    return texts


@pytest.mark.parametrize("name", list(SHAPES))
def test_plan_follows_the_model(shape_models, name):
    plan = plan_encoding(describe(shape_models[name]).spec)
    assert plan.mode == SHAPES[name][1], plan
    assert plan.why
    if name == "llama2":
        # Trained on lines, no piece holds a newline: it is cut out of words.
        assert "\n" in plan.isolated
    if name == "unigram":
        assert "UNIGRAM" in plan.why


@pytest.mark.parametrize("cache_words", [200_000, 3])
@pytest.mark.parametrize("name", [n for n, (_, mode) in SHAPES.items() if mode != "plain"])
def test_per_word_equals_sentencepiece_on_adversarial_text(shape_models, name, cache_words):
    sp, enc = _encoder(shape_models[name], cache_words)
    texts = _texts()
    for text in texts:
        got = np.frombuffer(enc.encode(text), np.uint16).tolist()
        assert got == sp.encode(text), (name, repr(text))
    for start in range(0, len(texts), 41):
        batch = texts[start : start + 41]
        for text, got in zip(batch, enc.encode_many(batch)):
            assert np.frombuffer(got, np.uint16).tolist() == sp.encode(text), (name, repr(text))
    assert enc.misses > 0 and enc.lookups > enc.misses


@pytest.mark.parametrize("name", ["llama2", "nmt_nfkc_keep_ws"])
def test_failed_batch_leaves_no_unfilled_unit(shape_models, name):
    sp, enc = _encoder(shape_models[name], 200_000)
    good = ["zebra  quokka\naxolotl", "  quokka narwhal\n\tzebra okapi"]
    with pytest.raises(ENCODE_ERRORS):
        enc.encode_many(good + ["narwhal \ud800 quokka"])
    for text, got in zip(good, enc.encode_many(good)):
        assert np.frombuffer(got, np.uint16).tolist() == sp.encode(text), text
    assert not any(isinstance(v, bytearray) for v in enc.cache.values())


def _read_docs(prefix: str) -> list[list[int]]:
    arr = ix.read_index(prefix)
    return [ix.read_document(prefix, i, arr).tolist() for i in range(arr.header.documents)]


@pytest.mark.parametrize("name", list(SHAPES))
def test_pipeline_output_and_manifest_for_every_shape(tmp_path, shape_models, name):
    docs = _texts()[:400]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    sp = spm.SentencePieceProcessor(model_file=shape_models[name])
    res = preprocess_files([path], tmp_path / "o", shape_models[name], append_eod=True, workers=2,
                           verify=60, chunk_bytes=8192)
    want = [ids + [sp.eos_id()] if ids else ids for ids in (sp.encode(d) for d in docs)]
    assert _read_docs(res.prefix) == want
    enc = res.manifests["text"]["encoder"]
    assert enc["mode"] == {"layout": "per-word cache, whitespace kept", "words": "per-word cache",
                           "normalized": "per-word cache, normalized first", "plain": "plain"}[SHAPES[name][1]]
    assert enc["why"] and enc["verified_documents"] >= 55


# ---------------------------------------------------------------------------------------------
# The default tokenizer keeps layout

LAYOUT_DOCS = [
    "def f(x):\n    if x:\n        return  x * 2\n    return None\n",
    "Dear team,\n\n  the build is   green.\n\nThanks,\n\tA.\n",
    "user: hi\nassistant: hello!\n\nuser:   two  spaces\n",
    "    four leading spaces and two trailing  ",
    "a\r\nwindows\r\nfile\r\n",
]


@pytest.fixture(scope="module")
def layout_corpus(tmp_path_factory):
    rng = random.Random(2)
    root = tmp_path_factory.mktemp("layout")
    docs = []
    for i in range(300):
        docs.append(LAYOUT_DOCS[i % len(LAYOUT_DOCS)].replace("x", rng.choice(PROSE)))
        docs.append(" ".join(rng.choice(PROSE) for _ in range(rng.randint(5, 30))))
    path = root / "layout.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return root, path, docs


def test_default_tokenizer_round_trips_layout(layout_corpus):
    root, path, docs = layout_corpus
    model = train_tokenizer([path], str(root / "tok"), vocab_size=500)
    spec = describe(model).spec
    assert spec.normalization == "identity" and not spec.remove_extra_whitespaces and spec.add_dummy_prefix
    assert spec.allow_whitespace_only_pieces and spec.byte_fallback
    sp = spm.SentencePieceProcessor(model_file=model)
    unseen = ["  new\n\n\tindented\n      deeper   spaces\r\n", "x\ny", "tail  \n  ", "\n\n\n", "a     b"]
    for text in LAYOUT_DOCS + unseen + docs[:50]:
        assert sp.decode(sp.encode(text)) == text, repr(text)
    # Indentation was learned as pieces, not spelled out one space at a time.
    assert any(set(p) == {"\u2581"} and len(p) >= 4 for p in spec.pieces)
    assert plan_encoding(spec).mode == "layout"


def test_nmt_nfkc_is_one_option_away_and_collapses_whitespace(layout_corpus, tmp_path):
    root, path, docs = layout_corpus
    model = train_tokenizer([path], str(tmp_path / "nfkc"), vocab_size=500, normalization="nmt_nfkc")
    spec = describe(model).spec
    assert spec.normalization == "nmt_nfkc" and spec.remove_extra_whitespaces
    sp = spm.SentencePieceProcessor(model_file=model)
    assert sp.decode(sp.encode("a\n    b  c")) == "a b c"
    assert plan_encoding(spec).mode == "words"


def test_cli_trains_layout_tokenizer_by_default(tmp_path, layout_corpus):
    import subprocess
    import sys

    _, path, _ = layout_corpus
    for norm, expect in (([], "identity"), (["--normalization", "nmt_nfkc"], "nmt_nfkc")):
        prefix = tmp_path / expect
        proc = subprocess.run([sys.executable, "-m", "megatron_plugin.preprocess", "--input", str(path),
                               "--output-prefix", str(prefix), "--train-tokenizer", "--vocab-size", "400",
                               "--append-eod", "--workers", "2", "--no-progress", "--verify", "50", *norm],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        m = json.loads((tmp_path / f"{expect}_text_document.json").read_text())
        assert m["tokenizer"]["normalization"] == expect
        assert m["encoder"]["mode"] == ("per-word cache, whitespace kept" if expect == "identity" else "per-word cache")
        assert m["encoder"]["verified_documents"] >= 45
