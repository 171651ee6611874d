"""One trial on real Ray Train workers running DeepSpeed ZeRO (CPU, gloo), on the bundled fixture text.

Checks: 2 workers with ZeRO-2 train exactly like 1 worker with the same global batch (gradients really are
all-reduced); a PEER trial allowed no worker failure (max_failures 0) whose rank-0 worker is SIGKILLed
mid-trial fails (`peer-sweeps trial` exits 1), and `peer-sweeps trial` again resumes it from its
checkpoint: the metrics lines up to the checkpoint's step are the first attempt's, byte for byte, the ones
after it are trained again, and the final weights and optimizer state are exactly those of an uninterrupted
run; with PEER's expert tables outside ZeRO (row_sparse), a rank-0 worker SIGKILLed mid-trial of two is
replaced by Ray Train and the trial resumes to the losses of one worker; the W&B offline run holds the
logged metrics (read back through W&B's own record schema); a loss that blows up (not NaN: above
`divergence_factor` times the first loss) ends the trial as "diverged".
"""

from __future__ import annotations

import copy
import json
import math
import re
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from typer.testing import CliRunner

from peer_sweeps.plan import plan_study
from peer_sweeps.study import parse_study
from peer_sweeps.tracking import read_metrics
from peer_sweeps.trial import METRICS_FILE, run_trial, trial_dir
from wandb_records import history as wandb_history

pytestmark = pytest.mark.slow

SMOKE = yaml.safe_load((Path(__file__).parents[1] / "studies" / "smoke.yaml").read_text())
GOLDEN_TRIAL = Path(__file__).parent / "golden" / "trial.json"
GOLDEN_TOLERANCE = 2e-4  # relative, as tests/test_model_golden.py


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from peer_sweeps.data import prepare_suite

    root = tmp_path_factory.mktemp("data")
    prepare_suite("fixture", root, 512)
    return root


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    from cluster.runtime import ray_session

    with ray_session(None, num_cpus=3, storage_path=tmp_path_factory.mktemp("ray")) as session:
        yield session


def make_study(data_root, method="dense", workers=1, budget=2.0e9, method_params=None, **training) -> dict:
    """The smoke study cut to one trial of `method` at d32 L2."""
    study = copy.deepcopy(SMOKE)
    study["data"]["root"] = str(data_root)
    study["methods"] = {method: {**SMOKE["methods"][method], **(method_params or {})}}
    study["design"] = {"kind": "isoflop", "budgets": [budget], "sizes": [{"d_model": 32, "n_layers": 2}]}
    study["resources"]["workers_per_trial"] = workers
    study["training"].update(training)
    return study


def make_trial(data_root, **study):
    (trial,) = plan_study(parse_study(make_study(data_root, **study)))
    return trial


def peer_sweeps_trial(study: dict, out: Path, *options: str):
    """`peer-sweeps trial STUDY TRIAL_ID --out OUT` in this process (on the module's Ray instance)."""
    path = out.parent / f"{out.name}-study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    (trial,) = plan_study(parse_study(study))
    from peer_sweeps.cli import app

    return CliRunner().invoke(app, ["trial", str(path), trial.trial_id, "--out", str(out), *options],
                              prog_name="peer-sweeps")


def recorded_row(results_dir: Path, trial_id: str) -> dict:
    """The row `peer-sweeps trial` recorded (its stdout also carries the workers' output that Ray forwards)."""
    return json.loads((results_dir / "results" / f"{trial_id}.json").read_text())


def losses(results_dir, trial):
    return [r["train_loss"] for r in read_metrics(trial_dir(results_dir, trial.trial_id) / METRICS_FILE)]


def golden_trial(data_root):
    """The trial of golden/trial.json: the smoke study's dense d32 L2 trial on one worker."""
    return make_trial(data_root, workers=1, zero_stage=2)


def golden_figures(trial, row, results_dir) -> dict:
    """What golden/trial.json holds: the train loss of every step and the final evaluation figures."""
    return {"train_loss": losses(results_dir, trial),
            **{key: row[key] for key in sorted(row) if key.startswith(("ppl", "bpb_")) and row[key] is not None}}


@pytest.fixture(scope="module")
def one_worker(ray_cluster, data_root, tmp_path_factory):
    trial, out = golden_trial(data_root), tmp_path_factory.mktemp("one") / "out"
    return trial, run_trial(trial, out, "disabled", data_root=data_root), out


