"""What `plan` says a trial needs, and what a run does with it.

Checks: the analytical memory per worker (peer_sweeps.capacity) against one step of the real model at the
paper's shapes under FakeTensorMode (no memory allocated); a cell too big for `resources.gpu_memory_gb`
gets a smaller micro-batch or a one-line refusal (exit 2); `plan` prints memory and storage for every trial
of the paper studies and their totals; a completed run keeps only its latest checkpoints; trial concurrency
counts what the cluster can grow to.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

from model import ModelConfig, build_model
from peer_sweeps import capacity
from peer_sweeps.cli import app
from peer_sweeps.plan import plan_study
from peer_sweeps.study import Resources, StudyError, parse_study

from conftest import study_dict

STUDIES = Path(__file__).parents[1] / "studies"
PAPER = {"vocab_size": 32768, "max_seq_len": 2048}
PEER = {"method": "peer", "num_experts": 1024**2, "heads": 8, "top_k": 16, "query_dim": 256}
PKM = {"method": "pkm", "num_experts": 1024**2, "heads": 8, "top_k": 32, "query_dim": 512}
TOLERANCE = 0.05


class _WorstCaseUnique(TorchDispatchMode):
    """`torch.unique`'s output size depends on the data, which fake tensors do not have: answer the case the
    estimate assumes, every gathered row distinct (at most `rows` of them)."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows = rows

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._unique2.default:
            x = args[0]
            return x.new_empty(min(x.numel(), self.rows)), x.new_empty(x.shape), x.new_empty(0)
        return func(*args, **(kwargs or {}))


