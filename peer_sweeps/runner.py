"""Running a study: every planned trial not yet done, as a Ray Tune grid, one Ray Train job per trial.

Plain grid, FIFO, no early stopping (a loss part-way through a cosine schedule is not comparable across
horizons). Completed and diverged trials (by trial id) are never trained again; failed ones are retried,
resuming from their own checkpoints. The driver records each finished trial as it reports and rebuilds
trials.parquet / curves.parquet; one run per results directory at a time (a lock).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from ray.tune import Callback

from .console import RunConsole, StudyProgress
from .plan import Trial, load_and_plan
from .results import ResultsDir
from .study import Study, StudyError
from .trial import run_trial, trial_row


@dataclass
class RunOptions:
    out: Path | None = None
    address: str | None = None
    max_concurrent: int | None = None
    wandb_mode: str = "offline"
    num_cpus: int | None = None  # embedded Ray only
    prepare_data: bool = True  # prepare a missing shipped data suite (False: stop, naming the command)
    verbose: bool = False  # let Ray, Tune and DeepSpeed print to the console instead of DIR/logs/


def default_out(study: Study) -> Path:
    return Path("runs") / study.name


def run_study(study_path: str | Path, options: RunOptions) -> int:
    """Runs every trial of the study not yet done; returns the exit code (0, or 1 if a trial failed)."""
    study, trials = load_and_plan(study_path)
    results = ResultsDir(options.out or default_out(study))
    console = RunConsole(results.path, options.verbose)
    try:
        _check_data(study, study_path, options.prepare_data, console.say)
        results.create()
        with results.lock():
            results.remove_partial_files()
            _write_study(results.path / "study.yaml", study)
            done = results.done_ids()
            pending = [t for t in trials if t.trial_id not in done]
            order = [t.trial_id for t in trials]
            console.say(f"study {study.name}: {len(trials)} trials, {len(trials) - len(pending)} already done, "
                        f"{len(pending)} to run -> {results.path}", style="bold")
            if pending:
                if not options.verbose:
                    console.say(f"logs: {results.path / 'logs'}/ (--verbose shows them here)", style="dim")
                with console.quiet():
                    _run_tune(study, trials, pending, results, order, options, console)
            results.consolidate(order)
        rows = results.rows()
        failed = [t for t in trials if rows.get(t.trial_id, {}).get("status") == "failed"]
        missing = [t for t in trials if t.trial_id not in rows]
        console.say(f"study {study.name}: {sum(rows.get(t.trial_id, {}).get('status') == 'completed' for t in trials)} "
                    f"completed, {len(failed)} failed, "
                    f"{sum(rows.get(t.trial_id, {}).get('status') == 'diverged' for t in trials)} diverged"
                    f"{f', {len(missing)} not run' if missing else ''}; results in {results.path}", style="bold")
    finally:
        console.close()
    return 1 if failed or missing else 0


def data_root(study: Study) -> str:
    from .data import default_root

    return str(Path(study.data.root or default_root()).resolve())


def _check_data(study: Study, study_path: str | Path, prepare: bool, say: Callable[..., None]) -> None:
    """Before starting Ray, and before writing anything: the study's data suite is prepared, or is prepared
    now when it can be (see peer_sweeps.data.ensure)."""
    from .data import DataError, ensure_study_data

    try:
        ensure_study_data(study.data, study_path, prepare, say)
    except DataError as e:
        raise StudyError(str(e)) from None


def _write_study(path: Path, study: Study) -> None:
    from .results import write_atomic

    write_atomic(path, yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False).encode())


def _run_tune(study: Study, trials: list[Trial], pending: list[Trial], results: ResultsDir, order: list[str],
              options: RunOptions, console: RunConsole) -> None:
    from ray import tune

    from cluster.runtime import SharedStorageError, check_shared_storage, ray_session

    resources = study.resources
    num_cpus = options.num_cpus
    if (options.address is None and not os.environ.get("RAY_ADDRESS") and num_cpus is None
            and not trains_in_process(resources)):
        # Tune's function trials each hold a sliver of a CPU while they wait on their Train job: add one
        # logical CPU for them, so that N trials of 1 CPU still fit N cores.
        num_cpus = (os.cpu_count() or 1) + 1
    with ray_session(options.address, num_cpus=num_cpus, storage_path=results.path) as session:
        try:  # a joined multi-node cluster: every node must see the results directory and the data
            check_shared_storage(session, results.path, [data_root(study)])
        except SharedStorageError as e:
            raise StudyError(f"--out {results.path}: {e}") from None
        most_cpus, most_gpus = max(session.num_cpus, session.max_cpus), max(session.num_gpus, session.max_gpus)
        concurrent = trial_concurrency(resources, most_cpus, most_gpus, options.max_concurrent, len(pending))
        grows = (f" (can grow to {most_cpus:g} CPUs, {most_gpus:g} GPUs)"
                 if (most_cpus, most_gpus) != (session.num_cpus, session.num_gpus) else "")
        console.say(f"Ray: {session.num_nodes} node(s), {session.num_cpus:g} CPUs, {session.num_gpus:g} GPUs{grows}; "
                    f"{concurrent} trial(s) at a time")
        rows = results.rows()
        labels = {t.trial_id: t.label for t in pending}
        progress = StudyProgress(results.path, trials, {  # a failed trial is pending again: it is retried
            t.trial_id: "pending" if t.trial_id in labels else rows[t.trial_id]["status"] for t in trials})
        trainable = tune.with_parameters(
            _tune_trial, results_dir=str(results.path.resolve()), wandb_mode=options.wandb_mode,
            wandb_project=study.tracking.wandb_project, data_root=data_root(study),
            attempts={tid: row.get("attempts", 0) for tid, row in rows.items()},
            logs_dir=None if options.verbose else str(console.logs.resolve()),
            in_process=trains_in_process(resources),
        )
        # A trial training in its actor dies with it (a crash, the OOM killer): Tune runs it again in a fresh
        # actor, resuming from its checkpoints, as often as Ray Train would have replaced its worker.
        actor_retries = max(t.training["max_failures"] for t in pending) if trains_in_process(resources) else 0
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": tune_trial_cpus(resources)}),
            param_space={"trial": tune.grid_search([t.to_json() for t in pending])},
            # reuse_actors: the next trial runs in the process the last one ran in (no new actor process
            # importing the runner, Ray Train, torch and DeepSpeed per trial). Tune only reuses an actor whose
            # trial ended cleanly.
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, num_samples=1, reuse_actors=True),
            run_config=tune.RunConfig(
                name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str((results.path / "tune").resolve()),
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=actor_retries),
                callbacks=[_Recorder(results, order, progress, labels, console)],
            ),
        )
        with console.live(progress):
            tuner.fit()


def trains_in_process(resources) -> bool:
    """Whether a trial's one CPU worker trains in its Tune trial's actor (cluster.train_job's in-process job)
    rather than in a Train worker process of its own. GPU trials keep Ray Train's worker processes: they are
    long enough not to notice the start, and the accelerator set-up is Ray Train's."""
    return resources.workers_per_trial == 1 and not resources.gpus_per_worker


def tune_trial_cpus(resources) -> float:
    """The CPUs a Tune trial holds itself: its worker's when it trains in-process, else a sliver (it waits)."""
    from cluster.train_job import TUNE_TRIAL_CPUS

    return resources.cpus_per_worker if trains_in_process(resources) else TUNE_TRIAL_CPUS


def trial_cpus(resources) -> float:
    """The CPUs one trial holds in all: its Tune trial's, and its Train workers' unless it trains in-process."""
    workers = 0 if trains_in_process(resources) else resources.workers_per_trial
    return tune_trial_cpus(resources) + workers * resources.cpus_per_worker


def trial_concurrency(resources, cpus: float, gpus: float, max_concurrent: int | None, pending: int) -> int:
    """Trials at a time: as many as fit the CPUs and GPUs the cluster can grow to (an autoscaler adds nodes as
    Tune's queued trials ask for them), bounded by `--max-concurrent`, `resources.max_concurrent` and the
    trials left."""
    fit = max(1, int(cpus // trial_cpus(resources)))
    if resources.gpus_per_worker:
        fit = min(fit, max(1, int(gpus // (resources.workers_per_trial * resources.gpus_per_worker))))
    return min(x for x in (fit, max_concurrent, resources.max_concurrent, pending) if x)


def _tune_trial(config: dict[str, Any], results_dir: str, wandb_mode: str, wandb_project: str, data_root: str,
                attempts: dict[str, int], logs_dir: str | None, in_process: bool) -> None:
    """A Tune function trial: run one trial's Train job (in this process with `in_process`) and report its row.
    With `logs_dir`, this process and the trial's Train workers write their output to `<logs_dir>/<trial id>.log`."""
    from ray import tune

    from cluster.logs import redirect_output

    trial = Trial.from_json(config["trial"])
    log_path = str(Path(logs_dir) / f"{trial.trial_id}.log") if logs_dir else None
    with redirect_output(log_path):
        row = run_trial(trial, results_dir, wandb_mode, wandb_project, attempt=attempts.get(trial.trial_id, 0) + 1,
                        data_root=data_root, log_path=log_path, in_process=in_process)
    tune.report({"row": json.dumps(row, default=str), "done": 1})


class _Recorder(Callback):
    """Driver-side: records each finished trial durably, rebuilds the Parquet files, shows progress."""

    def __init__(self, results: ResultsDir, order: list[str], progress: StudyProgress, labels: dict[str, str],
                 console: RunConsole):
        self.results, self.order, self.progress, self.labels, self.console = results, order, progress, labels, console

    def on_trial_start(self, iteration, trials, trial, **info):
        tid = trial.config["trial"]["trial_id"]
        self.console.trial_started(tid)
        self.progress.start(tid)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "row" in result:
            self._record(json.loads(result["row"]))

    def on_trial_error(self, iteration, trials, trial, **info):
        planned = Trial.from_json(trial.config["trial"])
        if self.progress.states.get(planned.trial_id) == "running":
            error = getattr(trial, "error_file", None)
            self._record(trial_row(planned, {"status": "failed", "error": f"Tune trial error (see {error})"}))

    def _record(self, row: dict[str, Any]) -> None:
        tid = row["trial_id"]
        self.results.save_row(row)
        self.progress.finish(tid, row["status"])
        try:
            self.results.consolidate(self.order)
        except Exception as e:  # noqa: BLE001 - the records are safe; the next consolidation retries
            self.console.say(f"peer-sweeps: consolidation failed, will retry: {e}", style="yellow")
        self.console.trial_finished(row, self.labels.get(tid, tid), self.progress)


def run_single_trial(study_path: str | Path, trial_id: str, out: Path | None, wandb_mode: str,
                     prepare_data: bool = True) -> int:
    """`peer-sweeps trial`: one trial of a study, outside a sweep (debugging). Records it like a sweep would;
    its output is not redirected. Data progress goes to stderr, the trial's row to stdout."""
    from rich.console import Console

    from cluster.runtime import ray_session

    study, planned = load_and_plan(study_path)
    trials = {t.trial_id: t for t in planned}
    matches = [tid for tid in trials if tid.startswith(trial_id)]
    if len(matches) != 1:
        raise StudyError(f"{study_path}: trial {trial_id!r} {'is ambiguous' if matches else 'is not in the plan'}"
                         f"; see `peer-sweeps plan {study_path}`")
    trial = trials[matches[0]]
    results = ResultsDir(out or default_out(study))
    _check_data(study, study_path, prepare_data, Console(stderr=True, highlight=False, soft_wrap=True).print)
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
