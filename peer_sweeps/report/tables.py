"""The report's tables, computed from a `Results` snapshot: isoFLOP optima (`optimal.csv`), fit details,
power laws, the Table-1-style comparison with dense, iso-time optima, the Table-2-style ablation and failures.

Every perplexity at an optimum is that of the best trained size of the curve (by the primary set's mean
over seeds), averaged over its seeds as a geometric mean: `ppl_opt` on the primary set and `ppl_opt_<set>`
on the others, so all sets and all curves report the same kind of quantity (see fits.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from peer_sweeps.report.fits import (
    PowerLaw,
    VertexFit,
    fit_isoflop,
    fit_power_law,
    lower_envelope,
)
from peer_sweeps.report.parametric import MIN_TRIALS, ParametricFit, fit_parametric
from peer_sweeps.report.results import Results
from peer_sweeps.report.seeds import Change, Interval, Noise, compare, pooled_noise, t_interval

METHOD_ORDER = ("dense", "moe", "pkm", "peer")
METHOD_LABELS = {"dense": "dense", "moe": "MoE", "pkm": "PKM", "peer": "PEER"}
BASELINE = "dense"
ASSUMED_NOISE = 0.02  # sd of log(ppl) assumed when neither seeds nor residuals can measure it


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def sorted_methods(methods) -> list[str]:
    known = [m for m in METHOD_ORDER if m in set(methods)]
    return known + sorted(set(methods) - set(METHOD_ORDER))


@dataclass(frozen=True)
class IsoflopCurve:
    """The completed trials of one (method, budget) isoFLOP curve, their means per size and the fit."""

    method: str
    budget: float
    points: pd.DataFrame  # completed isoflop trials (every seed), sorted by params_backbone
    sizes: pd.DataFrame  # one row per size: params_backbone, n_seeds, log_ppl (mean over seeds), se
    fit: VertexFit
    ppl_opt_sets: dict[str, float]  # perplexity of every evaluation set at the optimum (mean over seeds)
    seed_log_ppl: dict[int, float]  # seed -> log ppl of the best trained size
    interval: Interval  # of the mean log ppl of the best trained size, over its seeds

    @property
    def params_opt(self) -> float:
        return 10**self.fit.x_opt

    @property
    def ppl_opt(self) -> float:
        return float(np.exp(self.fit.y_opt))

    @property
    def best_size(self) -> pd.DataFrame:
        """The trials (every seed) of the best trained size."""
        best = self.sizes["params_backbone"].iloc[self.fit.best_index]
        return self.points[self.points["params_backbone"] == best]


@dataclass(frozen=True)
class NoiseModel:
    """The noise the fits use: per method where seeds measure it, else pooled over methods, else estimated
    from the fits' residuals, else assumed (`source` says which)."""

    per_method: dict[str, Noise]
    pooled: Noise
    sd: dict[str, float]
    source: dict[str, str]


def completed_isoflop(results: Results) -> pd.DataFrame:
    done = results.completed("isoflop")
    done = done[np.isfinite(pd.to_numeric(done["params_backbone"], errors="coerce").astype(float))]
    done = done[pd.to_numeric(done["budget_flops"], errors="coerce").notna()].copy()
    done["budget_flops"] = done["budget_flops"].astype(float)
    done["seed"] = pd.to_numeric(done["seed"], errors="coerce").fillna(0).astype(int)
    done["log_ppl"] = np.log(done["ppl"].astype(float))
    return done


def _cell_labels(done: pd.DataFrame) -> pd.Series:
    return done["method"].astype(str) + "|" + done["budget_flops"].astype(str) + "|" + \
        done["params_backbone"].astype(str)