def test_the_trial_reproduces_its_golden_curve_and_evaluation(one_worker):
    """Optimizer, schedule, clipping, weight-decay groups, batch sampler and evaluation as the worker loop
    runs them (regenerate: `make golden`)."""
    trial, row, out = one_worker
    figures = golden_figures(trial, row, out)
    golden = json.loads(GOLDEN_TRIAL.read_text())
    assert sorted(figures) == sorted(golden) and len(golden["train_loss"]) == trial.steps
    for key, want in golden.items():
        assert figures[key] == pytest.approx(want, rel=GOLDEN_TOLERANCE), key


def test_two_zero2_workers_train_like_one(one_worker, data_root, tmp_path):
    one, row1, one_dir = one_worker
    two = make_trial(data_root, workers=2, zero_stage=2)
    assert one.trial_id == two.trial_id  # resources do not change what is trained
    row2 = run_trial(two, tmp_path / "two", "disabled", data_root=data_root)
    assert row1["status"] == row2["status"] == "completed", (row1["error"], row2["error"])
    assert row1["wall_seconds"] >= row1["train_seconds"] > 0  # the trial's start to its row, training inside
    l1, l2 = losses(one_dir, one), losses(tmp_path / "two", two)
    assert len(l1) == len(l2) == one.steps >= 20
    assert l1[-1] < l1[0] - 0.5  # it learns
    assert l2 == pytest.approx(l1, rel=1e-4)
    # Run again (as after a driver killed between the final checkpoint and its row): the Train run resumes
    # at its last step, trains nothing, and still reports the final evaluation.
    again = run_trial(one, one_dir, "disabled", data_root=data_root)
    assert again["status"] == "completed" and again["ppl"] == pytest.approx(row1["ppl"], rel=1e-6)
    assert losses(one_dir, one) == l1


@pytest.fixture(scope="module")
def killed_and_clean(ray_cluster, data_root, tmp_path_factory, monkeypatch_module):
    """The same PEER trial, allowed no worker failure (max_failures 0), twice: once uninterrupted; once
    through `peer-sweeps trial` with its rank-0 worker SIGKILLed after the second of four checkpoints, then
    `peer-sweeps trial` again (the next run)."""
    spec = make_study(data_root, method="peer", budget=1.95e9, checkpoints=4, evals=2, max_failures=0)  # 33 steps
    (trial,) = plan_study(parse_study(spec))
    clean_dir, killed_dir = tmp_path_factory.mktemp("clean") / "out", tmp_path_factory.mktemp("killed") / "out"
    clean = run_trial(trial, clean_dir, "offline", data_root=data_root)
    kill_step = trial.steps * 3 // 4
    monkeypatch_module.setenv("PEER_SWEEPS_FAULT", f"kill:{trial.trial_id}:{kill_step}")
    failed = peer_sweeps_trial(spec, killed_dir, "--wandb", "disabled")
    monkeypatch_module.delenv("PEER_SWEEPS_FAULT")
    failed_row = recorded_row(killed_dir, trial.trial_id)
    left = (trial_dir(killed_dir, trial.trial_id) / METRICS_FILE).read_bytes()
    resumed = peer_sweeps_trial(spec, killed_dir, "--wandb", "disabled")
    return trial, clean, clean_dir, (failed, failed_row, left, resumed), killed_dir, kill_step


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_a_worker_death_beyond_max_failures_fails_the_trial(killed_and_clean):
    trial, _, _, (failed, row, left, _), killed_dir, kill_step = killed_and_clean
    assert (trial_dir(killed_dir, trial.trial_id) / ".fault-kill-done").exists(), "the fault did not fire"
    assert failed.exit_code == 1, failed.output
    assert row["status"] == "failed" and row["attempts"] == 1 and row["error"], row
    # The first attempt trained up to the kill and no further.
    assert [json.loads(line)["step"] for line in left.splitlines()] == list(range(1, kill_step))