def fake_peak_bytes(cfg: ModelConfig, micro_batch: int) -> float:
    """Peak memory of a training step of the real model (fp32, one worker, AdamW as a trial's engine runs it at
    ZeRO stage 0), measured under FakeTensorMode: a first step creates the optimizer's state, the second is
    measured, as a trial's steady state."""
    from cluster.eager_adamw import EagerAdamW

    rows = cfg.sparse.num_experts if cfg.sparse is not None else 1
    with FakeTensorMode():
        model = build_model(cfg)
        optimizer = EagerAdamW(model.parameters(), lr=1e-3)
        tracker = MemTracker()
        for step in range(2):
            if step == 1:
                tracker.track_external(model, optimizer)
                tracker.__enter__()
            with _WorstCaseUnique(rows):
                x = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.max_seq_len))
                logits = model(x)  # held through backward and the step, as the training loop does
                loss = F.cross_entropy(logits.float().flatten(0, 1), x.flatten())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                del logits, loss
        tracker.__exit__(None, None, None)
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("d_model, n_layers, sparse, micro_batch", [
    (768, 12, None, 8),  # activations and the loss: the peak is at the loss
    (512, 8, PEER, 16),  # PEER's table gradients: the peak is in its backward
    (512, 8, PKM, 4),  # the dense value table: the peak is at the optimizer step
])
def test_memory_estimate_matches_a_fake_tensor_step(monkeypatch, d_model, n_layers, sparse, micro_batch):
    monkeypatch.setenv("PEER_KERNELS", "torch")  # GPUs' path; the C++ kernels take no fake tensors
    cfg = ModelConfig(**PAPER, d_model=d_model, n_layers=n_layers, n_heads=d_model // 128, sparse=sparse)
    measured = fake_peak_bytes(cfg, micro_batch)
    estimate = capacity.worker_memory(cfg, 2048, micro_batch, world=1, zero_stage=0, precision="fp32",
                                      on_gpu=False).peak
    assert estimate == pytest.approx(measured, rel=TOLERANCE), (estimate / 1e9, measured / 1e9)


def gpu_study(tmp_path, gpu_memory_gb: float) -> dict:
    """PEER at the paper's N on GPU workers: 8 sequences of 2048 tokens per worker, all in one micro-batch."""
    study = study_dict(tmp_path, budgets=(2.0e15,),
                       data={"vocab_size": 32768},
                       training={"seq_len": 2048, "batch_tokens": 16 * 2048, "precision": "bf16", "checkpoints": 2},
                       model={"head_dim": 128},
                       design={"kind": "isoflop", "budgets": [2.0e15], "sizes": [{"d_model": 1024, "n_layers": 4}]},
                       resources={"workers_per_trial": 2, "gpus_per_worker": 1, "gpu_memory_gb": gpu_memory_gb})
    study["methods"] = {"peer": {k: v for k, v in PEER.items() if k != "method"}}
    return study


def test_a_cell_too_big_for_the_gpu_gets_a_smaller_micro_batch(tmp_path):
    (roomy,) = plan_study(parse_study(gpu_study(tmp_path, 200)))
    assert roomy.training["micro_batch_size"] is None  # all 8 sequences at once fit 200 GB
    limit = roomy.memory_gb_per_worker - 1
    (fitted,) = plan_study(parse_study(gpu_study(tmp_path, limit)))
    micro = fitted.training["micro_batch_size"]
    assert micro in (1, 2, 4) and fitted.memory_gb_per_worker <= limit < roomy.memory_gb_per_worker
    assert fitted.batch_tokens == roomy.batch_tokens and fitted.steps == roomy.steps  # the same global batch
    assert fitted.trial_id != roomy.trial_id  # another micro-batch is another trial


def test_a_cell_that_fits_no_micro_batch_is_refused(tmp_path):
    with pytest.raises(StudyError, match=r"cell \[peer d1024 L4 2e\+15 FLOPs\]: needs [\d.]+ GB per worker even at "
                                         r"micro-batch 1, more than resources.gpu_memory_gb=10"):
        plan_study(parse_study(gpu_study(tmp_path, 10)))
    path = tmp_path / "too-big.yaml"
    path.write_text(json.dumps(gpu_study(tmp_path, 10)))
    result = CliRunner().invoke(app, ["plan", str(path)], prog_name="peer-sweeps")
    assert result.exit_code == 2 and "resources.gpu_memory_gb=10" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("study", sorted((STUDIES / "paper").glob("*.yaml")), ids=lambda p: p.stem)
def test_plan_prints_memory_and_storage_of_every_paper_trial(study):
    runner = CliRunner()
    trials = json.loads(runner.invoke(app, ["plan", str(study), "--json"]).output)
    for t in trials:
        assert 0 < t["memory_gb_per_worker"] <= 80 and t["checkpoint_gb"] > 0 and t["gpu_hours"] > 0
        # about 14 bytes per parameter in bf16 (weights, fp32 master copy, AdamW moments)
        assert t["checkpoint_gb"] == pytest.approx(14 * t["params_total"] / 1e9, rel=1e-3)
    text = runner.invoke(app, ["plan", str(study)]).output
    assert text.count("\n│ ") == len(trials)
    written = sum(10 * t["checkpoint_gb"] for t in trials)  # 10 checkpoints per paper trial, 1 kept
    assert f"{sum(t['checkpoint_gb'] for t in trials):.4g} GB kept when done" in text
    assert f"{written:.4g} GB written" in text
    assert "GPU-hours" in text and "peer " in text


def test_paper_peer_costs_more_gpu_hours_than_dense_for_the_same_flops():
    """The cost model charges PEER's gathers and dense table gradients at HBM bandwidth: at the same FLOPs,
    and more so for small models, where they are a larger share of the step."""
    trials = json.loads(CliRunner().invoke(app, ["plan", str(STUDIES / "paper" / "isoflop.yaml"), "--json"]).output)
    hours = {(t["method"], t["model"]["d_model"], t["budget_flops"]): t["gpu_hours"] for t in trials}
    for d_model in (512, 1536):
        assert hours["peer", d_model, 2e19] > 1.5 * hours["dense", d_model, 2e19]
    assert hours["peer", 512, 2e19] / hours["dense", 512, 2e19] > hours["peer", 1536, 2e19] / hours["dense", 1536, 2e19]


def test_only_the_latest_checkpoints_survive_a_completed_run(tmp_path):
    from cluster.checkpointing import prune_checkpoints

    names = [f"checkpoint_step{step:08d}_20261201-1200{s:02d}_000000000" for step, s in ((10, 1), (20, 2), (20, 3), (30, 4))]
    for name in names:
        (tmp_path / name / "engine").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("")
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == names[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:] + ["metrics.jsonl"])
    prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == [names[-1]]


