"""The C4 suite's path through Hugging Face `datasets`, without a hub, through `peer-sweeps data prepare`.

The C4 suite's own sources (`peer_sweeps.data.suites.C4`: C4 train and validation streamed, WikiText re-cut
into passages, LAMBADA), each pointed at a local dataset directory instead of the hub (parquet files written
by `datasets.Dataset.from_dict(...).to_parquet(...)`, the splits named by the files), keep everything else
of C4's definition. `peer-sweeps data prepare --study` then runs the code `data.suite: c4` runs:
`datasets.load_dataset(path, split=..., streaming=True)`, the validation split taken from its own source
rather than held out of training, the overlap check, the tokenizer, the token arrays.
"""

from __future__ import annotations

import dataclasses
import json

import datasets
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from peer_sweeps.data import SUITES, DataError, load_suite
from peer_sweeps.data.sources import clean_text, passages
from peer_sweeps.data.suites import C4, FIXTURES

VOCAB = 512


def write_local_dataset(directory, splits: dict[str, list[str]]) -> str:
    """A dataset directory the way the hub lays one out: one parquet file per split, a `text` column."""
    directory.mkdir()
    for split, rows in splits.items():
        datasets.Dataset.from_dict({"text": rows}).to_parquet(str(directory / f"{split}.parquet"))
    return str(directory)


def on_disk(source, path: str):
    """`source` (a C4 suite source) reading the local dataset at `path`: no hub, no config name."""
    return dataclasses.replace(source, path=path, config=None)


def decoded_documents(data, tokens) -> list[str]:
    ids = np.asarray(tokens).tolist() + [data.eot_id]
    tok = data.tokenizer()
    docs, start = [], 1
    for i, token in enumerate(ids[1:], 1):
        if token == data.eot_id:
            docs.append(tok.decode(ids[start:i]))
            start = i + 1
    return docs


def test_c4_suite_sources_prepare_from_local_datasets(tmp_path, monkeypatch):
    training = [json.loads(line)["text"] for line in (FIXTURES / "train.jsonl").read_text().splitlines()]
    c4_train, c4_validation = training[:8], training[8:]
    wikitext_rows = (FIXTURES / "verse.txt").read_text().splitlines(keepends=True)  # one line a row, as WikiText
    lambada = [json.loads(line)["text"] for line in (FIXTURES / "prose.jsonl").read_text().splitlines()]

    c4 = write_local_dataset(tmp_path / "c4", {"train": c4_train, "validation": c4_validation})
    wikitext = write_local_dataset(tmp_path / "wikitext", {"test": wikitext_rows})
    lambada_path = write_local_dataset(tmp_path / "lambada", {"test": lambada})
    (train,), (validation,) = C4.sources(C4.train), C4.sources(C4.validation)
    (wiki,), (lamb,) = C4.sources(C4.eval_sets["wikitext103"]), C4.sources(C4.eval_sets["lambada"])
    assert train.streaming and validation.streaming and wiki.passages  # what the local copies must exercise
    local = dataclasses.replace(
        C4, name="c4_local", train=(on_disk(train, c4),), validation=(on_disk(validation, c4),),
        eval_sets={"wikitext103": (on_disk(wiki, wikitext),), "lambada": (on_disk(lamb, lambada_path),)})
    monkeypatch.setitem(SUITES, "c4_local", local)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # not ~/.cache

    root = tmp_path / "data"
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "name": "c4-local", "data": {"suite": "c4_local", "vocab_size": VOCAB, "root": str(root)},
        "methods": {"dense": {}},
        "design": {"kind": "isoflop", "budgets": [1.0e9], "sizes": [{"d_model": 16, "n_layers": 1}]},
    }))
    from peer_sweeps.cli import app

    result = CliRunner().invoke(app, ["data", "prepare", "--study", str(study)], prog_name="peer-sweeps")
    assert result.exit_code == 0, result.output
    assert "validation (primary)" in result.stdout and "wikitext103" in result.stdout

    data = load_suite("c4_local", root, VOCAB)
    assert list(data.eval_sets) == ["validation", "wikitext103", "lambada"]
    assert {s.kind for s in data.manifest.sources} == {"huggingface"}
    assert sorted(decoded_documents(data, data.train)) == sorted(c4_train)  # all of train, none held out
    assert decoded_documents(data, data.eval_sets["validation"]) == c4_validation
    assert decoded_documents(data, data.eval_sets["wikitext103"]) == [clean_text(p) for p in passages("".join(wikitext_rows))]
    assert decoded_documents(data, data.eval_sets["lambada"]) == lambada

    # The same command again does nothing.
    files = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    again = CliRunner().invoke(app, ["data", "prepare", "--study", str(study)], prog_name="peer-sweeps")
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == files


def test_unreachable_hub_is_one_line_and_exit_2(tmp_path, monkeypatch):
    """`data prepare --suite c4` on a machine without hub access (datasets raises ConnectionError after its
    retries, ~25 s here; simulated): after the progress line, one line naming the source and dataset, exit 2,
    no traceback, no file left in the data root."""
    def unreachable(path, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    from peer_sweeps.cli import app

    root = tmp_path / "data"
    result = CliRunner().invoke(app, ["data", "prepare", "--suite", "c4", "--root", str(root)], prog_name="peer-sweeps")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        "peer-sweeps: error: source 'c4_train': cannot load Hugging Face dataset allenai/c4: "
        "Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)")
    assert "Traceback" not in result.output
    assert not [p for p in root.rglob("*") if p.is_file()]


def test_a_dataset_that_is_not_there_is_one_line(tmp_path):
    """A Hugging Face source whose local dataset directory is missing: DataError naming it, not a traceback."""
    source = dataclasses.replace(C4.sources(C4.validation)[0], path=str(tmp_path / "missing"), config=None)
    with pytest.raises(DataError, match=r"cannot load Hugging Face dataset .*missing: Couldn't find any data file"):
        source.documents(tmp_path / "cache")
