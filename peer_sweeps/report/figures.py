"""The report's figures (matplotlib, Agg backend). Each function draws what the data has, writes one PNG
and returns its path, or returns None when there is nothing to draw.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from peer_sweeps.report.fits import PowerLaw, lower_envelope  # noqa: E402
from peer_sweeps.report.tables import IsoflopCurve, method_label, sorted_methods  # noqa: E402

METHOD_COLORS = {"dense": "#444444", "moe": "#1f77b4", "pkm": "#2ca02c", "peer": "#d62728"}
METHOD_CMAPS = {"dense": "Greys", "moe": "Blues", "pkm": "Greens", "peer": "Reds"}
METHOD_MARKERS = {"dense": "o", "moe": "s", "pkm": "^", "peer": "D"}
EXTRA_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#17becf"]
PARAMS_LABEL = "backbone parameters (non-embedding, dense-equivalent)"
PPL_LABEL = "validation perplexity"
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 9,
         "figure.dpi": 110, "savefig.dpi": 110, "savefig.bbox": "tight"}


def method_color(method: str) -> str:
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return EXTRA_COLORS[sum(map(ord, method)) % len(EXTRA_COLORS)]


def format_count(value: float, _pos=None) -> str:
    """1.2M, 350k, 3.5G: parameter counts and the like."""
    value = float(f"{value:.3g}")  # round first: 999,600 is 1M, not 1e+03k
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def format_flops(value: float) -> str:
    exponent = math.floor(math.log10(value))
    mantissa = value / 10**exponent
    return f"{mantissa:.2g}e{exponent}" if abs(mantissa - 1) > 1e-9 else f"1e{exponent}"


def _nice_log_ticks(ax, which: str, fmt=format_count) -> None:
    """Ticks of a log axis, labelled in plain numbers: 1-2-5 per decade when at least 3 fall in view
    (e.g. 200k, 500k, 1M, 2M), else about 5 evenly spaced round values (a narrow range, as perplexity
    usually has). Call after plotting: it reads the final limits."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = ax.get_xlim() if which == "x" else ax.get_ylim()
    decades = np.arange(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks = [m * 10.0**d for d in decades for m in (1, 2, 5) if lo <= m * 10.0**d <= hi]
    if len(ticks) < 3:
        linear = ticker.MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
        ticks = [t for t in linear if lo <= t <= hi and t > 0]
    axis.set_major_locator(ticker.FixedLocator(ticks))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: fmt(v)))
    axis.set_minor_locator(ticker.NullLocator())
    (ax.set_xlim if which == "x" else ax.set_ylim)(lo, hi)


def _plain(v: float) -> str:
    return f"{v:g}"


def _grid(n: int, width: float = 5.0, height: float = 4.0, max_cols: int = 3):
    cols = min(max_cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, path: Path) -> Path:
    fig.savefig(path)
    plt.close(fig)
    return path