def test_keep_checkpoints_is_checked_and_not_part_of_the_trial_id(tmp_path):
    base = study_dict(tmp_path, budgets=(1.0e9,), training={"checkpoints": 3})
    (one,) = plan_study(parse_study(base))
    (three,) = plan_study(parse_study(study_dict(tmp_path, budgets=(1.0e9,), training={"checkpoints": 3,
                                                                                       "keep_checkpoints": 3})))
    assert one.keep_checkpoints == 1 and three.keep_checkpoints == 3 and one.trial_id == three.trial_id
    with pytest.raises(StudyError, match=r"training: keep_checkpoints: 4 is more than the trial's checkpoints \(3\)"):
        parse_study(study_dict(tmp_path, training={"checkpoints": 3, "keep_checkpoints": 4}))


def test_concurrency_counts_what_the_cluster_can_grow_to():
    from peer_sweeps.runner import trial_concurrency

    paper = Resources(workers_per_trial=8, cpus_per_worker=8, gpus_per_worker=1)
    # an autoscaling cluster with no GPU node up yet, which can grow to 4 nodes of 8 GPUs
    assert trial_concurrency(paper, cpus=16 + 4 * 192, gpus=32, max_concurrent=None, pending=48) == 4
    assert trial_concurrency(paper, cpus=16 + 4 * 192, gpus=32, max_concurrent=2, pending=48) == 2
    assert trial_concurrency(paper, cpus=16 + 4 * 192, gpus=32, max_concurrent=None, pending=3) == 3
    # A one-worker CPU trial trains in its Tune actor, which holds the worker's CPU: one trial per core.
    cpu = Resources(workers_per_trial=1, cpus_per_worker=1)
    assert trial_concurrency(cpu, cpus=2, gpus=0, max_concurrent=None, pending=10) == 2
    assert trial_concurrency(cpu, cpus=3, gpus=0, max_concurrent=None, pending=10) == 3
    # Trials of several workers are driven by a Tune trial that holds a sliver of a CPU besides them.
    two = Resources(workers_per_trial=2, cpus_per_worker=1)
    assert trial_concurrency(two, cpus=5, gpus=0, max_concurrent=None, pending=10) == 2
    assert trial_concurrency(two, cpus=4, gpus=0, max_concurrent=None, pending=10) == 1


def test_gpu_workers_record_mfu_and_peak_memory(monkeypatch, tmp_path):
    """The meter a GPU worker runs each step (CUDA's allocator statistics stood in for: no GPU here), and the
    trials.parquet columns it fills (null on CPU)."""
    from peer_sweeps.schema import trials_schema
    from peer_sweeps.trial import trial_row

    peaks = iter([30e9, 50e9, 40e9])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: next(peaks))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    state: dict = {}
    meter = capacity.GpuMeter("cuda:0", flops_per_rank_step=989e12, state=state)
    records = [meter.step(seconds) for seconds in (2.0, 2.5, 4.0)]
    assert [r["mfu"] for r in records] == pytest.approx([0.5, 0.4, 0.25])
    assert [r["gpu_memory_gb"] for r in records] == pytest.approx([30, 50, 40])
    assert meter.summary(steps=3, train_seconds=8.5) == pytest.approx({"mfu": 3 / 8.5, "gpu_memory_gb": 50})
    assert state["gpu_memory_gb"] == 50  # checkpointed with the trial's state: a resumed trial keeps its peak

    (trial,) = plan_study(parse_study(study_dict(tmp_path, budgets=(1.0e9,))))
    assert {"mfu", "gpu_memory_gb"} <= set(trials_schema([]).names)
    assert trial_row(trial, {"status": "completed", "mfu": 0.31, "gpu_memory_gb": 42.0})["mfu"] == 0.31
    cpu_row = trial_row(trial, {"status": "completed"})
    assert cpu_row["mfu"] is None and cpu_row["gpu_memory_gb"] is None
