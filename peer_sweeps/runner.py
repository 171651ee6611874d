"""Running a study: every planned trial not yet done, as a Ray Tune grid, one Ray Train job per trial.

Plain grid, FIFO, no early stopping (a loss part-way through a cosine schedule is not comparable across
horizons). Completed and diverged trials (by trial id) are never trained again; failed ones are retried,
resuming from their own checkpoints. The driver records each finished trial as it reports and rebuilds
trials.parquet / curves.parquet; one run per results directory at a time (a lock).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback

from .plan import Trial, load_and_plan
from .results import DONE_STATUSES, ResultsDir
from .study import Study, StudyError
from .trial import run_trial, trial_row


@dataclass
class RunOptions:
    out: Path | None = None
    address: str | None = None
    max_concurrent: int | None = None
    wandb_mode: str = "offline"
    num_cpus: int | None = None  # embedded Ray only


@dataclass
class Progress:
    """The live view: one line per finished trial, with counts and an ETA."""

    total: int
    skipped: int
    started_at: float = field(default_factory=time.time)
    finished: dict[str, str] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)

    def line(self, row: dict[str, Any], label: str) -> str:
        counts = {s: list(self.finished.values()).count(s) for s in ("completed", "failed", "diverged")}
        done = len(self.finished)
        pending = self.total - done - len(self.running)
        elapsed = time.time() - self.started_at
        eta = elapsed / done * (self.total - done) if done else math.nan
        result = f"ppl {row['ppl']:.2f}" if row.get("ppl") is not None else (row.get("error") or "")[:80]
        return (f"[{done}/{self.total}] {row['status']:<9} {label:<44} {result}  | done {counts['completed']}, "
                f"running {len(self.running)}, failed {counts['failed']}, diverged {counts['diverged']}, "
                f"pending {pending}, ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def default_out(study: Study) -> Path:
    return Path("runs") / study.name


def run_study(study_path: str | Path, options: RunOptions) -> int:
    """Runs every trial of the study not yet done; returns the exit code (0, or 1 if a trial failed)."""
    study, trials = load_and_plan(study_path)
    results = ResultsDir(options.out or default_out(study))
    _check_data(study, study_path)
    results.create()
    with results.lock():
        results.remove_partial_files()
        _write_study(results.path / "study.yaml", study)
        done = results.done_ids()
        pending = [t for t in trials if t.trial_id not in done]
        order = [t.trial_id for t in trials]
        print(f"study {study.name}: {len(trials)} trials, {len(trials) - len(pending)} already done, "
              f"{len(pending)} to run -> {results.path}", flush=True)
        if pending:
            _run_tune(study, pending, results, order, options)
        results.consolidate(order)
    rows = results.rows()
    failed = [t for t in trials if rows.get(t.trial_id, {}).get("status") == "failed"]
    missing = [t for t in trials if t.trial_id not in rows]
    print(f"study {study.name}: {sum(rows.get(t.trial_id, {}).get('status') == 'completed' for t in trials)} completed, "
          f"{len(failed)} failed, {sum(rows.get(t.trial_id, {}).get('status') == 'diverged' for t in trials)} diverged"
          f"{f', {len(missing)} not run' if missing else ''}; results in {results.path}", flush=True)
    return 1 if failed or missing else 0


def data_root(study: Study) -> str:
    from .data import default_root

    return str(Path(study.data.root or default_root()).resolve())


def _check_data(study: Study, study_path: str | Path) -> None:
    """Fail before starting Ray, and before writing anything, when the study's data is not prepared."""
    from .data import DataError, load_suite

    try:
        load_suite(study.data.suite, study.data.root, study.data.vocab_size)
    except DataError as e:
        raise StudyError(f"{study_path}: data.suite: {e}") from None


def _write_study(path: Path, study: Study) -> None:
    from .results import write_atomic

    write_atomic(path, yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False).encode())


