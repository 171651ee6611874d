"""Every shipped study plans; isoFLOP trials meet their budgets; the smoke study runs end to end, resumes
without training anything, and reports.

The CONTRACT's trials.parquet columns and `plan --json` fields are checked here.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from peer_sweeps.cli import app
from peer_sweeps.plan import plan_study
from peer_sweeps.study import load_study

ROOT = Path(__file__).parents[1]
STUDIES = sorted((ROOT / "studies").rglob("*.yaml"))
PLAN_FIELDS = {"trial_id", "study", "kind", "method", "budget_flops", "seq_len", "tokens", "steps",
               "forward_flops_per_token", "train_flops_per_token", "total_flops", "params_total",
               "params_active", "model", "memory_gb_per_worker", "checkpoint_gb"}
TRIAL_COLUMNS = {"trial_id", "study", "kind", "method", "status", "budget_flops", "total_flops", "tokens",
                 "params_total", "params_active", "d_model", "n_layers", "num_experts", "expert_heads", "top_k",
                 "query_bn", "seed", "ppl", "usage", "unevenness", "train_seconds", "tokens_per_second",
                 "ray_nodes", "error", "mfu", "gpu_memory_gb", "wall_seconds"}
TIMESTAMPS = ["trial_started", "job_started", "worker_started", "imported", "data_loaded", "engine_ready",
              "tracking_started", "setup_done", "loop_done", "tracking_finished", "worker_returned", "job_returned",
              "row_built"]
CURVE_COLUMNS = {"trial_id", "step", "tokens", "flops", "train_loss"}


def test_the_shipped_studies_are_the_ones_the_docs_name():
    names = {str(p.relative_to(ROOT / "studies")) for p in STUDIES}
    assert {"isoflop.yaml", "experts.yaml", "active_experts.yaml", "query_bn.yaml", "smoke.yaml",
            "paper/isoflop.yaml"} <= names


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: str(p.relative_to(ROOT / "studies")))
def test_every_study_plans_and_meets_its_budgets(path):
    study = load_study(path)
    trials = plan_study(study)
    assert trials and len({t.trial_id for t in trials}) == len(trials)
    for trial in trials:
        if trial.budget_flops is not None:
            assert abs(trial.total_flops - trial.budget_flops) <= 0.01 * trial.budget_flops, trial.label
        assert trial.total_flops == pytest.approx(trial.tokens * trial.train_flops_per_token)
        assert trial.tokens == trial.steps * trial.batch_tokens


def test_anchors_and_merge_keys_still_load(tmp_path):
    """Study files may share settings by YAML anchors and override merged keys (`<<: *x` then the key again):
    that is not a key given twice (test_bad_inputs refuses those)."""
    path = tmp_path / "merged.yaml"
    path.write_text(
        "name: merged\n"
        "methods:\n"
        "  peer: &peer {num_experts: 1024, heads: 2, top_k: 4, query_dim: 16}\n"
        "  pkm:\n"
        "    <<: *peer\n"
        "    top_k: 8\n"
        "design: {kind: isoflop, budgets: [1.0e9], sizes: [{d_model: 16, n_layers: 1}]}\n")
    study = load_study(path)
    assert study.methods["pkm"].top_k == 8 and study.methods["pkm"].num_experts == 1024
    assert study.methods["peer"].top_k == 4


def test_cpu_isoflop_study_has_the_promised_shape():
    """Curves to find a minimum on, at more than one budget, and every cell seeded at least three times (issue 16)."""
    study = load_study(ROOT / "studies" / "isoflop.yaml")
    trials = plan_study(study)
    budgets = {t.budget_flops for t in trials}
    assert len(budgets) >= 2
    assert len(study.training.seeds) >= 3
    for budget in budgets:
        for method in ("dense", "moe", "pkm", "peer"):
            cells = [t for t in trials if t.budget_flops == budget and t.method == method]
            sizes = {t.params_backbone for t in cells}
            assert len(sizes) >= 3, (budget, method)
            assert len(cells) == len(sizes) * len(study.training.seeds), (budget, method)


def test_paper_study_uses_the_papers_settings():
    study = load_study(ROOT / "studies" / "paper" / "isoflop.yaml")
    assert set(study.design.budgets) == {6e18, 2e19}
    assert study.training.batch_tokens == 128 * 2048 and study.training.seq_len == 2048
    peer, pkm, moe = study.methods["peer"], study.methods["pkm"], study.methods["moe"]
    assert (peer.num_experts, peer.heads, peer.top_k, peer.query_bn) == (1024**2, 8, 16, True)
    assert (pkm.num_experts, pkm.heads, pkm.top_k, pkm.query_bn) == (1024**2, 8, 32, True)
    assert (moe.num_experts, moe.routing) == (128, "expert_choice")


def test_plan_json_has_the_contract_fields_and_paper_plan_prints_gpu_hours():
    runner = CliRunner()
    result = runner.invoke(app, ["plan", str(ROOT / "studies" / "smoke.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    trials = json.loads(result.stdout)
    assert len(trials) == 8
    for trial in trials:
        assert PLAN_FIELDS <= set(trial)
        assert trial["kind"] == "isoflop" and trial["method"] in ("dense", "moe", "pkm", "peer")
    table = runner.invoke(app, ["plan", str(ROOT / "studies" / "paper" / "isoflop.yaml")])
    assert table.exit_code == 0 and re.search(r"[\d.]+ GPU-hours", table.stdout)


@pytest.mark.slow
def test_smoke_study_runs_resumes_and_reports(data_root, tmp_path):
    study = yaml.safe_load((ROOT / "studies" / "smoke.yaml").read_text())
    study["data"]["root"] = str(data_root)
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "runs" / "smoke"
    command = [sys.executable, "-m", "peer_sweeps.cli", "run", str(path), "--out", str(out), "--wandb", "offline"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    trials = pq.read_table(out / "trials.parquet").to_pandas()
    assert TRIAL_COLUMNS <= set(trials.columns)
    assert {f"ppl_{s}" for s in ("validation", "verse", "prose")} <= set(trials.columns)
    assert {f"bpb_{s}" for s in ("validation", "verse", "prose")} <= set(trials.columns)
    assert len(trials) == 8 and set(trials.status) == {"completed"} and trials.trial_id.is_unique
    assert (trials.ppl == trials.ppl_validation).all()
    assert (trials.wall_seconds >= trials.train_seconds).all()  # start to row written, training inside it
    sparse = trials[trials.method != "dense"]
    assert sparse.usage.between(0, 1).all() and (sparse.unevenness >= 0).all()
    assert trials[trials.method == "dense"].usage.isna().all()
    curves = pq.read_table(out / "curves.parquet").to_pandas()
    assert CURVE_COLUMNS <= set(curves.columns)
    assert len(curves) == trials.steps.sum() and not curves.duplicated(["trial_id", "step"]).any()
    assert len(list((out / "wandb").glob("offline-run-*"))) == 8
    records = {p.name: p.read_bytes() for p in (out / "results").glob("*.json")}
    for record in records.values():  # the timestamps benchmarks/small_trials.py takes apart, in the order lived
        t = json.loads(record)["timings"]
        lived = [t[k] for k in TIMESTAMPS]
        assert lived == sorted(lived), t

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "8 already done, 0 to run" in second.stdout
    assert {p.name: p.read_bytes() for p in (out / "results").glob("*.json")} == records
    assert pq.read_table(out / "trials.parquet").to_pandas().equals(trials)

    status = CliRunner().invoke(app, ["status", str(out)])
    assert status.exit_code == 0 and "completed 8" in status.stdout
    report = CliRunner().invoke(app, ["report", str(out)])
    assert report.exit_code == 0, report.output
    written = {p.name for p in (out / "report").iterdir()}
    assert {"report.html", "report.md", "optimal.csv", "isoflop.png", "frontier.png", "curves_isoflop.png"} <= written
    html = (out / "report" / "report.html").read_text()
    images = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    assert base64.b64decode(images[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    header = (out / "report" / "optimal.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["method", "budget_flops", "params_opt", "ppl_opt"] and header[-2:] == ["n_points", "flag"]


def test_row_sparse_expert_tables_change_the_peer_trials_only():
    from peer_sweeps.study import parse_study

    smoke = yaml.safe_load((ROOT / "studies" / "smoke.yaml").read_text())

    def plan(**training):
        study = {**smoke, "training": {**smoke["training"], **training}}
        return {t.label: t for t in plan_study(parse_study(study))}

    default, zero, row_sparse = plan(), plan(expert_tables="zero"), plan(expert_tables="row_sparse")
    assert {label: t.trial_id for label, t in zero.items()} == {label: t.trial_id for label, t in default.items()}
    assert {t.method for t in row_sparse.values()} == {"dense", "moe", "pkm", "peer"}
    for label, trial in row_sparse.items():
        peer = trial.method == "peer"
        assert (trial.trial_id != default[label].trial_id) == peer, label
        assert trial.training.get("expert_tables") == ("row_sparse" if peer else None), label
