"""One Ray Train job: `num_workers` processes running `train_loop(loop_config)` in a torch process group.

Runs from a plain driver or from inside a Ray Tune function trial (one job per trial). Ray Train reserves
its own placement group of `num_workers` bundles of `cpus_per_worker` CPUs (and 1 GPU each with
`use_gpu`); a Tune function that starts a job should itself hold only a fraction of a CPU
(`tune.with_resources(fn, {"cpu": TUNE_TRIAL_CPUS})`), else trials hold the CPUs their workers wait for.

A job is identified by `(storage_path, run_name)`. Ray Train resumes a run whose directory already holds
checkpoints: calling `run_train_job` again with the same name continues from the latest checkpoint (what a
retried trial wants); two different trials must never share a name, so name runs by a content hash.

A one-worker CPU job can run in-process (`in_process=True`): Ray Train's local mode runs the loop in the
calling process (a Ray Tune trial's actor, which Tune reuses from trial to trial), so no controller, placement
group, worker process or process group is started per job: that start was 5-8 s of every small trial. What
the controller did is done here: checkpoints are written into the run's directory and the latest restored
(cluster.checkpointing.in_process_run), a failed attempt is retried up to `max_failures` times in the same
process, and the process group is a one-rank gloo group kept for the life of the process. A crash of the
process itself ends the caller too: the caller retries it (Ray Tune's FailureConfig), resuming from the
run's directory. Never run in-process in a driver whose death would end more than the job.

Inside the loop (see cluster.checkpointing): `load_latest_checkpoint(engine)` at the start,
`save_checkpoint(...)` / `report_metrics(...)` on every rank at the same steps, and `return` a picklable
value from rank 0: it comes back as `JobResult.return_value`.
"""

import contextlib
import functools
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
import ray.train
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from cluster.allocator import TRAINING_MALLOC_ENV
from cluster.torch_backend import LazyTorchConfig

# Set for the duration of every job unless the caller's environment has them; Ray Train reads them in the
# driver or in its controller actor, which gets them from the driver.
JOB_ENV = {
    # The controller polls the workers, and takes one report from each, every interval (default 2 s): it
    # bounds how soon a finished job is noticed and how often a loop can report.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}
# Settings of a lean job (see LeanTorchTrainer), read by Ray Train in the driver or its controller.
LEAN_ENV = {
    # a side actor per job that watches for node drains (spot preemption); a crash is still retried
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Prometheus gauges of the controller and workers; nothing here scrapes them
    "RAY_TRAIN_METRICS_ENABLED": "0",
}

# CPU share of a Tune function trial that only drives a Train job (it waits; the workers compute).
TUNE_TRIAL_CPUS = 0.1


@dataclass(frozen=True)
class JobResult:
    return_value: Any  # what rank 0's train_loop returned
    metrics: dict[str, Any] | None  # rank 0's metrics reported with the latest checkpoint, None without one
    checkpoint_path: str | None  # the latest checkpoint (a path or URI), None without one
    path: str  # the run's directory on storage: <storage_path>/<run_name>


class TrainJobError(RuntimeError):
    """A Train job failed for good (its `max_failures` retries spent). `worker_errors`: rank -> message."""

    def __init__(self, run_name: str, message: str, worker_errors: dict[int, str]):
        super().__init__(f"Train job {run_name!r} failed: {message}")
        self.run_name = run_name
        self.worker_errors = worker_errors


# Errors of the job's own code that a retry would only repeat (the same code on the same data): a bug, a
# dtype or shape mismatch, a tensor too large for the device. A lost worker shows up on the others as some
# other error (a RuntimeError from the collective it broke, a dead actor) and is retried.
RECURRING_ERRORS = (TypeError, ValueError, AttributeError, NameError, ImportError, NotImplementedError,
                    AssertionError, IndexError, KeyError, ZeroDivisionError)
RECURRING_MESSAGES = ("expected scalar type", "dtype", "shape", "size mismatch", "mat1 and mat2", "out of memory")


class RecurringError(RuntimeError):
    """A worker's error that will recur on a retry (see `will_recur`): the job fails at once, whatever its
    max_failures. The message is the original's, prefixed by its type."""


def will_recur(error: BaseException) -> bool:
    if isinstance(error, RECURRING_ERRORS):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in RECURRING_MESSAGES)