def _residual_sd(done: pd.DataFrame) -> float:
    """Pooled residual sd of plain least-squares parabolas through the curves with 4 or more sizes (the
    noise plus the parabola's misfit: an upper estimate, used only when no cell has 2 seeds)."""
    squares, dof = 0.0, 0
    for _, curve in done.groupby(["method", "budget_flops"]):
        sizes = curve.groupby("params_backbone")["log_ppl"].mean()
        if len(sizes) < 4:
            continue
        x = np.log10(sizes.index.to_numpy(float))
        residual = np.polyval(np.polyfit(x - x.mean(), sizes.to_numpy(), 2), x - x.mean()) - sizes.to_numpy()
        squares, dof = squares + float(np.sum(residual**2)), dof + len(sizes) - 3
    return float(np.sqrt(squares / dof)) if dof else float("nan")


def noise_model(done: pd.DataFrame) -> NoiseModel:
    cells = _cell_labels(done)
    per_method = {m: pooled_noise(done.loc[done["method"] == m, "log_ppl"], cells[done["method"] == m])
                  for m in sorted_methods(done["method"].unique())}
    pooled = pooled_noise(done["log_ppl"], cells)
    residual = _residual_sd(done) if not pooled.measured else float("nan")
    sd, source = {}, {}
    for m, noise in per_method.items():
        if noise.measured:
            sd[m], source[m] = noise.sd, f"seeds of {method_label(m)} ({noise.dof} degrees of freedom)"
        elif pooled.measured:
            sd[m], source[m] = pooled.sd, f"seeds of all methods ({pooled.dof} degrees of freedom)"
        elif np.isfinite(residual) and residual > 0:
            sd[m], source[m] = residual, "residuals of the parabolas (one seed: noise not measured)"
        else:
            sd[m], source[m] = ASSUMED_NOISE, "assumed (one seed, too few sizes to estimate it)"
    return NoiseModel(per_method, pooled, sd, source)


def _set_ppl_at_best(best: pd.DataFrame, name: str) -> float:
    values = pd.to_numeric(best[f"ppl_{name}"], errors="coerce").to_numpy(float)
    values = values[np.isfinite(values) & (values > 0)]
    return float(np.exp(np.mean(np.log(values)))) if len(values) else float("nan")


def isoflop_curves(results: Results, noise: NoiseModel | None = None) -> list[IsoflopCurve]:
    """One fitted curve per (method, budget) with at least one completed isoFLOP trial; sizes are averaged
    over their seeds (geometric mean of perplexity, i.e. mean of log-perplexity)."""
    done = completed_isoflop(results)
    noise = noise or noise_model(done)
    curves = []
    for method in sorted_methods(done["method"].unique()):
        of_method = done[done["method"] == method]
        for budget in sorted(of_method["budget_flops"].unique()):
            points = of_method[of_method["budget_flops"] == budget].sort_values(["params_backbone", "seed"])
            points = points.reset_index(drop=True)
            sizes = points.groupby("params_backbone", as_index=False).agg(
                n_seeds=("seed", "count"), log_ppl=("log_ppl", "mean"))
            sizes["se"] = noise.sd[method] / np.sqrt(sizes["n_seeds"])
            fit = fit_isoflop(np.log10(sizes["params_backbone"].to_numpy(float)), sizes["log_ppl"].to_numpy(),
                              sizes["se"].to_numpy(), noise_measured=noise.per_method[method].measured
                              or noise.pooled.measured)
            best = points[points["params_backbone"] == sizes["params_backbone"].iloc[fit.best_index]]
            seed_log_ppl = dict(zip(best["seed"].astype(int), best["log_ppl"].astype(float)))
            sets = {name: _set_ppl_at_best(best, name) for name in results.eval_sets}
            if results.primary:
                sets[results.primary] = float(np.exp(fit.y_opt))
            curves.append(IsoflopCurve(method, float(budget), points, sizes, fit, sets, seed_log_ppl,
                                       t_interval(best["log_ppl"].to_numpy(float))))
    return curves


