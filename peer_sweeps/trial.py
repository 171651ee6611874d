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

Timing: the row's `wall_seconds` runs from `run_trial`'s call to its row (handed to the driver, which writes
it at once); the row's `timings` (kept in results/<id>.json, not in trials.parquet) holds the wall-clock
timestamps of the trial's parts, driver side and rank 0's (and the driving process's pid), which
benchmarks/small_trials.py takes apart.
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
              attempt: int = 1, data_root: str | Path | None = None, log_path: str | None = None,
              in_process: bool = False) -> dict[str, Any]:
    """Runs one trial as a Ray Train job (Ray must be initialised) and returns its trials.parquet row.

    `data_root`: where the study's data suite was prepared, as the driver sees it (Ray runs trials and
    workers in other working directories); default the study's data.root or the default root. `log_path`:
    the file the Train workers' output goes to (None: Ray's own logs, forwarded to the driver). `in_process`:
    a one-worker CPU trial runs its worker in this process (cluster.train_job; only where this process may die
    with the trial: a Tune trial's actor)."""
    from cluster.checkpointing import prune_checkpoints
    from cluster.train_job import TrainJobError, run_train_job

    from .data import default_root

    timings = {"trial_started": time.time(), "driver_pid": os.getpid()}
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
    timings["job_started"] = time.time()
    try:
        job = run_train_job(
            train_loop, loop_config,
            run_name=trial.trial_id,
            storage_path=str(results_dir / "trials"),
            num_workers=resources["workers_per_trial"],
            use_gpu=use_gpu,
            cpus_per_worker=resources["cpus_per_worker"],
            max_failures=trial.training["max_failures"],
            num_checkpoints_to_keep=trial.keep_checkpoints,
            log_path=log_path,
            in_process=in_process,
        )
        summary = job.return_value
        if summary["status"] == "completed":
            prune_checkpoints(directory, trial.keep_checkpoints)
    except TrainJobError as e:
        summary = {"status": "failed", "error": _last_line(str(e), e.worker_errors)}
    except Exception as e:  # the job could not even start: still a recorded failure, the study goes on
        summary = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    timings["job_returned"] = time.time()
    return trial_row(trial, summary, attempt, {**timings, **summary.get("timings", {})})


def _last_line(message: str, worker_errors: dict[int, str]) -> str:
    for text in worker_errors.values():
        lines = [line for line in text.strip().splitlines() if line.strip()]
        if lines:
            return lines[-1][:2000]
    return message[:2000]


