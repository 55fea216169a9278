"""The preprocessing job: exactness of the fast encoder, formats, bad input, shards, resume, CLI."""
from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np
import pytest
import sentencepiece as spm

from megatron_plugin.data import indexed as ix
from megatron_plugin.preprocess import PreprocessError, dataset_prefix, preprocess_files, train_tokenizer
from megatron_plugin.preprocess.encoder import WordCacheEncoder, plan_encoding, word_separators
from megatron_plugin.preprocess.tokenizer import describe
from megatron_plugin.preprocess.worker import ENCODE_ERRORS

WORDS = (
    "the of and to in is that for it as with was on be by this are from at an or have not which "
    "data model token train value error file line key cache merge shard index dataset writer reader "
    "function return class import python numpy tensor memory process worker encode decode byte"
).split()

ADVERSARIAL = [
    "",
    " ",
    "   \t\n  ",
    "plain ascii words here",
    "  leading and trailing spaces  ",
    "runs  of\t\tmixed \n\n whitespace\r\n here\u00a0nbsp\u3000ideographic\u2003em",
    "control\x00chars\x01and\x1cfile\x1dsep\x1e\x1f and \x0bvt \x0cff \x85nel\u2028ls\u2029ps",
    "\x1c\x1d\x1e\x1f",
    "full-width ＡＢＣ　ｄｅｆ １２３ and compatibility ﬁ ﬂ ① ㈱ ½ ™ Ⅻ",
    "combining e\u0301 a\u0308 \u0301leading n\u0303o\u0308 and spacing marks \u00a8x y\u00b4 \u02d8",
    "emoji 😀👍🏽 👨‍👩‍👧 flags 🇫🇷 and byte fallback 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃ ꙮ 𒀀",
    "zero width\u200bspace\u200cjoiner\u200dnon\ufeffbom \u200e\u200f marks",
    "▁already▁escaped ▁ ▁▁ meta \ufffd replacement",
    "中文没有空格 日本語のテキスト 한국어 텍스트 العربية עברית",
    "tabs\tonly\tseparated\tand\vvertical",
    "\n\nnewlines at start and end\n\n",
    "numbers 3.14159 1,000,000 0x1F and punctuation!!! ?? ... --- (a) [b] {c}",
]


def _text_corpus(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 60))]
        if i % 5 == 0:
            words.insert(rng.randrange(len(words)), rng.choice(ADVERSARIAL))
        docs.append(" ".join(words))
    return docs + ADVERSARIAL


def _train(path: Path, prefix: Path, vocab: int = 400, **extra) -> str:
    spm.SentencePieceTrainer.train(
        input=str(path), model_prefix=str(prefix), vocab_size=vocab, model_type="bpe",
        byte_fallback=True, minloglevel=2, num_threads=2, **extra,
    )
    return str(prefix) + ".model"


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("preprocess")


@pytest.fixture(scope="session")
def corpus(workdir):
    docs = _text_corpus(400)
    path = workdir / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    return path, docs


@pytest.fixture(scope="session")
def models(workdir, corpus):
    path, docs = corpus
    txt = workdir / "train.txt"
    txt.write_text("\n".join(d.replace("\n", " ") for d in docs if d.strip()), encoding="utf-8")
    return {
        "default": _train(txt, workdir / "m_default"),
        "no_dummy_prefix": _train(txt, workdir / "m_nodummy", add_dummy_prefix=False),
        "keep_whitespace": _train(txt, workdir / "m_keepws", remove_extra_whitespaces=False),
        "no_split": _train(txt, workdir / "m_nosplit", split_by_whitespace=False),
    }


def _plain_doc(sp, text, eod=None):
    ids = sp.encode(text)
    if ids and eod is not None:
        ids.append(eod)
    return ids


def _read_docs(prefix: str) -> list[list[int]]:
    arr = ix.read_index(prefix)
    return [ix.read_document(prefix, i, arr).tolist() for i in range(arr.header.documents)]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(*args, check=True, **kw):
    proc = subprocess.run([sys.executable, "-m", "megatron_plugin.preprocess", *map(str, args)],
                          capture_output=True, text=True, env=_env(), **kw)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


