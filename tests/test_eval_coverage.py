"""Evaluation represents each set: a seeded sample of whole documents drawn across the whole split (at least
131,072 scored tokens, the whole split when smaller), the same tokens for every trial; `peer-sweeps eval`
re-scores a finished trial from its final checkpoint and agrees with the recorded numbers."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from peer_sweeps.cli import app
from peer_sweeps.data import MIN_SAMPLE_TOKENS, evaluation_sample
from peer_sweeps.study import StudyError, parse_study

EOT = 0


def split_of(doc_lengths, seed=0) -> tuple[np.ndarray, list[np.ndarray]]:
    """A split as prepare_suite writes it: each document preceded by the end-of-text token; document i's
    tokens all equal i + 1 (so a sample's documents can be read back)."""
    docs = [np.concatenate([[EOT], np.full(n - 1, i + 1)]).astype(np.uint16) for i, n in enumerate(doc_lengths)]
    return np.concatenate(docs), docs


def test_sample_is_whole_documents_from_across_the_split_and_the_same_every_time():
    # 3 "sources" one after another, as a split is written: 600 documents of 500-1500 tokens (~600k tokens)
    lengths = np.random.default_rng(1).integers(500, 1500, size=600)
    tokens, docs = split_of(lengths)
    sample = evaluation_sample(tokens, EOT, MIN_SAMPLE_TOKENS, seq_len=64)
    assert np.array_equal(sample, evaluation_sample(tokens, EOT, MIN_SAMPLE_TOKENS, seq_len=64))
    chosen = sorted(set(sample[sample != EOT].tolist()))
    assert np.array_equal(sample, np.concatenate([docs[i - 1] for i in chosen]))  # whole documents, split order
    scored = len(sample) // 65 * 64
    assert MIN_SAMPLE_TOKENS <= scored < MIN_SAMPLE_TOKENS + 1500 * 64 / 65 + 64  # the fewest documents
    thirds = np.bincount(np.array(chosen) * 3 // 601, minlength=3)
    assert thirds.min() >= len(chosen) // 6, thirds  # every part of the split, not the first 131,072 tokens
    assert sample[-1] != EOT and not np.array_equal(sample[: len(sample) // 2], tokens[: len(sample) // 2])


def test_small_split_is_scored_whole():
    tokens, _ = split_of([1000] * 50)
    assert evaluation_sample(tokens, EOT, MIN_SAMPLE_TOKENS, seq_len=64) is not None
    assert len(evaluation_sample(tokens, EOT, MIN_SAMPLE_TOKENS, seq_len=64)) == len(tokens)
    assert len(evaluation_sample(tokens, EOT, None, seq_len=64)) == len(tokens)


def test_evaluation_sets_record_tokens_scored_per_set():
    import torch

    from peer_sweeps.trial import evaluate_sets, evaluation_sets

    def few_ids(tokens):  # token ids below 8, so that the logits stay small
        return np.where(tokens == EOT, EOT, tokens % 7 + 1)

    class Suite:
        eot_id, primary = EOT, "validation"
        token_bytes = np.ones(8)
        eval_sets = {"validation": few_ids(split_of(np.full(400, 600))[0]), "small": few_ids(split_of([300] * 20)[0])}

    class Uniform(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape, 8)

        def collect_routing_stats(self, enabled):
            pass

        def routing_scores(self):
            return []

    sets = evaluation_sets(Suite, MIN_SAMPLE_TOKENS, 64)
    out = evaluate_sets(Uniform(), sets, Suite, 64, 16, "cpu")
    assert out["eval_tokens_validation"] >= MIN_SAMPLE_TOKENS and out["eval_tokens_small"] == 6000 // 65 * 64
    assert out["ppl"] == pytest.approx(8)


@pytest.mark.parametrize("value", [16384, 0, "some"])
def test_study_rejects_unrepresentative_eval_tokens(value):
    raw = {"name": "x", "data": {"eval_tokens": value}, "methods": {"dense": {}},
           "design": {"kind": "isoflop", "budgets": [1e12], "sizes": [{"d_model": 64, "n_layers": 2}]}}
    with pytest.raises(StudyError, match="data.eval_tokens"):
        parse_study(raw)


def peer_sweeps(*args):
    return subprocess.run([sys.executable, "-m", "peer_sweeps.cli", *map(str, args)], capture_output=True, text=True)


def test_eval_command_rejects_bad_arguments(tmp_path, capsys):
    (tmp_path / "trials" / "abc").mkdir(parents=True)
    (tmp_path / "trials" / "abc" / "config.json").write_text("{}")
    for args, message in [((tmp_path / "none", "abc"), "no such results directory"),
                          ((tmp_path, "nope"), "no trial 'nope'"),
                          ((tmp_path, "abc", "--tokens", "-3"), "--tokens"),
                          ((tmp_path, "abc", "--tokens", "lots"), "--tokens")]:
        with pytest.raises(SystemExit) as exit_:
            app(["eval", *map(str, args)])
        stderr = capsys.readouterr().err
        assert exit_.value.code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_eval_command_agrees_with_the_recorded_numbers(data_root, tmp_path, capsys):
    """One short MoE trial: expert choice depends on the evaluation batch, the case most easily got wrong."""
    import yaml
    from conftest import study_dict

    spec = study_dict(data_root, budgets=(1.0e9,), methods={"moe": {"num_experts": 4}})
    spec["methods"].pop("dense")
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(spec))
    out = tmp_path / "runs"
    done = peer_sweeps("run", study, "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 1 and (trials["status"] == "completed").all()
    for _, row in trials.iterrows():
        scores = cli_json(capsys, "eval", out, row["trial_id"], "--json")
        assert list(scores) == ["validation", "verse", "prose"]
        for name, s in scores.items():
            assert s["ppl"] == pytest.approx(row[f"ppl_{name}"], rel=1e-5)
            assert s["bpb"] == pytest.approx(row[f"bpb_{name}"], rel=1e-5)
            assert s["tokens"] == row[f"eval_tokens_{name}"] > 0
    one = cli_json(capsys, "eval", out, row["trial_id"], "--set", "verse", "--tokens", "all", "--json")
    assert list(one) == ["verse"] and one["verse"]["ppl"] == pytest.approx(row["ppl_verse"], rel=1e-5)
    with pytest.raises(SystemExit) as exit_:
        app(["eval", str(out), row["trial_id"], "--set", "novel"])
    assert exit_.value.code == 2 and "'novel' is not an evaluation set" in capsys.readouterr().err


def cli_json(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        app([*map(str, args)])
    captured = capsys.readouterr()
    assert exit_.value.code == 0, captured.err
    return json.loads(captured.out)