class FailFastOnRecurringErrors(DefaultFailurePolicy):
    """Ray Train's default policy (retry a failed worker group up to max_failures times), except that a
    failure in which any worker raised a RecurringError is raised at once."""

    def make_decision(self, training_failed_error):
        failures = getattr(training_failed_error, "worker_failures", {}) or {}
        if any(isinstance(error, RecurringError) for error in failures.values()):
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class _FailFast:
    """Mixin for a Ray Train trainer: its controller uses FailFastOnRecurringErrors (Ray Train internals:
    `_initialize_and_run_controller(failure_policy=...)`)."""

    def _initialize_and_run_controller(self, **kwargs):
        kwargs["failure_policy"] = FailFastOnRecurringErrors(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**kwargs)


@functools.cache
def _state_api_available() -> bool:
    """Whether the cluster serves Ray's state API (its dashboard: ray[default], not ray[train] alone)."""
    from ray.util.state import list_nodes

    try:
        list_nodes(limit=1, timeout=5, raise_on_missing_output=False)
    except Exception:
        return False
    return True


class LeanTorchTrainer(_FailFast, DataParallelTrainer):
    """A TorchTrainer without what a DeepSpeed job here does not use.

    Ray Train V2 starts up to six processes per job (controller, worker(s), synchronization actor, dataset
    manager, preemption watcher, placement-group cleaner); on a 2-core machine each costs seconds of CPU
    while the workers import torch and DeepSpeed. Dropped: the dataset manager when no Ray Dataset is
    passed, and the placement-group cleaner when the cluster has no state API (it could never query the
    controller and logs a warning every second). The process group is `LazyTorchConfig`'s, so the
    controller never imports torch. Uses Ray Train internals (`_create_default_callbacks`); if they
    change, it falls back to the stock callbacks.
    """

    def __init__(self, train_loop_per_worker, *, backend: str, timeout_s: int, **kwargs):
        super().__init__(train_loop_per_worker,
                         backend_config=LazyTorchConfig(backend=backend, timeout_s=timeout_s), **kwargs)

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        try:
            from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
            from ray.train.v2._internal.callbacks.placement_group_callback import (
                PlacementGroupCleanerCallback,
            )
        except ImportError:
            return callbacks
        drop: tuple[type, ...] = () if self.datasets else (DatasetsCallback,)
        if not _state_api_available():
            drop += (PlacementGroupCleanerCallback,)
        return [cb for cb in callbacks if not isinstance(cb, drop)]


def _worker_entry(train_loop: Callable[[dict], Any], log_path: str | None,
                  in_process: bool = False) -> Callable[[dict], Any]:
    def entry(config: dict) -> Any:
        from cluster.deepspeed_config import set_accelerator_env
        from cluster.logs import redirect_output

        with redirect_output(log_path):
            set_accelerator_env()
            if in_process:
                _one_rank_process_group()
            try:
                return train_loop(config)
            except Exception as error:
                if will_recur(error):
                    raise RecurringError(f"{type(error).__name__}: {error}") from error
                raise

    return entry


# What a Ray Train worker finds in its environment, for a loop run in-process (DeepSpeed reads them).
ONE_RANK_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1"}


