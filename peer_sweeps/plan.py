"""Expanding a study into trials: every cell of its grid resolved to a model, a token horizon and an id.

isoFLOP cells: steps = round(budget / (train FLOPs per token x batch tokens)), so a trial's total FLOPs is
within 1% of its budget in whole steps; a cell where that is impossible (too few steps) is rejected.

Each trial also gets what it needs (peer_sweeps.capacity): memory per worker, the size of one checkpoint and
GPU-hours. On GPU workers a cell whose micro-batch does not fit `resources.gpu_memory_gb` gets the largest
micro-batch that does (more gradient accumulation, the same global batch: its trial id changes with it), or
is rejected when not even one sequence fits.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model import ModelConfig
from model.flops import forward_flops_per_token, params_active, params_backbone, params_total, train_flops_per_token

from . import capacity
from .study import AblationDesign, IsoFlopDesign, ModelSize, Study, StudyError, load_study

BUDGET_TOLERANCE = 0.01
# Rough costs for time estimates. CPU: one fp32 worker on the 2-core development machine, two trials at a
# time, fitted (non-negative least squares) to the wall time of the 72 trials of the default study's fresh-clone
# run (LOG.md, 2026-12-01, third session; median error 8%): a fixed cost per trial (evaluation, W&B, engine,
# scheduling; one-worker trials run in their Tune process), a per-step cost (optimizer, Python), the FLOPs at
# the throughput these small models reach, and the product-key retrievals of PKM and PEER (per token, head and
# top-k slot). GPU: the cost model of peer_sweeps.capacity.
CPU_TRIAL_OVERHEAD_SECONDS = 4.0
CPU_SECONDS_PER_STEP = 0.0133
CPU_FLOPS_PER_SECOND = 26e9
CPU_SECONDS_PER_RETRIEVAL = 1.55e-7


@dataclass(frozen=True)
class Trial:
    trial_id: str
    study: str
    kind: str
    method: str
    label: str
    budget_flops: float | None
    seq_len: int
    batch_tokens: int
    tokens: int
    steps: int
    seed: int
    forward_flops_per_token: float
    train_flops_per_token: float
    total_flops: float
    params_total: int
    params_active: int
    params_backbone: int
    memory_gb_per_worker: float  # estimated peak memory of one worker's device (capacity.worker_memory)
    checkpoint_gb: float  # one checkpoint, all ranks together
    gpu_hours: float  # GPU workers' hours, from capacity.gpu_time (the cost model), on GPU-class hardware
    keep_checkpoints: int  # checkpoints kept when the trial completes (not part of the trial id)
    model: dict[str, Any]
    training: dict[str, Any] = field(repr=False)
    data: dict[str, Any] = field(repr=False)
    resources: dict[str, Any] = field(repr=False)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.model_validate(self.model)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Trial:
        return cls(**data)

    def estimated_cpu_seconds(self) -> float:
        sparse = self.model.get("sparse") or {}
        retrievals = self.tokens * sparse["heads"] * sparse["top_k"] if sparse.get("method") in ("pkm", "peer") else 0
        return (CPU_TRIAL_OVERHEAD_SECONDS + self.steps * CPU_SECONDS_PER_STEP + self.total_flops / CPU_FLOPS_PER_SECOND
                + retrievals * CPU_SECONDS_PER_RETRIEVAL)

    def estimated_gpu_hours(self) -> float:
        return self.gpu_hours


def plan_study(study: Study) -> list[Trial]:
    """All trials of a study, in a stable order; raises StudyError naming the first infeasible cell."""
    _check_batch(study)
    if isinstance(study.design, IsoFlopDesign):
        cells = _isoflop_cells(study, study.design)
    else:
        cells = _ablation_cells(study, study.design)
    trials = [_resolve(study, *cell, seed=seed) for cell in cells for seed in study.training.seeds]
    if not trials:
        raise StudyError(f"study {study.name!r}: the design has no trials")
    return trials


def load_and_plan(path: str | Path) -> tuple[Study, list[Trial]]:
    """`load_study(path)` and its trials; a cell that cannot be planned is a StudyError naming the file."""
    study = load_study(path)
    try:
        return study, plan_study(study)
    except StudyError as e:
        raise StudyError(f"{path}: {e}") from None


def _check_batch(study: Study) -> None:
    t, workers = study.training, study.resources.workers_per_trial
    if t.batch_tokens % t.seq_len:
        raise StudyError(f"training.batch_tokens: {t.batch_tokens} is not a multiple of seq_len {t.seq_len}")
    sequences = t.batch_tokens // t.seq_len
    if sequences % workers:
        raise StudyError(f"training.batch_tokens: {sequences} sequences per batch do not divide over "
                         f"resources.workers_per_trial={workers}")
    per_worker = sequences // workers
    if t.micro_batch_size and per_worker % t.micro_batch_size:
        raise StudyError(f"training.micro_batch_size: {t.micro_batch_size} does not divide the "
                         f"{per_worker} sequences each worker gets per step")


def _isoflop_cells(study: Study, design: IsoFlopDesign):
    for budget in design.budgets:
        for method in study.methods:
            for size in design.sizes_at(budget):
                yield method, size, {}, budget, None


def _ablation_cells(study: Study, design: AblationDesign):
    axes = design.axes.items()
    names = [name for name, _ in axes]
    for values in itertools.product(*(values for _, values in axes)):
        overrides: dict[str, Any] = {}
        for name, value in zip(names, values):
            if name == "heads_top_k":
                overrides["heads"], overrides["top_k"] = value
            else:
                overrides[name] = value
        for budget in design.budgets or (None,):
            for size in design.all_sizes:
                yield design.method, size, overrides, budget, design.tokens
    if design.reference:
        for budget in design.budgets or (None,):
            for size in design.all_sizes:
                yield design.reference, size, {}, budget, design.tokens


def _cell_name(method: str, size: ModelSize, overrides: dict, budget: float | None) -> str:
    parts = [method, f"d{size.d_model}", f"L{size.n_layers}"] + [f"{k}={v}" for k, v in overrides.items()]
    if budget is not None:
        parts.append(f"{budget:.3g} FLOPs")
    return " ".join(parts)


def _model_config(study: Study, method: str, size: ModelSize, overrides: dict) -> ModelConfig:
    backbone = study.model
    if size.d_model % backbone.head_dim:
        raise ValueError(f"d_model={size.d_model} is not a multiple of model.head_dim={backbone.head_dim}")
    sparse = None
    if method != "dense":
        sparse = study.methods[method].model_dump() | overrides
        if "query_bn" in overrides and method == "moe":
            raise ValueError("query_bn does not apply to moe")
    return ModelConfig(
        vocab_size=study.data.vocab_size,
        max_seq_len=study.training.seq_len,
        d_model=size.d_model,
        n_layers=size.n_layers,
        n_heads=size.d_model // backbone.head_dim,
        d_ff=backbone.d_ff_ratio * size.d_model,
        tie_embeddings=backbone.tie_embeddings,
        sparse=sparse,
        sparse_layers=backbone.sparse_layers if method != "dense" else None,
    )


def _resolve(study: Study, method, size, overrides, budget, fixed_tokens, seed) -> Trial:
    cell = _cell_name(method, size, overrides, budget)
    try:
        cfg = _model_config(study, method, size, overrides)
    except ValueError as e:
        message = e.errors()[0]["msg"].removeprefix("Value error, ") if hasattr(e, "errors") else str(e)
        raise StudyError(f"study {study.name!r}, cell [{cell}]: {message}") from None
    t = study.training
    train_fpt = train_flops_per_token(cfg, t.seq_len)
    flops_per_step = train_fpt * t.batch_tokens
    if budget is not None:
        steps = round(budget / flops_per_step)
        if steps < 1:
            raise StudyError(f"study {study.name!r}, cell [{cell}]: budget is smaller than one step "
                             f"({flops_per_step:.3g} FLOPs)")
        error = abs(steps * flops_per_step - budget) / budget
        if error > BUDGET_TOLERANCE:
            raise StudyError(f"study {study.name!r}, cell [{cell}]: {steps} whole steps miss the budget by "
                             f"{error:.1%} (more than 1%); raise the budget or lower training.batch_tokens")
    else:
        steps = -(-fixed_tokens // t.batch_tokens)
    tokens = steps * t.batch_tokens
    training = t.model_dump(mode="json", exclude={"seeds", "keep_checkpoints", "lr_scaling"})
    if t.lr_scaling is not None:  # the trial records the lr it trains with, whatever rule gave it
        training["lr"] = t.lr_scaling.lr(t.lr, params_backbone(cfg))
    if method != "peer" or t.expert_tables == "zero":
        del training["expert_tables"]  # no change to what is trained: no change to the trial id
    needs = _capacity(study, cfg, cell, steps)
    if needs["micro_batch"] != (t.micro_batch_size or needs["per_worker"]):
        training["micro_batch_size"] = needs["micro_batch"]
    resolved = {
        "study": study.name, "kind": study.design.kind, "method": method, "budget_flops": budget,
        "seq_len": t.seq_len, "batch_tokens": t.batch_tokens, "tokens": tokens, "steps": steps, "seed": seed,
        "model": cfg.model_dump(mode="json"), "training": training,
        "data": study.data.model_dump(mode="json"),
    }
    return Trial(
        trial_id=trial_hash(resolved),
        label=cell + ("" if len(t.seeds) == 1 else f" seed={seed}"),
        forward_flops_per_token=forward_flops_per_token(cfg, t.seq_len),
        train_flops_per_token=train_fpt,
        total_flops=tokens * train_fpt,
        params_total=params_total(cfg),
        params_active=params_active(cfg),
        params_backbone=params_backbone(cfg),
        memory_gb_per_worker=round(needs["memory"] / capacity.GB, 2),
        checkpoint_gb=round(needs["checkpoint"] / capacity.GB, 3),
        gpu_hours=needs["gpu_hours"],
        keep_checkpoints=t.keep_checkpoints,
        resources=study.resources.model_dump(mode="json"),
        **resolved,
    )


def _capacity(study: Study, cfg: ModelConfig, cell: str, steps: int) -> dict[str, Any]:
    """Memory per worker at the micro-batch the trial will use (refitted to `resources.gpu_memory_gb` on GPU
    workers), one checkpoint's bytes and the GPU-hours of the cost model."""
    t, r = study.training, study.resources
    on_gpu = r.gpus_per_worker > 0
    precision = capacity.precision_of(t.model_dump(), r.gpus_per_worker)
    row_sparse = cfg.method == "peer" and t.expert_tables == "row_sparse"
    per_worker = t.batch_tokens // t.seq_len // r.workers_per_trial
    requested = t.micro_batch_size or per_worker

    def memory_at(micro: int) -> float:
        return capacity.worker_memory(cfg, t.seq_len, micro, r.workers_per_trial, t.zero_stage, precision,
                                      on_gpu=on_gpu, row_sparse_tables=row_sparse).peak

    micro = requested
    if on_gpu:
        micro = capacity.fit_micro_batch(memory_at, per_worker, requested, r.gpu_memory_gb * capacity.GB)
        if micro is None:
            raise StudyError(f"study {study.name!r}, cell [{cell}]: needs {memory_at(1) / capacity.GB:.1f} GB per "
                             f"worker even at micro-batch 1, more than resources.gpu_memory_gb={r.gpu_memory_gb:g}; "
                             f"raise resources.workers_per_trial or training.zero_stage, or use larger GPUs")
    checkpoint = capacity.checkpoint_bytes(cfg, precision, t.zero_stage, row_sparse)
    from .data.evaluate import MIN_SAMPLE_TOKENS
    from .data.suites import SUITES

    # "all" (whole splits, whose sizes the plan does not read): costed as the smallest sample a study may ask for
    per_set = study.data.eval_tokens if study.data.eval_tokens != "all" else MIN_SAMPLE_TOKENS
    evaluation_tokens = t.evals * (1 + len(SUITES[study.data.suite].eval_sets)) * per_set
    time = capacity.gpu_time(cfg, seq_len=t.seq_len, batch_tokens=t.batch_tokens, steps=steps, micro_batch=micro,
                             world=r.workers_per_trial, zero_stage=t.zero_stage, precision="bf16" if
                             t.precision == "auto" else t.precision, evaluation_tokens=evaluation_tokens,
                             checkpoints=t.checkpoints, checkpoint_size=checkpoint)
    return {"per_worker": per_worker, "micro_batch": micro, "memory": memory_at(micro), "checkpoint": checkpoint,
            "gpu_hours": time.gpu_hours}


def storage_totals(trials: list[Trial], concurrent: int = 1) -> dict[str, float]:
    """Checkpoint storage of a study, in GB: `kept` once every trial is done (each keeps its final
    `keep_checkpoints`), `peak` (kept, plus one more checkpoint per running trial: a trial keeps only its
    latest while training, and writes the next before it deletes it) and `written` over the study."""
    kept = sum(t.keep_checkpoints * t.checkpoint_gb for t in trials)
    largest = sorted((t.checkpoint_gb for t in trials), reverse=True)[:concurrent]
    written = sum(t.training["checkpoints"] * t.checkpoint_gb for t in trials)
    return {"kept": kept, "peak": kept + sum(largest), "written": written}


def trial_hash(resolved: dict[str, Any]) -> str:
    """Stable content hash of everything that determines a trial's result (not its resources)."""
    canonical = json.dumps(resolved, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