# ---------------------------------------------------------------------------------------------
# Exactness of the per-word encoder (item 4)


def test_per_word_path_decided_from_model_spec(models):
    assert plan_encoding(describe(models["default"]).spec).mode == "words"
    # Normalized by SentencePiece first, then cut into units (whitespace-kept shapes: see
    # test_preprocess_layout.py); pieces that span spaces leave only whole-document encoding.
    for name in ("no_dummy_prefix", "keep_whitespace"):
        assert plan_encoding(describe(models[name]).spec).mode == "normalized", name
    plan = plan_encoding(describe(models["no_split"]).spec)
    assert plan.mode == "plain" and "split_by_whitespace=false" in plan.why


CODE_LIKE_TEXTS = [
    "foo, (bar) x.y_z a1b2c3 C++ e.g. i.e., don't \"quoted\" [link](http://x.org/a?b=c&d=e) 3.14abc",
    "snake_case camelCase kebab-case ::scope-> <tag attr='v'/> #hash @at $var %pct ^up ~tilde `tick`",
    "émigré, naïve; Straße! 中文, word—dash …ellipsis “curly” ‘single’ ½a a½ ＡＢ, x\u0301, y",
]


@pytest.mark.parametrize("cache_words", [200_000, 3])
def test_word_cache_equals_plain_on_adversarial_text(models, corpus, cache_words):
    info = describe(models["default"])
    sp = spm.SentencePieceProcessor(model_file=info.path)
    enc = WordCacheEncoder(sp, np.uint16, word_separators(info.path, info.sha256, info.spec.normalization),
                           cache_words)
    texts = ADVERSARIAL + CODE_LIKE_TEXTS + corpus[1][:100] + [a + b for a in ADVERSARIAL for b in ADVERSARIAL[:6]]
    texts += [a + "," + b for a in CODE_LIKE_TEXTS for b in ADVERSARIAL]
    # One document at a time, and whole batches (where misses are found and encoded together).
    for text in texts:
        got = np.frombuffer(enc.encode(text), np.uint16).tolist()
        assert got == sp.encode(text), repr(text)
    for start in range(0, len(texts), 37):
        batch = texts[start : start + 37]
        for text, got in zip(batch, enc.encode_many(batch)):
            assert np.frombuffer(got, np.uint16).tolist() == sp.encode(text), repr(text)


@pytest.mark.parametrize("cache_words", [200_000, 3])
def test_failed_batch_leaves_no_unfilled_word_in_cache(models, cache_words):
    # A batch that cannot be encoded (a lone surrogate) must not leave the placeholders of its
    # new words behind: the same words in later documents would be written as no tokens at all.
    info = describe(models["default"])
    sp = spm.SentencePieceProcessor(model_file=info.path)
    enc = WordCacheEncoder(sp, np.uint16, word_separators(info.path, info.sha256, info.spec.normalization),
                           cache_words)
    good = ["zebra quokka axolotl", "quokka narwhal zebra okapi", "axolotl okapi"]
    with pytest.raises(ENCODE_ERRORS):
        enc.encode_many(good + ["narwhal \ud800 quokka"])
    for text, got in zip(good, enc.encode_many(good)):
        assert np.frombuffer(got, np.uint16).tolist() == sp.encode(text), text
    assert not enc.cache.pending_words and not any(isinstance(v, bytearray) for v in enc.cache.values())
    # The failed batch's look-ups are not counted: the manifest's hit rate counts each word once.
    assert enc.lookups == sum(len(t.split()) for t in good)


def test_separators_differ_from_python_whitespace(models):
    info = describe(models["default"])
    seps = word_separators(info.path, info.sha256, info.spec.normalization)
    assert " " in seps and "\t" in seps and "\u00a0" in seps and "\u3000" in seps
    assert "\x1c" not in seps and "\x85" not in seps  # str.split() splits there, SentencePiece does not


