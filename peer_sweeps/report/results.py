"""One consistent snapshot of a results directory: `trials.parquet` and `curves.parquet` (CONTRACT.md).

Both files are replaced atomically by rename while a study runs, so each is opened exactly once and read
through that one file handle. Either may be missing or unreadable; `Results.notes` says so and the report
goes on with what there is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from peer_sweeps.schema import curves_schema, eval_sets_of, trials_schema

DEFAULT_PRIMARY = "validation"


@dataclass
class Results:
    trials: pd.DataFrame  # one row per trial; every column of `trials_schema(eval_sets)` is present
    curves: pd.DataFrame | None  # None when curves.parquet is missing or unreadable
    eval_sets: list[str]  # evaluation set names, the primary validation set first
    notes: list[str] = field(default_factory=list)  # what is missing or unreadable, in plain words

    @property
    def primary(self) -> str | None:
        return self.eval_sets[0] if self.eval_sets else None

    def completed(self, kind: str) -> pd.DataFrame:
        """Completed trials of `kind` ("isoflop" or "ablation") with a finite primary perplexity."""
        t = self.trials
        ok = (t["kind"] == kind) & (t["status"] == "completed") & np.isfinite(t["ppl"].astype(float))
        return t[ok]


def _read_once(path: Path, notes: list[str]) -> pa.Table | None:
    if not path.exists():
        notes.append(f"`{path.name}` is missing.")
        return None
    try:
        with open(path, "rb") as f:  # one handle: a rename mid-read cannot mix two versions
            return pq.read_table(f)
    except (OSError, pa.ArrowException) as err:
        notes.append(f"`{path.name}` could not be read ({type(err).__name__}: {err}).")
        return None


def _with_schema_columns(df: pd.DataFrame, schema: pa.Schema, notes: list[str], file: str) -> pd.DataFrame:
    missing = [name for name in schema.names if name not in df.columns]
    if missing and len(df.columns):
        notes.append(f"`{file}` lacks columns {', '.join(missing)}; they are treated as empty.")
    for name in missing:
        df[name] = None
    return df


def _primary_first(trials: pd.DataFrame, eval_sets: list[str]) -> list[str]:
    """Put first the set whose perplexity is the `ppl` column (preferring `validation` on a tie)."""
    ppl = pd.to_numeric(trials["ppl"], errors="coerce").to_numpy(float)

    def matches(name: str) -> bool:
        other = pd.to_numeric(trials[f"ppl_{name}"], errors="coerce").to_numpy(float)
        both = np.isfinite(ppl) & np.isfinite(other)
        return bool(both.any()) and np.allclose(ppl[both], other[both], rtol=1e-6)

    candidates = [name for name in eval_sets if matches(name)]
    if not candidates:
        candidates = [DEFAULT_PRIMARY] if DEFAULT_PRIMARY in eval_sets else eval_sets[:1]
    primary = DEFAULT_PRIMARY if DEFAULT_PRIMARY in candidates else candidates[0] if candidates else None
    return ([primary] if primary else []) + [name for name in eval_sets if name != primary]


def load_results(results_dir: str | Path) -> Results:
    """Read `results_dir/trials.parquet` and `results_dir/curves.parquet` once each."""
    results_dir = Path(results_dir)
    notes: list[str] = []
    trials_table = _read_once(results_dir / "trials.parquet", notes)
    curves_table = _read_once(results_dir / "curves.parquet", notes)

    eval_sets = eval_sets_of(trials_table.schema) if trials_table is not None else []
    if trials_table is None or trials_table.num_rows == 0:
        if trials_table is not None:
            notes.append("`trials.parquet` has no rows yet.")
        trials = pd.DataFrame({name: pd.Series(dtype=object) for name in trials_schema(eval_sets).names})
    else:
        trials = _with_schema_columns(trials_table.to_pandas(), trials_schema(eval_sets), notes, "trials.parquet")
    eval_sets = _primary_first(trials, eval_sets) if len(trials) else eval_sets

    curves = None
    if curves_table is not None:
        if curves_table.num_rows == 0:
            notes.append("`curves.parquet` has no rows yet.")
        else:
            schema = curves_schema(eval_sets_of(curves_table.schema))
            curves = _with_schema_columns(curves_table.to_pandas(), schema, notes, "curves.parquet")
    return Results(trials=trials, curves=curves, eval_sets=eval_sets, notes=notes)