def optimal_table(curves: list[IsoflopCurve], eval_sets: list[str]) -> pd.DataFrame:
    """`optimal.csv` (CONTRACT.md): one row per (method, budget). ppl_opt is always the best trained size's
    mean over seeds; ppl_lo95 / ppl_hi95 its 95% t-interval over seeds (empty with one seed); ppl_vertex the
    parabola's minimum, for comparison only."""
    columns = (["method", "budget_flops", "params_opt", "ppl_opt"] + [f"ppl_opt_{s}" for s in eval_sets]
               + ["ppl_lo95", "ppl_hi95", "n_seeds", "n_sizes", "ppl_vertex", "n_points", "flag"])
    rows = [
        [c.method, c.budget, c.params_opt, c.ppl_opt] + [c.ppl_opt_sets[s] for s in eval_sets]
        + [float(np.exp(c.interval.lo)), float(np.exp(c.interval.hi)), c.interval.n, c.fit.num_points,
           float(np.exp(c.fit.y_vertex)), len(c.points), c.fit.flag]
        for c in curves
    ]
    return pd.DataFrame(rows, columns=columns)


VERDICT_COLUMNS = ["budget_flops", "method", "baseline", "change_pct", "change_lo", "change_hi", "verdict",
                   "n_seeds", "interval"]


def comparisons(methods: list[str]) -> list[tuple[str, str]]:
    """(method, baseline) pairs: every method against dense, and PEER against every other method."""
    pairs = [(m, BASELINE) for m in methods if m != BASELINE and BASELINE in methods]
    if "peer" in methods:
        pairs += [("peer", m) for m in methods if m not in ("peer", BASELINE)]
    return pairs


def verdicts_table(curves: list[IsoflopCurve]) -> pd.DataFrame:
    """`verdicts.csv` (CONTRACT.md): per budget, each method's compute-optimal perplexity against a
    baseline's, in %, its 95% interval over seeds, and the verdict the interval gives."""
    by_key = {(c.method, c.budget): c for c in curves}
    rows = []
    for budget in sorted({c.budget for c in curves}):
        methods = sorted_methods([m for m, b in by_key if b == budget])
        for method, baseline in comparisons(methods):
            a, b = by_key[(method, budget)], by_key[(baseline, budget)]
            change: Change = compare(a.seed_log_ppl, b.seed_log_ppl)
            rows.append([budget, method, baseline, change.pct, change.lo, change.hi, change.verdict,
                         min(len(a.seed_log_ppl), len(b.seed_log_ppl)), change.how])
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def noise_table(noise: NoiseModel) -> pd.DataFrame:
    """Seed noise per method and pooled: sd of log(ppl) across seeds of one cell, in % of perplexity."""
    rows = [{"method": m, "sd_log_ppl": n.sd, "sd_pct": n.pct, "dof": n.dof, "cells": n.num_cells,
             "used_sd_log_ppl": noise.sd[m], "used_from": noise.source[m]} for m, n in noise.per_method.items()]
    rows.append({"method": "pooled", "sd_log_ppl": noise.pooled.sd, "sd_pct": noise.pooled.pct,
                 "dof": noise.pooled.dof, "cells": noise.pooled.num_cells, "used_sd_log_ppl": np.nan,
                 "used_from": ""})
    return pd.DataFrame(rows)


def fits_table(curves: list[IsoflopCurve]) -> pd.DataFrame:
    """The parabolas behind `optimal.csv`: log(ppl) = a u^2 + b u + c, u = log10(params_backbone) - u_ref,
    fitted to the means over seeds per size."""
    rows = []
    for c in curves:
        p, f = c.fit.parabola, c.fit
        rows.append({
            "method": c.method, "budget_flops": c.budget, "n_sizes": f.num_points, "n_trials": len(c.points),
            "a": p.a if p else np.nan, "b": p.b if p else np.nan, "c": p.c if p else np.nan,
            "u_ref": p.x_ref if p else np.nan,
            "params_vertex": 10**p.vertex_x if p and p.convex else np.nan,
            "ppl_vertex": float(np.exp(f.y_vertex)),
            "params_best": float(c.sizes["params_backbone"].iloc[f.best_index]), "ppl_best": c.ppl_opt,
            "huber_scale": f.huber_scale, "reduced_chi2": f.chi2, "flag": f.flag,
        })
    return pd.DataFrame(rows)