def isoflop_figure(curves: list[IsoflopCurve], unfinished: pd.DataFrame, path: Path) -> Path | None:
    """One panel per budget: perplexity against backbone size per method (every seed small, the mean over
    seeds large), Huber parabola, the optimum with its 95% interval over seeds; flagged curves show the
    optimum hollow and say why in the panel.
    `unfinished` (failed / diverged isoFLOP trials) are marked with x on the bottom edge."""
    if not curves:
        return None
    budgets = sorted({c.budget for c in curves})
    with plt.rc_context(STYLE):
        fig, axes = _grid(len(budgets))
        for ax, budget in zip(axes, budgets):
            notes = []
            for c in (c for c in curves if c.budget == budget):
                color, marker = method_color(c.method), METHOD_MARKERS.get(c.method, "o")
                params, ppl = c.points["params_backbone"].to_numpy(float), c.points["ppl"].to_numpy(float)
                ax.plot(params, ppl, marker, color=color, ms=3, alpha=0.45, ls="none")
                means = c.sizes["params_backbone"].to_numpy(float), np.exp(c.sizes["log_ppl"].to_numpy(float))
                ax.plot(*means, marker, color=color, ms=6, alpha=0.9, ls="none")
                p = c.fit.parabola
                if p is not None:
                    x = np.log10(means[0])
                    pad = 0.05 * (x.max() - x.min())
                    xs = np.linspace(x.min() - pad, x.max() + pad, 100)
                    ax.plot(10**xs, np.exp(p(xs)), color=color, lw=1.5, ls=":" if c.fit.flag else "-")
                yerr = None
                if np.isfinite(c.interval.lo):
                    yerr = [[c.ppl_opt - np.exp(c.interval.lo)], [np.exp(c.interval.hi) - c.ppl_opt]]
                ax.errorbar(c.params_opt, c.ppl_opt, yerr=yerr, fmt="*", ms=15, color=color,
                            mfc="white" if c.fit.flag else color, mec=color if c.fit.flag else "black",
                            mew=1.2, capsize=4, elinewidth=1.5, zorder=5)
                if c.fit.flag:
                    notes.append((color, f"{method_label(c.method)}: {c.fit.flag.split('; best')[0]}"))
            bad = unfinished[unfinished["budget_flops"].astype(float) == budget]
            for method, rows in bad.groupby("method"):
                ax.plot(rows["params_backbone"].astype(float), np.zeros(len(rows)), "x", color=method_color(method),
                        ms=7, mew=1.5, transform=ax.get_xaxis_transform(), clip_on=False)
            ax.set_xscale("log")
            ax.set_yscale("log")
            _nice_log_ticks(ax, "x")
            _nice_log_ticks(ax, "y", _plain)
            ax.set_title(f"budget {format_flops(budget)} FLOPs")
            ax.set_xlabel(PARAMS_LABEL)
            ax.set_ylabel(PPL_LABEL)
            for i, (color, text) in enumerate(notes):
                ax.text(0.02, 0.97 - 0.07 * i, "flag: " + text, transform=ax.transAxes, va="top", fontsize=8,
                        color=color, bbox=dict(fc="white", ec="none", alpha=0.8, pad=1))
        methods = sorted_methods({c.method for c in curves} | set(unfinished["method"].dropna()))
        handles = [Line2D([], [], color=method_color(m), marker=METHOD_MARKERS.get(m, "o"), label=method_label(m))
                   for m in methods]
        handles += [
            Line2D([], [], color="gray", marker="*", ms=12, mec="black", ls="none",
                   label="optimum (bar: 95% CI over seeds)"),
            Line2D([], [], color="gray", marker="*", ms=12, mfc="white", ls=":",
                   label="flagged fit: best trained size"),
            Line2D([], [], color="gray", marker="x", ls="none", label="failed / diverged trial"),
        ]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), frameon=False,
                   bbox_to_anchor=(0.5, -0.02))
        fig.suptitle("isoFLOP curves: Huber parabola of log(perplexity) in log10(parameters)")
        fig.tight_layout(rect=(0, 0.1 if len(axes) <= 3 else 0.05, 1, 1))
        return _save(fig, path)


