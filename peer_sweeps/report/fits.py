"""Scaling-law fits: Chinchilla Approach 2 (Hoffmann et al. 2022, section 3.2) that keeps the data.

Each (method, budget) isoFLOP curve is summarised per size: the mean of log(perplexity) over the seeds
trained at that size, and its standard error where there are several seeds. A parabola
log(ppl) = a u^2 + b u + c, u = log10(params) - u_ref, is fitted to those means with a Huber loss whose
scale is set by the noise (`huber_scale`), so that one bad size cannot move the vertex, while the curve's
own minimum, which differs from its neighbours by much more than the noise, is never treated as an outlier.

What is reported (choices the method leaves open):
- The compute-optimal perplexity is always an observed one: the mean over seeds of the best trained size.
  It is never worse than the best trained model and never below it, and every curve reports the same kind
  of quantity. With four or five sizes per curve a value read off the parabola below the grid adds the fit's
  error and none of the data's information; the parabola's minimum is kept beside it (`y_vertex`).
- The compute-optimal size is the vertex when the fit is trusted, else the best trained size. A fit is not
  trusted (flagged) when there are fewer than 3 sizes, when it is not convex, when the minimum is at the
  edge of the grid, when the vertex lies outside the best size's neighbours, when the parabola passes more
  than `MISS_SE` standard errors above or below the best trained model (it does not describe the minimum it
  stands for: a collapsed arm pulls it below, a too-small robust scale treats the minimum as an outlier and
  leaves it above), or when its residuals are large next to the seed noise (reduced chi-square above its
  99th percentile).
The optimal size against compute is then fitted as a power law N_opt = k C^a over the trusted optima.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

HUBER_TUNING = 1.345  # Huber's constant: 95% efficiency under Gaussian noise, in units of the noise's sd
MISS_SE = 3.0  # a parabola this many standard errors off the best trained model at its size is flagged
RESIDUAL_QUANTILE = 0.99  # reduced chi-square of the fit's residuals above this quantile is flagged

FEWER_THAN_3 = "fewer than 3 sizes"
NON_CONVEX = "non-convex fit"
AT_EDGE = "minimum at edge of grid"
FAR_FROM_BEST = "vertex far from the best trained size"
MISSES_BEST = "fit misses the best trained model"
LARGE_RESIDUALS = "residuals large next to the seed noise"
FALLBACK = "best trained size used"


@dataclass(frozen=True)
class Parabola:
    """y = a u^2 + b u + c with u = x - x_ref (x_ref centres x for a well-conditioned fit)."""

    a: float
    b: float
    c: float
    x_ref: float

    def __call__(self, x: np.ndarray | float) -> np.ndarray | float:
        u = np.asarray(x, dtype=float) - self.x_ref
        return self.a * u**2 + self.b * u + self.c

    @property
    def convex(self) -> bool:
        return self.a > 0

    @property
    def vertex_x(self) -> float:
        return self.x_ref - self.b / (2 * self.a) if self.a != 0 else float("nan")


def fit_parabola(x: np.ndarray, y: np.ndarray, huber_scale: float, max_iter: int = 100) -> Parabola:
    """Huber-robust parabola through (x, y), which needs at least 3 distinct x: minimises
    sum_i huber(r_i), quadratic for |r_i| <= huber_scale and linear beyond, by reweighted least squares
    with weights min(1, huber_scale / |r_i|), starting from the plain least-squares fit (the same minimum as
    scipy `least_squares(loss="huber", f_scale=huber_scale)`, which a test checks)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    assert len(np.unique(x)) >= 3, "a parabola needs at least 3 distinct x"
    assert huber_scale > 0
    x_ref = float(np.mean(x))
    design = np.vander(x - x_ref, 3)  # columns u^2, u, 1
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    for _ in range(max_iter):
        residual = np.abs(design @ coef - y)
        root_w = np.sqrt(np.minimum(1.0, huber_scale / np.maximum(residual, 1e-300)))
        new = np.linalg.lstsq(design * root_w[:, None], y * root_w, rcond=None)[0]
        converged = np.allclose(new, coef, rtol=0, atol=1e-12)
        coef = new
        if converged:
            break
    a, b, c = coef
    return Parabola(float(a), float(b), float(c), x_ref)


