"""A reference worker loop through the whole cluster API: a 2-layer MLP regression on synthetic data.

Used by the tests and benchmarks/trial_overhead.py, and a template for the trial loop. The global batch of
step s is a pure function of (seed, s); rank r of W trains on rows [r*B/W, (r+1)*B/W), so any world size
sees the same global batch, and the mean of the ranks' micro-batch losses is the global batch loss.

loop_config keys: steps, global_batch, zero_stage, seed, lr, grad_clip, dim, hidden;
checkpoint_every (0: never); kill_at_step + kill_marker (+ kill_rank, kill_delay_s): SIGKILL that rank
after that step, once (the marker file records it); raise_at_step: raise ValueError on every rank;
attempts_file: rank 0 appends a line to it at every start (attempts of the job);
report_at_end: report metrics without a checkpoint after the last step; step_sleep_s: seconds per step.
Returns, from rank 0: {"losses": {step: global loss}, "start_step", "world_size", "node_ids", "timings"}.
"""

import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from cluster.checkpointing import load_latest_checkpoint, report_metrics, save_checkpoint
from cluster.deepspeed_config import build_engine, deepspeed_config
from cluster.eager_adamw import EagerAdamW
from cluster.runtime import current_node_id


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, 1)

    def forward(self, x):  # (B, dim) -> (B,)
        return self.down(torch.tanh(self.norm(self.up(x)))).squeeze(-1)


def global_batch(seed: int, step: int, batch: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(batch, dim, generator=g)
    y = torch.sin(x.sum(-1)) + 0.1 * torch.randn(batch, generator=g)
    return x, y


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay for norms and biases (1-d tensors)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def mlp_regression_loop(config: dict) -> dict:
    t_start = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    if config.get("attempts_file") and rank == 0:
        with open(config["attempts_file"], "a") as f:
            f.write("start\n")
    steps, batch, dim = config["steps"], config["global_batch"], config.get("dim", 16)
    if batch % world:
        raise ValueError(f"global_batch {batch} is not divisible by {world} workers")
    micro = batch // world
    seed = config.get("seed", 0)

    torch.manual_seed(seed)  # identical initial weights on every rank
    model = MLP(dim, config.get("hidden", 32))
    lr = config.get("lr", 1e-2)
    optimizer = EagerAdamW(param_groups(model, 0.1), lr=lr)
    warmup = 2
    schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))  # noqa: E731
    ds_config = deepspeed_config(
        zero_stage=config.get("zero_stage", 2), micro_batch_per_rank=micro, grad_accum_steps=1,
        grad_clip=config.get("grad_clip", 1.0), precision="fp32", world_size=world,
    )
    engine = build_engine(model, optimizer, schedule, ds_config)
    t_engine = time.perf_counter()

    resumed = load_latest_checkpoint(engine)
    start = resumed["step"] if resumed else 0
    losses: dict[int, float] = dict(resumed["state"]["losses"]) if resumed else {}

    every = config.get("checkpoint_every", 0)
    t_first = None
    for step in range(start, steps):
        x, y = global_batch(seed, step, batch, dim)
        x, y = x[rank * micro:(rank + 1) * micro], y[rank * micro:(rank + 1) * micro]
        loss = nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses[step] = global_loss.item() / world
        if t_first is None:
            t_first = time.perf_counter()
        if config.get("step_sleep_s"):
            time.sleep(config["step_sleep_s"])
        done = step + 1
        if every and done % every == 0:
            save_checkpoint(engine, done, {"losses": losses}, {"step": done, "loss": losses[step]})
        if done == config.get("kill_at_step") and rank == config.get("kill_rank", 0):
            marker = Path(config["kill_marker"])
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                time.sleep(config.get("kill_delay_s", 0.0))  # let the controller take the last report
                os.kill(os.getpid(), signal.SIGKILL)
        if done == config.get("raise_at_step"):
            raise ValueError(f"injected failure at step {done} on rank {rank}")
    if config.get("report_at_end"):
        report_metrics({"step": steps, "loss": losses.get(steps - 1)})
    t_end = time.perf_counter()
    return {
        "losses": losses,
        "start_step": start,
        "world_size": world,
        "node_ids": [current_node_id()],
        "lr_last": engine.get_lr()[0],
        "timings": {
            "engine_s": t_engine - t_start,
            "first_step_s": (t_first or t_end) - t_engine,
            "loop_s": t_end - t_start,
            "worker_started_at": time.time() - (t_end - t_start),
        },
    }

