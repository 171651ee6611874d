"""`write_report(results_dir, out_dir)`: read one snapshot of a results directory and write report.md,
a self-contained report.html, the PNG figures and the CSV tables (CONTRACT.md, issue 6).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from peer_sweeps.report import figures, parametric, tables
from peer_sweeps.report.fits import HUBER_TUNING, MISS_SE
from peer_sweeps.report.parametric import HUBER_DELTA
from peer_sweeps.report.seeds import LEVEL
from peer_sweeps.report.figures import format_count, format_experts, format_flops
from peer_sweeps.report.render import Document
from peer_sweeps.report.results import Results, load_results
from peer_sweeps.report.tables import BASELINE, method_label, sorted_methods

FIGURES = ("isoflop.png", "frontier.png", "ablations.png", "ablation_isoflop.png", "usage.png", "curves_isoflop.png",
           "curves_ablation.png")


def _ppl(v: float) -> str:
    return f"{v:.2f}" if np.isfinite(v) else "-"


def _pct(v: float) -> str:
    return f"{v:+.1f}%" if np.isfinite(v) else "-"


def _seconds(v: float) -> str:
    if not np.isfinite(v):
        return "-"
    return f"{v:.0f} s" if v < 3600 else f"{v / 3600:.2f} h"


def _num(v) -> float:
    return float(v) if v is not None and not pd.isna(v) else float("nan")


def _or_dash(fmt, v) -> str:
    """fmt(v), or "-" for a missing value."""
    return fmt(_num(v)) if np.isfinite(_num(v)) else "-"


def _change(r) -> str:
    interval = (f" [{r['change_lo']:+.1f}, {r['change_hi']:+.1f}]" if np.isfinite(_num(r["change_lo"]))
                else " [no interval]")
    return f"{format_flops(r['budget_flops'])} {_pct(r['change_pct'])}{interval}"


def answer(verdicts: pd.DataFrame, optimal: pd.DataFrame,
           equal_time: tuple[float, dict[str, float], dict[str, float]]) -> str:
    """The plain answer to "does PEER beat dense / MoE / PKM at equal compute, and by how much?", read
    from `verdicts.csv` and nothing else: Yes when every comparison of PEER is `better`, No when none is,
    Partly otherwise; each verdict with its change and 95% interval over seeds."""
    if optimal.empty:
        return "No isoFLOP trial has completed yet, so there is no compute-optimal model to compare."
    methods = sorted_methods(optimal["method"].unique())
    if "peer" not in methods:
        return (f"No PEER isoFLOP trial has completed yet (methods with results: "
                f"{', '.join(map(method_label, methods))}), so PEER cannot be compared.")
    of_peer = verdicts[verdicts["method"] == "peer"]
    if of_peer.empty:
        return "PEER has no other method to be compared with at any of its budgets."
    better = int((of_peer["verdict"] == "better").sum())
    lead = "Yes. " if better == len(of_peer) else "No. " if better == 0 else "Partly. "
    parts = []
    for baseline in sorted_methods(of_peer["baseline"].unique()):
        rows = of_peer[of_peer["baseline"] == baseline].sort_values("budget_flops")
        counts = rows["verdict"].value_counts()
        said = ", ".join(f"{v} at {counts[v]}" for v in ("better", "indistinguishable", "worse") if v in counts)
        parts.append(f"against {method_label(baseline)}: {said} of {len(rows)} budget(s) "
                     f"({'; '.join(_change(r) for _, r in rows.iterrows())})")
    text = (lead + "On the primary validation set, PEER's compute-optimal perplexity (change in %, 95% interval"
            " over seeds) is " + "; ".join(parts) + ".")
    if of_peer["change_lo"].isna().any():
        text += (" Where there is no interval (one seed on a side) the comparison cannot tell the change from"
                 " seed noise and is counted indistinguishable, whatever its sign.")
    seconds, best, fastest = equal_time
    others = [m for m in best if m != "peer"]
    if others and "peer" in fastest:
        parts = ", ".join(f"{method_label(m)} {_ppl(v)}" for m, v in best.items())
        text += (f" At equal wall-clock time ({_seconds(seconds)} of training, the longest every method reached)"
                 f" the best perplexity reached is {parts}")
        if "peer" in best:
            beaten = [method_label(m) for m in others if best["peer"] < best[m]]
            text += f": PEER is ahead of {', '.join(beaten) if beaten else 'none of them'} (single trials, no interval)."
        else:
            text += (f", while PEER has no trial that short (its fastest took {_seconds(fastest['peer'])}):"
                     " at this wall-clock time it is behind all of them.")
    return text


def _interval(lo: float, hi: float) -> str:
    return f"{lo:.2f} - {hi:.2f}" if np.isfinite(lo) else "no interval"


def _optimal_display(optimal: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, o in optimal.iterrows():
        rows.append({"method": method_label(o["method"]), "budget (FLOPs)": format_flops(o["budget_flops"]),
                     "params_opt": format_count(o["params_opt"]), "ppl_opt": _ppl(o["ppl_opt"]),
                     "95% CI over seeds": _interval(o["ppl_lo95"], o["ppl_hi95"]), "seeds": o["n_seeds"],
                     "parabola min": _ppl(o["ppl_vertex"]), "sizes": o["n_sizes"], "flag": o["flag"] or ""})
    return pd.DataFrame(rows)


def _verdicts_display(verdicts: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame([{
        "budget (FLOPs)": format_flops(r["budget_flops"]), "method": method_label(r["method"]),
        "baseline": method_label(r["baseline"]), "change": _pct(r["change_pct"]),
        "95% CI": (f"{r['change_lo']:+.1f}% to {r['change_hi']:+.1f}%" if np.isfinite(_num(r["change_lo"]))
                   else "no interval"),
        "verdict": r["verdict"], "interval": r["interval"]} for _, r in verdicts.iterrows()])


def _noise_display(noise: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame([{
        "method": method_label(r["method"]) if r["method"] != "pooled" else "all (pooled)",
        "seed sd of perplexity": f"{r['sd_pct']:.2f}%" if np.isfinite(r["sd_pct"]) else "not measured",
        "degrees of freedom": r["dof"], "cells with 2+ seeds": r["cells"],
        "noise the fits use": (f"{100 * np.expm1(r['used_sd_log_ppl']):.2f}% ({r['used_from']})"
                               if np.isfinite(r["used_sd_log_ppl"]) else "")} for _, r in noise.iterrows()])


def _table1_display(optimal: pd.DataFrame, t1: pd.DataFrame, eval_sets: list[str]) -> pd.DataFrame:
    rows = []
    for budget in sorted(optimal["budget_flops"].unique()):
        for method in sorted_methods(optimal.loc[optimal["budget_flops"] == budget, "method"]):
            cells = t1[(t1["budget_flops"] == budget) & (t1["method"] == method)].set_index("eval_set")
            flag = "*" if cells["flag"].iloc[0] else ""
            row = {"budget (FLOPs)": format_flops(budget), "method": method_label(method) + flag}
            for name in eval_sets:
                c = cells.loc[name]
                change = "" if method == BASELINE or not np.isfinite(c["change_vs_dense_pct"]) else \
                    f" ({_pct(c['change_vs_dense_pct'])})"
                row[name] = _ppl(c["ppl_opt"]) + change
            rows.append(row)
    return pd.DataFrame(rows)


def _spread(sd, fmt: str) -> str:
    """ ± the seeds' sd, or nothing with one seed."""
    return f" ± {fmt.format(_num(sd))}" if np.isfinite(_num(sd)) else ""


