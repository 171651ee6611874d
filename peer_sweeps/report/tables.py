"""The report's tables, computed from a `Results` snapshot: isoFLOP optima (`optimal.csv`), fit details,
power laws, the Table-1-style comparison with dense, iso-time optima, the Table-2-style ablation and failures.

Perplexity of the other evaluation sets at an optimum (`ppl_opt_<set>`): each set's own Huber parabola,
fitted on the same trials, evaluated at the primary set's vertex; for a flagged curve, the values observed
on the trial used as the fallback optimum. The primary set's value is `ppl_opt` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from peer_sweeps.report.fits import (
    PowerLaw,
    VertexFit,
    fit_isoflop,
    fit_parabola,
    fit_power_law,
    lower_envelope,
)
from peer_sweeps.report.results import Results

METHOD_ORDER = ("dense", "moe", "pkm", "peer")
METHOD_LABELS = {"dense": "dense", "moe": "MoE", "pkm": "PKM", "peer": "PEER"}
BASELINE = "dense"


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def sorted_methods(methods) -> list[str]:
    known = [m for m in METHOD_ORDER if m in set(methods)]
    return known + sorted(set(methods) - set(METHOD_ORDER))


@dataclass(frozen=True)
class IsoflopCurve:
    """The completed trials of one (method, budget) isoFLOP curve and its fit."""

    method: str
    budget: float
    points: pd.DataFrame  # completed isoflop trials, sorted by params_backbone
    fit: VertexFit
    ppl_opt_sets: dict[str, float]  # perplexity of every evaluation set at the optimum

    @property
    def params_opt(self) -> float:
        return 10**self.fit.x_opt

    @property
    def ppl_opt(self) -> float:
        return float(np.exp(self.fit.y_opt))


def _set_ppl_at_optimum(points: pd.DataFrame, fit: VertexFit, name: str) -> float:
    values = pd.to_numeric(points[f"ppl_{name}"], errors="coerce").to_numpy(float)
    if fit.flag:
        return float(values[fit.best_index])
    x = np.log10(points["params_backbone"].to_numpy(float))
    ok = np.isfinite(values) & (values > 0)
    if len(np.unique(x[ok])) < 3:
        return float("nan")
    return float(np.exp(fit_parabola(x[ok], np.log(values[ok]))(fit.x_opt)))


def isoflop_curves(results: Results) -> list[IsoflopCurve]:
    """One fitted curve per (method, budget) with at least one completed isoFLOP trial."""
    done = results.completed("isoflop")
    done = done[np.isfinite(pd.to_numeric(done["params_backbone"], errors="coerce").astype(float))]
    done = done[pd.to_numeric(done["budget_flops"], errors="coerce").notna()]
    curves = []
    for method in sorted_methods(done["method"].unique()):
        of_method = done[done["method"] == method]
        for budget in sorted(of_method["budget_flops"].astype(float).unique()):
            points = of_method[of_method["budget_flops"].astype(float) == budget]
            points = points.sort_values("params_backbone").reset_index(drop=True)
            x = np.log10(points["params_backbone"].to_numpy(float))
            fit = fit_isoflop(x, np.log(points["ppl"].to_numpy(float)))
            sets = {name: _set_ppl_at_optimum(points, fit, name) for name in results.eval_sets}
            if results.primary:
                sets[results.primary] = float(np.exp(fit.y_opt))
            curves.append(IsoflopCurve(method, float(budget), points, fit, sets))
    return curves


def optimal_table(curves: list[IsoflopCurve], eval_sets: list[str]) -> pd.DataFrame:
    """`optimal.csv` (CONTRACT.md): one row per (method, budget)."""
    columns = ["method", "budget_flops", "params_opt", "ppl_opt"] + [f"ppl_opt_{s}" for s in eval_sets]
    rows = [
        [c.method, c.budget, c.params_opt, c.ppl_opt] + [c.ppl_opt_sets[s] for s in eval_sets]
        + [c.fit.num_points, c.fit.flag]
        for c in curves
    ]
    return pd.DataFrame(rows, columns=columns + ["n_points", "flag"])


def fits_table(curves: list[IsoflopCurve]) -> pd.DataFrame:
    """The parabolas behind `optimal.csv`: log(ppl) = a u^2 + b u + c, u = log10(params_backbone) - u_ref."""
    rows = []
    for c in curves:
        p, f = c.fit.parabola, c.fit
        rows.append({
            "method": c.method, "budget_flops": c.budget, "n_points": f.num_points,
            "a": p.a if p else np.nan, "b": p.b if p else np.nan, "c": p.c if p else np.nan,
            "u_ref": p.x_ref if p else np.nan,
            "params_vertex": 10**p.vertex_x if p and p.convex else np.nan,
            "params_vertex_lo": 10**f.x_lo, "params_vertex_hi": 10**f.x_hi,
            "n_bootstraps": f.num_bootstraps, "flag": f.flag,
        })
    return pd.DataFrame(rows)


def power_laws(optimal: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, PowerLaw]]:
    """Per method, params_opt ~ C^a and ppl_opt ~ C^b over the trusted (unflagged) optima, given >= 3."""
    rows, laws = [], {}
    for method in sorted_methods(optimal["method"].unique()):
        of_method = optimal[optimal["method"] == method]
        trusted = of_method[of_method["flag"] == ""]
        row = {"method": method, "n_budgets": len(of_method), "n_trusted": len(trusted),
               "params_exponent": np.nan, "params_coefficient": np.nan, "ppl_exponent": np.nan, "note": ""}
        if trusted["budget_flops"].nunique() >= 3:
            law = fit_power_law(trusted["budget_flops"], trusted["params_opt"])
            laws[method] = law
            row |= {"params_exponent": law.exponent, "params_coefficient": 10**law.log10_k,
                    "ppl_exponent": fit_power_law(trusted["budget_flops"], trusted["ppl_opt"]).exponent}
        else:
            row["note"] = f"{len(trusted)} trusted budget(s); a power law needs 3"
        rows.append(row)
    return pd.DataFrame(rows), laws


def table1(optimal: pd.DataFrame, eval_sets: list[str]) -> pd.DataFrame:
    """Compute-optimal perplexity per method, budget and evaluation set, and its change against dense (%)."""
    rows = []
    for _, r in optimal.iterrows():
        base = optimal[(optimal["method"] == BASELINE) & (optimal["budget_flops"] == r["budget_flops"])]
        for name in eval_sets:
            ppl = r[f"ppl_opt_{name}"]
            dense = float(base[f"ppl_opt_{name}"].iloc[0]) if len(base) else np.nan
            rows.append({"method": r["method"], "budget_flops": r["budget_flops"], "eval_set": name,
                         "ppl_opt": ppl, "dense_ppl_opt": dense,
                         "change_vs_dense_pct": 100 * (ppl / dense - 1) if np.isfinite(dense) else np.nan,
                         "flag": r["flag"]})
    return pd.DataFrame(rows, columns=["method", "budget_flops", "eval_set", "ppl_opt", "dense_ppl_opt",
                                       "change_vs_dense_pct", "flag"])


def iso_time_table(curves: list[IsoflopCurve]) -> pd.DataFrame:
    """Training seconds of each isoFLOP optimum: log-linear interpolation in log10(params) between the
    trials around the vertex (the fallback trial's own seconds when flagged)."""
    rows = []
    for c in curves:
        x = np.log10(c.points["params_backbone"].to_numpy(float))
        seconds = pd.to_numeric(c.points["train_seconds"], errors="coerce").to_numpy(float)
        ok = np.isfinite(seconds) & (seconds > 0)
        if c.fit.flag or not ok.any():
            t = seconds[c.fit.best_index]
        else:
            t = float(10 ** np.interp(c.fit.x_opt, x[ok], np.log10(seconds[ok])))
        rows.append({"method": c.method, "budget_flops": c.budget, "params_opt": c.params_opt,
                     "ppl_opt": c.ppl_opt, "train_seconds_opt": t, "flag": c.fit.flag})
    return pd.DataFrame(rows, columns=["method", "budget_flops", "params_opt", "ppl_opt", "train_seconds_opt",
                                       "flag"])


def equal_time_best(results: Results) -> tuple[float, dict[str, float], dict[str, float]]:
    """The longest training time every method reached in the isoFLOP trials; each method's best
    perplexity among its trials that trained no longer than that (the lower envelopes read at one time;
    a method without such a trial is absent); and each method's shortest training time."""
    done = results.completed("isoflop")
    seconds = pd.to_numeric(done["train_seconds"], errors="coerce")
    done = done[np.isfinite(seconds.astype(float))]
    if done.empty:
        return float("nan"), {}, {}
    t = float(done.groupby("method")["train_seconds"].max().min())
    fastest = {m: float(v) for m, v in done.groupby("method")["train_seconds"].min().items()}
    best = {}
    for method in sorted_methods(done["method"].unique()):
        of_method = done[done["method"] == method]
        _, envelope = lower_envelope(of_method["train_seconds"].to_numpy(float), of_method["ppl"].to_numpy(float))
        reached = of_method["train_seconds"].to_numpy(float) <= t
        if reached.any():
            best[method] = float(envelope[: int(reached.sum())][-1])
    return t, best, fastest


ABLATION_KEYS = ["budget_flops", "params_backbone", "expert_heads", "top_k", "num_experts", "query_bn"]


def ablation_points(results: Results) -> pd.DataFrame:
    """Completed ablation trials averaged over seeds: one row per distinct configuration."""
    done = results.completed("ablation").copy()
    if done.empty:
        return pd.DataFrame(columns=["method"] + ABLATION_KEYS + ["active_experts", "ppl", "usage_pct",
                                                                   "unevenness", "n_trials"])
    done["query_bn"] = done["query_bn"].map(lambda v: bool(v) if v is not None and not pd.isna(v) else False)
    for key in ["budget_flops", "params_backbone", "expert_heads", "top_k", "num_experts"]:
        done[key] = pd.to_numeric(done[key], errors="coerce").fillna(-1)  # -1: not set (groupby drops NaN)
    done["usage_pct"] = 100 * pd.to_numeric(done["usage"], errors="coerce")
    done["unevenness"] = pd.to_numeric(done["unevenness"], errors="coerce")
    grouped = done.groupby(["method"] + ABLATION_KEYS, as_index=False).agg(
        ppl=("ppl", "mean"), usage_pct=("usage_pct", "mean"), unevenness=("unevenness", "mean"),
        n_trials=("trial_id", "count"))
    grouped = grouped.replace(-1, np.nan)
    grouped["active_experts"] = grouped["expert_heads"] * grouped["top_k"]
    return grouped


def table2(points: pd.DataFrame) -> pd.DataFrame:
    """Table-2 style: per num_experts, without and with query batch norm, perplexity, usage (%) and
    unevenness - for the settings (budget, size, heads, top-k) where num_experts or query BN was varied."""
    setting = ["method", "budget_flops", "params_backbone", "expert_heads", "top_k"]
    blocks = []
    for _, block in points.groupby(setting, dropna=False):
        if block["num_experts"].nunique() < 2 and block["query_bn"].nunique() < 2:
            continue
        blocks.append(block.sort_values(["num_experts", "query_bn"]))
    if not blocks:
        return pd.DataFrame(columns=list(points.columns))
    return pd.concat(blocks, ignore_index=True)[setting + ["num_experts", "query_bn", "active_experts", "ppl",
                                                          "usage_pct", "unevenness", "n_trials"]]


def failures_table(results: Results) -> pd.DataFrame:
    t = results.trials
    bad = t[t["status"].isin(["failed", "diverged"])]
    columns = ["trial_id", "study", "kind", "method", "budget_flops", "params_backbone", "status", "attempts",
               "error"]
    return bad[columns].sort_values(["status", "kind", "method", "budget_flops"]).reset_index(drop=True)


def status_counts(results: Results) -> pd.DataFrame:
    """Trials per kind and status (rows: kind; columns: completed, failed, diverged, total)."""
    t = results.trials
    statuses = ["completed", "failed", "diverged"]
    rows = []
    for kind in sorted(t["kind"].dropna().unique()):
        of_kind = t[t["kind"] == kind]
        rows.append({"kind": kind} | {s: int((of_kind["status"] == s).sum()) for s in statuses}
                    | {"total": len(of_kind)})
    if rows:
        rows.append({"kind": "all"} | {s: int((t["status"] == s).sum()) for s in statuses} | {"total": len(t)})
    return pd.DataFrame(rows, columns=["kind"] + statuses + ["total"])
