"""A trial's local metrics record (the source of truth) and its W&B mirror.

`metrics.jsonl`: one JSON object per optimizer step: step, tokens, flops, seconds, train_loss, lr, and at
evaluation steps loss, ppl, ppl_<set>, bpb_<set>, usage, unevenness. A trial resumed from a checkpoint
at step S first drops the lines after S, so the record never holds a step twice.

W&B mirrors it from rank 0 only (every evaluation, and training steps at a stride: about 200 a run): id =
trial id, group = study, job_type = kind, config = the resolved trial with its derived counts beside flat
keys to group and filter runs by (`COMPARISON_KEYS`, valued as in trials.parquet), tags for method and
budget, every metric plotted against tokens (`flops` is logged and defined too, so any panel can switch its
x-axis to it), the final evaluation in the summary. A W&B failure (no network, an init time-out after
$PEER_SWEEPS_WANDB_INIT_TIMEOUT seconds, default 60, a full disk) never stops the trial: it is reported once
per trial (one stderr line from the trial's rank-0 worker, naming the trial, which `peer-sweeps run` copies
from the trial's log to its console) and the mirror goes quiet.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from .plan import Trial


class MetricsLog:
    def __init__(self, path: Path, truncate_after_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r["step"] <= truncate_after_step] if truncate_after_step else []
        # Named like every other temporary file here (`.<name>.tmp<pid>`): what a killed writer leaves, the next
        # run's clean-up removes (peer_sweeps.results.ResultsDir.remove_partial_files).
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self._file = self.path.open("a")

    def append(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a torn last line (a killed writer) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def resolve_wandb_mode(cli_mode: str | None, study_mode: str) -> str:
    """--wandb beats WANDB_MODE beats the study's tracking.wandb_mode."""
    mode = cli_mode or os.environ.get("WANDB_MODE") or study_mode
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"W&B mode {mode!r}: expected online, offline or disabled")
    return mode


COMPARISON_KEYS = ("method", "budget_flops", "params_active", "params_total", "params_backbone", "d_model",
                   "n_layers", "num_experts", "expert_heads", "top_k", "query_bn", "seed", "lr")


def wandb_config(trial: Trial, row: dict[str, Any]) -> dict[str, Any]:
    """A trial run's W&B config: the resolved trial (model, training, data nested) and the flat
    `COMPARISON_KEYS`, valued as in its trials.parquet `row` (null where a method has no such setting)."""
    return {**trial.to_json(), **{key: row[key] for key in COMPARISON_KEYS}}


# Training points a trial's W&B run gets at most (besides its evaluations): a W&B chart draws a sample of
# ~1,500 points, and each `run.log` costs ~0.35 ms of the trial's thread plus the W&B service's CPU, which on a
# small machine is another trial's. metrics.jsonl (and curves.parquet) keep every step.
WANDB_TRAINING_POINTS = 200


class WandbMirror:
    """Mirrors metrics to a W&B run: every evaluation, and the training steps at a stride that keeps a run
    to about `WANDB_TRAINING_POINTS` of them (`total_steps`; the last step always); becomes a no-op after the
    first W&B error."""

    def __init__(self, run, trial_id: str = "", mode: str = "disabled", total_steps: int = 0):
        self.run, self.trial_id, self.mode = run, trial_id, mode
        self.total_steps = total_steps
        self.stride = max(1, -(-total_steps // WANDB_TRAINING_POINTS))
        self.warned = False

    @classmethod
    def start(cls, trial: Trial, row: dict[str, Any], results_dir: str, mode: str, project: str,
              resumed: bool = False) -> WandbMirror:
        """`row`: the trial's trials.parquet row as planned, whose `COMPARISON_KEYS` the run's config carries."""
        if mode == "disabled":
            return cls(None)
        mirror = cls(None, trial.trial_id, mode, trial.steps)
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            _forget_dead_wandb_service()
            run = wandb.init(
                project=project, id=trial.trial_id, name=trial.label, group=trial.study, job_type=trial.kind,
                config=wandb_config(trial, row), tags=[trial.method] + ([f"budget={trial.budget_flops:.3g}"] if trial.budget_flops else []),
                dir=results_dir, mode=mode, resume="allow", reinit="create_new",
                settings=wandb.Settings(init_timeout=float(os.environ.get("PEER_SWEEPS_WANDB_INIT_TIMEOUT", 60)),
                                        console="off", x_disable_stats=True),
            )
            run.define_metric("tokens")
            run.define_metric("flops")
            run.define_metric("*", step_metric="tokens")
            mirror.run = run
        except Exception as e:  # noqa: BLE001 - W&B must never cost the local record
            mirror._warn_once(e)
        return mirror

    def log(self, record: dict[str, Any]) -> None:
        if self.run is None:
            return
        step = record["step"]
        if step % self.stride and step != self.total_steps and "ppl" not in record:
            return
        try:
            self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
        except Exception as e:  # noqa: BLE001
            self._warn_once(e)
            self.run = None

    def finish(self, final: dict[str, Any], status: str) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update({"status": status, **{k: v for k, v in final.items() if isinstance(v, (int, float))}})
            self.run.finish(exit_code=0 if status == "completed" else 1)
        except Exception as e:  # noqa: BLE001
            self._warn_once(e)
            self.run = None

    def _warn_once(self, error: Exception) -> None:
        if not self.warned:
            self.warned = True
            # Not print(): Ray Train patches it in workers and, once W&B has wrapped sys.stderr, it writes
            # every line twice (to the stream and to Train's log).
            sys.stderr.write(wandb_warning(self.trial_id, self.mode, error) + "\n")
            sys.stderr.flush()


def _forget_dead_wandb_service() -> None:
    """W&B runs of one process share one service process (wandb-core), started by the first run. Trials now
    follow one another in one process (a reused Tune actor): if the service died with an earlier trial, the
    next trial's init would fail on its closed connection. Then the library is torn down, and the next init
    starts a fresh service. (W&B internals, `wandb_setup._singleton`; if they change, nothing is done.)"""
    import wandb
    from wandb.sdk import wandb_setup

    try:
        service = wandb_setup._singleton._connection._proc._process
    except AttributeError:
        return
    if service.poll() is not None:
        try:
            wandb.teardown()
        except Exception:  # noqa: BLE001 - the teardown of a dead service reports its lost connection
            pass


def wandb_warning(trial_id: str, mode: str, error: Exception) -> str:
    """The one line that reports a W&B failure of a trial."""
    cause = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (f"peer-sweeps: W&B ({mode}) unavailable for trial {trial_id}, continuing with its local record "
            f"only (trials/{trial_id}/metrics.jsonl): {type(error).__name__}: {cause}")
