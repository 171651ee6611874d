"""A synthetic results directory with known answers, written with the schemas of peer_sweeps/schema.py.

isoFLOP trials of four methods at three budgets on a 7-size grid, each trained with `seeds` seeds;
log-perplexity is a parabola in log10(params_backbone) whose vertex `true_vertex(method, budget)` and minimum
`true_log_ppl_min` are known, plus Gaussian noise of sd `noise` per trial (the seed noise). Planted:
- EDGE: the vertex of (moe, 1e19) lies beyond the largest size of the grid;
- TWO_POINTS: (pkm, 1e17) has only 2 completed sizes, the rest failed (out of memory);
- OUTLIER: one (peer, 1e18) point has perplexity 40% too high, next to the vertex;
- DIVERGED: the largest (dense, 1e17) model diverged with seed 0;
plus ablation trials of PEER (num_experts x query BN; heads x top_k) with usage and unevenness, one failed,
and isoFLOP curves of two numbers of experts at three sizes with a dense reference (the paper's Fig. 3a).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from peer_sweeps.schema import curves_schema, trials_schema

EVAL_SETS = ("validation", "c4", "wikitext")
SET_OFFSETS = {"validation": 0.0, "c4": 0.05, "wikitext": 0.25}  # log-perplexity above the validation set
METHODS = ("dense", "moe", "pkm", "peer")
BUDGETS = (1e17, 1e18, 1e19)
GRID_OFFSETS = np.linspace(-0.6, 0.6, 7)  # log10 params around the grid centre
CURVATURE = 0.5  # log-perplexity per (log10 params)^2
GAIN = {"dense": 0.0, "moe": 0.05, "pkm": 0.03, "peer": 0.09}  # log-perplexity below dense at the optimum
SHIFT = {"dense": 0.0, "moe": -0.1, "pkm": 0.05, "peer": -0.15}  # vertex offset from the grid centre
SPEED = {"dense": 1.0, "moe": 0.8, "pkm": 0.6, "peer": 0.45}  # relative training throughput (FLOP/s)

EDGE = ("moe", 1e19)
TWO_POINTS = ("pkm", 1e17)
OUTLIER = ("peer", 1e18)
DIVERGED = ("dense", 1e17)
STUDY, ABLATION_STUDY = "synthetic_isoflop", "synthetic_ablation"
BATCH_TOKENS, SEQ_LEN, VOCAB = 8192, 256, 32000


def grid_centre(budget: float) -> float:
    return 6.0 + 0.5 * (math.log10(budget) - 17)


def true_vertex(method: str, budget: float) -> float:
    """log10(params_backbone) at the minimum of the planted parabola (exponent of N_opt ~ C^0.5)."""
    return grid_centre(budget) + (0.9 if (method, budget) == EDGE else SHIFT[method])


def true_log_ppl_min(method: str, budget: float, gain: dict[str, float] = GAIN) -> float:
    return math.log(40.0) - 0.15 * (math.log10(budget) - 17) - gain[method]


def _model_fields(method: str, x: float, num_experts: int | None = None, heads: int = 8, top_k: int = 16) -> dict:
    backbone = int(round(10**x))
    n_layers = 8
    d_model = max(16, int(round(math.sqrt(backbone / (12 * n_layers)) / 16)) * 16)
    embedding = VOCAB * d_model
    mlp = 8 * d_model**2
    experts = {"dense": None, "moe": 8, "pkm": 65536, "peer": 65536}[method] if num_experts is None else num_experts
    extra_total = {"dense": 0, "moe": 7 * mlp, "pkm": experts * d_model if experts else 0,
                   "peer": 2 * experts * d_model if experts else 0}[method]
    extra_active = {"dense": 0, "moe": 0, "pkm": 32 * 8 * d_model, "peer": (2 * d_model + 1) * heads * top_k}[method]
    return {
        "params_backbone": backbone,
        "params_total": backbone + embedding + extra_total,
        "params_active": backbone + embedding + extra_active - (mlp if method == "peer" else 0),
        "d_model": d_model,
        "n_layers": n_layers,
        "n_heads": max(1, d_model // 64),
        "num_experts": experts,
        "expert_heads": {"pkm": 8, "peer": heads}.get(method),
        "top_k": {"moe": 1, "pkm": 32, "peer": top_k}.get(method),
        "query_bn": True if method in ("pkm", "peer") else None,
    }


def _trial_row(study: str, kind: str, method: str, budget: float, x: float, log_ppl: float, index: int,
               rng: np.random.Generator, noise: float, seed: int = 0, **model_kw) -> dict:
    row = {"trial_id": f"{kind[:3]}-{method}-{index:03d}", "study": study, "kind": kind, "method": method,
           "status": "completed", "budget_flops": budget, "total_flops": budget, "seq_len": SEQ_LEN,
           "batch_tokens": BATCH_TOKENS, "seed": seed, "lr": 1e-3, "attempts": 1, "ray_nodes": ["node-0"],
           "error": None, "finished_at": "2025-01-01T00:00:00Z"}
    row |= _model_fields(method, x, **model_kw)
    row["tokens"] = int(budget / (6 * row["params_active"]))
    row["steps"] = max(1, row["tokens"] // BATCH_TOKENS)
    row["loss"] = log_ppl
    row["ppl"] = math.exp(log_ppl)
    for name in EVAL_SETS:
        set_loss = log_ppl + SET_OFFSETS[name] + (rng.normal(0, noise) if name != EVAL_SETS[0] else 0.0)
        row[f"ppl_{name}"] = math.exp(set_loss)
        row[f"bpb_{name}"] = set_loss / math.log(2) / 4.0
    sparse = method in ("pkm", "peer")
    row["usage"] = 1.0 if sparse else None
    row["unevenness"] = 0.5 if sparse else None
    flops_per_second = 2e14 * SPEED[method] * (row["params_backbone"] / 1e6) ** 0.15
    row["train_seconds"] = budget / flops_per_second
    row["tokens_per_second"] = row["tokens"] / row["train_seconds"]
    return row


def _isoflop_rows(rng: np.random.Generator, noise: float, seeds: int, gain: dict[str, float]) -> list[dict]:
    rows = []
    for method in METHODS:
        for budget in BUDGETS:
            vertex = true_vertex(method, budget)
            xs = grid_centre(budget) + GRID_OFFSETS
            outlier_at = int(np.argmin(np.abs(xs - (vertex + 0.2))))
            for i, x in enumerate(xs):
                for seed in range(seeds):
                    log_ppl = (true_log_ppl_min(method, budget, gain) + CURVATURE * (x - vertex) ** 2
                               + rng.normal(0, noise))
                    if (method, budget) == OUTLIER and i == outlier_at:
                        log_ppl += math.log(1.4)
                    row = _trial_row(STUDY, "isoflop", method, budget, x, log_ppl, len(rows), rng, noise, seed)
                    if (method, budget) == TWO_POINTS and i not in (2, 4):
                        _fail(row, "failed", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
                    if (method, budget) == DIVERGED and i == len(xs) - 1 and seed == 0:
                        _fail(row, "diverged", f"training loss became NaN at step {row['steps'] // 2}")
                    rows.append(row)
    return rows


def _ablation_rows(rng: np.random.Generator, noise: float, seeds: int) -> list[dict]:
    budget = 1e18
    x = grid_centre(budget) + SHIFT["peer"]
    base = true_log_ppl_min("peer", budget)
    rows = []
    for seed in range(seeds):
        for num_experts in (1024, 4096, 16384, 65536):
            for query_bn in (False, True):
                log_ppl = base + 0.015 * (16 - math.log2(num_experts)) + (0.0 if query_bn else 0.01)
                row = _trial_row(ABLATION_STUDY, "ablation", "peer", budget, x, log_ppl + rng.normal(0, noise),
                                 1000 + len(rows), rng, noise, seed, num_experts=num_experts)
                row["query_bn"] = query_bn
                row["usage"] = 1.0 if query_bn or num_experts < 65536 else 0.998
                row["unevenness"] = (0.3 + 0.2 * math.log(num_experts / 1024, 4)) * (1.0 if query_bn else 1.45)
                rows.append(row)
        for heads, top_k in ((1, 16), (2, 16), (4, 16), (8, 16), (16, 16)):
            log_ppl = base + 0.04 * (math.log2(128) - math.log2(heads * top_k)) ** 2 / 4
            rows.append(_trial_row(ABLATION_STUDY, "ablation", "peer", budget, x, log_ppl + rng.normal(0, noise),
                                   1000 + len(rows), rng, noise, seed, num_experts=65536, heads=heads, top_k=top_k))
        for offset in (-0.2, 0.0, 0.2):  # Fig. 3a style: isoFLOP curves per N at 3 sizes, dense as reference
            for method, num_experts in (("peer", 1024), ("peer", 16384), ("dense", None)):
                gain = GAIN[method] + (0.015 * (math.log2(num_experts) - 10) if num_experts else 0.0)
                log_ppl = base + GAIN["peer"] - gain + CURVATURE * offset**2 + rng.normal(0, noise)
                row = _trial_row(ABLATION_STUDY, "ablation", method, 1e19, x + offset, log_ppl, 1000 + len(rows),
                                 rng, noise, seed, num_experts=num_experts)
                rows.append(row)
    failed = _trial_row(ABLATION_STUDY, "ablation", "peer", budget, x, base, 1000 + len(rows), rng, noise,
                        num_experts=262144)
    _fail(failed, "failed", "ray.exceptions.RayTaskError: worker died (out of host memory)")
    rows.append(failed)
    return rows


def _fail(row: dict, status: str, error: str) -> None:
    row["status"], row["error"] = status, error
    for name in ["loss", "ppl", "usage", "unevenness"] + [f"{m}_{s}" for m in ("ppl", "bpb") for s in EVAL_SETS]:
        row[name] = None
    if status == "failed":
        row["train_seconds"] = row["tokens_per_second"] = None


def _curve_rows(trial: dict) -> list[dict]:
    """Loss falling as a power of tokens to the trial's final loss; diverged trials blow up half-way."""
    if trial["status"] == "failed":
        return []
    final_loss = trial["loss"] if trial["loss"] is not None else math.log(60.0)
    steps = np.unique(np.linspace(0, trial["steps"], 13).astype(int))
    rows = []
    for j, step in enumerate(steps):
        frac = max(step, 1) / trial["steps"]
        loss = final_loss + 0.5 * (frac**-0.35 - 1)
        if trial["status"] == "diverged" and frac > 0.5:
            loss = 1e3 if frac < 0.75 else float("nan")
        evaluated = j % 4 == 0 or j == len(steps) - 1
        row = {"trial_id": trial["trial_id"], "step": int(step), "tokens": int(step) * BATCH_TOKENS,
               "flops": trial["budget_flops"] * frac, "seconds": (trial["train_seconds"] or 0.0) * frac,
               "train_loss": loss, "lr": 1e-3 * 0.5 * (1 + math.cos(math.pi * frac)),
               "ppl": math.exp(loss + 0.02) if evaluated and math.isfinite(loss) and loss < 50 else None,
               "usage": trial["usage"] if evaluated else None,
               "unevenness": trial["unevenness"] if evaluated else None}
        for name in EVAL_SETS:
            ok = row["ppl"] is not None
            row[f"ppl_{name}"] = row["ppl"] * math.exp(SET_OFFSETS[name]) if ok else None
            row[f"bpb_{name}"] = (loss + SET_OFFSETS[name]) / math.log(2) / 4.0 if ok else None
        rows.append(row)
    return rows


