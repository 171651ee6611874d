"""Checkpoints and metric reports from inside a Ray Train worker running a DeepSpeed engine.

Layout of one checkpoint (one directory in `<storage_path>/<run_name>/`, named `checkpoint_step<N>_<time>`):
    engine/<files>          DeepSpeed `engine.save_checkpoint(dir, tag="engine")`: model, ZeRO optimizer
                            shards (one file per rank), LR scheduler
    latest                  DeepSpeed's pointer to the tag
    state_rank<r>.pt        per rank: step, the caller's state dict, torch RNG states
    shared.pt               state that is the same on every rank, outside the engine (written by rank 0)

Every rank writes its own files into a local temporary directory and reports it; Ray Train copies each rank's
directory into the same checkpoint directory on storage (the names synced from rank 0), which merges the
ZeRO shards, then deletes the temporary directory. `ray.train.report` is a barrier: every rank must call
`save_checkpoint` / `report_metrics` equally often. Only rank 0's metrics are kept by Ray Train.

Retention: Ray Train keeps the run's `keep` latest checkpoints (`CheckpointConfig(num_to_keep=keep)`, set by
cluster.train_job), deleting the older one only after the newer is registered, so a worker killed while
saving resumes from the previous one; `prune_checkpoints` removes, once a run has completed, what a killed
attempt left half-written beside them.

A job run in-process (Ray Train's local mode, one worker: see cluster.train_job) has no controller to move
or keep checkpoints: within `in_process_run(run_dir, keep)` every checkpoint is written straight into the run's
directory (under a `.partial-` name, renamed when whole), the `keep` latest are kept, and the latest whole
one is what `load_latest_checkpoint` restores. The layout is the same.

Ray Train's controller takes one report per worker per poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, default 2 s,
0.2 s when run through cluster.train_job): a report blocks until the previous one was taken, so report at
intervals, not every step.
"""

import os
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import ray.train
import torch

ENGINE_TAG = "engine"
SHARED_FILE = "shared.pt"
CHECKPOINT_PREFIX = "checkpoint_step"
PARTIAL_PREFIX = ".partial-"


@dataclass(frozen=True)
class InProcessRun:
    """The run directory and retention of a job whose one worker runs in the calling process."""
    path: Path
    keep: int | None

    def latest(self) -> Path | None:
        """The newest whole checkpoint (names sort by step, then by time of saving)."""
        checkpoints = sorted(p for p in self.path.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
        return checkpoints[-1] if checkpoints else None

    def publish(self, partial: Path, name: str) -> Path:
        """Renames a written checkpoint into place, then deletes all but the `keep` latest."""
        final = self.path / name
        os.replace(partial, final)
        if self.keep:
            prune_checkpoints(self.path, self.keep)
        return final


_in_process_run: InProcessRun | None = None


@contextmanager
def in_process_run(run_dir: str | Path, keep: int | None) -> Iterator[InProcessRun]:
    """Within the block, checkpoints are kept in `run_dir` by this process (see the module docstring). What a
    killed attempt left half-written is removed first."""
    global _in_process_run
    run = InProcessRun(Path(run_dir), keep)
    run.path.mkdir(parents=True, exist_ok=True)
    for partial in run.path.glob(f"{PARTIAL_PREFIX}*"):
        shutil.rmtree(partial, ignore_errors=True)
    _in_process_run = run
    try:
        yield run
    finally:
        _in_process_run = None


def _rank() -> int:
    return ray.train.get_context().get_world_rank()


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, step: int, state: dict[str, Any] | None, metrics: dict[str, Any],
                    shared: dict[str, Any] | None = None) -> None:
    """Save the engine and `state` after `step` optimizer steps, and report `metrics` with the checkpoint.

    Call on every rank at the same steps. `state` is this rank's picklable dict (data position, history...).
    `shared`: state every rank holds identically outside the engine (an optimizer of replicated parameters):
    saved once, from rank 0.
    """
    rank = _rank()
    # Rank 0's name wins (Ray syncs it); the time suffix keeps a re-save of the same step from merging into,
    # and later being deleted with, an older directory.
    name = f"{CHECKPOINT_PREFIX}{step:08d}_{time.strftime('%Y%m%d-%H%M%S')}_{time.time_ns() % 10**9:09d}"
    run = _in_process_run
    if run is not None:
        local_dir = str(run.path / f"{PARTIAL_PREFIX}{name}")
        os.makedirs(local_dir)
    else:
        local_dir = tempfile.mkdtemp(prefix=f"ckpt-step{step}-rank{rank}-")
    engine.save_checkpoint(local_dir, tag=ENGINE_TAG, client_state={"step": step})
    torch.save(
        {"step": step, "state": state or {}, "rng": _rng_state()},
        Path(local_dir) / f"state_rank{rank}.pt",
    )
    if shared is not None and rank == 0:
        torch.save(shared, Path(local_dir) / SHARED_FILE)
    if run is not None:
        final = run.publish(Path(local_dir), name)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(final)))
        return
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(local_dir),
        checkpoint_dir_name=name,
        delete_local_checkpoint_after_upload=True,
    )


def report_metrics(metrics: dict[str, Any]) -> None:
    """Report metrics without a checkpoint (a barrier too: call on every rank)."""
    ray.train.report(metrics)


def load_latest_checkpoint(engine) -> dict[str, Any] | None:
    """Restore the engine, RNG states and caller state from the run's latest checkpoint, if there is one.

    Returns None on a fresh start, else `{"step": N, "state": <the dict this rank saved>, "shared": <the
    shared state saved with it, or None>}` (rank 0's state when this rank has none, e.g. after a change of
    world size).
    """
    if _in_process_run is not None:
        latest = _in_process_run.latest()
        return None if latest is None else _restore(engine, latest)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return _restore(engine, Path(directory))


def _restore(engine, directory: Path) -> dict[str, Any]:
    load_path, client_state = engine.load_checkpoint(str(directory), tag=ENGINE_TAG)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no engine checkpoint in {directory}")
    state_file = directory / f"state_rank{_rank()}.pt"
    if not state_file.exists():
        state_file = directory / "state_rank0.pt"
    saved = torch.load(state_file, weights_only=False)
    shared_file = directory / SHARED_FILE
    shared = torch.load(shared_file, weights_only=False) if shared_file.exists() else None
    assert saved["step"] == client_state["step"], (saved["step"], client_state["step"])
    _set_rng_state(saved["rng"])
    return {"step": saved["step"], "state": saved["state"], "shared": shared}


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """On a completed run's directory: delete every checkpoint but the `keep` latest (by step, then by time of
    saving: their names sort so); returns the deleted directories. Call it only once the run is over: a
    running one may be writing the next checkpoint."""
    assert keep >= 1, keep
    checkpoints = sorted(p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
    doomed = checkpoints[:-keep]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def world_rank() -> int:
    return _rank()


def world_size() -> int:
    return ray.train.get_context().get_world_size()


def checkpoint_dir() -> str | None:
    """Path (or URI) of the checkpoint this attempt started from, None on a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    return None if checkpoint is None else checkpoint.path


__all__ = [
    "ENGINE_TAG",
    "save_checkpoint",
    "report_metrics",
    "load_latest_checkpoint",
    "prune_checkpoints",
    "in_process_run",
    "world_rank",
    "world_size",
    "checkpoint_dir",
]