def test_separators_kept_on_disk_per_model(tmp_path, models, monkeypatch):
    from megatron_plugin.preprocess import encoder as enc_mod

    info = describe(models["default"])
    fresh = word_separators(info.path, info.sha256, info.spec.normalization)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    enc_mod._separators_cached.cache_clear()
    assert word_separators(info.path, info.sha256, info.spec.normalization) == fresh
    files = list((tmp_path / "megatron_plugin").glob(f"separators-{info.sha256}-*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["separators"] == [ord(c) for c in fresh]
    # A damaged file is probed again and rewritten, never trusted.
    files[0].write_text('{"separators": [32, ')
    enc_mod._separators_cached.cache_clear()
    assert word_separators(info.path, info.sha256, info.spec.normalization) == fresh
    assert json.loads(files[0].read_text())["separators"] == [ord(c) for c in fresh]
    enc_mod._separators_cached.cache_clear()


@pytest.mark.parametrize("name", ["default", "no_dummy_prefix", "keep_whitespace", "no_split"])
def test_output_equals_plain_encoding_for_every_model(tmp_path, models, corpus, name):
    path, docs = corpus
    sp = spm.SentencePieceProcessor(model_file=models[name])
    res = preprocess_files([path], tmp_path / "out", models[name], append_eod=True, workers=2, verify=50)
    got = _read_docs(res.prefix)
    assert got == [_plain_doc(sp, d, sp.eos_id()) for d in docs]
    enc = res.manifests["text"]["encoder"]
    assert enc["mode"] == {"default": "per-word cache", "no_split": "plain"}.get(name, "per-word cache, normalized first")
    assert enc["verified_documents"] >= 45


def test_verify_catches_a_wrong_encoder(tmp_path, models, corpus, monkeypatch):
    from megatron_plugin.preprocess import encoder as enc_mod

    real = enc_mod.WordCacheEncoder.encode_many

    def broken(self, texts):
        return [out[:-2] if len(out) > 4 else out for out in real(self, texts)]

    monkeypatch.setattr(enc_mod.WordCacheEncoder, "encode_many", broken)
    with pytest.raises(PreprocessError, match="--verify found a difference"):
        preprocess_files([corpus[0]], tmp_path / "out", models["default"], workers=1, verify=1000)
    assert not list(tmp_path.glob("out*.bin")) and not list(tmp_path.glob("out*.idx"))


# ---------------------------------------------------------------------------------------------
# Formats, round trip, readers (items 1, 3)


def test_round_trip_and_megatron_readers(tmp_path, models):
    rng = random.Random(3)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(120)]
    path = tmp_path / "rt.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    res = preprocess_files([path], tmp_path / "rt", models["default"], append_eod=True, workers=2)
    sp = spm.SentencePieceProcessor(model_file=models["default"])
    written = _read_docs(res.prefix)
    assert [sp.decode(ids[:-1]) for ids in written] == docs
    assert all(ids[-1] == sp.eos_id() for ids in written)
    assert res.manifests["text"]["tokens"] == sum(map(len, written)) == res.tokens

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(res.prefix)
    assert len(ds) == len(docs) and ds[5].tolist() == written[5]
    _check_gpt_dataset(res.prefix, models["default"], tmp_path)


def _check_gpt_dataset(prefix, model, tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    try:
        from megatron.core.tokenizers import MegatronTokenizer

        tok = MegatronTokenizer.from_pretrained(tokenizer_path=model, metadata_path={"library": "sentencepiece"})
    except Exception as exc:  # pragma: no cover - depends on the installed megatron-core
        pytest.skip(f"no Megatron-Core SentencePiece tokenizer: {exc}")
    cfg = GPTDatasetConfig(
        random_seed=1, sequence_length=32, blend=([prefix], None), split="100,0,0", tokenizer=tok,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, path_to_cache=str(tmp_path / "cache"),
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [20, None, None], lambda: True, cfg).build()
    sample = train[0]
    assert sample["tokens"].shape[0] == 32


def test_input_formats_give_the_same_dataset(tmp_path, models, corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    path, docs = corpus
    raw = path.read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"text": docs}), tmp_path / "c.parquet", row_group_size=64)
    ref = preprocess_files([path], tmp_path / "ref", models["default"], workers=2, chunk_bytes=4096)
    ref_bytes = Path(ref.prefix + ".bin").read_bytes()
    for name, inp in [("gz", tmp_path / "in"), ("zst", tmp_path / "b.jsonl.zst"), ("pq", tmp_path / "c.parquet"),
                      ("glob", str(tmp_path / "in" / "*.gz"))]:
        res = preprocess_files([inp], tmp_path / name, models["default"], workers=2, chunk_bytes=4096)
        assert Path(res.prefix + ".bin").read_bytes() == ref_bytes, name
        assert Path(res.prefix + ".idx").read_bytes() == Path(ref.prefix + ".idx").read_bytes(), name