def _run_tune(study: Study, pending: list[Trial], results: ResultsDir, order: list[str], options: RunOptions) -> None:
    from ray import tune

    from cluster.runtime import SharedStorageError, check_shared_storage, ray_session
    from cluster.train_job import TUNE_TRIAL_CPUS

    resources = study.resources
    per_trial_cpus = resources.workers_per_trial * resources.cpus_per_worker
    num_cpus = options.num_cpus
    if options.address is None and not os.environ.get("RAY_ADDRESS") and num_cpus is None:
        # Tune's function trials each hold a sliver of a CPU while they wait on their Train job: add one
        # logical CPU for them, so that N trials of 1 CPU still fit N cores.
        num_cpus = (os.cpu_count() or 1) + 1
    with ray_session(options.address, num_cpus=num_cpus, storage_path=results.path) as session:
        try:  # a joined multi-node cluster: every node must see the results directory and the data
            check_shared_storage(session, results.path, [data_root(study)])
        except SharedStorageError as e:
            raise StudyError(f"--out {results.path}: {e}") from None
        fit = max(1, int(session.num_cpus // (per_trial_cpus + TUNE_TRIAL_CPUS)))
        if resources.gpus_per_worker:
            fit = min(fit, max(1, int(session.num_gpus // (resources.workers_per_trial * resources.gpus_per_worker))))
        concurrent = min(x for x in (fit, options.max_concurrent, resources.max_concurrent, len(pending)) if x)
        print(f"Ray: {session.num_nodes} node(s), {session.num_cpus:g} CPUs, {session.num_gpus:g} GPUs; "
              f"{concurrent} trial(s) at a time", flush=True)
        progress = Progress(total=len(order), skipped=len(order) - len(pending))
        for tid, row in results.rows().items():
            if row["status"] in DONE_STATUSES:
                progress.finished[tid] = row["status"]
        labels = {t.trial_id: t.label for t in pending}
        trainable = tune.with_parameters(
            _tune_trial, results_dir=str(results.path.resolve()), wandb_mode=options.wandb_mode,
            wandb_project=study.tracking.wandb_project, data_root=data_root(study),
            attempts={tid: row.get("attempts", 0) for tid, row in results.rows().items()},
        )
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": TUNE_TRIAL_CPUS}),
            param_space={"trial": tune.grid_search([t.to_json() for t in pending])},
            # reuse_actors: the next trial runs in the process the last one drove its Train job from (no new
            # actor process importing the runner, Ray Train and the plan per trial; Train's own workers stay
            # fresh processes). Tune only reuses an actor whose trial ended cleanly.
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, num_samples=1, reuse_actors=True),
            run_config=tune.RunConfig(
                name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str((results.path / "tune").resolve()),
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[_Recorder(results, order, progress, labels)],
            ),
        )
        tuner.fit()


def _tune_trial(config: dict[str, Any], results_dir: str, wandb_mode: str, wandb_project: str, data_root: str,
                attempts: dict[str, int]) -> None:
    """A Tune function trial: drive one trial's Train job and report its row."""
    from ray import tune

    trial = Trial.from_json(config["trial"])
    row = run_trial(trial, results_dir, wandb_mode, wandb_project, attempt=attempts.get(trial.trial_id, 0) + 1,
                    data_root=data_root)
    tune.report({"row": json.dumps(row, default=str), "done": 1})


class _Recorder(Callback):
    """Driver-side: records each finished trial durably, rebuilds the Parquet files, prints progress."""

    def __init__(self, results: ResultsDir, order: list[str], progress: Progress, labels: dict[str, str]):
        self.results, self.order, self.progress, self.labels = results, order, progress, labels

    def on_trial_start(self, iteration, trials, trial, **info):
        self.progress.running.add(trial.config["trial"]["trial_id"])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "row" in result:
            self._record(json.loads(result["row"]))

    def on_trial_error(self, iteration, trials, trial, **info):
        planned = Trial.from_json(trial.config["trial"])
        if planned.trial_id in self.progress.running:
            error = getattr(trial, "error_file", None)
            self._record(trial_row(planned, {"status": "failed", "error": f"Tune trial error (see {error})"}))

    def _record(self, row: dict[str, Any]) -> None:
        tid = row["trial_id"]
        self.results.save_row(row)
        self.progress.running.discard(tid)
        self.progress.finished[tid] = row["status"]
        try:
            self.results.consolidate(self.order)
        except Exception as e:  # noqa: BLE001 - the records are safe; the next consolidation retries
            print(f"peer-sweeps: consolidation failed, will retry: {e}", file=sys.stderr)
        print(self.progress.line(row, self.labels.get(tid, tid)), flush=True)


def run_single_trial(study_path: str | Path, trial_id: str, out: Path | None, wandb_mode: str) -> int:
    """`peer-sweeps trial`: one trial of a study, outside a sweep (debugging). Records it like a sweep would."""
    from cluster.runtime import ray_session

    study, planned = load_and_plan(study_path)
    trials = {t.trial_id: t for t in planned}
    matches = [tid for tid in trials if tid.startswith(trial_id)]
    if len(matches) != 1:
        raise StudyError(f"{study_path}: trial {trial_id!r} {'is ambiguous' if matches else 'is not in the plan'}"
                         f"; see `peer-sweeps plan {study_path}`")
    trial = trials[matches[0]]
    results = ResultsDir(out or default_out(study))
    _check_data(study, study_path)
    results.create()
    with results.lock():
        results.remove_partial_files()
        _write_study(results.path / "study.yaml", study)
        previous = results.rows().get(trial.trial_id, {})
        with ray_session(None, storage_path=results.path):
            row = run_trial(trial, results.path, wandb_mode, study.tracking.wandb_project,
                            attempt=previous.get("attempts", 0) + 1, data_root=data_root(study))
        results.save_row(row)
        results.consolidate([t.trial_id for t in trials.values()])
    print(json.dumps({k: v for k, v in row.items() if v is not None}, indent=1, default=str))
    return 0 if row["status"] != "failed" else 1
