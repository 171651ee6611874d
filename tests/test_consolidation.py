"""Consolidation into trials.parquet and curves.parquet: after every trial the driver rebuilds both, and a
trial's curve is read from its metrics file only when that file changed, so the work per trial does not grow
with the trials done. The files are the same as a rebuild from scratch."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

import peer_sweeps.results as results_module
from peer_sweeps.results import ResultsDir
from peer_sweeps.trial import METRICS_FILE, trial_dir

STEPS = 5


def finish_trial(results: ResultsDir, trial_id: str, first_step: int = 1, loss: float = 5.0) -> None:
    """A finished trial as a run leaves it: its metrics (one record a step, an evaluation at the end) and its row."""
    metrics = trial_dir(results.path, trial_id) / METRICS_FILE
    metrics.parent.mkdir(parents=True, exist_ok=True)
    with metrics.open("a") as f:
        for step in range(first_step, first_step + STEPS):
            record = {"step": step, "tokens": 64 * step, "flops": 1e6 * step, "train_loss": loss - 0.1 * step,
                      "lr": 1e-3}
            if step == first_step + STEPS - 1:
                record |= {"ppl_validation": 90.0 + step}
            f.write(json.dumps(record) + "\n")
    results.save_row({"trial_id": trial_id, "status": "completed", "ppl": 90.0, "ppl_validation": 90.0, "steps": STEPS})


@pytest.fixture
def metrics_reads(monkeypatch):
    reads: list[str] = []
    real = results_module.read_metrics

    def counting(path):
        reads.append(path.parent.name)
        return real(path)

    monkeypatch.setattr(results_module, "read_metrics", counting)
    return reads


def test_a_new_trial_reads_only_its_own_curve(tmp_path, metrics_reads):
    results = ResultsDir(tmp_path / "run")
    for i in range(6):
        finish_trial(results, f"t{i}")
        results.consolidate()
    assert metrics_reads == [f"t{i}" for i in range(6)], "each curve read once, when its trial finished"
    assert pq.read_table(results.path / "curves.parquet").num_rows == 6 * STEPS
    assert pq.read_table(results.path / "trials.parquet").num_rows == 6


def test_a_changed_curve_is_read_again_and_the_files_equal_a_rebuild(tmp_path, metrics_reads):
    results = ResultsDir(tmp_path / "run")
    for i in range(3):
        finish_trial(results, f"t{i}")
    results.consolidate(["t2", "t0", "t1"])
    finish_trial(results, "t1", first_step=STEPS + 1, loss=4.0)  # retried: more steps, a new row
    metrics_reads.clear()
    results.consolidate(["t2", "t0", "t1"])
    assert metrics_reads == ["t1"]
    curves = pq.read_table(results.path / "curves.parquet")
    trials = pq.read_table(results.path / "trials.parquet")

    rebuilt = ResultsDir(tmp_path / "run")  # a new object: nothing cached
    rebuilt.consolidate(["t2", "t0", "t1"])
    assert pq.read_table(results.path / "curves.parquet").equals(curves)
    assert curves.num_rows == 4 * STEPS and curves.column("trial_id").to_pylist()[:STEPS] == ["t2"] * STEPS
    assert pq.read_table(results.path / "trials.parquet").equals(trials)


def test_no_finished_trial_gives_empty_tables(tmp_path):
    results = ResultsDir(tmp_path / "run")
    results.create()
    results.consolidate()
    assert pq.read_table(results.path / "curves.parquet").num_rows == 0
    assert pq.read_table(results.path / "trials.parquet").num_rows == 0
