"""What a researcher sees (issue 20): `peer-sweeps run` on a data root without data prepares the fixture
suite and completes, its console (not a terminal here) holds the study's progress and nothing from Ray,
Tune or DeepSpeed, whose output is in DIR/logs/; `status` shows a running trial's step, loss and ETA; the
trial's W&B run carries the flat comparison keys; `report --wandb offline` logs one report run whose
tables and plots are read back from its offline file with W&B's own record schema.

One real run (one trial, W&B offline) serves every slow test here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from conftest import study_dict
from wandb_records import defined_metrics, final_summary, history, run_record

REPO = Path(__file__).resolve().parents[1]
PEER_SWEEPS = [sys.executable, "-m", "peer_sweeps.cli"]
# What Ray, Tune and DeepSpeed print, as seen on the console before issue 20.
NOISE = re.compile(r"TrainController|RayTrainWorker|DeepSpeed|deepspeed|Tune|tensorboard|TensorBoard|Checkpoint "
                   r"successfully|Reporting training result|worker group|Requesting resources|WARNING|INFO|pid=")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PEER_SWEEPS_", "RAY_ADDRESS"))}
    return env | {"PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory):
    """`peer-sweeps run` of a one-trial study whose data root is empty, W&B offline, stdout not a terminal."""
    tmp = tmp_path_factory.mktemp("quiet")
    data, out = tmp / "data", tmp / "out"
    study = tmp / "study.yaml"
    study.write_text(yaml.safe_dump(study_dict(data, budgets=(1.0e9,), tracking={"wandb_mode": "offline"})))
    proc = subprocess.run([*PEER_SWEEPS, "run", str(study), "--out", str(out)], capture_output=True, text=True,
                          env=_env(), cwd=tmp, timeout=600)
    return study, data, out, proc


@pytest.mark.slow
def test_run_prepares_its_data_and_keeps_ray_tune_and_deepspeed_off_the_console(quiet_run):
    study, data, out, proc = quiet_run
    console = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join(console[-40:])
    assert (data / "fixture" / "bpe512" / "manifest.json").is_file()
    assert console[0].startswith("data: preparing suite 'fixture'")
    noise = [line for line in console if NOISE.search(line)]
    assert not noise, noise
    progress = [line for line in console if not line.startswith(("data: ", "  "))]  # after the data's progress
    assert progress[0] == f"study tiny: 1 trials, 0 already done, 1 to run -> {out}"
    finished = [line for line in progress if line.startswith("[1/1] completed")]
    assert len(finished) == 1 and "ppl" in finished[0], progress
    assert len(progress) <= 5, progress  # header, logs, Ray, the trial, the total
    (trial_id,) = pq.read_table(out / "trials.parquet").column("trial_id").to_pylist()
    trial_log = (out / "logs" / f"{trial_id}.log").read_text()
    # DeepSpeed's and Ray Train's own lines (a one-worker CPU trial runs in Ray Train's local mode)
    assert "DeepSpeed" in trial_log and "Running in local mode" in trial_log
    assert "Configuration for experiment" in (out / "logs" / "driver.log").read_text()  # Tune's table


@pytest.mark.slow
def test_trial_run_compares_by_flat_keys_and_report_run_holds_tables(quiet_run):
    from peer_sweeps.tracking import COMPARISON_KEYS

    _, _, out, proc = quiet_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = pq.read_table(out / "trials.parquet").to_pylist()
    run_file = out / "wandb" / f"offline-run-{'*'}-{row['trial_id']}"
    (run_dir,) = run_file.parent.glob(run_file.name)
    run, config = run_record(run_dir / f"run-{row['trial_id']}.wandb")
    assert (run.run_group, run.job_type) == ("tiny", "isoflop")
    assert {key: config[key] for key in COMPARISON_KEYS} == {key: row[key] for key in COMPARISON_KEYS}
    assert config["lr"] == 3.0e-3 and config["d_model"] == 16 and config["model"]["d_model"] == 16
    metrics = defined_metrics(run_dir / f"run-{row['trial_id']}.wandb")
    assert {m.name for m in metrics} >= {"tokens", "flops"}
    assert any(m.glob_name == "*" and m.step_metric == "tokens" for m in metrics)
    assert final_summary(run_dir / f"run-{row['trial_id']}.wandb")["ppl"] == pytest.approx(row["ppl"])

    report = subprocess.run([*PEER_SWEEPS, "report", str(out), "--wandb", "offline"], capture_output=True,
                            text=True, env=_env(), timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    (report_dir,) = (out / "wandb").glob("offline-run-*-report-tiny-*")
    (report_file,) = report_dir.glob("*.wandb")
    run, config = run_record(report_file)
    assert (run.run_group, run.job_type) == ("tiny", "report")
    (logged,) = history(report_file)

    def table(key: str) -> pd.DataFrame:
        assert logged[f"{key}/_type"] == "table-file", key
        content = json.loads((report_dir / "files" / logged[f"{key}/path"]).read_text())
        return pd.DataFrame(content["data"], columns=content["columns"])

    optimal = pd.read_csv(out / "report" / "optimal.csv")
    assert list(table("optimal").columns) == list(optimal.columns)
    assert table("optimal")["ppl_opt"].tolist() == pytest.approx(optimal["ppl_opt"].tolist())
    assert len(table("isoflop_fits")) == len(optimal) == 1
    curve = table("isoflop_curves_table")  # the W&B line plot's data: one point, this trial
    assert curve["lineVal"].tolist() == pytest.approx([row["ppl"]])
    assert curve["step"].tolist() == [row["params_backbone"]] and curve["lineKey"].tolist() == ["dense @ 1e+09"]
    assert table("frontier_table")["lineVal"].tolist() == pytest.approx(optimal["ppl_opt"].tolist())
    assert logged["figures/isoflop/_type"] == "image-file"
    assert (report_dir / "files" / logged["figures/isoflop/path"]).stat().st_size > 0


def test_status_shows_how_far_a_running_trial_is(small_study, tmp_path):
    """A fake running trial: the run's lock held, a metrics.jsonl written by hand (its last line torn)."""
    from peer_sweeps.cli import app
    from peer_sweeps.results import ResultsDir
    from peer_sweeps.runner import _write_study
    from peer_sweeps.plan import load_and_plan

    study, (running, pending) = load_and_plan(small_study(tmp_path / "study.yaml"))
    results = ResultsDir(tmp_path / "out")
    results.create()
    _write_study(results.path / "study.yaml", study)
    metrics = results.path / "trials" / running.trial_id / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    records = [{"step": s, "tokens": s * 256, "flops": s * 1e6, "seconds": 0.5 * s, "train_loss": 6.0 - s / 10}
               for s in range(1, 11)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 11, "tok')
    with results.lock():
        started = time.time() - 60  # the run began a minute ago
        os.utime(results.path / ".lock", (started, started))
        text = CliRunner().invoke(app, ["status", str(results.path)])
        as_json = CliRunner().invoke(app, ["status", str(results.path), "--json"])
    assert text.exit_code == 0, text.output
    assert f"running {running.trial_id} {running.label}: step 10/{running.steps}, loss 5.000, 512 tokens/s" \
        in text.stdout
    assert "(a run is in progress); ETA " in text.stdout
    info = json.loads(as_json.stdout)
    (progress,) = info["running_trials"]
    assert (progress["trial_id"], progress["step"], progress["steps"]) == (running.trial_id, 10, running.steps)
    assert progress["eta_seconds"] == pytest.approx((running.steps - 10) * 0.5)
    # the study's ETA: the plan's estimate of the work left, at the rate the run got through estimated work
    fraction = 10 / running.steps
    left = pending.estimated_cpu_seconds() + running.estimated_cpu_seconds() * (1 - fraction)
    expected = left * 60 / (running.estimated_cpu_seconds() * fraction)
    assert info["pending"] == 1 and info["eta_seconds"] == pytest.approx(expected, rel=0.02)
