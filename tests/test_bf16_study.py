"""bf16 trains: the smoke study's four methods (d16, one layer) in DeepSpeed bf16 (ZeRO-2, gloo, 2 workers per
trial) complete, and their perplexities match the same trials' in fp32 (on one worker, which trains exactly as
two do: tests/test_trial.py).

Before the fix every PEER and PKM trial failed in bf16 (the query batch norm: "expected scalar type BFloat16
but found Float"). Tolerance: 8% of the fp32 perplexity after 26-28 steps (an untrained model scores about
the vocabulary size, 512; the fp32 trials reach 351-391). Measured once (load average ~30, 29 min): dense
351.55 / 351.57 (bf16 / fp32), MoE 357.76 / 355.83 (0.5%), PKM within 3%, PEER 412.49 / 391.38 (5.4%, not explained
yet; a guess, unmeasured: bf16 ranks near-tied experts differently, which early in training changes which
experts learn; see LOG.md, issue 17).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from peer_sweeps.plan import plan_study
from peer_sweeps.study import parse_study
from peer_sweeps.trial import run_trial

pytestmark = pytest.mark.slow

SMOKE = yaml.safe_load((Path(__file__).parents[1] / "studies" / "smoke.yaml").read_text())
TOLERANCE = 0.08


def smoke_trials(data_root, precision: str, workers: int):
    study = copy.deepcopy(SMOKE)
    study["data"].update(root=str(data_root), eval_tokens="all")
    study["training"].update(precision=precision, evals=1, checkpoints=1, max_failures=0)
    study["design"] = {"kind": "isoflop", "budgets": [4.95e8], "sizes": [{"d_model": 16, "n_layers": 1}]}
    study["resources"]["workers_per_trial"] = workers
    return plan_study(parse_study(study))


def test_bf16_study_trains_like_fp32(data_root, tmp_path_factory):
    from cluster.runtime import ray_session

    rows = {}
    with ray_session(None, num_cpus=2, storage_path=tmp_path_factory.mktemp("ray")):
        for precision, workers in (("bf16", 2), ("fp32", 1)):  # 1 fp32 worker trains as 2 do (test_trial.py)
            for trial in smoke_trials(data_root, precision, workers):
                row = run_trial(trial, tmp_path_factory.mktemp(precision), "disabled", data_root=data_root)
                assert row["status"] == "completed", (precision, trial.method, row["error"])
                rows[precision, trial.method] = row
    for method in SMOKE["methods"]:
        bf16, fp32 = rows["bf16", method]["ppl"], rows["fp32", method]["ppl"]
        assert abs(bf16 - fp32) <= TOLERANCE * fp32, (method, bf16, fp32)
