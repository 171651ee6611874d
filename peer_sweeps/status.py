"""`peer-sweeps status DIR`: trials completed / running / failed / diverged / pending, how far each running
trial is, and when the study should be done; from one snapshot of the results directory.

A running trial's progress is the last line of its `metrics.jsonl`: step, train loss, tokens per second
(over its training seconds, evaluation excluded) and its ETA (the remaining steps at the rate so far).

The study's ETA weighs every trial by the plan's own time estimate (`Trial.estimated_cpu_seconds`, which
counts a trial's start-up, its steps, its FLOPs and its expert retrievals) and scales the estimated work
left by the wall-clock rate at which the current run has got through estimated work: trials finished since
it started, plus the done fraction of the running ones. So it accounts for trials running side by side and
for how much faster or slower this machine is than the estimate. Before any progress it is the estimate
itself, divided among the running trials. `status` dates the current run by its lock file, which
`peer-sweeps run` writes when it starts.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from .plan import Trial, plan_study
from .results import ResultsDir, ResultsDirError, is_locked
from .study import StudyError, load_study
from .trial import METRICS_FILE, trial_dir

TAIL_BYTES = 16384  # enough for the last records of any trial, evaluation records included


@dataclass(frozen=True)
class TrialProgress:
    trial_id: str
    label: str
    step: int
    steps: int
    loss: float | None
    tokens_per_second: float | None
    eta_seconds: float | None

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.steps) if self.steps else 0.0


def last_record(path: Path) -> dict | None:
    """The last whole JSON line of a metrics file (reads only its tail); None when there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL_BYTES))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a torn last line, or the first line cut by the seek
        if isinstance(record, dict) and "step" in record:
            return record
    return None


def trial_progress(results_dir: Path, trial: Trial) -> TrialProgress:
    """How far `trial` is, from its metrics file (step 0 before its first step)."""
    record = last_record(trial_dir(results_dir, trial.trial_id) / METRICS_FILE) or {}
    step, seconds = int(record.get("step", 0)), float(record.get("seconds") or 0.0)
    rate = step / seconds if step and seconds > 0 else None
    return TrialProgress(
        trial_id=trial.trial_id, label=trial.label, step=step, steps=trial.steps, loss=record.get("train_loss"),
        tokens_per_second=record["tokens"] / seconds if rate and record.get("tokens") else None,
        eta_seconds=max(0, trial.steps - step) / rate if rate else None,
    )


def study_eta_seconds(trials: list[Trial], states: dict[str, str], running: dict[str, TrialProgress],
                      finished_this_run: set[str], elapsed_seconds: float) -> float | None:
    """Seconds until every trial not yet done is (see the module's docstring); 0 when none is left."""
    estimate = {t.trial_id: t.estimated_cpu_seconds() for t in trials}
    # a trial that failed before this run is retried by it
    left = sum(estimate[tid] for tid, state in states.items()
               if state == "pending" or state == "failed" and tid not in finished_this_run)
    left += sum(estimate[tid] * (1 - p.fraction) for tid, p in running.items())
    if left <= 0:
        return 0.0
    done = sum(estimate[tid] for tid in finished_this_run) + sum(estimate[tid] * p.fraction for tid, p in running.items())
    if done > 0 and elapsed_seconds > 0:
        return left * elapsed_seconds / done
    return left / max(1, len(running)) if running else None


def study_status(path: str | Path) -> dict:
    results = ResultsDir(path)
    study_file = results.path / "study.yaml"
    if not study_file.is_file():
        raise ResultsDirError(f"{results.path}: not a results directory (no study.yaml)")
    try:
        trials = plan_study(load_study(study_file))
    except StudyError as e:
        raise ResultsDirError(f"{results.path}: its study.yaml no longer plans: {e}") from None
    rows = results.rows()
    live = is_locked(results.path)
    states = {}
    for trial in trials:
        row = rows.get(trial.trial_id)
        if row is not None:
            states[trial.trial_id] = row["status"]
        elif live and (trial_dir(results.path, trial.trial_id) / METRICS_FILE).exists():
            states[trial.trial_id] = "running"
        else:
            states[trial.trial_id] = "pending"
    running = {t.trial_id: trial_progress(results.path, t) for t in trials if states[t.trial_id] == "running"}
    eta = None
    if live:
        started = (results.path / ".lock").stat().st_mtime
        finished = {tid for tid, row in rows.items() if tid in states and _finished_at(row) >= started}
        eta = study_eta_seconds(trials, states, running, finished, time.time() - started)
    counts = Counter(states.values())
    return {"study": trials[0].study, "total": len(trials), "run_in_progress": live,
            **{s: counts.get(s, 0) for s in ("completed", "running", "failed", "diverged", "pending")},
            "failed_trials": {tid: rows[tid].get("error") for tid, s in states.items() if s == "failed"},
            "running_trials": [asdict(p) for p in running.values()], "eta_seconds": eta}


def _finished_at(row: dict) -> float:
    try:
        return dt.datetime.fromisoformat(row["finished_at"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return 0.0