def test_text_input_units(tmp_path, models):
    sp = spm.SentencePieceProcessor(model_file=models["default"])
    txt = tmp_path / "a.txt"
    txt.write_text("first line\nsecond line\n\n\nthird para\nstill third\n")
    res = preprocess_files([txt], tmp_path / "l", models["default"], workers=1)
    assert [sp.decode(d[:-1]) for d in _read_docs(res.prefix)] == ["first line", "second line", "third para", "still third"]
    res = preprocess_files([txt], tmp_path / "p", models["default"], workers=1, text_unit="paragraph")
    assert len(_read_docs(res.prefix)) == 2
    res = preprocess_files([txt], tmp_path / "f", models["default"], workers=1, text_unit="file")
    assert len(_read_docs(res.prefix)) == 1


def test_multiple_json_keys(tmp_path, models):
    path = tmp_path / "k.jsonl"
    path.write_text('{"title": "a title", "text": "the body"}\n{"title": "t2", "text": "b2"}\n')
    res = preprocess_files([path], tmp_path / "k", models["default"], json_keys=("text", "title"), workers=1)
    assert set(res.prefixes) == {"text", "title"}
    assert res.prefixes["title"].endswith("k_title_document")
    assert len(_read_docs(res.prefixes["title"])) == 2


# ---------------------------------------------------------------------------------------------
# Bad input (item 7)

BAD_CASES = [
    ("malformed_json", b'{"text": "ok"}\n{"text": "broken"\n{"text": "ok"}\n', 2, "malformed JSON"),
    ("missing_key", b'{"text": "ok"}\n{"body": "x"}\n', 2, "missing key 'text'"),
    ("non_string", b'{"text": "ok"}\n{"text": "ok"}\n{"text": 42}\n', 3, "holds a int, not a string"),
    ("invalid_utf8", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, "invalid UTF-8"),
    # A lone surrogate escape parses as JSON but cannot be encoded; its chunk-mates still are.
    ("invalid_utf8", b'{"text": "ok words"}\n{"text": "more words"}\n{"text": "bad \\ud800 x"}\n{"text": "end"}\n',
     3, "not valid Unicode"),
]


@pytest.mark.parametrize("reason,data,line,msg", BAD_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CASES)])
def test_bad_input_stops_with_file_and_line(tmp_path, models, reason, data, line, msg):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(data)
    proc = _cli("--input", path, "--output-prefix", tmp_path / "o", "--tokenizer-model", models["default"],
                "--append-eod", "--workers", "1", check=False)
    assert proc.returncode == 2
    assert f"{path}:{line}:" in proc.stderr and msg in proc.stderr and f"[{reason}]" in proc.stderr
    assert "--on-error skip" in proc.stderr
    assert not list(tmp_path.glob("o_*"))  # nothing under a final name, no temporary left

    res = preprocess_files([path], tmp_path / "s", models["default"], on_error="skip", workers=1)
    docs = res.manifests["text"]["documents"]
    assert docs["skipped"] == {reason: 1}
    assert docs["written"] == data.count(b"\n") - 1