def test_the_next_run_resumes_from_the_checkpoint(killed_and_clean):
    trial, clean, clean_dir, (_, _, left, resumed), killed_dir, kill_step = killed_and_clean
    assert resumed.exit_code == 0, resumed.output
    row = recorded_row(killed_dir, trial.trial_id)
    assert row["status"] == clean["status"] == "completed" and row["attempts"] == 2, row
    lines = (trial_dir(killed_dir, trial.trial_id) / METRICS_FILE).read_bytes().splitlines(keepends=True)
    assert_resumed_at_checkpoint(lines, left.splitlines(keepends=True), trial, kill_step)
    # The resumed run ends exactly where the uninterrupted one does: weights and optimizer state.
    assert losses(killed_dir, trial) == losses(clean_dir, trial)
    assert row["ppl"] == clean["ppl"]
    assert_same_tensors(final_engine_state(killed_dir, trial), final_engine_state(clean_dir, trial))
    # Of the four checkpoints only the final one is kept (training.keep_checkpoints, default 1), killed run or
    # not: the one `peer-sweeps eval` re-evaluates from.
    for directory in (clean_dir, killed_dir):
        kept = [p.name for p in trial_dir(directory, trial.trial_id).glob("checkpoint_step*") if p.is_dir()]
        assert len(kept) == 1 and kept[0].startswith(f"checkpoint_step{trial.steps:08d}_"), kept


def assert_resumed_at_checkpoint(lines: list[bytes], first_attempt: list[bytes], trial, kill_step: int) -> None:
    """`lines` (the trial's metrics.jsonl at the end) continue `first_attempt` (the file as the killed attempt
    left it) from the last checkpoint before `kill_step`, of four evenly spaced: only a resume keeps the lines
    up to the checkpoint's step as the first attempt wrote them (their `seconds` are wall-clock times: a
    restart from step 0 writes other ones) and trains the step after it again."""
    checkpoint = max(step for step in (round(trial.steps * i / 4) for i in range(1, 5)) if step < kill_step)
    assert len(first_attempt) > checkpoint + 1, "the first attempt's record ends before the checkpoint"
    assert [json.loads(line)["step"] for line in lines] == list(range(1, trial.steps + 1))
    assert lines[:checkpoint] == first_attempt[:checkpoint]
    assert lines[checkpoint] != first_attempt[checkpoint]


def final_checkpoint(results_dir, trial) -> Path:
    (last, *_) = sorted(trial_dir(results_dir, trial.trial_id).glob("checkpoint_*"), reverse=True)
    return last


def final_engine_state(results_dir, trial) -> dict:
    """The model weights and every optimizer tensor (ZeRO's fp32 partition and Adam moments) of the last
    checkpoint, by file name."""
    state = {}
    for path in sorted((final_checkpoint(results_dir, trial) / "engine").glob("*.pt")):
        saved = torch.load(path, weights_only=False, map_location="cpu")
        state[path.name] = {key: saved[key] for key in ("module", "optimizer_state_dict") if key in saved}
    assert any("module" in s for s in state.values()) and any("optimizer_state_dict" in s for s in state.values())
    return state


