"""Checks that need a CUDA device (marked `gpu`, skipped without one); run them with benchmarks/gpu_check.sh.

- A one-GPU trial of each method, `precision: auto` (bf16 on GPU workers), through Ray Train and DeepSpeed,
  on the fixture text: every trial completes with a finite perplexity.
- The PEER layer at the paper's size (d1024, N = 1024^2 experts, 8 heads, top-16, 4096 tokens, bf16, the
  torch kernels): forward + backward time against its HBM floor, and peak memory.
  HBM floor: the bytes the layer must move at the device's peak bandwidth: the gathered expert rows, read
  twice forward (U, V) and twice backward (V for the gate gradients, U for the input gradient), 4 T h k D
  elements, plus the two dense [N, D] table gradients written once each, 2 N D elements.
Each test appends one JSON line of its figures to $PEER_SWEEPS_GPU_SUMMARY (when set) for the summary.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SMOKE = yaml.safe_load((Path(__file__).parents[1] / "studies" / "smoke.yaml").read_text())
# Peak HBM bandwidth (bytes/s) by device name; others: H100 SXM's.
HBM_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def summarise(record: dict) -> None:
    path = os.environ.get("PEER_SWEEPS_GPU_SUMMARY")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


@pytest.mark.slow
def test_one_gpu_bf16_trial_of_each_method(data_root, tmp_path_factory):
    from cluster.runtime import ray_session
    from peer_sweeps.plan import plan_study
    from peer_sweeps.study import parse_study
    from peer_sweeps.trial import run_trial

    study = copy.deepcopy(SMOKE)
    study["data"].update(root=str(data_root), eval_tokens=2048)
    study["training"].update(precision="auto", max_failures=0)
    study["design"] = {"kind": "isoflop", "budgets": [5.0e9], "sizes": [{"d_model": 32, "n_layers": 2}]}
    study["resources"].update(workers_per_trial=1, cpus_per_worker=2, gpus_per_worker=1)
    trials = plan_study(parse_study(study))
    with ray_session(None, num_gpus=1, storage_path=tmp_path_factory.mktemp("ray")):
        for trial in trials:
            tick = time.perf_counter()
            row = run_trial(trial, tmp_path_factory.mktemp(trial.method), "disabled", data_root=data_root)
            summarise({"check": "trial", "method": trial.method, "status": row["status"], "ppl": row["ppl"],
                       "steps": trial.steps, "seconds": round(time.perf_counter() - tick, 1),
                       "error": row["error"]})
            assert row["status"] == "completed", (trial.method, row["error"])
            assert math.isfinite(row["ppl"])


def test_peer_layer_at_paper_size_against_its_hbm_floor(monkeypatch):
    from model.peer import PEER

    monkeypatch.setenv("PEER_KERNELS", "torch")
    dim, num_experts, heads, top_k, tokens = 1024, 1024**2, 8, 16, 4096
    device = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(device):
        layer = PEER(dim, num_experts, heads, top_k, query_dim=256).to(torch.bfloat16)
    x = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=True)

    def step():
        layer(x).float().square().mean().backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    repeats = 10
    start.record()
    for _ in range(repeats):
        step()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / repeats
    name = torch.cuda.get_device_name()
    bandwidth = next((bw for key, bw in HBM_BANDWIDTH.items() if key in name), HBM_BANDWIDTH["H100"])
    floor_bytes = (4 * tokens * heads * top_k * dim + 2 * num_experts * dim) * 2  # bf16
    floor = floor_bytes / bandwidth
    peak_gb = torch.cuda.max_memory_allocated() / 1e9
    tables_gb = 2 * num_experts * dim * 2 / 1e9
    summarise({"check": "peer_layer", "device": name, "fwd_bwd_ms": round(seconds * 1e3, 2),
               "hbm_floor_ms": round(floor * 1e3, 2), "x_floor": round(seconds / floor, 2),
               "peak_gb": round(peak_gb, 2), "tables_gb": round(tables_gb, 2)})
    # The gathered [T, h k, D] rows alone would be 8.6 GB in bf16; tables, their gradients and an fp32
    # accumulator of one gradient stay under 5 x the tables.
    assert peak_gb < 5 * tables_gb, peak_gb
