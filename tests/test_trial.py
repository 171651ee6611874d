"""One trial on real Ray Train workers running DeepSpeed ZeRO (CPU, gloo), on the bundled fixture text.

Checks: 2 workers with ZeRO-2 train exactly like 1 worker with the same global batch (gradients really are
all-reduced); a rank-0 worker SIGKILLed mid-trial is replaced and the trial resumes from its checkpoint to
the very losses of an uninterrupted run; the same two with PEER's expert tables outside ZeRO (row_sparse);
the W&B offline run holds the logged metrics (read back through W&B's own record schema); a NaN loss ends
the trial as "diverged".
"""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import pytest
import torch
import yaml

from peer_sweeps.plan import plan_study
from peer_sweeps.study import parse_study
from peer_sweeps.tracking import read_metrics
from peer_sweeps.trial import METRICS_FILE, run_trial, trial_dir

pytestmark = pytest.mark.slow

SMOKE = yaml.safe_load((Path(__file__).parents[1] / "studies" / "smoke.yaml").read_text())


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


def make_trial(data_root, method="dense", workers=1, budget=2.0e9, method_params=None, **training):
    study = copy.deepcopy(SMOKE)
    study["data"]["root"] = str(data_root)
    study["methods"] = {method: {**SMOKE["methods"][method], **(method_params or {})}}
    study["design"] = {"kind": "isoflop", "budgets": [budget], "sizes": [{"d_model": 32, "n_layers": 2}]}
    study["resources"]["workers_per_trial"] = workers
    study["training"].update(training)
    (trial,) = plan_study(parse_study(study))
    return trial


def losses(results_dir, trial):
    return [r["train_loss"] for r in read_metrics(trial_dir(results_dir, trial.trial_id) / METRICS_FILE)]


def test_two_zero2_workers_train_like_one(ray_cluster, data_root, tmp_path):
    one = make_trial(data_root, workers=1, zero_stage=2)
    two = make_trial(data_root, workers=2, zero_stage=2)
    assert one.trial_id == two.trial_id  # resources do not change what is trained
    row1 = run_trial(one, tmp_path / "one", "disabled", data_root=data_root)
    row2 = run_trial(two, tmp_path / "two", "disabled", data_root=data_root)
    assert row1["status"] == row2["status"] == "completed", (row1["error"], row2["error"])
    assert row1["wall_seconds"] >= row1["train_seconds"] > 0  # the trial's start to its row, training inside
    l1, l2 = losses(tmp_path / "one", one), losses(tmp_path / "two", two)
    assert len(l1) == len(l2) == one.steps >= 20
    assert l1[-1] < l1[0] - 0.5  # it learns
    assert l2 == pytest.approx(l1, rel=1e-4)
    # Run again (as after a driver killed between the final checkpoint and its row): the Train run resumes
    # at its last step, trains nothing, and still reports the final evaluation.
    again = run_trial(one, tmp_path / "one", "disabled", data_root=data_root)
    assert again["status"] == "completed" and again["ppl"] == pytest.approx(row1["ppl"], rel=1e-6)
    assert losses(tmp_path / "one", one) == l1


@pytest.fixture(scope="module")
def killed_and_clean(ray_cluster, data_root, tmp_path_factory, monkeypatch_module):
    """The same PEER trial twice: once uninterrupted, once with its rank-0 worker SIGKILLed mid-way."""
    trial = make_trial(data_root, method="peer", checkpoints=4, evals=2)
    clean_dir, killed_dir = tmp_path_factory.mktemp("clean"), tmp_path_factory.mktemp("killed")
    clean = run_trial(trial, clean_dir, "offline", data_root=data_root)
    kill_step = trial.steps * 3 // 4  # after the second of four checkpoints
    monkeypatch_module.setenv("PEER_SWEEPS_FAULT", f"kill:{trial.trial_id}:{kill_step}")
    killed = run_trial(trial, killed_dir, "disabled", data_root=data_root)
    return trial, clean, clean_dir, killed, killed_dir, kill_step


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_worker_killed_mid_trial_resumes_from_checkpoint(killed_and_clean):
    trial, clean, clean_dir, killed, killed_dir, kill_step = killed_and_clean
    assert (trial_dir(killed_dir, trial.trial_id) / ".fault-kill-done").exists(), "the fault did not fire"
    assert killed["status"] == clean["status"] == "completed", killed["error"]
    records = read_metrics(trial_dir(killed_dir, trial.trial_id) / METRICS_FILE)
    assert [r["step"] for r in records] == list(range(1, trial.steps + 1))  # no step twice, none missing
    # The loss curve continues from the checkpoint and matches the uninterrupted run step for step.
    assert losses(killed_dir, trial) == pytest.approx(losses(clean_dir, trial), rel=1e-5)
    assert killed["ppl"] == pytest.approx(clean["ppl"], rel=1e-5)


ROW_SPARSE_PEER = dict(method="peer", method_params={"query_bn": False}, checkpoints=4, evals=2,
                       expert_tables="row_sparse")


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
    killed = run_trial(two, two_dir, "disabled", data_root=data_root)
    monkeypatch_module.delenv("PEER_SWEEPS_FAULT")
    return trial, one, one_dir, killed, two_dir


def test_row_sparse_tables_resume_and_train_alike_on_two_workers(row_sparse_runs, data_root):
    trial, one, one_dir, killed, two_dir = row_sparse_runs
    assert trial.training["expert_tables"] == "row_sparse"
    assert trial.trial_id != make_trial(data_root, **{**ROW_SPARSE_PEER, "expert_tables": "zero"}).trial_id
    assert one["status"] == killed["status"] == "completed", (one["error"], killed["error"])
    assert (trial_dir(two_dir, trial.trial_id) / ".fault-kill-done").exists(), "the fault did not fire"
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
    (last, *_) = sorted(trial_dir(results_dir, trial.trial_id).glob("checkpoint_*"), reverse=True)
    return torch.load(last / "shared.pt", weights_only=False)["expert_tables"]


def read_wandb_history(run_file: Path) -> list[dict]:
    """History rows of a .wandb transaction log, decoded with W&B's own protobuf record schema.

    The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte
    header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    import json

    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    rows, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_mirrors_the_local_record(killed_and_clean):
    trial, _, clean_dir, *_ = killed_and_clean
    (run_dir,) = (clean_dir / "wandb").glob(f"offline-run-*-{trial.trial_id}")
    history = read_wandb_history(run_dir / f"run-{trial.trial_id}.wandb")
    local = read_metrics(trial_dir(clean_dir, trial.trial_id) / METRICS_FILE)
    assert [h["train_loss"] for h in history] == pytest.approx([r["train_loss"] for r in local])
    assert [h["tokens"] for h in history] == [r["tokens"] for r in local]
    evals = [h for h in history if "ppl" in h]
    assert len(evals) == 2 and evals[-1]["ppl"] == pytest.approx(local[-1]["ppl"])


def test_nan_loss_ends_the_trial_as_diverged(ray_cluster, data_root, tmp_path, monkeypatch):
    trial = make_trial(data_root, method="dense", max_failures=0)
    monkeypatch.setenv("PEER_SWEEPS_FAULT", f"nan:{trial.trial_id}:3")
    row = run_trial(trial, tmp_path, "disabled", data_root=data_root)
    assert row["status"] == "diverged"
    assert row["error"].startswith("diverged: loss nan at step 3")
    assert row["ppl"] is None
