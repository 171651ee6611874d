"""Seed noise, 95% intervals over seeds and verdicts (CONTRACT.md `verdicts.csv`).

Choices (the issue leaves them open):
- Noise is measured on log(perplexity): the sample standard deviation across seeds of one (method, budget,
  size) cell, pooled over cells (degrees of freedom summed), per method and over all methods. In percent of
  perplexity it is 100 (exp(sd) - 1).
- An optimum's interval is a Student t-interval of the mean over its seeds, at the size chosen as the
  optimum. With 3-5 seeds a bootstrap over seeds has 10-126 distinct resamples and its percentile interval
  is too narrow (for 3 seeds it cannot be wider than the range of the seeds); the t-interval is exact for
  Gaussian noise, which log-perplexity across seeds is close to.
- A method against a baseline: the seed sets the initialisation and the order of the training batches, so
  trials with the same seed share their data; the change is a paired t-interval over the seeds both have
  (the per-seed log ratio), or a Welch interval when fewer than 2 seeds are shared. With one seed on either
  side there is no interval: change_lo and change_hi are empty and the verdict is `indistinguishable`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

LEVEL = 0.95
BETTER, WORSE, INDISTINGUISHABLE = "better", "worse", "indistinguishable"


def log_pct(log_ratio: float) -> float:
    """A difference of log-perplexities as a change of perplexity in %."""
    return 100 * float(np.expm1(log_ratio))


@dataclass(frozen=True)
class Noise:
    """Pooled seed-to-seed standard deviation of log(perplexity)."""

    sd: float  # nan when no cell has 2 seeds
    dof: int  # sum over cells of (seeds - 1)
    num_cells: int  # cells with at least 2 seeds

    @property
    def measured(self) -> bool:
        return self.dof > 0

    @property
    def pct(self) -> float:
        return log_pct(self.sd)


def pooled_noise(log_ppl: pd.Series, cells: pd.Series) -> Noise:
    """Pooled sd of `log_ppl` within groups given by `cells` (one label per trial)."""
    frame = pd.DataFrame({"y": np.asarray(log_ppl, dtype=float), "cell": np.asarray(cells)})
    groups = frame.groupby("cell")["y"]
    counts, variances = groups.count(), groups.var(ddof=1)
    replicated = counts >= 2
    dof = int((counts[replicated] - 1).sum())
    if dof == 0:
        return Noise(float("nan"), 0, 0)
    sd = float(np.sqrt(((counts[replicated] - 1) * variances[replicated]).sum() / dof))
    return Noise(sd, dof, int(replicated.sum()))


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float  # nan with fewer than 2 values
    hi: float
    n: int


def t_interval(values: np.ndarray, level: float = LEVEL) -> Interval:
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return Interval(mean, float("nan"), float("nan"), len(values))
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values))


@dataclass(frozen=True)
class Change:
    """A method's perplexity relative to a baseline's, in %, with its 95% interval."""

    pct: float
    lo: float
    hi: float
    how: str  # "paired over N seeds", "Welch", or "no interval: ..."

    @property
    def verdict(self) -> str:
        return verdict(self.lo, self.hi)


def verdict(lo: float, hi: float) -> str:
    """CONTRACT.md: better when the whole interval is below zero, worse when above, else indistinguishable
    (also when there is no interval)."""
    if hi < 0:
        return BETTER
    if lo > 0:
        return WORSE
    return INDISTINGUISHABLE


def compare(method: dict[int, float], baseline: dict[int, float], level: float = LEVEL) -> Change:
    """Change of the method's log-perplexity (seed -> value) against the baseline's, as % of perplexity."""
    shared = sorted(set(method) & set(baseline))
    a, b = np.array(list(method.values())), np.array(list(baseline.values()))
    if len(shared) >= 2:
        diff = t_interval(np.array([method[s] - baseline[s] for s in shared]), level)
        return Change(log_pct(diff.mean), log_pct(diff.lo), log_pct(diff.hi), f"paired over {len(shared)} seeds")
    point = log_pct(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Change(point, float("nan"), float("nan"), "no interval: one seed")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else len(a) + len(b) - 2
    half = stats.t.ppf(0.5 + level / 2, dof) * np.sqrt(va + vb)
    d = a.mean() - b.mean()
    return Change(point, log_pct(d - half), log_pct(d + half), "Welch")
