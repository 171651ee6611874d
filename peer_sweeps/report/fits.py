"""Scaling-law fits: Chinchilla approach 2 (Hoffmann et al. 2022, section 3.2) with robust fits.

For each (method, budget) an isoFLOP parabola  log(ppl) = a u^2 + b u + c,  u = log10(params) - u_ref,
is fitted with a Huber loss, so one bad trial cannot move the vertex: the Huber M-estimate, computed by
iteratively reweighted least squares (the same minimum as scipy `least_squares(loss="huber")`, which a test
checks, at a fraction of the cost - the bootstrap refits every curve 200 times).
The vertex u* = -b / 2a is the compute-optimal size; a bootstrap over the points (resampled with
replacement, seeded) gives its 95% interval. A vertex is not trusted - flagged, and the best observed point
used instead - when there are fewer than 3 distinct sizes, when the fit is not convex (a <= 0), or when the
minimum lies at the edge of the grid (vertex outside the sizes tried, or the best observed point is the
smallest or largest size). The optimal size against compute is then fitted as a power law N_opt = k C^a.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
HUBER_SCALE = 0.02  # residual (in nats of log-perplexity, about 2% of perplexity) beyond which loss is linear
NUM_BOOTSTRAPS = 200
BOOTSTRAP_SEED = 0

FEWER_THAN_3 = "fewer than 3 points"
NON_CONVEX = "non-convex fit"
AT_EDGE = "minimum at edge of grid"
FALLBACK = "best observed point used"


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


def fit_parabola(x: np.ndarray, y: np.ndarray, huber_scale: float = HUBER_SCALE, max_iter: int = 100) -> Parabola:
    """Huber-robust parabola through (x, y), which needs at least 3 distinct x: minimises
    sum_i huber(r_i), quadratic for |r_i| <= huber_scale and linear beyond, by reweighted least squares
    with weights min(1, huber_scale / |r_i|), starting from the plain least-squares fit."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    assert len(np.unique(x)) >= 3, "a parabola needs at least 3 distinct x"
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

    num_points: int
    parabola: Parabola | None  # None with fewer than 3 distinct sizes
    x_opt: float  # log10 params of the optimum: the vertex, or the best observed point when flagged
    y_opt: float  # log ppl at x_opt: the parabola's value, or the observed one when flagged
    x_lo: float  # bootstrap 95% interval of the vertex (nan when there is no convex fit)
    x_hi: float
    num_bootstraps: int  # resamples that gave a convex fit (those the interval is taken from)
    best_index: int  # index of the best observed point in the inputs
    flag: str  # empty when the vertex is trusted; else why not, ending with FALLBACK

    @property
    def trusted(self) -> bool:
        return not self.flag


def _bootstrap_vertices(x: np.ndarray, y: np.ndarray, num: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vertices = []
    for _ in range(num):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) < 3:
            continue
        p = fit_parabola(x[idx], y[idx])
        if p.convex:
            vertices.append(p.vertex_x)
    return np.array(vertices)


def fit_isoflop(
    x: np.ndarray, y: np.ndarray, num_bootstraps: int = NUM_BOOTSTRAPS, seed: int = BOOTSTRAP_SEED
) -> VertexFit:
    """Fit one isoFLOP curve: x = log10(params), y = log(ppl), one entry per completed trial."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    assert len(x) == len(y) and len(x) > 0
    best = int(np.argmin(y))
    reasons: list[str] = []
    parabola = None
    x_lo = x_hi = float("nan")
    kept = 0
    if len(np.unique(x)) < 3:
        reasons.append(FEWER_THAN_3)
    else:
        parabola = fit_parabola(x, y)
        if not parabola.convex:
            reasons.append(NON_CONVEX)
        elif not (x.min() <= parabola.vertex_x <= x.max()) or x[best] in (x.min(), x.max()):
            reasons.append(AT_EDGE)
        if parabola.convex:
            vertices = _bootstrap_vertices(x, y, num_bootstraps, seed)
            kept = len(vertices)
            if kept:
                x_lo, x_hi = (float(v) for v in np.percentile(vertices, [2.5, 97.5]))
    if reasons:
        x_opt, y_opt, flag = float(x[best]), float(y[best]), "; ".join(reasons + [FALLBACK])
    else:
        x_opt, flag = parabola.vertex_x, ""
        y_opt = float(parabola(x_opt))
    return VertexFit(len(x), parabola, x_opt, y_opt, x_lo, x_hi, kept, best, flag)


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
