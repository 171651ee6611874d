"""One trial: train one planned model for its token horizon on Ray Train workers running a DeepSpeed engine.

Driver side, `run_trial(trial, results_dir)`: writes `trials/<id>/config.json`, runs the Train job named
by the trial id (so a retried trial resumes from its own checkpoints and no two trials share any), and
returns the trial's row for trials.parquet - "completed", "diverged" or "failed" with the error.

Worker side, `train_loop(config)`: AdamW with linear warm-up then cosine decay to the trial's own horizon
(PEER's expert tables optionally outside the engine, by row-sparse AdamW: `training.expert_tables`),
gradient clipping, the global batch split over ranks (the same global batch whatever the world size),
evaluation of every set at evenly spaced steps, checkpoints saved by DeepSpeed on all ranks, divergence
detection. Rank 0 appends every step to `trials/<id>/metrics.jsonl` (the source of truth) and mirrors it to
W&B (see peer_sweeps.tracking).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from .plan import Trial

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


def trial_dir(results_dir: Path, trial_id: str) -> Path:
    return Path(results_dir) / "trials" / trial_id


# ----------------------------------------------------------------------------------------------- driver


def run_trial(trial: Trial, results_dir: str | Path, wandb_mode: str = "offline", wandb_project: str = "peer-sweeps",
              attempt: int = 1, data_root: str | Path | None = None) -> dict[str, Any]:
    """Runs one trial as a Ray Train job (Ray must be initialised) and returns its trials.parquet row.

    `data_root`: where the study's data suite was prepared, as the driver sees it (Ray runs trials and
    workers in other working directories); default the study's data.root or the default root."""
    from cluster.train_job import TrainJobError, run_train_job

    from .data import default_root

    results_dir = Path(results_dir).resolve()
    directory = trial_dir(results_dir, trial.trial_id)
    directory.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(directory / CONFIG_FILE, trial.to_json())
    resources = trial.resources
    use_gpu = resources["gpus_per_worker"] > 0
    loop_config = {
        "trial": trial.to_json(),
        "trial_dir": str(directory),
        "results_dir": str(results_dir),
        "wandb": {"mode": wandb_mode, "project": wandb_project},
        "threads": max(1, int(resources["cpus_per_worker"])),
        # Workers run in their own working directory: hand them an absolute data root.
        "data_root": str(Path(data_root or trial.data["root"] or default_root()).resolve()),
        "fault": os.environ.get("PEER_SWEEPS_FAULT", ""),
    }
    try:
        job = run_train_job(
            train_loop, loop_config,
            run_name=trial.trial_id,
            storage_path=str(results_dir / "trials"),
            num_workers=resources["workers_per_trial"],
            use_gpu=use_gpu,
            cpus_per_worker=resources["cpus_per_worker"],
            max_failures=trial.training["max_failures"],
        )
        summary = job.return_value
    except TrainJobError as e:
        summary = {"status": "failed", "error": _last_line(str(e), e.worker_errors)}
    except Exception as e:  # the job could not even start: still a recorded failure, the study goes on
        summary = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    return trial_row(trial, summary, attempt)


def _last_line(message: str, worker_errors: dict[int, str]) -> str:
    for text in worker_errors.values():
        lines = [line for line in text.strip().splitlines() if line.strip()]
        if lines:
            return lines[-1][:2000]
    return message[:2000]