def assert_same_tensors(got, want, where="") -> None:
    """Equal to the bit: every tensor, at every key and index."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            assert_same_tensors(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_tensors(a, b, f"{where}/{i}")


ROW_SPARSE_PEER = dict(method="peer", method_params={"query_bn": False}, budget=1.95e9, checkpoints=4, evals=2,
                       expert_tables="row_sparse")  # 33 steps


@pytest.fixture(scope="module")
def row_sparse_runs(ray_cluster, data_root, tmp_path_factory, monkeypatch_module):
    """A PEER trial with row_sparse expert tables (query BN off: its statistics are per rank) run on one
    worker, then on two workers whose rank 0 is SIGKILLed after the second of four checkpoints."""
    trial = make_trial(data_root, **ROW_SPARSE_PEER)
    two = make_trial(data_root, **ROW_SPARSE_PEER, workers=2)
    one_dir, two_dir = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    monkeypatch_module.delenv("PEER_SWEEPS_FAULT", raising=False)
    one = run_trial(trial, one_dir, "disabled", data_root=data_root)
    monkeypatch_module.setenv("PEER_SWEEPS_FAULT", f"kill:{trial.trial_id}:{trial.steps * 3 // 4}")
    watcher = FirstAttemptRecord(trial_dir(two_dir, trial.trial_id))
    killed = run_trial(two, two_dir, "disabled", data_root=data_root)
    monkeypatch_module.delenv("PEER_SWEEPS_FAULT")
    return trial, one, one_dir, killed, two_dir, watcher.stop()


class FirstAttemptRecord:
    """Copies a trial's metrics.jsonl, over and over, until the kill fault's marker appears (its rank-0 worker
    touches it just before it SIGKILLs itself): `stop()` returns the last copy, the killed attempt's lines
    (the replacement worker, seconds later, rewrites the file)."""

    def __init__(self, directory: Path):
        self.metrics, self.marker = directory / METRICS_FILE, directory / ".fault-kill-done"
        self.copy = b""
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopped.is_set() and not self.marker.exists():
            try:
                self.copy = self.metrics.read_bytes()
            except OSError:
                pass
            time.sleep(0.002)

    def stop(self) -> bytes:
        self._stopped.set()
        self._thread.join()
        return self.copy


def test_row_sparse_tables_resume_and_train_alike_on_two_workers(row_sparse_runs, data_root):
    trial, one, one_dir, killed, two_dir, first_attempt = row_sparse_runs
    assert trial.training["expert_tables"] == "row_sparse"
    assert trial.trial_id != make_trial(data_root, **{**ROW_SPARSE_PEER, "expert_tables": "zero"}).trial_id
    assert one["status"] == killed["status"] == "completed", (one["error"], killed["error"])
    assert (trial_dir(two_dir, trial.trial_id) / ".fault-kill-done").exists(), "the fault did not fire"
    # Ray Train replaced the killed worker and the new group resumed at the checkpoint ...
    lines = (trial_dir(two_dir, trial.trial_id) / METRICS_FILE).read_bytes().splitlines(keepends=True)
    assert_resumed_at_checkpoint(lines, first_attempt.splitlines(keepends=True), trial, trial.steps * 3 // 4)
    # The resumed two-worker run follows the uninterrupted one-worker run step for step...
    l1, l2 = losses(one_dir, trial), losses(two_dir, trial)
    assert len(l1) == len(l2) == trial.steps >= 20
    assert l1[-1] < l1[0] - 0.5
    assert l2 == pytest.approx(l1, rel=1e-4)
    assert killed["ppl"] == pytest.approx(one["ppl"], rel=1e-4)
    # ...and so do the tables' Adam moments, checkpointed beside the engine: restored, not restarted. (Row by
    # row they differ where rounding flipped a near-tie in the routing; their norms agree.)
    final1, final2 = final_table_optimizer(one_dir, trial), final_table_optimizer(two_dir, trial)
    assert len(final1["state"]) == len(final2["state"]) == 2  # w_down, w_up of the one PEER layer
    for state1, state2 in zip(final1["state"].values(), final2["state"].values()):
        assert state1["step"] == state2["step"] == trial.steps
        for name in ("exp_avg", "exp_avg_sq"):
            assert float(state2[name].norm()) == pytest.approx(float(state1[name].norm()), rel=1e-2)


def final_table_optimizer(results_dir, trial) -> dict:
    return torch.load(final_checkpoint(results_dir, trial) / "shared.pt", weights_only=False)["expert_tables"]


def test_wandb_offline_run_mirrors_the_local_record(killed_and_clean):
    trial, _, clean_dir, *_ = killed_and_clean
    (run_dir,) = (clean_dir / "wandb").glob(f"offline-run-*-{trial.trial_id}")
    history = wandb_history(run_dir / f"run-{trial.trial_id}.wandb")
    local = read_metrics(trial_dir(clean_dir, trial.trial_id) / METRICS_FILE)
    assert [h["train_loss"] for h in history] == pytest.approx([r["train_loss"] for r in local])
    assert [h["tokens"] for h in history] == [r["tokens"] for r in local]
    evals = [h for h in history if "ppl" in h]
    assert len(evals) == 2 and evals[-1]["ppl"] == pytest.approx(local[-1]["ppl"])


def test_loss_blow_up_ends_the_trial_as_diverged(ray_cluster, data_root, tmp_path):
    """A learning rate of 10 sends the loss from about 6 to the hundreds within a few steps: finite, but
    above divergence_factor (3) times the first loss. (A NaN loss: tests/test_reliability.py.)"""
    study = make_study(data_root, method="dense", lr=10.0)
    result = peer_sweeps_trial(study, tmp_path / "out", "--wandb", "disabled")
    assert result.exit_code == 0, result.output  # diverged is a result, not a failure
    row = recorded_row(tmp_path / "out", make_trial(data_root, method="dense", lr=10.0).trial_id)
    assert row["status"] == "diverged" and row["ppl"] is None, row
    loss, step, first = re.fullmatch(r"diverged: loss (\S+) at step (\d+) \(first loss (\S+)\)", row["error"]).groups()
    assert math.isfinite(float(loss)) and float(loss) > 3 * float(first), row["error"]
    records = read_metrics(trial_dir(tmp_path / "out", row["trial_id"]) / METRICS_FILE)
    assert records[-1]["diverged"] and records[-1]["step"] == int(step) < row["steps"]
