"""`peer-sweeps status DIR`: trials completed / running / failed / diverged / pending, from one snapshot."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .plan import plan_study
from .results import ResultsDir, ResultsDirError, is_locked
from .study import StudyError, load_study
from .trial import METRICS_FILE, trial_dir


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
    counts = Counter(states.values())
    return {"study": trials[0].study, "total": len(trials), "run_in_progress": live,
            **{s: counts.get(s, 0) for s in ("completed", "running", "failed", "diverged", "pending")},
            "failed_trials": {tid: rows[tid].get("error") for tid, s in states.items() if s == "failed"}}