def trial_row(trial: Trial, summary: dict[str, Any], attempt: int = 1) -> dict[str, Any]:
    """A trials.parquet row: the plan's columns, then what training measured (null where not measured)."""
    model = trial.model
    sparse = model.get("sparse") or {}
    row = {
        "trial_id": trial.trial_id, "study": trial.study, "kind": trial.kind, "method": trial.method,
        "status": summary["status"], "budget_flops": trial.budget_flops, "total_flops": trial.total_flops,
        "tokens": trial.tokens, "steps": trial.steps, "seq_len": trial.seq_len, "batch_tokens": trial.batch_tokens,
        "params_total": trial.params_total, "params_active": trial.params_active,
        "params_backbone": trial.params_backbone, "d_model": model["d_model"], "n_layers": model["n_layers"],
        "n_heads": model["n_heads"], "num_experts": sparse.get("num_experts"),
        "expert_heads": sparse.get("heads"), "top_k": sparse.get("top_k") if trial.method != "moe" or
        sparse.get("routing") == "token_choice" else None,
        "query_bn": sparse.get("query_bn"), "seed": trial.seed, "lr": trial.training["lr"],
        "attempts": attempt, "error": summary.get("error"),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    for key in ("loss", "ppl", "usage", "unevenness", "train_seconds", "tokens_per_second", "ray_nodes"):
        row[key] = summary.get(key)
    for key, value in summary.items():
        if key.startswith(("ppl_", "bpb_", "eval_tokens_")):
            row[key] = value
    return row


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- worker


def lr_schedule(step: int, total_steps: int, warmup_fraction: float, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, cosine to min_lr_ratio."""
    warmup = max(1, round(warmup_fraction * total_steps)) if warmup_fraction > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def evenly_spaced_steps(total_steps: int, count: int) -> set[int]:
    """`count` steps (1-based, after that many optimizer steps) evenly spread, the last at `total_steps`."""
    return {max(1, round(total_steps * i / count)) for i in range(1, count + 1)}


def param_groups(model, weight_decay: float, exclude=()) -> list[dict[str, Any]]:
    """Weight decay on matrices; none on norms, biases, embeddings and product keys. `exclude`: parameters
    left out (trained by another optimizer)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if any(param is other for other in exclude):
            continue
        skip = param.dim() < 2 or "emb" in name or "sub_keys" in name
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def eval_batch_size(trial: Trial) -> int:
    """Sequences per evaluation batch: the training batch's, at most 32 (memory for the logits). MoE's expert
    choice depends on it: evaluated on the pool of tokens it was trained on (`peer-sweeps eval` uses it too)."""
    return max(1, min(32, trial.batch_tokens // trial.seq_len))


def evaluation_sets(data, eval_tokens: int | str, seq_len: int) -> dict:
    """The tokens scored per evaluation set, primary first (peer_sweeps.data.evaluation_sample): the same for
    every trial of a study and for `peer-sweeps eval`."""
    from .data import evaluation_sample

    sample = None if eval_tokens == "all" else int(eval_tokens)
    return {name: evaluation_sample(tokens, data.eot_id, sample, seq_len) for name, tokens in data.eval_sets.items()}


def evaluate_sets(module, eval_sets: dict, data, seq_len: int, batch: int, device) -> dict[str, Any]:
    """loss, ppl, routing statistics (primary set) and ppl_, bpb_, eval_tokens_<set> for every set."""
    from model import summarize_routing

    from .data import evaluate_lm

    results: dict[str, Any] = {}
    for name, tokens in eval_sets.items():
        module.collect_routing_stats(name == data.primary)
        out = evaluate_lm(module, tokens, seq_len, batch, len(tokens), data.token_bytes, device)
        if name == data.primary:
            results.update(loss=out["loss"], ppl=out["ppl"], **summarize_routing(module.routing_scores()))
        results[f"ppl_{name}"], results[f"bpb_{name}"] = out["ppl"], out["bpb"]
        results[f"eval_tokens_{name}"] = int(out["tokens"])
    module.collect_routing_stats(False)
    return results


class DivergedError(Exception):
    pass


class Fault:
    """Fault injection for the reliability tests: PEER_SWEEPS_FAULT="<kind>:<trial id prefix>[:<step>]",
    read where the trial is launched (run_trial) and handed to the workers.

    kind "raise": the worker raises at that step (default the first); "nan": the loss of that step is NaN;
    "kill": the rank-0 worker SIGKILLs itself at that step, once per trial (a marker file in the trial
    directory remembers it), so the retried worker group must resume from the checkpoint.
    """

    def __init__(self, spec: str, trial_id: str, directory: Path):
        kind, prefix, step = (spec.split(":") + ["", "", ""])[:3]
        active = bool(prefix) and trial_id.startswith(prefix)
        self.kind = kind if active else ""
        self.step = int(step) if step else 1
        self.marker = directory / ".fault-kill-done"

    def before_step(self, step: int, rank: int) -> None:
        if step + 1 != self.step:
            return
        if self.kind == "raise":
            raise RuntimeError(f"injected fault at step {self.step}")
        if self.kind == "kill" and rank == 0 and not self.marker.exists():
            import signal

            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    def poison(self, step: int, loss):
        return loss * float("nan") if self.kind == "nan" and step + 1 == self.step else loss


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker; returns the trial summary (from rank 0)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from cluster.checkpointing import load_latest_checkpoint, save_checkpoint, world_rank, world_size
    from cluster.deepspeed_config import build_engine, deepspeed_config
    from cluster.eager_adamw import EagerAdamW
    from cluster.runtime import current_node_id
    from model import build_model
    from model.sparse_adam import ExpertTableOptimizer

    from .data import TrainBatches, load_suite
    from .tracking import MetricsLog, WandbMirror

    trial = Trial.from_json(config["trial"])
    training, data_spec = trial.training, trial.data
    rank, world = world_rank(), world_size()
    on_gpu = torch.cuda.is_available() and trial.resources["gpus_per_worker"] > 0
    precision = training["precision"] if training["precision"] != "auto" else ("bf16" if on_gpu else "fp32")
    torch.set_num_threads(config["threads"])
    torch.manual_seed(trial.seed)

    data = load_suite(data_spec["suite"], config["data_root"], data_spec["vocab_size"])
    cfg = trial.model_config
    model = build_model(cfg)
    sequences = trial.batch_tokens // trial.seq_len
    per_rank = sequences // world
    micro = training["micro_batch_size"] or per_rank
    accum = per_rank // micro
    total_steps = trial.steps

    tables = None
    if training.get("expert_tables") == "row_sparse":  # fp32 and ZeRO 1-2: checked when the study was loaded
        tables = ExpertTableOptimizer(model, lr=training["lr"], betas=tuple(training["adam_betas"]),
                                      weight_decay=training["weight_decay"], grad_clip=training["grad_clip"])
    groups = param_groups(model, training["weight_decay"], exclude=tables.tables if tables is not None else ())
    optimizer = EagerAdamW(groups, lr=training["lr"], betas=tuple(training["adam_betas"]))
    schedule = lambda step: lr_schedule(step, total_steps, training["warmup_fraction"], training["min_lr_ratio"])  # noqa: E731
    engine = build_engine(
        model, optimizer, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        deepspeed_config(training["zero_stage"], micro, accum, training["grad_clip"], precision, world, on_gpu),
    )
    device = engine.device
    restored = load_latest_checkpoint(engine)
    start_step = restored["step"] if restored else 0
    state = restored["state"] if restored else {"train_seconds": 0.0, "first_loss": None}
    if restored and tables is not None:
        tables.load_state_dict(restored["shared"]["expert_tables"])

    directory = Path(config["trial_dir"])
    log = MetricsLog(directory / METRICS_FILE, truncate_after_step=start_step) if rank == 0 else None
    mirror = WandbMirror.start(trial, config["results_dir"], **config["wandb"], resumed=start_step > 0) if rank == 0 else None

    batches = TrainBatches(data.train, trial.seq_len, sequences, trial.seed, rank, world)
    eval_steps = evenly_spaced_steps(total_steps, training["evals"])
    checkpoint_steps = evenly_spaced_steps(total_steps, training["checkpoints"])
    flops_per_step = trial.train_flops_per_token * trial.batch_tokens
    eval_batch = eval_batch_size(trial)
    last_eval: dict[str, Any] = {}
    status, error = "completed", None

    eval_sets = evaluation_sets(data, data_spec["eval_tokens"], trial.seq_len)

    def evaluate() -> dict[str, Any]:
        return evaluate_sets(engine.module, eval_sets, data, trial.seq_len, eval_batch, device)

    fault = Fault(config.get("fault", ""), trial.trial_id, directory)
    step = start_step
    try:
        while step < total_steps:
            fault.before_step(step, rank)
            tick = time.perf_counter()
            inputs, targets = batches.batch(step)
            step_loss = torch.zeros((), dtype=torch.float64)
            for x, y in zip(inputs.split(micro), targets.split(micro)):
                x, y = x.to(device), y.to(device)
                logits = engine(x)
                loss = fault.poison(step, F.cross_entropy(logits.float().flatten(0, 1), y.flatten()))
                engine.backward(loss)
                engine.step()
                step_loss += loss.detach().double().cpu() / accum
            if tables is not None:
                tables.step(training["lr"] * schedule(step))
            if world > 1:
                dist.all_reduce(step_loss)
                step_loss /= world
            state["train_seconds"] += time.perf_counter() - tick
            step += 1
            train_loss = float(step_loss)
            if state["first_loss"] is None:
                state["first_loss"] = train_loss
            record = {"step": step, "tokens": step * trial.batch_tokens, "flops": step * flops_per_step,
                      "seconds": state["train_seconds"], "train_loss": train_loss,
                      "lr": training["lr"] * schedule(step - 1)}
            if not math.isfinite(train_loss) or train_loss > training["divergence_factor"] * state["first_loss"]:
                raise DivergedError(f"loss {train_loss:.4g} at step {step} (first loss {state['first_loss']:.4g})")
            if step in eval_steps:
                last_eval = evaluate()
                record.update(last_eval)
            if log is not None:
                log.append(record)
                mirror.log(record)
            if step in checkpoint_steps:
                save_checkpoint(engine, step, state, {"step": step, "train_loss": train_loss},
                                shared={"expert_tables": tables.state_dict()} if tables is not None else None)
    except DivergedError as e:
        status, error = "diverged", f"diverged: {e}"
        if log is not None:
            log.append({"step": step, "tokens": step * trial.batch_tokens, "flops": step * flops_per_step,
                        "seconds": state["train_seconds"], "train_loss": float(step_loss), "diverged": True})

    if status == "completed" and not last_eval:
        # Resumed from the final checkpoint (the attempt died after saving it): nothing left to train.
        last_eval = evaluate()

    nodes = [current_node_id()]
    if world > 1:
        nodes = [None] * world
        dist.all_gather_object(nodes, current_node_id())
    if mirror is not None:
        mirror.finish(last_eval, status)
    if log is not None:
        log.close()
    summary = {
        "status": status, "error": error, "train_seconds": state["train_seconds"],
        "tokens_per_second": step * trial.batch_tokens / state["train_seconds"] if state["train_seconds"] else None,
        "ray_nodes": sorted(set(nodes)),
    }
    if status == "completed":
        summary.update(last_eval)
    return summary