def parametric_fits(results: Results) -> dict[str, ParametricFit | str]:
    """Approach 3 per method over its completed isoFLOP trials (every seed); a string says why not."""
    done = completed_isoflop(results)
    fits: dict[str, ParametricFit | str] = {}
    for method in sorted_methods(done["method"].unique()):
        t = done[done["method"] == method]
        tokens = pd.to_numeric(t["tokens"], errors="coerce").to_numpy(float)
        flops = pd.to_numeric(t["total_flops"], errors="coerce").to_numpy(float)
        ok = np.isfinite(tokens) & (tokens > 0) & np.isfinite(flops) & (flops > 0)
        t, tokens, flops = t[ok], tokens[ok], flops[ok]
        if len(t) < MIN_TRIALS or t["budget_flops"].nunique() < 2 or t["params_backbone"].nunique() < 3:
            fits[method] = (f"{len(t)} trials at {t['budget_flops'].nunique()} budget(s): Approach 3 needs"
                            f" {MIN_TRIALS} trials over 2 budgets and 3 sizes")
            continue
        fits[method] = fit_parametric(t["params_backbone"].to_numpy(float), tokens, t["log_ppl"].to_numpy(float),
                                      flops / tokens)
    return fits


def approach3_table(fits: dict[str, ParametricFit | str], curves: list[IsoflopCurve]) -> pd.DataFrame:
    """Approach 3's optimum per (method, budget) with bootstrap 95% intervals, beside Approach 2's; `warning`
    where they disagree: Approach 2's perplexity interval (over seeds; its point without seeds) misses
    Approach 3's, or a trusted Approach-2 vertex lies outside Approach 3's size interval."""
    rows = []
    for c in curves:
        fit = fits.get(c.method)
        row = {"method": c.method, "budget_flops": c.budget, "params_opt_a2": c.params_opt, "ppl_opt_a2": c.ppl_opt,
               "params_opt_a3": np.nan, "params_a3_lo": np.nan, "params_a3_hi": np.nan, "ppl_opt_a3": np.nan,
               "ppl_a3_lo": np.nan, "ppl_a3_hi": np.nan, "warning": ""}
        if not isinstance(fit, ParametricFit):
            row["warning"] = fit or "no fit"
            rows.append(row)
            continue
        n_opt, loss_opt = fit.optimum(c.budget)
        n_lo, n_hi, l_lo, l_hi = fit.optimum_interval(c.budget)
        row |= {"params_opt_a3": n_opt, "params_a3_lo": n_lo, "params_a3_hi": n_hi, "ppl_opt_a3": np.exp(loss_opt),
                "ppl_a3_lo": np.exp(l_lo), "ppl_a3_hi": np.exp(l_hi)}
        a2_lo, a2_hi = (c.interval.lo, c.interval.hi) if np.isfinite(c.interval.lo) else (c.fit.y_opt, c.fit.y_opt)
        warnings = []
        if np.isfinite(l_lo) and (np.exp(a2_hi) < row["ppl_a3_lo"] or np.exp(a2_lo) > row["ppl_a3_hi"]):
            warnings.append("perplexity intervals of Approaches 2 and 3 do not overlap")
        if not c.fit.flag and np.isfinite(n_lo) and not (n_lo <= c.params_opt <= n_hi):
            warnings.append("Approach 2's vertex lies outside Approach 3's size interval")
        row["warning"] = "; ".join(warnings)
        rows.append(row)
    return pd.DataFrame(rows)