@dataclass(frozen=True)
class VertexFit:
    """The compute-optimal point of one isoFLOP curve, in log10(params) and log(ppl)."""

    num_points: int  # distinct sizes
    parabola: Parabola | None  # None with fewer than 3 sizes
    x_opt: float  # log10 params of the optimum: the vertex, or the best trained size when flagged
    y_opt: float  # mean log ppl of the best trained size (what the report compares)
    y_vertex: float  # the parabola's minimum (nan without a convex fit)
    best_index: int  # index of the best trained size in the inputs
    huber_scale: float
    chi2: float  # reduced chi-square of the residuals against the standard errors (nan: not measured)
    flag: str  # empty when the vertex is trusted; else why not, ending with FALLBACK

    @property
    def trusted(self) -> bool:
        return not self.flag


def fit_isoflop(x: np.ndarray, y: np.ndarray, se: np.ndarray, noise_measured: bool = True) -> VertexFit:
    """Fit one isoFLOP curve: per distinct size, x = log10(params), y = mean log(ppl) over its seeds and
    se = the standard error of that mean. `noise_measured`: se comes from seed replicates (else it is an
    estimate from the fits' residuals, and the residuals cannot be judged against it)."""
    x, y, se = (np.asarray(v, dtype=float) for v in (x, y, se))
    assert len(x) == len(y) == len(se) > 0 and len(np.unique(x)) == len(x), "one entry per distinct size"
    assert np.all(se > 0)
    order = np.argsort(x)
    best = int(np.argmin(y))
    huber_scale = HUBER_TUNING * float(np.median(se))
    reasons: list[str] = []
    parabola, y_vertex, chi2 = None, float("nan"), float("nan")
    if len(x) < 3:
        reasons.append(FEWER_THAN_3)
    else:
        parabola = fit_parabola(x, y, huber_scale)
        rank = int(np.flatnonzero(order == best)[0])
        neighbours = x[order[max(rank - 1, 0)]], x[order[min(rank + 1, len(x) - 1)]]
        if not parabola.convex:
            reasons.append(NON_CONVEX)
        elif not (x.min() <= parabola.vertex_x <= x.max()) or rank in (0, len(x) - 1):
            reasons.append(AT_EDGE)
        elif not (neighbours[0] <= parabola.vertex_x <= neighbours[1]):
            reasons.append(FAR_FROM_BEST)
        if parabola.convex:
            y_vertex = float(parabola(parabola.vertex_x))
        if abs(parabola(x[best]) - y[best]) > MISS_SE * se[best]:
            reasons.append(MISSES_BEST)
        dof = len(x) - 3
        if noise_measured and dof > 0:
            chi2 = float(np.sum(((parabola(x) - y) / se) ** 2) / dof)
            if chi2 > stats.chi2.ppf(RESIDUAL_QUANTILE, dof) / dof:
                reasons.append(LARGE_RESIDUALS)
    x_opt = float(x[best]) if reasons else parabola.vertex_x
    flag = "; ".join(reasons + [FALLBACK]) if reasons else ""
    return VertexFit(len(x), parabola, x_opt, float(y[best]), y_vertex, best, huber_scale, chi2, flag)


@dataclass(frozen=True)
class PowerLaw:
    """y = k x^exponent, fitted by least squares in log10-log10."""

    exponent: float
    log10_k: float
    num_points: int

    def __call__(self, x: np.ndarray | float) -> np.ndarray | float:
        return 10 ** (self.log10_k + self.exponent * np.log10(x))


def fit_power_law(x: np.ndarray, y: np.ndarray) -> PowerLaw:
    """Power law through positive (x, y); needs at least 3 distinct x (fewer would fit any line exactly)."""
    lx, ly = np.log10(np.asarray(x, dtype=float)), np.log10(np.asarray(y, dtype=float))
    assert len(np.unique(lx)) >= 3, "a power law needs at least 3 distinct x"
    exponent, log10_k = np.polyfit(lx, ly, 1)
    return PowerLaw(float(exponent), float(log10_k), len(lx))


def lower_envelope(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best y reached at or below each x (points sorted by x): a Pareto frontier, for iso-time plots."""
    order = np.argsort(x, kind="stable")
    return np.asarray(x, dtype=float)[order], np.minimum.accumulate(np.asarray(y, dtype=float)[order])