def frontier_figure(curves: list[IsoflopCurve], iso_time: pd.DataFrame, trials: pd.DataFrame,
                    laws: dict[str, PowerLaw], path: Path) -> Path | None:
    """(a) compute-optimal perplexity against FLOPs; (b) the same against training seconds, over all
    trials' lower envelope; (c) compute-optimal size against FLOPs with the fitted power laws."""
    if not curves:
        return None
    with plt.rc_context(STYLE):
        fig, (ax_f, ax_t, ax_n) = plt.subplots(1, 3, figsize=(16, 4.6))
        for method in sorted_methods({c.method for c in curves}):
            of_method = [c for c in curves if c.method == method]
            color, marker, label = method_color(method), METHOD_MARKERS.get(method, "o"), method_label(method)
            budgets = np.array([c.budget for c in of_method])
            ppl = np.array([c.ppl_opt for c in of_method])
            size = np.array([c.params_opt for c in of_method])
            trusted = np.array([not c.fit.flag for c in of_method])
            for ax, y in ((ax_f, ppl), (ax_n, size)):
                ax.plot(budgets, y, "-", color=color, lw=1.2, alpha=0.6)
                ax.plot(budgets[trusted], y[trusted], marker, color=color, ms=7, ls="none", label=label)
                ax.plot(budgets[~trusted], y[~trusted], marker, mfc="white", mec=color, ms=7, ls="none")
            if method in laws:
                law = laws[method]
                cs = np.logspace(np.log10(budgets.min()), np.log10(budgets.max()), 50)
                ax_n.plot(cs, law(cs), "--", color=color, lw=1,
                          label=f"{label} fit: $N_{{opt}} \\propto C^{{{law.exponent:.2f}}}$")
            of_trials = trials[trials["method"] == method]
            seconds = pd.to_numeric(of_trials["train_seconds"], errors="coerce").to_numpy(float)
            ok = np.isfinite(seconds)
            if ok.any():
                ax_t.plot(seconds[ok], of_trials["ppl"].to_numpy(float)[ok], marker, color=color, ms=3.5,
                          alpha=0.3, ls="none")
                xs, envelope = lower_envelope(seconds[ok], of_trials["ppl"].to_numpy(float)[ok])
                ax_t.step(xs, envelope, where="post", color=color, lw=1.5, alpha=0.9, label=f"{label} best so far")
            opt = iso_time[(iso_time["method"] == method) & np.isfinite(iso_time["train_seconds_opt"].astype(float))]
            if len(opt):
                flagged = (opt["flag"] != "").to_numpy()
                t, y = opt["train_seconds_opt"].to_numpy(float), opt["ppl_opt"].to_numpy(float)
                ax_t.plot(t[~flagged], y[~flagged], marker, color=color, ms=8, mec="black", mew=0.6, ls="none")
                ax_t.plot(t[flagged], y[flagged], marker, mfc="white", mec=color, ms=8, ls="none")
        for ax in (ax_f, ax_t, ax_n):
            ax.set_xscale("log")
            ax.set_yscale("log")
        if len(iso_time):  # keep the envelopes readable: far-off trials (tiny or huge models) may leave the top
            top = 1.5 * float(np.nanmax(iso_time["ppl_opt"].to_numpy(float)))
            lo, hi = ax_t.get_ylim()
            ax_t.set_ylim(lo, min(hi, top))
        for ax in (ax_f, ax_t):
            _nice_log_ticks(ax, "y", _plain)
            ax.set_ylabel(f"compute-optimal {PPL_LABEL}" if ax is ax_f else PPL_LABEL)
        _nice_log_ticks(ax_n, "y")
        _nice_log_ticks(ax_t, "x")
        ax_f.set_xlabel("training budget (FLOPs)")
        ax_n.set_xlabel("training budget (FLOPs)")
        ax_t.set_xlabel("measured training time (seconds)")
        ax_n.set_ylabel(f"compute-optimal {PARAMS_LABEL.split(' (')[0]}")
        ax_f.set_title("(a) isoFLOP frontier")
        ax_t.set_title("(b) iso-time: all trials, best-so-far envelope,\nlarge markers = isoFLOP optima")
        ax_n.set_title("(c) compute-optimal model size")
        ax_f.legend(title="hollow: flagged optimum", title_fontsize=8)
        ax_t.legend()
        ax_n.legend()
        fig.tight_layout()
        return _save(fig, path)


def _series_label(row: pd.Series, keys: list[str]) -> str:
    names = {"budget_flops": lambda v: f"{format_flops(v)} FLOPs", "query_bn": lambda v: "BN" if v else "no BN",
             "params_backbone": lambda v: f"{format_count(v)} params", "active_experts": lambda v: f"h*k={v:g}",
             "num_experts": lambda v: f"N={format_experts(v)}", "method": method_label}
    return ", ".join(names[k](row[k]) for k in keys)


def format_experts(n: float) -> str:
    """1024 -> 32^2 (product keys: N is a square); else the number; "-" for none (dense)."""
    if n is None or not np.isfinite(n):
        return "-"
    root = math.isqrt(int(n))
    return f"{root}²" if root * root == int(n) and root >= 4 else f"{int(n)}"


