"""The worker loop on a process group that serves only a non-CPU device (what NCCL is), without a GPU.

How, and why this way: NCCL serves only CUDA tensors, so a CPU tensor handed to one of the loop's
collectives kills every multi-GPU trial at its first step, and one GPU never reaches the call. torch's
fake process group (`fake_pg`) checks that routing on CPU: registered for one device type, it raises "No
backend type associated with device type cpu" for a CPU tensor. It cannot be registered for "cuda" here,
because a CPU machine cannot create the CUDA tensors the fixed loop would then hand it. So the backend here
claims only the `meta` device, and the loop runs there: `TrialWorker` keeps every tensor of the loop (model,
batches, losses, evaluation sums, router scores) on its engine's device and runs its collectives there, and
that device is meta. Meta also proves the other half of the deliverable: any read of a value to the host
(`.item()`, `.cpu()`, a boolean mask, `torch.unique` in a backward) raises on meta, so `train_step` and
`evaluate` are shown to keep losses and metrics on the device; the loop's one read per step and per
evaluation (`run`, `evaluation_results`) is outside the parts run here.

The engine is the model with a torch AdamW behind the three calls the loop makes of DeepSpeed's engine
(DeepSpeed's own collectives run on CPU tensors under its CPU accelerator and could not run on this group);
the fake group does no arithmetic, so the values of 2-rank training are checked by the gloo tests
(tests/test_trial.py). Both ranks run in this process, one after the other, each with its own group.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from model import build_model
from peer_sweeps.data import load_suite
from peer_sweeps.plan import plan_study
from peer_sweeps.study import parse_study
from peer_sweeps.trial import TrialWorker

SMOKE = yaml.safe_load((Path(__file__).parents[1] / "studies" / "smoke.yaml").read_text())
META_ONLY_BACKEND = "metaonly"


class PlainEngine:
    """The calls TrialWorker makes of a DeepSpeed engine, on a plain model and optimizer."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.device = next(module.parameters()).device
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)

    def __call__(self, x):
        return self.module(x)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def meta_only_backend():
    from torch.testing._internal.distributed.fake_pg import _create_fake_pg

    if not hasattr(dist.Backend, META_ONLY_BACKEND.upper()):  # registered once per process
        dist.Backend.register_backend(META_ONLY_BACKEND, _create_fake_pg, extended_api=True, devices=["meta"])
    return META_ONLY_BACKEND


def smoke_trial(data_root, method: str):
    study = copy.deepcopy(SMOKE)
    study["data"]["root"] = str(data_root)
    study["data"]["eval_tokens"] = "all"
    study["methods"] = {method: SMOKE["methods"][method]}
    study["design"] = {"kind": "isoflop", "budgets": [5.0e9], "sizes": [{"d_model": 32, "n_layers": 2}]}
    study["resources"]["workers_per_trial"] = 2
    study["training"]["micro_batch_size"] = 2  # two micro-steps per rank: the loss is summed on the device
    (trial,) = plan_study(parse_study(study))
    return trial


@pytest.mark.parametrize("method", ["dense", "moe", "pkm", "peer"])
def test_worker_steps_and_evaluates_on_a_device_only_process_group(meta_only_backend, data_root, method):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    trial = smoke_trial(data_root, method)
    data = load_suite("fixture", data_root, trial.data["vocab_size"])
    for rank in range(2):
        dist.init_process_group(meta_only_backend, store=FakeStore(), rank=rank, world_size=2)
        try:
            with pytest.raises(RuntimeError, match="device type cpu"):  # the group really refuses the CPU
                dist.all_reduce(torch.zeros(()))
            engine = PlainEngine(build_model(trial.model_config, device="meta"))
            worker = TrialWorker(trial, data, rank, 2, engine)
            assert worker.accum == 2
            loss = worker.train_step(0)
            assert loss.device.type == "meta" and loss.shape == ()
            evaluated = worker.evaluate()
            assert evaluated["packed"].device.type == "meta"
            sparse = 0 if method == "dense" else trial.model_config.sparse.num_experts
            assert evaluated["packed"].numel() == 4 * len(data.eval_sets) + sparse
        finally:
            dist.destroy_process_group()


def test_model_is_built_on_its_device_without_the_cpu_kernels(data_root):
    """A GPU worker builds its model there (here: meta, the device that holds no memory): no parameter or
    buffer on the CPU, and PEER's tables are allocated without compiling the C++ extension (a fresh
    interpreter, so no earlier test has loaded it)."""
    import subprocess
    import sys

    trial = smoke_trial(data_root, "peer")
    script = (
        "import json, sys, torch\n"
        "from model import ModelConfig, build_model\n"
        "import model.peer_kernels as K\n"
        "model = build_model(ModelConfig(**json.loads(sys.argv[1])), device='meta')\n"
        "devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}\n"
        "assert devices == {'meta'}, devices\n"
        "assert K._cpp_module is None and K._cpp_error is None, 'the C++ kernels were built'\n"
    )
    done = subprocess.run([sys.executable, "-c", script, trial.model_config.model_dump_json()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