def synthetic_tables(seed: int = 0, noise: float = 0.004, seeds: int = 3, gain: dict[str, float] | None = None,
                     all_failed: bool = False) -> tuple[pa.Table, pa.Table]:
    """(trials, curves) tables of the synthetic study: `seeds` seeds per cell, seed noise `noise` (sd of
    log-perplexity), each method's `gain` in log-perplexity below dense (default GAIN); `all_failed` turns
    every trial into a failure."""
    rng = np.random.default_rng(seed)
    trials = _isoflop_rows(rng, noise, seeds, gain or GAIN) + _ablation_rows(rng, noise, seeds)
    if all_failed:
        for row in trials:
            _fail(row, "failed", "RuntimeError: NCCL error: unhandled system error")
    curves = [r for trial in trials for r in _curve_rows(trial)]
    return (pa.Table.from_pylist(trials, schema=trials_schema(EVAL_SETS)),
            pa.Table.from_pylist(curves, schema=curves_schema(EVAL_SETS)))


def write_synthetic_results(out_dir: str | Path, curves: bool = True, **kwargs) -> Path:
    """Write trials.parquet (and curves.parquet unless `curves=False`) of the synthetic study to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trials_table, curves_table = synthetic_tables(**kwargs)
    pq.write_table(trials_table, out_dir / "trials.parquet")
    if curves:
        pq.write_table(curves_table, out_dir / "curves.parquet")
    return out_dir


def curve_table(method: str, budget: float, params: list[float], ppl_by_seed: list[list[float]]) -> pa.Table:
    """The trials of one isoFLOP curve with given perplexities: ppl_by_seed[s][i] at params[i], seed s."""
    rng = np.random.default_rng(0)
    rows = []
    for seed, ppls in enumerate(ppl_by_seed):
        for p, ppl in zip(params, ppls):
            row = _trial_row(STUDY, "isoflop", method, budget, math.log10(p), math.log(ppl), len(rows), rng, 0.0,
                             seed)
            row["params_backbone"] = int(p)
            rows.append(row)
    return pa.Table.from_pylist(rows, schema=trials_schema(EVAL_SETS))