def _ablation_panel(ax, points: pd.DataFrame, x: str, xlabel: str, fixed: list[str]) -> bool:
    series_keys = [k for k in fixed if points[k].nunique(dropna=False) > 1]
    drawn = False
    cmap = plt.get_cmap("tab10")
    for i, (_, series) in enumerate(points.groupby(fixed, dropna=False)):
        if series[x].nunique() < 2:
            continue
        series = series.sort_values(x)
        label = _series_label(series.iloc[0], series_keys) if series_keys else None
        ax.plot(series[x], series["ppl"], "o-", color=cmap(i % 10), label=label)
        drawn = True
    if not drawn:
        return False
    ax.set_xscale("log", base=2)
    values = sorted(points[x].dropna().unique())
    ax.xaxis.set_major_locator(ticker.FixedLocator(values))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(
        lambda v, _: format_experts(v) if x == "num_experts" else f"{v:g}"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_yscale("log")
    _nice_log_ticks(ax, "y", _plain)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(PPL_LABEL)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return True


def ablation_figure(points: pd.DataFrame, path: Path) -> Path | None:
    """Perplexity against num_experts (log2) and against active experts heads*top_k (log2), one line per
    setting of the other ablation variables; only panels the data can draw."""
    if points.empty:
        return None
    common = ["method", "budget_flops", "params_backbone"]
    panels = [("num_experts", "total experts N (log2 scale)", common + ["query_bn", "active_experts"],
               "(a) perplexity vs number of experts"),
              ("active_experts", "active experts per token, heads x top-k (log2 scale)",
               common + ["num_experts", "query_bn"], "(b) perplexity vs active experts")]
    drawable = [p for p in panels
                if (points.groupby(p[2], dropna=False)[p[0]].nunique() >= 2).any()]
    if not drawable:
        return None
    with plt.rc_context(STYLE):
        fig, axes = _grid(len(drawable), width=5.6, height=4.2)
        for ax, (x, xlabel, fixed, title) in zip(axes, drawable):
            _ablation_panel(ax, points, x, xlabel, fixed)
            ax.set_title(title)
        fig.suptitle("PEER ablations (completed trials, mean over seeds)")
        fig.tight_layout()
        return _save(fig, path)


def ablation_isoflop_figure(points: pd.DataFrame, path: Path) -> Path | None:
    """The paper's Fig. 3 from ablations run at several sizes: per ablated variable (number of experts,
    active experts) and budget, perplexity against backbone size, one line per setting (mean over seeds,
    bar: 95% interval over seeds), and the dense reference trials of the same study in black."""
    sparse = points[points["method"] != "dense"]
    dense = points[points["method"] == "dense"]
    panels = []
    for variable, label in (("num_experts", "N"), ("active_experts", "h*k")):
        others = [k for k in ("num_experts", "active_experts", "query_bn") if k != variable]
        for (budget, *_), block in sparse.groupby(["budget_flops"] + others, dropna=False):
            if block[variable].nunique() >= 2 and block.groupby(variable)["params_backbone"].nunique().min() >= 2:
                panels.append((variable, label, budget, block))
    if not panels:
        return None
    with plt.rc_context(STYLE):
        fig, axes = _grid(len(panels), width=5.6, height=4.2)
        for ax, (variable, label, budget, block) in zip(axes, panels):
            cmap = plt.get_cmap("viridis")
            values = sorted(block[variable].unique())
            for i, value in enumerate(values):
                line = block[block[variable] == value].sort_values("params_backbone")
                yerr = np.array([line["ppl"] - line["ppl_lo"], line["ppl_hi"] - line["ppl"]])
                text = format_experts(value) if variable == "num_experts" else f"{value:g}"
                ax.errorbar(line["params_backbone"], line["ppl"], yerr=None if np.isnan(yerr).all() else yerr,
                            fmt="o-", color=cmap(i / max(1, len(values) - 1)), capsize=3, label=f"{label}={text}")
            ref = dense[dense["budget_flops"] == budget].sort_values("params_backbone")
            if len(ref):
                ax.plot(ref["params_backbone"], ref["ppl"], "s--", color="black", label="dense")
            ax.set_xscale("log")
            ax.set_yscale("log")
            _nice_log_ticks(ax, "x")
            _nice_log_ticks(ax, "y", _plain)
            ax.set_xlabel(PARAMS_LABEL)
            ax.set_ylabel(PPL_LABEL)
            ax.set_title(f"{'(a) experts N' if variable == 'num_experts' else '(b) active experts h*k'},"
                         f" {format_flops(budget)} FLOPs")
            ax.legend(fontsize=8)
        fig.suptitle("isoFLOP curves of the ablations (paper Fig. 3): mean over seeds, 95% interval")
        fig.tight_layout()
        return _save(fig, path)


def usage_figure(curves: pd.DataFrame, trials: pd.DataFrame, path: Path) -> Path | None:
    """Expert usage and unevenness at the evaluation steps of every PKM / PEER trial, one line per trial,
    one colour per setting of the ablated variables: whether usage collapses during training."""
    meta = trials[trials["method"].isin(["pkm", "peer"]) & trials["status"].isin(["completed", "diverged"])]
    data = curves[curves["trial_id"].isin(meta["trial_id"]) & curves["usage"].notna()]
    if data.empty:
        return None
    meta = meta[meta["trial_id"].isin(data["trial_id"])]
    colors = _ablation_colors(meta)
    with plt.rc_context(STYLE):
        fig, (ax_u, ax_e) = plt.subplots(1, 2, figsize=(12, 4.4))
        for trial_id, curve in data.groupby("trial_id"):
            curve = curve.sort_values("tokens")
            color, label = colors[trial_id]
            ax_u.plot(curve["tokens"], 100 * curve["usage"].astype(float), "o-", color=color, ms=3, lw=1, label=label)
            ax_e.plot(curve["tokens"], curve["unevenness"].astype(float), "o-", color=color, ms=3, lw=1)
        ax_u.set_ylabel("expert usage (%)")
        ax_e.set_ylabel("unevenness (KL from uniform, nats)")
        for ax in (ax_u, ax_e):
            ax.set_xlabel("training tokens")
        ax_u.set_ylim(0, 102)
        fig.legend(*ax_u.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
        fig.suptitle("Expert usage and unevenness over training (evaluation steps of the PKM and PEER trials)")
        rows = math.ceil(len(ax_u.get_legend_handles_labels()[0]) / 3)
        fig.set_figheight(fig.get_figheight() + 0.25 * rows)
        fig.tight_layout(rect=(0, 0.25 * rows / fig.get_figheight() + 0.02, 1, 1))
        return _save(fig, path)


def _ablation_colors(meta: pd.DataFrame) -> dict[str, tuple]:
    """trial_id -> (colour, label) with one colour per setting of the ablated variables (a label only on the
    first trial of each setting, so the legend lists every setting once)."""
    meta = meta.assign(active_experts=pd.to_numeric(meta["expert_heads"], errors="coerce")
                       * pd.to_numeric(meta["top_k"], errors="coerce"))
    keys = [k for k in ("method", "params_backbone", "num_experts", "query_bn", "active_experts")
            if meta[k].astype(str).nunique() > 1] or ["method"]
    cmap, out, seen = plt.get_cmap("tab20"), {}, {}
    for _, row in meta.sort_values(keys).iterrows():
        label = _series_label(row, keys)
        first = label not in seen
        seen.setdefault(label, len(seen))
        out[row["trial_id"]] = (cmap(seen[label] % 20), label if first else None)
    return out


def curves_figure(curves: pd.DataFrame, trials: pd.DataFrame, kind: str, path: Path) -> Path | None:
    """Training loss against tokens, one panel per budget, one line per trial: isoFLOP trials in their
    method's colour, darker for larger models (total parameters); ablation trials one colour per setting of
    the ablated variables; diverged trials dashed and ending in x."""
    meta = trials[(trials["kind"] == kind) & trials["status"].isin(["completed", "diverged"])]
    data = curves[curves["trial_id"].isin(meta["trial_id"]) & (curves["tokens"] > 0)]
    if data.empty:
        return None
    meta = meta[meta["trial_id"].isin(data["trial_id"])].copy()
    meta["budget_key"] = pd.to_numeric(meta["budget_flops"], errors="coerce").fillna(-1.0)
    budgets = sorted(meta["budget_key"].unique())
    by_trial = {tid: g.sort_values("tokens") for tid, g in data.groupby("trial_id")}
    completed_loss = data[data["trial_id"].isin(meta.loc[meta["status"] == "completed", "trial_id"])]["train_loss"]
    finite = np.isfinite(completed_loss.astype(float))
    top = float(completed_loss[finite].max()) if finite.any() else float(np.nanpercentile(data["train_loss"], 90))
    by_setting = _ablation_colors(meta) if kind == "ablation" else {}
    with plt.rc_context(STYLE):
        fig, axes = _grid(len(budgets), width=5.2, height=3.9)
        for ax, budget in zip(axes, budgets):
            panel = meta[meta["budget_key"] == budget]
            bottom = np.inf
            for method, of_method in panel.groupby("method"):
                cmap = plt.get_cmap(METHOD_CMAPS.get(method, "Purples"))
                ranks = of_method["params_total"].astype(float).rank(method="dense").to_numpy()
                for rank, (_, trial) in zip(ranks, of_method.iterrows()):
                    curve = by_trial[trial["trial_id"]]
                    loss = curve["train_loss"].to_numpy(float)
                    if by_setting:  # ablations: one colour per setting of the ablated variables
                        color, label = by_setting[trial["trial_id"]]
                    else:
                        color, label = cmap(0.4 + 0.45 * (rank - 1) / max(1, ranks.max() - 1)), None
                    diverged = trial["status"] == "diverged"
                    ax.plot(curve["tokens"], np.clip(loss, None, top * 1.5), color=color, lw=1.2,
                            ls="--" if diverged else "-", label=label)
                    if diverged:
                        last = np.flatnonzero(np.isfinite(loss))
                        if len(last):
                            i = last[-1]
                            ax.plot(curve["tokens"].iloc[i], min(loss[i], top * 1.02), "x", color="black", ms=8,
                                    mew=2, clip_on=False)
                    if np.isfinite(loss).any():
                        bottom = min(bottom, np.nanmin(loss[np.isfinite(loss)]))
            ax.set_xscale("log")
            ax.set_ylim(bottom - 0.05 * (top - bottom) if np.isfinite(bottom) else None, top * 1.02)
            ax.set_xlabel("training tokens")
            ax.set_ylabel("training loss (nats / token)")
            _nice_log_ticks(ax, "x")
            ax.set_title(f"{kind}, budget {format_flops(budget)} FLOPs" if budget > 0 else f"{kind}, no budget")
        if by_setting:
            handles, title = [h for ax in axes for h in ax.get_legend_handles_labels()[0]], None
        else:
            handles = [Line2D([], [], color=plt.get_cmap(METHOD_CMAPS.get(m, "Purples"))(0.75), label=method_label(m))
                       for m in sorted_methods(meta["method"].unique())]
            title = "darker = more parameters"
        if (meta["status"] == "diverged").any():
            handles.append(Line2D([], [], color="gray", ls="--", marker="x", mec="black", label="diverged"))
        ncol = min(len(handles), 3 if by_setting else 6)
        rows = math.ceil(len(handles) / max(1, ncol))
        if handles:
            fig.legend(handles=handles, loc="lower center", ncol=ncol, frameon=False, title=title, fontsize=8,
                       bbox_to_anchor=(0.5, 0.0))
        fig.suptitle(f"Training curves ({kind} trials)")
        legend_in = 0.2 * rows + (0.3 if title else 0.1)  # the legend gets its own strip at the bottom
        fig.set_figheight(fig.get_figheight() + legend_in)
        fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 1))
        return _save(fig, path)
