"""`write_report(results_dir, out_dir)`: read one snapshot of a results directory and write report.md,
a self-contained report.html, the PNG figures and the CSV tables (CONTRACT.md, issue 6).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from peer_sweeps.report import figures, tables
from peer_sweeps.report.fits import HUBER_SCALE, NUM_BOOTSTRAPS
from peer_sweeps.report.figures import format_count, format_experts, format_flops
from peer_sweeps.report.render import Document
from peer_sweeps.report.results import Results, load_results
from peer_sweeps.report.tables import BASELINE, method_label, sorted_methods

FIGURES = ("isoflop.png", "frontier.png", "ablations.png", "curves_isoflop.png", "curves_ablation.png")


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


def answer(optimal: pd.DataFrame, equal_time: tuple[float, dict[str, float], dict[str, float]]) -> str:
    """The plain answer to "does PEER beat dense / MoE / PKM at equal compute, and by how much?"."""
    if optimal.empty:
        return "No isoFLOP trial has completed yet, so there is no compute-optimal model to compare."
    methods = sorted_methods(optimal["method"].unique())
    if "peer" not in methods:
        return (f"No PEER isoFLOP trial has completed yet (methods with results: "
                f"{', '.join(map(method_label, methods))}), so PEER cannot be compared.")
    sentences, wins, flagged = [], {}, 0
    for budget in sorted(optimal["budget_flops"].unique()):
        at = optimal[optimal["budget_flops"] == budget].set_index("method")
        if "peer" not in at.index:
            continue
        peer = at.loc["peer", "ppl_opt"]
        others = [m for m in methods if m != "peer" and m in at.index]
        flagged += sum(bool(at.loc[m, "flag"]) for m in ["peer"] + others)
        parts = [f"{method_label(m)} {_ppl(at.loc[m, 'ppl_opt'])} ({_pct(100 * (peer / at.loc[m, 'ppl_opt'] - 1))})"
                 for m in others]
        for m in others:
            won, total = wins.get(m, (0, 0))
            wins[m] = (won + int(peer < at.loc[m, "ppl_opt"]), total + 1)
        versus = f" against {', '.join(parts)}" if parts else " (no other method has an optimum at this budget)"
        sentences.append(f"at {format_flops(budget)} FLOPs PEER's compute-optimal perplexity is {_ppl(peer)}{versus}")
    won = sum(w for w, _ in wins.values())
    compared = sum(n for _, n in wins.values())
    verdict = ("" if not compared else "Yes. " if won == compared else "No. " if won == 0 else "Partly. ")
    text = verdict + "On the primary validation set, " + "; ".join(sentences) + " (change of PEER relative to each)."
    if wins:
        verdicts = [f"{method_label(m)} at {won} of {total} budget(s)" for m, (won, total) in wins.items()]
        text += " PEER has lower perplexity than " + ", ".join(verdicts) + "."
        deltas = []
        for m in wins:
            common = optimal[optimal["method"].isin(["peer", m])].pivot_table(
                index="budget_flops", columns="method", values="ppl_opt").dropna()
            if len(common):
                deltas.append(f"{method_label(m)} {_pct(float((100 * (common['peer'] / common[m] - 1)).mean()))}")
        text += " Mean change of PEER across shared budgets: " + ", ".join(deltas) + "."
    if flagged:
        text += (f" Caveat: {flagged} of the optima compared are flagged (see `optimal.csv`): they are the best"
                 " observed trial, not a fitted vertex.")
    seconds, best, fastest = equal_time
    others = [m for m in best if m != "peer"]
    if others and "peer" in fastest:
        parts = ", ".join(f"{method_label(m)} {_ppl(v)}" for m, v in best.items())
        text += (f" At equal wall-clock time ({_seconds(seconds)} of training, the longest every method reached)"
                 f" the best perplexity reached is {parts}")
        if "peer" in best:
            beaten = [method_label(m) for m in others if best["peer"] < best[m]]
            text += f": PEER is ahead of {', '.join(beaten) if beaten else 'none of them'}."
        else:
            text += (f", while PEER has no trial that short (its fastest took {_seconds(fastest['peer'])}):"
                     " at this wall-clock time it is behind all of them.")
    return text


def _optimal_display(optimal: pd.DataFrame, fits: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (_, o), (_, f) in zip(optimal.iterrows(), fits.iterrows()):
        ci = (f"{format_count(f['params_vertex_lo'])} - {format_count(f['params_vertex_hi'])}"
              if np.isfinite(f["params_vertex_lo"]) else "-")
        if o["flag"] and np.isfinite(f["params_vertex"]):
            ci = f"not used (vertex {format_count(f['params_vertex'])})"
        rows.append({"method": method_label(o["method"]), "budget (FLOPs)": format_flops(o["budget_flops"]),
                     "params_opt": format_count(o["params_opt"]), "vertex 95% CI": ci, "ppl_opt": _ppl(o["ppl_opt"]),
                     "points": o["n_points"], "flag": o["flag"] or ""})
    return pd.DataFrame(rows)


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


def _table2_display(t2: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, r in t2.iterrows():
        rows.append({"budget (FLOPs)": _or_dash(format_flops, r["budget_flops"]),
                     "backbone params": _or_dash(format_count, r["params_backbone"]),
                     "heads x top-k": f"{r['expert_heads']:g} x {r['top_k']:g}" if np.isfinite(r["active_experts"])
                     else "-",
                     "N": _or_dash(lambda n: f"{format_experts(n)} ({int(n)})", r["num_experts"]),
                     "query BN": "yes" if r["query_bn"] else "no", "perplexity": _ppl(r["ppl"]),
                     "usage (%)": _or_dash(lambda v: f"{v:.1f}", r["usage_pct"]),
                     "unevenness": _or_dash(lambda v: f"{v:.3f}", r["unevenness"]),
                     "trials": int(r["n_trials"])})
    return pd.DataFrame(rows)


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
    curves = tables.isoflop_curves(results)
    optimal = tables.optimal_table(curves, eval_sets)
    fits = tables.fits_table(curves)
    laws_table, laws = tables.power_laws(optimal)
    t1 = tables.table1(optimal, eval_sets)
    iso_time = tables.iso_time_table(curves)
    points = tables.ablation_points(results)
    t2 = tables.table2(points)
    failures = tables.failures_table(results)
    counts = tables.status_counts(results)
    csvs = {"optimal.csv": optimal, "isoflop_fits.csv": fits, "power_laws.csv": laws_table, "table1.csv": t1,
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
                  + answer(optimal, tables.equal_time_best(results)))

    doc.heading("isoFLOP curves")
    if drawn["isoflop.png"]:
        doc.figure(drawn["isoflop.png"], "Validation perplexity against backbone parameters per budget and method; "
                   "lines: Huber parabolas, stars: compute-optimal models with 95% bootstrap intervals of the vertex.")
        doc.paragraph(
            f"Fit: for each (method, budget), log(perplexity) as a parabola in log10(backbone parameters), Huber loss"
            f" (scale {HUBER_SCALE} nats) so that single bad trials barely move it; the vertex is the compute-optimal"
            f" size, its interval the 2.5-97.5 percentiles over {NUM_BOOTSTRAPS} seeded bootstrap resamples of the"
            " trials. Flagged fits (fewer than 3 points, non-convex, minimum at the edge of the grid) fall back to"
            " the best observed trial. Perplexity of the other evaluation sets at the optimum: each set's own"
            " parabola evaluated at the primary set's vertex (the fallback trial's values when flagged).")
        doc.table(_optimal_display(optimal, fits))
    else:
        doc.paragraph("No completed isoFLOP trial yet: no curves to fit.")

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
    if len(t2):
        doc.paragraph("Table 2 style: per number of experts, without and with query batch norm. Usage: share of"
                      " experts retrieved at least once on the validation set; unevenness: KL divergence of the"
                      " router-score distribution from uniform (paper section 3).")
        doc.table(_table2_display(t2))
    if not drawn["ablations.png"] and not len(t2):
        doc.paragraph("No completed ablation trials that vary the number of experts, the active experts or query"
                      " batch norm." if len(points) else "No completed ablation trials.")

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