def test_empty_documents(tmp_path, models):
    path = tmp_path / "e.jsonl"
    path.write_text('{"text": "a b"}\n{"text": ""}\n{"text": "  \\n "}\n{"text": "c"}\n')
    keep = preprocess_files([path], tmp_path / "k", models["default"], workers=1)
    assert keep.manifests["text"]["documents"]["empty"] == 2
    assert [len(d) for d in _read_docs(keep.prefix)][1:3] == [0, 0]
    skip = preprocess_files([path], tmp_path / "s", models["default"], workers=1, empty_documents="skip", on_error="skip")
    assert skip.manifests["text"]["documents"]["skipped"] == {"empty_document": 2}
    with pytest.raises(PreprocessError, match=r"e.jsonl:2: empty document"):
        preprocess_files([path], tmp_path / "x", models["default"], workers=1, empty_documents="error")


def test_unreadable_file(tmp_path, models, corpus):
    bad = tmp_path / "broken.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"text": "x"}\n' * 1000)[:60])  # truncated stream
    with pytest.raises(PreprocessError, match=r"broken.jsonl.gz: cannot read the file.*\[unreadable_file\]"):
        preprocess_files([bad], tmp_path / "o", models["default"], workers=1)
    assert not list(tmp_path.glob("o_*"))
    res = preprocess_files([corpus[0], bad], tmp_path / "s", models["default"], workers=1, on_error="skip")
    assert res.manifests["text"]["documents"]["skipped"] == {"unreadable_file": 1}


def test_missing_eod_is_a_clear_error(tmp_path, corpus, workdir):
    txt = workdir / "train.txt"
    model = _train(txt, tmp_path / "noeos", eos_id=-1)
    with pytest.raises(PreprocessError, match="no eos piece"):
        preprocess_files([corpus[0]], tmp_path / "o", model, append_eod=True, workers=1)


# ---------------------------------------------------------------------------------------------
# Shards, merge, resume (item 5)


def _split_corpus(tmp_path, corpus, n):
    lines = corpus[0].read_text(encoding="utf-8").splitlines(keepends=True)
    d = tmp_path / "parts"
    d.mkdir()
    step = (len(lines) + n - 1) // n
    for i in range(n):
        (d / f"part{i:02d}.jsonl").write_text("".join(lines[i * step:(i + 1) * step]), encoding="utf-8")
    return d


def test_shards_then_merge_equal_single_run(tmp_path, models, corpus):
    d = _split_corpus(tmp_path, corpus, 5)
    single = preprocess_files([d], tmp_path / "single", models["default"], workers=2)
    for i in range(3):
        _cli("--input", d, "--output-prefix", tmp_path / "sh", "--tokenizer-model", models["default"],
             "--append-eod", "--num-shards", 3, "--shard-index", i, "--workers", 1, "--no-progress")
    shards = sorted(str(p)[:-4] for p in tmp_path.glob("sh_text_document-shard-*.idx"))
    assert len(shards) == 3
    _cli("merge", "--output-prefix", tmp_path / "merged", *shards)
    for ext in (".bin", ".idx"):
        assert Path(str(tmp_path / "merged") + ext).read_bytes() == Path(single.prefix + ext).read_bytes()
    m = json.loads(Path(str(tmp_path / "merged") + ".json").read_text())
    assert m["tokens"] == single.tokens

    local = preprocess_files([d], tmp_path / "local", models["default"], workers=2, num_shards=3)
    assert Path(local.prefix + ".bin").read_bytes() == Path(single.prefix + ".bin").read_bytes()


def test_rerun_skips_complete_output(tmp_path, models, corpus):
    first = preprocess_files([corpus[0]], tmp_path / "r", models["default"], workers=1)
    again = preprocess_files([corpus[0]], tmp_path / "r", models["default"], workers=1)
    assert again.skipped_existing and again.tokens == first.tokens
    Path(first.prefix + ".bin").write_bytes(b"\0" * 10)  # damaged: redone, not trusted
    fixed = preprocess_files([corpus[0]], tmp_path / "r", models["default"], workers=1)
    assert not fixed.skipped_existing
    assert ix.check_dataset(fixed.prefix)


