"""`log_report_run`: a written report as one W&B run, beside the study's trial runs.

The run has job_type "report" and the study as its group, so the study's W&B workspace (grouped by
group) shows the trial runs and the report together. It holds:
- tables (`wandb.Table`): `optimal` (optimal.csv), `isoflop_fits` (the parabolas behind it), `power_laws`,
  and `verdicts` when the report wrote verdicts.csv;
- W&B plots: `isoflop_curves` (perplexity against backbone parameters, one line per method and budget,
  the completed isoFLOP trials) and `frontier` (compute-optimal perplexity against budget, one line per
  method);
- the report's PNG figures as images under `figures/`.
Each `peer-sweeps report --wandb MODE` logs a new run (its id: the study and the time), so the history of
the answer stays visible. Offline runs land in DIR/wandb/ like the trials' (`wandb sync` uploads them).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from peer_sweeps.report.results import load_results
from peer_sweeps.report.tables import method_label, sorted_methods
from peer_sweeps.report.write import FIGURES

TABLES = {"optimal": "optimal.csv", "isoflop_fits": "isoflop_fits.csv", "power_laws": "power_laws.csv",
          "verdicts": "verdicts.csv"}


def log_report_run(results_dir: str | Path, report_dir: str | Path, mode: str) -> Path | None:
    """Logs the report in `report_dir` (written from `results_dir`) as one W&B run; returns the run's local
    directory (None with mode "disabled", which logs nothing)."""
    import wandb

    from peer_sweeps.study import load_study

    if mode == "disabled":
        return None
    results_dir, report_dir = Path(results_dir), Path(report_dir)
    study = load_study(results_dir / "study.yaml")
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        project=study.tracking.wandb_project, group=study.name, job_type="report", name=f"report: {study.name}",
        id=f"report-{study.name}-{time.strftime('%Y%m%d-%H%M%S')}", dir=str(results_dir), mode=mode,
        config={"study": study.name, "results_dir": str(results_dir.resolve())},
        settings=wandb.Settings(init_timeout=float(os.environ.get("PEER_SWEEPS_WANDB_INIT_TIMEOUT", 60)),
                                console="off", x_disable_stats=True),
    )
    try:
        logged: dict = {}
        for key, file in TABLES.items():
            frame = _read_csv(report_dir / file)
            if frame is not None:
                logged[key] = wandb.Table(dataframe=frame, allow_mixed_types=True)
        results = load_results(results_dir)
        curves = _isoflop_series(results.completed("isoflop"))
        if curves:
            logged["isoflop_curves"] = wandb.plot.line_series(
                xs=[x for x, _ in curves.values()], ys=[y for _, y in curves.values()], keys=list(curves),
                title="isoFLOP curves: perplexity against backbone parameters", xname="params_backbone")
        optimal = _read_csv(report_dir / TABLES["optimal"])
        frontier = _frontier_series(optimal) if optimal is not None else {}
        if frontier:
            logged["frontier"] = wandb.plot.line_series(
                xs=[x for x, _ in frontier.values()], ys=[y for _, y in frontier.values()], keys=list(frontier),
                title="compute-optimal perplexity against training FLOPs", xname="budget_flops")
        for name in FIGURES:
            if (report_dir / name).is_file():
                logged[f"figures/{Path(name).stem}"] = wandb.Image(str(report_dir / name))
        run.log(logged)
        run.summary.update({"trials": len(results.trials),
                            "completed": int((results.trials["status"] == "completed").sum())})
    finally:
        run.finish()
    return Path(run.dir).parent


def _read_csv(path: Path) -> pd.DataFrame | None:
    """A report table, text columns' blanks as "" (W&B types a column by its values), None if absent."""
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None
    for column in frame.columns:
        if frame[column].dtype == object:
            frame[column] = frame[column].fillna("").astype(str)
    return frame


def _isoflop_series(points: pd.DataFrame) -> dict[str, tuple[list[float], list[float]]]:
    """label "<method> @ <budget>" -> (params_backbone, ppl) of its completed isoFLOP trials, by size."""
    series = {}
    for method in sorted_methods(points["method"].unique()):
        of_method = points[points["method"] == method]
        for budget in sorted(of_method["budget_flops"].astype(float).unique()):
            at = of_method[of_method["budget_flops"].astype(float) == budget].sort_values("params_backbone")
            series[f"{method_label(method)} @ {budget:.3g}"] = (
                at["params_backbone"].astype(float).tolist(), at["ppl"].astype(float).tolist())
    return series


def _frontier_series(optimal: pd.DataFrame) -> dict[str, tuple[list[float], list[float]]]:
    """method -> (budget_flops, ppl_opt) of its compute-optimal models, by budget."""
    series = {}
    for method in sorted_methods(optimal["method"].unique()):
        at = optimal[(optimal["method"] == method) & np.isfinite(optimal["ppl_opt"].astype(float))]
        at = at.sort_values("budget_flops")
        if len(at):
            series[method_label(method)] = (at["budget_flops"].astype(float).tolist(),
                                            at["ppl_opt"].astype(float).tolist())
    return series