def _table2_display(t2: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, r in t2.iterrows():
        rows.append({"budget (FLOPs)": _or_dash(format_flops, r["budget_flops"]),
                     "backbone params": _or_dash(format_count, r["params_backbone"]),
                     "heads x top-k": f"{r['expert_heads']:g} x {r['top_k']:g}" if np.isfinite(r["active_experts"])
                     else "-",
                     "N": _or_dash(lambda n: f"{format_experts(n)} ({int(n)})", r["num_experts"]),
                     "query BN": "yes" if r["query_bn"] else "no", "perplexity": _ppl(r["ppl"]),
                     "95% CI": _interval(_num(r["ppl_lo"]), _num(r["ppl_hi"])),
                     "usage (%)": _or_dash(lambda v: f"{v:.1f}", r["usage_pct"]) + _spread(r["usage_sd_pct"], "{:.1f}"),
                     "unevenness": _or_dash(lambda v: f"{v:.3f}", r["unevenness"])
                     + _spread(r["unevenness_sd"], "{:.3f}"),
                     "retrievals per expert": _or_dash(lambda v: f"{v:,.0f}", r["retrievals_per_expert"]),
                     "trials": int(r["n_trials"])})
    return pd.DataFrame(rows)


# The paper's Table 2: 1024^2 experts, 8 heads x top-16, at 2e19 FLOPs. At 6 FLOPs per parameter and token,
# 2e19 FLOPs train a model of under 1B active parameters on more than 3.3e9 tokens.
PAPER_TABLE2_RETRIEVALS = 3.3e9 * 8 * 16 / 1024**2


def _table2_regime(t2: pd.DataFrame) -> str:
    """Why a CPU-scale Table 2 is not the paper's regime, in the table's own numbers."""
    per_expert = t2["retrievals_per_expert"].dropna()
    if per_expert.empty:
        return ""
    return (f"Retrievals per expert: training tokens x heads x top-k / N, how often an expert is retrieved (and"
            f" updated) in training on average. Here {per_expert.min():,.0f} to {per_expert.max():,.0f}; in the"
            f" paper's Table 2 (1024^2 experts, 8 x 16 active, 2e19 FLOPs: more than 3.3e9 tokens for any model"
            f" under 1B active parameters) more than {PAPER_TABLE2_RETRIEVALS:,.0f}. The paper's usage near 100%"
            f" is a claim about experts that have each been trained hundreds of thousands of times; at CPU scale"
            f" the larger tables stop short of that regime by orders of magnitude, so this table tests the"
            f" direction of query batch norm's effect on usage and unevenness at equal N and equal training, not"
            f" the paper's levels.")


def _failures_display(failures: pd.DataFrame) -> pd.DataFrame:
    def first_line(error) -> str:
        if error is None or pd.isna(error):
            return "(no error recorded)"
        line = str(error).strip().splitlines()[-1] if str(error).strip() else "(empty)"
        return line if len(line) <= 160 else line[:157] + "..."

    return pd.DataFrame({
        "trial": failures["trial_id"], "kind": failures["kind"], "method": failures["method"].map(method_label),
        "budget (FLOPs)": [_or_dash(format_flops, b) for b in failures["budget_flops"]],
        "backbone params": [_or_dash(format_count, p) for p in failures["params_backbone"]],
        "status": failures["status"], "error (last line)": failures["error"].map(first_line)})


def write_report(results_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the report of `results_dir` into `out_dir` (default `results_dir/report`); returns `out_dir`.

    Works on whatever the directory holds (a study still running, only failures, no curves): what is
    missing is said in the report, never raised.
    """
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    results = load_results(results_dir)
    doc = _build(results, results_dir, out)
    (out / "report.md").write_text(doc.markdown())
    (out / "report.html").write_text(doc.html())
    return out


def _build(results: Results, results_dir: Path, out: Path) -> Document:
    trials, eval_sets, primary = results.trials, results.eval_sets, results.primary
    noise = tables.noise_model(tables.completed_isoflop(results))
    curves = tables.isoflop_curves(results, noise)
    optimal = tables.optimal_table(curves, eval_sets)
    verdicts = tables.verdicts_table(curves)
    noise_rows = tables.noise_table(noise)
    fits = tables.fits_table(curves)
    parametric_by_method = tables.parametric_fits(results)
    approach3 = tables.approach3_table(parametric_by_method, curves)
    parametric_rows = tables.parametric_table(parametric_by_method)
    laws_table, laws = tables.power_laws(optimal)
    t1 = tables.table1(optimal, eval_sets)
    iso_time = tables.iso_time_table(curves)
    points = tables.ablation_points(results)
    t2 = tables.table2(points)
    failures = tables.failures_table(results)
    counts = tables.status_counts(results)
    csvs = {"optimal.csv": optimal, "verdicts.csv": verdicts, "seed_noise.csv": noise_rows,
            "isoflop_fits.csv": fits, "approach3.csv": approach3, "parametric_fits.csv": parametric_rows, "power_laws.csv": laws_table, "table1.csv": t1,
            "iso_time.csv": iso_time, "ablations.csv": points, "table2.csv": t2, "failed_trials.csv": failures,
            "status_counts.csv": counts}
    for name, frame in csvs.items():
        frame.to_csv(out / name, index=False)

    isoflop_trials = trials[trials["kind"] == "isoflop"]
    unfinished = isoflop_trials[isoflop_trials["status"].isin(["failed", "diverged"])]
    drawn = {
        "isoflop.png": figures.isoflop_figure(curves, unfinished, out / "isoflop.png"),
        "frontier.png": figures.frontier_figure(curves, iso_time, results.completed("isoflop"), laws,
                                                out / "frontier.png"),
        "ablations.png": figures.ablation_figure(points, out / "ablations.png"),
        "ablation_isoflop.png": figures.ablation_isoflop_figure(points, out / "ablation_isoflop.png"),
        "usage.png": figures.usage_figure(results.curves, trials, out / "usage.png")
        if results.curves is not None else None,
    }
    for kind in ("isoflop", "ablation"):
        name = f"curves_{kind}.png"
        drawn[name] = figures.curves_figure(results.curves, trials, kind, out / name) \
            if results.curves is not None else None
    for name in FIGURES:  # a figure left from an earlier report must not pass for a current one
        if drawn.get(name) is None:
            (out / name).unlink(missing_ok=True)

    studies = sorted(trials["study"].dropna().unique())
    doc = Document(f"PEER sweeps report: {', '.join(studies) if studies else results_dir.name}")

    doc.heading("Summary")
    doc.paragraph(f"Results directory `{results_dir}`; studies: {', '.join(f'`{s}`' for s in studies) or 'none yet'};"
                  f" evaluation sets: {', '.join(f'`{s}`' for s in eval_sets) or 'none'}"
                  f"{f' (primary validation set `{primary}`)' if primary else ''}.")
    if len(counts):
        doc.table(counts.astype(str))
    notes = list(results.notes)
    if results.curves is not None:
        orphans = set(results.curves["trial_id"]) - set(trials["trial_id"])
        if orphans:
            notes.append(f"{len(orphans)} trial(s) have training curves but no row in `trials.parquet` yet"
                         " (still running); they are not drawn.")
    if trials.empty:
        notes.append("No trials yet: nothing to fit or draw.")
    if ((trials["method"] == "moe") & trials["top_k"].isna()).any():  # top_k is null for expert choice
        notes.append("MoE uses expert-choice routing, which is not causal: each expert picks its tokens across the"
                     " whole batch, future tokens included, at evaluation too, so its perplexity is not that of a"
                     " causal language model (the paper's MoE baseline routes the same way).")
    doc.bullets(notes)
    doc.paragraph("**Does PEER beat dense, MoE and PKM at equal compute?** "
                  + answer(verdicts, optimal, tables.equal_time_best(results)))
    if len(verdicts):
        doc.heading("Verdicts and seed noise")
        doc.paragraph(
            f"`verdicts.csv`: each method's compute-optimal perplexity relative to a baseline's at the same budget,"
            f" with its {LEVEL:.0%} interval over seeds: a paired t-interval of the per-seed log-ratio over the"
            " seeds both have (a seed fixes the initialisation and the order of the training batches, so the"
            " two trials of one seed saw the same data), a Welch interval when fewer than 2 seeds are shared,"
            " and none with one seed. Verdict: better when the whole interval is below zero, worse when above,"
            " else indistinguishable (also without an interval).")
        doc.table(_verdicts_display(verdicts))
    doc.paragraph("Seed noise: the standard deviation of log-perplexity across the seeds of one (method, budget,"
                  " size) cell, pooled over cells, shown as % of perplexity. Differences between methods smaller"
                  " than about three times this cannot be resolved with a few seeds.")
    doc.table(_noise_display(noise_rows))

    doc.heading("isoFLOP curves")
    if drawn["isoflop.png"]:
        doc.figure(drawn["isoflop.png"], "Validation perplexity against backbone parameters per budget and method"
                   " (small: one seed; large: mean over seeds); lines: Huber parabolas; stars: compute-optimal"
                   " models (vertex size, best trained mean) with their 95% interval over seeds.")
        doc.paragraph(
            "Fit (Chinchilla Approach 2): for each (method, budget), the mean log-perplexity over seeds of each"
            " size, fitted as a parabola in log10(backbone parameters) with a Huber loss whose scale is"
            f" {HUBER_TUNING} standard errors of a mean (from the seed noise above), so a bad size barely moves it"
            " while the curve's own minimum is never an outlier. The vertex is the compute-optimal size. The"
            " compute-optimal perplexity is always the best trained size's mean over seeds (with its 95%"
            " t-interval), never a value read off the parabola: it is never worse than a trained model nor below"
            " it, and every row is the same kind of quantity; the parabola's minimum is shown beside it. Flagged"
            " fits (fewer than 3 sizes, non-convex, minimum at the edge of the grid, vertex outside the best"
            f" size's neighbours, parabola more than {MISS_SE:g} standard errors off the best trained model,"
            " residuals large next to the seed noise) use the best trained size as the optimal"
            " size. Other evaluation sets: the same trials' perplexity (mean over seeds).")
        doc.table(_optimal_display(optimal))
    else:
        doc.paragraph("No completed isoFLOP trial yet: no curves to fit.")

    if len(parametric_rows):
        doc.heading("Approach 3: a parametric fit of every trial")
        doc.paragraph(
            "Per method, L(N, D) = E + A / N^alpha + B / D^beta (N backbone parameters, D training tokens, L the"
            " final validation loss in nats) fitted to every completed isoFLOP trial and seed with a Huber loss"
            f" (delta {HUBER_DELTA:g}) on log L (Besiroglu et al. 2024): the best {parametric.NUM_STARTS} of the"
            " Chinchilla paper's 4500 starting points descend together, L-BFGS polishes the best; its optimum on each budget's isoFLOP curve, with"
            f" 2.5-97.5 percentiles over {int(parametric_rows['n_bootstraps'].max())} refits on resampled trials. A warning marks where it"
            " disagrees with Approach 2 (the isoFLOP curves above). With a few sizes per budget its exponents"
            " are poorly determined: read it as a check on Approach 2, not as a scaling law.")
        doc.table(pd.DataFrame([{
            "method": method_label(r["method"]), "E": _or_dash(lambda v: f"{v:.3f}", r["E"]),
            "A": _or_dash(lambda v: f"{v:.3g}", r["A"]), "alpha": _or_dash(lambda v: f"{v:.2f}", r["alpha"]),
            "B": _or_dash(lambda v: f"{v:.3g}", r["B"]), "beta": _or_dash(lambda v: f"{v:.2f}", r["beta"]),
            "trials": _or_dash(lambda v: f"{v:.0f}", r["n_trials"]), "note": r["note"]}
            for _, r in parametric_rows.iterrows()]))
        if len(approach3):
            doc.table(pd.DataFrame([{
                "method": method_label(r["method"]), "budget (FLOPs)": format_flops(r["budget_flops"]),
                "A2 params_opt": format_count(r["params_opt_a2"]), "A2 ppl_opt": _ppl(r["ppl_opt_a2"]),
                "A3 params_opt (95% CI)": _or_dash(format_count, r["params_opt_a3"]) + (
                    f" ({format_count(r['params_a3_lo'])} - {format_count(r['params_a3_hi'])})"
                    if np.isfinite(_num(r["params_a3_lo"])) else ""),
                "A3 ppl_opt (95% CI)": _ppl(_num(r["ppl_opt_a3"])) + (
                    f" ({r['ppl_a3_lo']:.2f} - {r['ppl_a3_hi']:.2f})" if np.isfinite(_num(r["ppl_a3_lo"])) else ""),
                "warning": r["warning"]} for _, r in approach3.iterrows()]))

    doc.heading("Compute-optimal frontier and iso-time")
    if drawn["frontier.png"]:
        doc.figure(drawn["frontier.png"], "(a) compute-optimal perplexity against training FLOPs; (b) perplexity "
                   "against measured training seconds: every trial, each method's best-so-far envelope and its "
                   "isoFLOP optima; (c) compute-optimal size against FLOPs with power-law fits (trusted optima only).")
        law_rows = [{"method": method_label(r["method"]), "budgets": r["n_budgets"], "trusted": r["n_trusted"],
                     "N_opt ~ C^a: a": f"{r['params_exponent']:.3f}" if np.isfinite(r["params_exponent"]) else "-",
                     "ppl_opt ~ C^b: b": f"{r['ppl_exponent']:.3f}" if np.isfinite(r["ppl_exponent"]) else "-",
                     "note": r["note"]} for _, r in laws_table.iterrows()]
        doc.table(pd.DataFrame(law_rows))
        doc.paragraph("Iso-time: training seconds of each compute-optimal model (interpolated between the trials"
                      " around the vertex), next to its perplexity.")
        doc.table(pd.DataFrame([{"method": method_label(r["method"]), "budget (FLOPs)": format_flops(r["budget_flops"]),
                                 "ppl_opt": _ppl(r["ppl_opt"]), "training time": _seconds(_num(r["train_seconds_opt"])),
                                 "flag": "*" if r["flag"] else ""} for _, r in iso_time.iterrows()]))
    else:
        doc.paragraph("No compute-optimal models yet.")

    doc.heading("Compute-optimal perplexity per evaluation set (Table 1 style)")
    if len(optimal):
        doc.paragraph("Perplexity of each compute-optimal model on every evaluation set; in brackets the change"
                      " relative to dense at the same budget. * = flagged optimum (best observed trial).")
        doc.table(_table1_display(optimal, t1, eval_sets))
    else:
        doc.paragraph("No compute-optimal models yet.")

    doc.heading("Ablations")
    if drawn["ablations.png"]:
        doc.figure(drawn["ablations.png"], "Ablation perplexity against the number of experts and against the number"
                   " of active experts (heads x top-k).")
    if drawn["ablation_isoflop.png"]:
        doc.figure(drawn["ablation_isoflop.png"], "Fig. 3 style: isoFLOP curves of each setting of the ablated"
                   " variable (mean over seeds, bar: 95% interval over seeds), the dense reference in black.")
    if len(t2):
        doc.paragraph("Table 2 style: per number of experts, without and with query batch norm. Usage: share of"
                      " experts retrieved at least once on the validation set; unevenness: KL divergence of the"
                      " router-score distribution from uniform (paper section 3).")
        doc.table(_table2_display(t2))
        doc.paragraph(_table2_regime(t2))
    if not drawn["ablations.png"] and not len(t2):
        doc.paragraph("No completed ablation trials that vary the number of experts, the active experts or query"
                      " batch norm." if len(points) else "No completed ablation trials.")

    if drawn["usage.png"]:
        doc.figure(drawn["usage.png"], "Expert usage and unevenness at each evaluation step, one line per PKM or"
                   " PEER trial: a usage that falls during training is a collapse of the retrieval, not of the"
                   " evaluation.")

    doc.heading("Training curves")
    for kind in ("isoflop", "ablation"):
        if drawn[f"curves_{kind}.png"]:
            colours = ("method colours, darker lines for larger models" if kind == "isoflop"
                       else "one colour per setting of the ablated variables")
            doc.figure(drawn[f"curves_{kind}.png"], f"Training loss against tokens of the {kind} trials, one panel per"
                       f" budget; {colours}; diverged trials dashed.")
    if not (drawn["curves_isoflop.png"] or drawn["curves_ablation.png"]):
        doc.paragraph("No training curves: " + ("`curves.parquet` is missing or empty." if results.curves is None
                                                else "none of the completed or diverged trials has curve points."))

    doc.heading("Failed and diverged trials")
    if len(failures):
        doc.table(_failures_display(failures))
    else:
        doc.paragraph("None.")

    doc.heading("Files")
    doc.bullets([f"`{name}`" for name in list(csvs) + [n for n in FIGURES if drawn.get(n)]])
    return doc