def _one_rank_process_group() -> None:
    """A gloo group of this process alone, made once and kept (later jobs in the process reuse it)."""
    import torch.distributed as dist

    os.environ.update(ONE_RANK_ENV)
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def run_train_job(
    train_loop: Callable[[dict], Any],
    loop_config: dict[str, Any],
    *,
    run_name: str,
    storage_path: str,
    num_workers: int,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    max_failures: int = 0,
    num_checkpoints_to_keep: int | None = 2,
    placement_strategy: str = "PACK",
    timeout_s: int = 1800,
    lean: bool = True,
    log_path: str | None = None,
    in_process: bool = False,
) -> JobResult:
    """Run `train_loop(loop_config)` on `num_workers` Ray Train workers and wait for it.

    `train_loop` must be importable by the workers (a module-level function of an installed package or a
    module on the driver's sys.path, which Ray passes on). It gets `loop_config` as is. A worker that
    dies or raises restarts the whole group (from the latest checkpoint) up to `max_failures` times; after
    that `TrainJobError` is raised with each failed rank's error. An error that a retry would repeat
    (`will_recur`: a TypeError, a dtype mismatch...) fails the job at its first occurrence. `timeout_s`
    bounds every collective.
    `lean`: skip Ray Train's optional side actors (LeanTorchTrainer, LEAN_ENV; environment variables the
    caller set win). The job itself computes the same either way. `log_path`: every worker appends its
    stdout and stderr (DeepSpeed's, Ray Train's, the loop's own) to this file instead of Ray's logs.
    `in_process`: run the one CPU worker in this process (see the module docstring).
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if not run_name:
        raise ValueError("run_name must be a non-empty, per-trial unique name")
    if in_process:
        if num_workers != 1 or use_gpu:
            raise ValueError("an in-process job has one CPU worker")
        return _run_in_process(train_loop, loop_config, run_name, storage_path, max_failures,
                               num_checkpoints_to_keep, log_path)
    backend = "nccl" if use_gpu else "gloo"
    if lean:
        trainer_cls = functools.partial(LeanTorchTrainer, backend=backend, timeout_s=timeout_s)
    else:
        from ray.train.torch import TorchConfig, TorchTrainer

        trainer_cls = functools.partial(type("FailFastTorchTrainer", (_FailFast, TorchTrainer), {}),
                                        torch_config=TorchConfig(backend=backend, timeout_s=timeout_s))
    trainer = trainer_cls(
        _worker_entry(train_loop, log_path),
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            placement_strategy=placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            # settings the caller's environment already has win
            worker_runtime_env={"env_vars": {k: v for k, v in TRAINING_MALLOC_ENV.items() if k not in os.environ}},
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_checkpoints_to_keep),
        ),
    )
    env = {**JOB_ENV, **(LEAN_ENV if lean else {})}
    added = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(added)
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as e:
        errors = {rank: _describe(err) for rank, err in sorted(e.worker_failures.items())}
        summary = "; ".join(f"rank {r}: {m.splitlines()[-1] if m else m}" for r, m in errors.items())
        raise TrainJobError(run_name, summary, errors) from e
    except ray.train.ControllerError as e:
        raise TrainJobError(run_name, _describe(e.controller_failure), {}) from e
    finally:
        for key in added:
            os.environ.pop(key, None)
    return JobResult(
        return_value=result.return_value,
        metrics=result.metrics if result.checkpoint is not None else None,
        checkpoint_path=None if result.checkpoint is None else result.checkpoint.path,
        path=result.path,
    )


@contextlib.contextmanager
def _outside_tune_session() -> Iterator[None]:
    """Within the block, Ray Train's API serves the in-process job even in a Ray Tune function trial's actor.

    `ray.train.get_context()`, `report()` and `get_checkpoint()` refuse to run where a Tune session is active
    (Ray 2.x: "use the equivalent ray.tune API"), and the session is one per process: a local-mode job started
    from a Tune function would find its loop refused. The Tune session is set aside for the job's duration
    (Ray internals: `ray.train._internal.session._session`) and put back before the function reports to Tune.
    The Tune actor's main thread is meanwhile waiting on that session's queue, which it fetched before."""
    from ray.train._internal import session

    tune_session, session._session = session._session, None
    try:
        yield
    finally:
        session._session = tune_session


def _run_in_process(train_loop: Callable[[dict], Any], loop_config: dict[str, Any], run_name: str,
                    storage_path: str, max_failures: int, keep: int | None, log_path: str | None) -> JobResult:
    """The job in Ray Train's local mode, its attempts retried here and its checkpoints kept in its directory."""
    from cluster.checkpointing import in_process_run

    run_dir = Path(storage_path) / run_name
    with in_process_run(run_dir, keep), _outside_tune_session():
        for attempt in range(max_failures + 1):
            trainer = DataParallelTrainer(
                _worker_entry(train_loop, log_path, in_process=True), train_loop_config=loop_config,
                scaling_config=ray.train.ScalingConfig(num_workers=0),
                run_config=ray.train.RunConfig(name=run_name, storage_path=storage_path),
            )
            try:
                result = trainer.fit()
            except Exception as error:  # noqa: BLE001 - what a worker raised: retried as Ray Train would
                if isinstance(error, RecurringError) or attempt == max_failures:
                    text = "".join(traceback.format_exception(error)).strip()
                    raise TrainJobError(run_name, f"rank 0: {text.splitlines()[-1]}", {0: text}) from error
                continue
            return JobResult(
                return_value=result.return_value,
                metrics=result.metrics if result.checkpoint is not None else None,
                checkpoint_path=None if result.checkpoint is None else result.checkpoint.path,
                path=str(run_dir),
            )
    raise AssertionError("unreachable")


def _describe(error: BaseException) -> str:
    """The worker's own traceback text where Ray kept it, else the exception's repr."""
    text = str(error).strip()
    return text or repr(error)