def parametric_table(fits: dict[str, ParametricFit | str]) -> pd.DataFrame:
    """The fitted L(N, D) = E + A / N^alpha + B / D^beta per method."""
    rows = []
    for method, fit in fits.items():
        if isinstance(fit, ParametricFit):
            rows.append({"method": method, **fit.params, "n_trials": fit.num_trials, "converged": fit.converged,
                         "n_bootstraps": len(fit.boots), "note": ""})
        else:
            rows.append({"method": method, "E": np.nan, "A": np.nan, "alpha": np.nan, "B": np.nan, "beta": np.nan,
                         "n_trials": np.nan, "converged": False, "n_bootstraps": 0, "note": fit})
    return pd.DataFrame(rows, columns=["method", "E", "A", "alpha", "B", "beta", "n_trials", "converged",
                                       "n_bootstraps", "note"])


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
    """Training seconds of each isoFLOP optimum: those of its best trained size (mean over seeds)."""
    rows = []
    for c in curves:
        seconds = pd.to_numeric(c.best_size["train_seconds"], errors="coerce").to_numpy(float)
        seconds = seconds[np.isfinite(seconds) & (seconds > 0)]
        rows.append({"method": c.method, "budget_flops": c.budget, "params_opt": c.params_opt,
                     "ppl_opt": c.ppl_opt, "train_seconds_opt": float(seconds.mean()) if len(seconds) else np.nan,
                     "flag": c.fit.flag})
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
    """Completed ablation trials averaged over seeds: one row per distinct configuration (perplexity as a
    geometric mean with its 95% t-interval over seeds; usage and unevenness as means with their sd)."""
    done = results.completed("ablation").copy()
    if done.empty:
        return pd.DataFrame(columns=["method"] + ABLATION_KEYS + ["active_experts", "ppl", "ppl_lo", "ppl_hi",
                                                                   "usage_pct", "unevenness", "usage_sd_pct",
                                                                   "unevenness_sd", "n_trials", "tokens"])
    done["query_bn"] = done["query_bn"].map(lambda v: bool(v) if v is not None and not pd.isna(v) else False)
    for key in ["budget_flops", "params_backbone", "expert_heads", "top_k", "num_experts"]:
        done[key] = pd.to_numeric(done[key], errors="coerce").fillna(-1)  # -1: not set (groupby drops NaN)
    done["usage_pct"] = 100 * pd.to_numeric(done["usage"], errors="coerce")
    done["unevenness"] = pd.to_numeric(done["unevenness"], errors="coerce")
    done["log_ppl"] = np.log(done["ppl"].astype(float))
    grouped = done.groupby(["method"] + ABLATION_KEYS, as_index=False).agg(
        log_ppl=("log_ppl", "mean"), usage_pct=("usage_pct", "mean"), unevenness=("unevenness", "mean"),
        usage_sd_pct=("usage_pct", "std"), unevenness_sd=("unevenness", "std"), n_trials=("trial_id", "count"),
        tokens=("tokens", "mean"))
    intervals = done.groupby(["method"] + ABLATION_KEYS)["log_ppl"].apply(lambda v: t_interval(v.to_numpy(float)))
    grouped["ppl"] = np.exp(grouped["log_ppl"])
    grouped["ppl_lo"] = [np.exp(i.lo) for i in intervals]
    grouped["ppl_hi"] = [np.exp(i.hi) for i in intervals]
    grouped = grouped.drop(columns="log_ppl").replace(-1, np.nan)
    grouped["active_experts"] = grouped["expert_heads"] * grouped["top_k"]
    return grouped


def table2(points: pd.DataFrame) -> pd.DataFrame:
    """Table-2 style: per num_experts, without and with query batch norm, perplexity, usage (%) and
    unevenness - for the settings (budget, size, heads, top-k) where num_experts or query BN was varied -
    and `retrievals_per_expert`: training tokens x heads x top-k / num_experts, how often an expert is
    retrieved in training on average (what separates a CPU-scale table from the paper's)."""
    setting = ["method", "budget_flops", "params_backbone", "expert_heads", "top_k"]
    columns = setting + ["num_experts", "query_bn", "active_experts", "ppl", "ppl_lo", "ppl_hi", "usage_pct",
                         "usage_sd_pct", "unevenness", "unevenness_sd", "n_trials", "retrievals_per_expert"]
    blocks = []
    for _, block in points.groupby(setting, dropna=False):
        if block["num_experts"].nunique() < 2 and block["query_bn"].nunique() < 2:
            continue
        blocks.append(block.sort_values(["num_experts", "query_bn"]))
    if not blocks:
        return pd.DataFrame(columns=columns)
    table = pd.concat(blocks, ignore_index=True)
    table["retrievals_per_expert"] = table["tokens"] * table["active_experts"] / table["num_experts"]
    return table[columns]


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
