"""Expanding a study into trials: every cell of its grid resolved to a model, a token horizon and an id.

isoFLOP cells: steps = round(budget / (train FLOPs per token x batch tokens)), so a trial's total FLOPs is
within 1% of its budget in whole steps; a cell where that is impossible (too few steps) is rejected.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from model import ModelConfig

from .study import AblationDesign, IsoFlopDesign, ModelSize, Study, StudyError

BUDGET_TOLERANCE = 0.01
# Rough costs for time estimates. CPU: one fp32 worker on the 2-core development machine, two trials at a
# time, fitted to the 48 trials of the isoFLOP study (LOG.md, 2026-11-22; median error 8%): a fixed cost
# per trial (Ray Train start, W&B, evaluation, scheduling), a per-step cost (optimizer, Python), the FLOPs
# at the throughput these small models reach, and the product-key retrievals of PKM and PEER (per token,
# head and top-k slot). GPU: 40% of an H100's dense bf16 peak.
CPU_TRIAL_OVERHEAD_SECONDS = 20.0
CPU_SECONDS_PER_STEP = 0.017
CPU_FLOPS_PER_SECOND = 18e9
CPU_SECONDS_PER_RETRIEVAL = 5.3e-7
GPU_FLOPS_PER_SECOND = 0.4 * 989e12


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
        return self.total_flops / GPU_FLOPS_PER_SECOND / 3600


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
    train_fpt = cfg.train_flops_per_token(t.seq_len)
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
    training = t.model_dump(mode="json", exclude={"seeds"})
    if method != "peer" or t.expert_tables == "zero":
        del training["expert_tables"]  # no change to what is trained: no change to the trial id
    resolved = {
        "study": study.name, "kind": study.design.kind, "method": method, "budget_flops": budget,
        "seq_len": t.seq_len, "batch_tokens": t.batch_tokens, "tokens": tokens, "steps": steps, "seed": seed,
        "model": cfg.model_dump(mode="json"), "training": training,
        "data": study.data.model_dump(mode="json"),
    }
    return Trial(
        trial_id=trial_hash(resolved),
        label=cell + ("" if len(t.seeds) == 1 else f" seed={seed}"),
        forward_flops_per_token=cfg.forward_flops_per_token(t.seq_len),
        train_flops_per_token=train_fpt,
        total_flops=tokens * train_fpt,
        params_total=cfg.params_total(),
        params_active=cfg.params_active(),
        params_backbone=cfg.params_backbone(),
        resources=study.resources.model_dump(mode="json"),
        **resolved,
    )


def trial_hash(resolved: dict[str, Any]) -> str:
    """Stable content hash of everything that determines a trial's result (not its resources)."""
    canonical = json.dumps(resolved, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
