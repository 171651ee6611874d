"""Text handling of the data layer: cleaning, sources, deduplication, the split by document and the
n-gram overlap check."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from peer_sweeps.data import DataError, HFDataset, LocalFiles
from peer_sweeps.data.corpora import _scenes
from peer_sweeps.data.overlap import NgramIndex, dedupe, drop_overlapping, split_by_document
from peer_sweeps.data.sources import clean_text, passages

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def test_clean_text_normalises_newlines_and_blank_lines():
    assert clean_text("\ufeff  a  \r\nb\t\n\n\n\n\nc\n  ") == "a\nb\n\nc"


def test_passages_cut_at_paragraphs_and_keep_all_text():
    text = "\n\n".join(f"paragraph {i} " + "x" * 30 for i in range(10))
    parts = passages(text, min_chars=100)
    assert len(parts) == 4
    assert "\n\n".join(parts) == text


def test_scenes_join_bare_headings_to_the_next_scene():
    play = "# Title\n\n## ACT I\n\n### SCENE I. Here.\n\n**A**  \n" + "x" * 400 + "\n\n### SCENE II. There.\n\n_Enter B_\n" + "y" * 400
    scenes = _scenes(play)
    assert len(scenes) == 2
    assert scenes[0].startswith("Title\n\nACT I\n\nSCENE I. Here.") and "**" not in scenes[0]
    assert scenes[1].startswith("SCENE II. There.\n\nEnter B\n")


def test_local_files_read_text_jsonl_and_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n\ntwo\n\n\n  \n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "three"}) + "\n" + json.dumps({"text": "four"}) + "\n")
    pq.write_table(pa.table({"body": ["five", "six"]}), tmp_path / "c.parquet")
    assert LocalFiles("t", (str(tmp_path / "a.txt"),), separator="\n\n\n").documents(tmp_path) == ["one", "two"]
    assert LocalFiles("t", (str(tmp_path / "a.txt"),)).documents(tmp_path) == ["one\n\ntwo"]
    assert LocalFiles("j", (str(tmp_path / "b.jsonl"),)).documents(tmp_path) == ["three", "four"]
    assert LocalFiles("p", (str(tmp_path / "c.parquet"),), field="body").documents(tmp_path) == ["five", "six"]
    with pytest.raises(DataError, match="no column 'text'"):
        LocalFiles("p", (str(tmp_path / "c.parquet"),)).documents(tmp_path)
    with pytest.raises(DataError, match="not found"):
        LocalFiles("m", (str(tmp_path / "missing.txt"),)).documents(tmp_path)


def test_hf_dataset_reads_local_data_files(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # not ~/.cache
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(5)))
    source = HFDataset("hf", "json", data_files=(str(path),), max_documents=3)
    assert source.documents(tmp_path / "cache") == ["row 0", "row 1", "row 2"]


def test_hf_dataset_without_datasets_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(DataError, match="needs the `datasets` package"):
        HFDataset("hf", "json").documents(tmp_path)


def test_dedupe_ignores_case_and_whitespace_and_remembers_across_calls():
    seen: set[str] = set()
    kept, dropped = dedupe(["A b", "a  B", "c"], seen)
    assert (kept, dropped) == (["A b", "c"], 1)
    assert dedupe(["C", "d"], seen) == (["d"], 1)


def test_split_by_document_is_disjoint_complete_and_order_independent():
    docs = [f"document {i} " + " ".join(WORDS[: i % 20]) for i in range(40)]
    train, held = split_by_document(docs, 0.1)
    assert len(held) == 4 and len(train) == 36
    assert sorted(train + held) == sorted(docs)
    assert not set(train) & set(held)
    train_r, held_r = split_by_document(list(reversed(docs)), 0.1)
    assert sorted(held_r) == sorted(held) and sorted(train_r) == sorted(train)


def test_split_by_document_holds_out_at_least_one_and_keeps_one():
    assert [len(x) for x in split_by_document(["a", "b"], 0.01)] == [1, 1]
    assert split_by_document(["only"], 0.5) == (["only"], [])


def test_ngram_overlap_finds_a_shared_13_gram_regardless_of_case_and_punctuation():
    training = ["Some preamble. " + " ".join(WORDS[:20]) + " and more."]
    index = NgramIndex(training, n=13)
    shared = ", ".join(WORDS[3:16]).upper()  # 13 words, other punctuation and case
    assert index.overlaps(f"An evaluation text quoting {shared} in passing.")
    assert not index.overlaps(" ".join(WORDS[3:15]))  # 12 words only
    assert not index.overlaps(" ".join(reversed(WORDS)))
    kept, dropped = drop_overlapping(["fresh text", " ".join(WORDS[5:19]), "short"], index)
    assert (kept, dropped) == (["fresh text", "short"], 1)