def trial_row(trial: Trial, summary: dict[str, Any], attempt: int = 1,
              timings: dict[str, float] | None = None) -> dict[str, Any]:
    """A trials.parquet row: the plan's columns, then what training measured (null where not measured).
    `timings`: wall-clock timestamps of the trial's parts, "trial_started" among them (-> `wall_seconds`)."""
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
    for key in ("loss", "ppl", "usage", "unevenness", "train_seconds", "tokens_per_second", "mfu", "gpu_memory_gb",
                "ray_nodes"):
        row[key] = summary.get(key)
    for key, value in summary.items():
        if key.startswith(("ppl_", "bpb_", "eval_tokens_")):
            row[key] = value
    if timings:
        row["timings"] = {**timings, "row_built": time.time()}
        row["wall_seconds"] = row["timings"]["row_built"] - timings["trial_started"]
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
            # Ray Train's controller registers a reported checkpoint when it next polls the workers (every
            # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s): a worker dying sooner after its checkpoint is retried
            # from the one before (a correct resume, but not from the step the tests check). Die after a poll.
            time.sleep(float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 1.0)
            os.kill(os.getpid(), signal.SIGKILL)

    def poison(self, step: int, loss):
        return loss * float("nan") if self.kind == "nan" and step + 1 == self.step else loss


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker; returns the trial summary (from rank 0)."""
    return TrialWorker.set_up(config).run()


def batch_geometry(trial: Trial, world: int) -> tuple[int, int, int]:
    """(sequences in the global batch, micro batch per rank, accumulation steps) of a trial on `world` ranks."""
    sequences = trial.batch_tokens // trial.seq_len
    per_rank = sequences // world
    micro = trial.training["micro_batch_size"] or per_rank
    return sequences, micro, per_rank // micro


class TrialWorker:
    """One worker's share of a trial, in the parts a step of training is made of: set-up (`set_up`: data,
    model, engine, restored checkpoint), `train_step`, `evaluate`, `checkpoint`, and `summary`; `run` drives
    them from the restored step to the trial's horizon.

    Every tensor of the loop lives on `device`, the engine's (the worker's GPU under NCCL, which serves only
    CUDA tensors; the CPU under gloo), and every collective of the loop runs there: the step loss and the
    evaluation sums stay on the device and are read to the host once per step (the train loss, needed for
    divergence detection and the record) and once per evaluation.
    """

    def __init__(self, trial: Trial, data, rank: int, world: int, engine, tables=None, fault: Fault | None = None):
        from .data import TrainBatches

        self.trial, self.training, self.data = trial, trial.training, data
        self.rank, self.world = rank, world
        self.engine, self.device, self.tables = engine, engine.device, tables
        self.sequences, self.micro, self.accum = batch_geometry(trial, world)
        self.total_steps = trial.steps
        self.batches = TrainBatches(data.train, trial.seq_len, self.sequences, trial.seed, rank, world)
        self.eval_steps = evenly_spaced_steps(self.total_steps, self.training["evals"])
        self.checkpoint_steps = evenly_spaced_steps(self.total_steps, self.training["checkpoints"])
        self.flops_per_step = trial.train_flops_per_token * trial.batch_tokens
        self.eval_batch = eval_batch_size(trial)
        self.eval_sets = data.eval_sets  # `set_up` narrows them to the study's sample
        self.fault = fault or Fault("", trial.trial_id, Path("."))
        self.start_step = 0
        self.state: dict[str, Any] = {"train_seconds": 0.0, "first_loss": None}
        self.log = self.mirror = self.gpu = None
        # Wall-clock timestamps of the set-up's parts, and seconds spent in the loop's parts besides training.
        self.timings: dict[str, float] = {}
        self.spent = {"evaluation_s": 0.0, "checkpoint_s": 0.0, "logging_s": 0.0}

    @classmethod
    def set_up(cls, config: dict[str, Any]) -> "TrialWorker":
        """The worker of a Ray Train job: its model built on its device, the DeepSpeed engine, the latest
        checkpoint restored, and (rank 0) the metrics record and its W&B mirror opened."""
        timings = {"worker_started": time.time()}
        import torch

        from cluster.checkpointing import load_latest_checkpoint, world_rank, world_size
        from cluster.deepspeed_config import build_engine, deepspeed_config, worker_device
        from cluster.eager_adamw import EagerAdamW
        from model import build_model
        from model.sparse_adam import ExpertTableOptimizer

        from .capacity import GpuMeter
        from .data import load_suite
        from .tracking import MetricsLog, WandbMirror

        trial = Trial.from_json(config["trial"])
        training = trial.training
        rank, world = world_rank(), world_size()
        on_gpu = torch.cuda.is_available() and trial.resources["gpus_per_worker"] > 0
        precision = training["precision"] if training["precision"] != "auto" else ("bf16" if on_gpu else "fp32")
        torch.set_num_threads(config["threads"])
        torch.manual_seed(trial.seed)

        timings["imported"] = time.time()
        data = load_suite(trial.data["suite"], config["data_root"], trial.data["vocab_size"])
        timings["data_loaded"] = time.time()
        model = build_model(trial.model_config, device=worker_device())
        _, micro, accum = batch_geometry(trial, world)
        tables = None
        if training.get("expert_tables") == "row_sparse":  # fp32 and ZeRO 1-2: checked when the study was loaded
            tables = ExpertTableOptimizer(model, lr=training["lr"], betas=tuple(training["adam_betas"]),
                                          weight_decay=training["weight_decay"], grad_clip=training["grad_clip"])
        groups = param_groups(model, training["weight_decay"], exclude=tables.tables if tables is not None else ())
        optimizer = EagerAdamW(groups, lr=training["lr"], betas=tuple(training["adam_betas"]))

        def schedule(step: int) -> float:
            return lr_schedule(step, trial.steps, training["warmup_fraction"], training["min_lr_ratio"])

        engine = build_engine(
            model, optimizer, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            deepspeed_config(training["zero_stage"], micro, accum, training["grad_clip"], precision, world, on_gpu),
        )
        directory = Path(config["trial_dir"])
        worker = cls(trial, data, rank, world, engine, tables, Fault(config.get("fault", ""), trial.trial_id, directory))
        worker.eval_sets = evaluation_sets(data, trial.data["eval_tokens"], trial.seq_len)
        restored = load_latest_checkpoint(engine)
        if restored:
            worker.start_step, worker.state = restored["step"], restored["state"]
            if tables is not None:
                tables.load_state_dict(restored["shared"]["expert_tables"])
        if on_gpu:
            worker.gpu = GpuMeter(worker.device, worker.flops_per_step / world, worker.state)
        timings["engine_ready"] = time.time()
        if rank == 0:
            worker.log = MetricsLog(directory / METRICS_FILE, truncate_after_step=worker.start_step)
            worker.mirror = WandbMirror.start(trial, trial_row(trial, {"status": "running"}), config["results_dir"],
                                              **config["wandb"], resumed=worker.start_step > 0)
        timings["tracking_started"] = timings["setup_done"] = time.time()
        worker.timings = timings
        return worker

    def schedule(self, step: int) -> float:
        """The lr multiplier at optimizer step `step` (0-based)."""
        t = self.training
        return lr_schedule(step, self.total_steps, t["warmup_fraction"], t["min_lr_ratio"])

    def run(self) -> dict[str, Any]:
        """Trains from the restored step to the horizon; returns the summary (rank 0's is the trial's)."""
        trial, training, state = self.trial, self.training, self.state
        last_eval: dict[str, Any] = {}
        status, error = "completed", None
        step = self.start_step
        train_loss = None
        try:
            while step < self.total_steps:
                self.fault.before_step(step, self.rank)
                tick = time.perf_counter()
                step_loss = self.train_step(step)
                train_loss = step_loss.item()  # the step's one host sync (it waits for the device's work)
                step_seconds = time.perf_counter() - tick
                state["train_seconds"] += step_seconds
                step += 1
                if state["first_loss"] is None:
                    state["first_loss"] = train_loss
                record = {"step": step, "tokens": step * trial.batch_tokens, "flops": step * self.flops_per_step,
                          "seconds": state["train_seconds"], "train_loss": train_loss,
                          "lr": training["lr"] * self.schedule(step - 1),
                          **(self.gpu.step(step_seconds) if self.gpu else {})}
                if not math.isfinite(train_loss) or train_loss > training["divergence_factor"] * state["first_loss"]:
                    raise DivergedError(f"loss {train_loss:.4g} at step {step} (first loss {state['first_loss']:.4g})")
                if step in self.eval_steps:
                    last_eval = self.timed("evaluation_s", lambda: self.evaluation_results(self.evaluate()))
                    record.update(last_eval)
                if self.log is not None:
                    tick = time.perf_counter()
                    self.log.append(record)
                    self.mirror.log(record)
                    self.spent["logging_s"] += time.perf_counter() - tick
                if step in self.checkpoint_steps:
                    self.timed("checkpoint_s", self.checkpoint, step, train_loss)
        except DivergedError as e:
            status, error = "diverged", f"diverged: {e}"
            if self.log is not None:
                self.log.append({"step": step, "tokens": step * trial.batch_tokens, "flops": step * self.flops_per_step,
                                 "seconds": state["train_seconds"], "train_loss": train_loss, "diverged": True})

        if status == "completed" and not last_eval:
            # Resumed from the final checkpoint (the attempt died after saving it): nothing left to train.
            last_eval = self.evaluation_results(self.evaluate())
        return self.summary(step, status, error, last_eval)

    def timed(self, part: str, work, *args):
        """`work(*args)`, its seconds added to the trial's timings under `part`."""
        tick = time.perf_counter()
        try:
            return work(*args)
        finally:
            self.spent[part] += time.perf_counter() - tick

    def train_step(self, step: int):
        """One optimizer step over this rank's share of the global batch: the step's mean loss over all ranks,
        a float64 scalar on the device (nothing is read to the host here)."""
        import torch
        import torch.nn.functional as F

        engine = self.engine
        inputs, targets = self.batches.batch(step)
        step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        for x, y in zip(inputs.split(self.micro), targets.split(self.micro)):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            logits = engine(x)
            loss = self.fault.poison(step, F.cross_entropy(logits.float().flatten(0, 1), y.flatten()))
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().double() / self.accum
        if self.tables is not None:
            self.tables.step(self.training["lr"] * self.schedule(step))
        return self.all_reduce(step_loss) / self.world

    def all_reduce(self, tensor):
        """The sum of `tensor` over the ranks, in place; the tensor must be on the loop's device."""
        import torch.distributed as dist

        assert tensor.device == self.device, (tensor.device, self.device)
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def evaluate(self) -> dict[str, Any]:
        """Scores this rank's share of every evaluation set (and, on the primary set, the router scores) and
        sums them over the ranks: {"sums": [sets, 4] (EVALUATION_SUMS per set), "routing": [per sparse layer]},
        device tensors that `evaluation_results` reads."""
        import torch

        from .data.evaluate import evaluation_sums

        module, data, trial = self.engine.module, self.data, self.trial
        sums, routing = [], []
        for name, tokens in self.eval_sets.items():
            module.collect_routing_stats(name == data.primary)
            sums.append(evaluation_sums(module, tokens, trial.seq_len, self.eval_batch, len(tokens),
                                        data.token_bytes, self.device, self.rank, self.world))
            if name == data.primary:
                routing = [scores.clone() for scores in module.routing_scores()]
        module.collect_routing_stats(False)
        packed = torch.cat([torch.stack(sums).flatten(), *routing])  # one collective, one host read
        return {"packed": self.all_reduce(packed), "sets": len(sums), "routing": [len(r) for r in routing]}

    def evaluation_results(self, evaluated: dict[str, Any]) -> dict[str, Any]:
        """loss, ppl, usage and unevenness on the primary set, ppl_<set> and bpb_<set> on every set."""
        from model import summarize_routing

        from .data.evaluate import EVALUATION_SUMS, evaluation_metrics

        packed = evaluated["packed"].cpu()
        n_sums = evaluated["sets"] * len(EVALUATION_SUMS)
        sums, routing = packed[:n_sums].view(evaluated["sets"], -1), packed[n_sums:].split(evaluated["routing"])
        results: dict[str, Any] = {}
        for name, set_sums in zip(self.eval_sets, sums):
            out = evaluation_metrics(set_sums)
            if name == self.data.primary:
                results.update(loss=out["loss"], ppl=out["ppl"], **summarize_routing(list(routing)))
            results[f"ppl_{name}"], results[f"bpb_{name}"] = out["ppl"], out["bpb"]
            results[f"eval_tokens_{name}"] = int(out["tokens"])
        return results

    def checkpoint(self, step: int, train_loss: float) -> None:
        """Saves the engine (all ranks) and the state outside it, reporting the step's loss with it."""
        from cluster.checkpointing import save_checkpoint

        tables = self.tables
        save_checkpoint(self.engine, step, self.state, {"step": step, "train_loss": train_loss},
                        shared={"expert_tables": tables.state_dict()} if tables is not None else None)

    def summary(self, step: int, status: str, error: str | None, last_eval: dict[str, Any]) -> dict[str, Any]:
        """Closes the record and the mirror; the trial's summary (the nodes its workers ran on gathered)."""
        import torch.distributed as dist

        from cluster.runtime import current_node_id

        state, world = self.state, self.world
        nodes = [current_node_id()]
        if world > 1:
            nodes = [None] * world
            dist.all_gather_object(nodes, current_node_id())
        self.timings["loop_done"] = time.time()
        if self.mirror is not None:
            self.mirror.finish(last_eval, status)
        self.timings["tracking_finished"] = time.time()
        if self.log is not None:
            self.log.close()
        summary = {
            "status": status, "error": error, "train_seconds": state["train_seconds"],
            "tokens_per_second": step * self.trial.batch_tokens / state["train_seconds"] if state["train_seconds"] else None,
            "ray_nodes": sorted(set(nodes)),
            "timings": {**self.timings, **self.spent, "train_s": state["train_seconds"],
                        "worker_returned": time.time()},
        }
        if self.gpu is not None:
            summary.update(self.gpu.summary(step, state["train_seconds"]))
        if status == "completed":
            summary.update(last_eval)
        return summary
