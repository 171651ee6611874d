"""A one-worker CPU trial trained in its Tune trial's actor (cluster.train_job's in-process job, issue 19).

- `test_in_process_trains_like_a_worker_process`: a PEER trial run in-process (in a Ray task's process, as a
  Tune actor runs it) and as a Ray Train worker process: the same losses, perplexity and final weights and
  optimizer state, to the bit; the in-process run keeps its checkpoints in its own directory (only the
  final one at the end) and leaves no half-written one.
- `test_a_trial_killed_in_its_actor_resumes_from_its_checkpoint`: `peer-sweeps run` of that trial, allowed
  one failure, whose actor is SIGKILLed after the second of four checkpoints: Tune starts the trial again
  in a fresh actor, which resumes from the checkpoint on disk (the record up to it is the first attempt's,
  byte for byte) and ends exactly where the uninterrupted run does.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import ray
import yaml

from peer_sweeps.plan import plan_study
from peer_sweeps.study import parse_study
from peer_sweeps.trial import METRICS_FILE, run_trial, trial_dir
from test_reliability import PEER_SWEEPS, _env
from test_trial import (FirstAttemptRecord, assert_resumed_at_checkpoint, assert_same_tensors, data_root,  # noqa: F401
                        final_engine_state, losses, make_study, ray_cluster)

pytestmark = pytest.mark.slow


def peer_study(data_root, **training) -> dict:
    return make_study(data_root, method="peer", budget=1.95e9, checkpoints=4, evals=2, **training)  # 33 steps


@pytest.fixture(scope="module")
def both_ways(ray_cluster, data_root, tmp_path_factory):
    (trial,) = plan_study(parse_study(peer_study(data_root, max_failures=0)))
    worker_dir, local_dir = tmp_path_factory.mktemp("worker") / "out", tmp_path_factory.mktemp("local") / "out"
    in_worker = run_trial(trial, worker_dir, "disabled", data_root=data_root)
    in_task = ray.remote(num_cpus=1)(run_trial)
    in_process = ray.get(in_task.remote(trial, local_dir, "disabled", data_root=data_root, in_process=True))
    return trial, (in_worker, worker_dir), (in_process, local_dir)


def test_in_process_trains_like_a_worker_process(both_ways):
    trial, (in_worker, worker_dir), (in_process, local_dir) = both_ways
    assert in_worker["status"] == in_process["status"] == "completed", (in_worker["error"], in_process["error"])
    assert losses(local_dir, trial) == losses(worker_dir, trial) and len(losses(local_dir, trial)) == trial.steps
    assert in_process["ppl"] == in_worker["ppl"] and in_process["usage"] == in_worker["usage"]
    assert_same_tensors(final_engine_state(local_dir, trial), final_engine_state(worker_dir, trial))
    directory = trial_dir(local_dir, trial.trial_id)
    kept = sorted(p.name for p in directory.iterdir() if p.name.startswith(("checkpoint", ".")))
    assert len(kept) == 1 and kept[0].startswith(f"checkpoint_step{trial.steps:08d}_"), kept


def test_a_trial_killed_in_its_actor_resumes_from_its_checkpoint(both_ways, data_root, tmp_path):
    trial, _, (clean, clean_dir) = both_ways
    spec, study = peer_study(data_root, max_failures=1), tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(spec, sort_keys=False))
    (planned,) = plan_study(parse_study(spec))
    out = tmp_path / "out"
    kill_step = trial.steps * 3 // 4
    env = _env(PEER_SWEEPS_FAULT=f"kill:{planned.trial_id}:{kill_step}")
    watcher = FirstAttemptRecord(trial_dir(out, planned.trial_id))
    done = subprocess.run([*PEER_SWEEPS, "run", str(study), "--out", str(out), "--wandb", "disabled"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    first_attempt = watcher.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (trial_dir(out, planned.trial_id) / ".fault-kill-done").exists(), "the fault did not fire"
    row = json.loads((out / "results" / f"{planned.trial_id}.json").read_text())
    assert row["status"] == "completed", row
    lines = (trial_dir(out, planned.trial_id) / METRICS_FILE).read_bytes().splitlines(keepends=True)
    assert_resumed_at_checkpoint(lines, first_attempt.splitlines(keepends=True), planned, kill_step)
    assert losses(out, planned) == losses(clean_dir, trial)
    assert row["ppl"] == clean["ppl"]
    assert_same_tensors(final_engine_state(out, planned), final_engine_state(clean_dir, trial))