def test_resume_after_killed_run(tmp_path, models, corpus):
    big = tmp_path / "big.jsonl"
    rng = random.Random(5)
    with open(big, "w") as f:
        for _ in range(30000):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) + str(rng.randint(0, 99999)) for _ in range(40))}) + "\n")
    args = ["--input", big, "--output-prefix", tmp_path / "k", "--tokenizer-model", models["default"],
            "--append-eod", "--workers", 1, "--encoder", "plain", "--no-progress", "--num-shards", 4]
    proc = subprocess.Popen([sys.executable, "-m", "megatron_plugin.preprocess", *map(str, args)],
                            env=_env(), stderr=subprocess.PIPE, text=True)
    first_shard = Path(dataset_prefix(str(tmp_path / "k"), "text", 4, 0) + ".json")
    deadline = time.time() + 120
    while not first_shard.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # killed once the first shard is complete, mid-way through the rest
    proc.wait()
    assert first_shard.exists()
    assert not Path(str(tmp_path / "k_text_document") + ".bin").exists() or proc.returncode == 0
    rerun = _cli(*args)
    assert "shard 0/4: already complete and verified, skipping" in rerun.stderr
    ref = preprocess_files([big], tmp_path / "ref", models["default"], workers=2)
    assert Path(str(tmp_path / "k_text_document") + ".bin").read_bytes() == Path(ref.prefix + ".bin").read_bytes()
    assert Path(str(tmp_path / "k_text_document") + ".idx").read_bytes() == Path(ref.prefix + ".idx").read_bytes()


# ---------------------------------------------------------------------------------------------
# Tokenizer training, API, inspect (items 2, 6, 9)


def test_train_tokenizer_and_pipeline_api(tmp_path, corpus):
    res = preprocess_files([corpus[0]], tmp_path / "t", train_tokenizer=True, vocab_size=400, workers=2)
    model = Path(str(tmp_path / "t") + ".model")
    assert model.exists() and res.tokenizer_model == str(model)
    m = res.manifests["text"]
    assert m["tokenizer"]["vocab_size"] == 400 and m["tokenizer"]["sha256"]
    assert m["tokens"] > 0 and m["documents"]["written"] == len(corpus[1])
    assert set(m) >= {"inputs", "options", "versions", "duration_s", "throughput", "tokens"}
    # a second run reuses the trained model
    again = preprocess_files([corpus[0]], tmp_path / "t", train_tokenizer=True, vocab_size=400, workers=2)
    assert again.skipped_existing

    path = train_tokenizer([corpus[0]], str(tmp_path / "api"), vocab_size=420, sample_lines=300)
    assert spm.SentencePieceProcessor(model_file=path).get_piece_size() == 420


def test_cli_megatron_flags_and_inspect(tmp_path, models, corpus):
    out = tmp_path / "cli"
    proc = _cli("--input", corpus[0], "--output-prefix", out, "--tokenizer-model", models["default"],
                "--append-eod", "--workers", 2, "--tokenizer-type", "GPTSentencePieceTokenizer")
    assert "tokens" in proc.stderr and "no --append-eod" not in proc.stderr
    without_eod = _cli("--input", corpus[0], "--output-prefix", tmp_path / "no_eod", "--tokenizer-model",
                       models["default"], "--workers", 1)
    assert "warning: no --append-eod" in without_eod.stderr
    prefix = str(out) + "_text_document"
    assert Path(prefix + ".bin").exists() and Path(prefix + ".idx").exists() and Path(prefix + ".json").exists()
    insp = _cli("inspect", prefix, "--show", 2).stdout
    assert "dtype     uint16" in insp and "[doc 1]" in insp and "median" in insp
