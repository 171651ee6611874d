"""Chinchilla Approach 3 (Hoffmann et al. 2022, section 3.3) as Besiroglu et al. 2024 refit it.

Per method, the final loss (nats per token) of every completed isoFLOP trial is modelled as
    L(N, D) = E + A / N^alpha + B / D^beta,
N = backbone parameters, D = training tokens, fitted in the form log L = LSE(a - alpha log N,
b - beta log D, e) (A = e^a, B = e^b, E = e^e) by minimising the Huber loss (delta 1e-3) of the error in log L
from a grid of starts. Starting points: the grid of the Chinchilla paper (alpha, beta in 0..2 step 0.5, e in
-1..1 step 0.5, a, b in 0..25 step 5: 4500 points); the objective is evaluated at all of them, the best
`NUM_STARTS` descend together (a batched Levenberg-Marquardt on the Huber weights: scipy's L-BFGS-B took
0.5-2 s per start on the shared 2-core machine, 100x this), and L-BFGS-B polishes the best end point.
The compute-optimal point of a budget C lies on D = C / f(N), f the training FLOPs per token, taken from the
trials as a power law of N per method; L(N, C / f(N)) is minimised over N on a fine grid of log N spanning the
trained sizes widened by a factor 4 each way.
Intervals: 2.5-97.5 percentiles over `NUM_BOOTSTRAPS` refits on trials resampled with replacement (seeded),
each started from the full fit and descended to convergence (Besiroglu et al.: the published fit's intervals
were implausibly narrow because it had not converged).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

HUBER_DELTA = 1e-3
NUM_STARTS = 16
NUM_BOOTSTRAPS = 100
BOOTSTRAP_SEED = 0
MIN_TRIALS = 8  # five parameters: fewer trials would fit any data
_GRID = np.array(np.meshgrid(np.arange(0, 26, 5.0), np.arange(0, 26, 5.0), np.arange(-1, 1.01, 0.5),
                             np.arange(0, 2.01, 0.5), np.arange(0, 2.01, 0.5), indexing="ij")).reshape(5, -1).T
# columns of _GRID and of every parameter vector: a, b, e, alpha, beta


def _terms(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """(K, n, 3) the three log-terms of L-hat for K parameter vectors."""
    a, b, e, alpha, beta = (theta[:, i, None] for i in range(5))
    return np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, a.shape[:1] + log_n.shape)], axis=2)


def _huber(r: np.ndarray) -> np.ndarray:
    r = np.abs(r)
    return np.where(r <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (r - 0.5 * HUBER_DELTA))


def objective(theta: np.ndarray, weights: np.ndarray, log_n, log_d, log_loss) -> np.ndarray:
    """Weighted sum of Huber losses of log L-hat - log L, for each of K parameter vectors (K, 5) and data
    weights (K, n) (the multiplicities of a bootstrap resample; ones for the data as it is)."""
    r = logsumexp(_terms(theta, log_n, log_d), axis=2) - log_loss
    return (weights * _huber(r)).sum(axis=1)


def _minimise(theta: np.ndarray, weights: np.ndarray, log_n, log_d, log_loss, max_iter: int = 200) -> np.ndarray:
    """Levenberg-Marquardt on iteratively reweighted least squares (Huber weights min(1, delta / |r|)),
    K problems at once; a step is taken only where it lowers the Huber objective, so each problem descends
    monotonically to a stationary point of the same objective L-BFGS minimises."""
    theta, lam = theta.copy(), np.full(len(theta), 1e-3)
    current = objective(theta, weights, log_n, log_d, log_loss)
    for _ in range(max_iter):
        terms = _terms(theta, log_n, log_d)
        r = logsumexp(terms, axis=2) - log_loss
        w = softmax(terms, axis=2)
        jac = np.stack([w[..., 0], w[..., 1], w[..., 2], -w[..., 0] * log_n, -w[..., 1] * log_d], axis=2)
        u = weights * np.minimum(1.0, HUBER_DELTA / np.maximum(np.abs(r), 1e-300))
        hess = np.einsum("kni,kn,knj->kij", jac, u, jac)
        grad = np.einsum("kni,kn->ki", jac, u * r)
        damped = hess + lam[:, None, None] * np.eye(5) * np.diagonal(hess, axis1=1, axis2=2)[:, None, :] \
            + 1e-10 * np.eye(5)
        step = np.linalg.solve(damped, -grad[..., None])[..., 0]
        trial = objective(theta + step, weights, log_n, log_d, log_loss)
        better = trial < current
        gain = np.where(better, (current - trial) / np.maximum(current, 1e-300), 0.0)
        theta[better], current[better] = theta[better] + step[better], trial[better]
        lam = np.where(better, lam / 3, lam * 4)
        if np.all((better & (gain < 1e-9)) | (lam > 1e8)):
            break
    return theta


def _fit(log_n, log_d, log_loss) -> tuple[np.ndarray, float, bool]:
    """The best of NUM_STARTS descents from the best grid points, polished by L-BFGS."""
    ones = np.ones((1, len(log_n)))
    grid_losses = objective(_GRID, np.ones((len(_GRID), len(log_n))), log_n, log_d, log_loss)
    starts = _GRID[np.argsort(grid_losses)[:NUM_STARTS]]
    ends = _minimise(starts, np.ones((len(starts), len(log_n))), log_n, log_d, log_loss)
    best = ends[np.argmin(objective(ends, np.ones((len(ends), len(log_n))), log_n, log_d, log_loss))]
    res = minimize(_value_and_grad, best, args=(log_n, log_d, log_loss), jac=True, method="L-BFGS-B",
                   options={"maxiter": 1000, "gtol": 1e-12, "ftol": 1e-15})
    return res.x, float(res.fun), bool(np.abs(res.jac).max() < 1e-7)


def _value_and_grad(theta: np.ndarray, log_n, log_d, log_loss) -> tuple[float, np.ndarray]:
    terms = _terms(theta[None], log_n, log_d)[0]
    r = logsumexp(terms, axis=1) - log_loss
    w = softmax(terms, axis=1)
    dr = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # Huber's derivative
    grad = np.array([(dr * w[:, 0]).sum(), (dr * w[:, 1]).sum(), (dr * w[:, 2]).sum(),
                     -(dr * w[:, 0] * log_n).sum(), -(dr * w[:, 1] * log_d).sum()])
    return float(_huber(r).sum()), grad


@dataclass(frozen=True)
class ParametricFit:
    """L(N, D) = E + A / N^alpha + B / D^beta of one method, with its bootstrap refits."""

    theta: np.ndarray  # a, b, e, alpha, beta
    objective: float
    converged: bool
    num_trials: int
    flops_law: tuple[float, float]  # log f = c0 + c1 log N: training FLOPs per token against N
    log_n_range: tuple[float, float]  # the trained sizes
    boots: np.ndarray  # (num_bootstraps, 5) refitted parameters

    @property
    def params(self) -> dict[str, float]:
        a, b, e, alpha, beta = self.theta
        return {"E": float(np.exp(e)), "A": float(np.exp(a)), "alpha": float(alpha), "B": float(np.exp(b)),
                "beta": float(beta)}

    def optimum(self, budget: float, theta: np.ndarray | None = None) -> tuple[float, float]:
        """(N_opt, loss at N_opt) on the isoFLOP curve of `budget`."""
        a, b, e, alpha, beta = self.theta if theta is None else theta
        lo, hi = self.log_n_range
        log_n = np.linspace(lo - np.log(4), hi + np.log(4), 801)
        log_d = np.log(budget) - (self.flops_law[0] + self.flops_law[1] * log_n)
        log_loss = logsumexp(np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)]), axis=0)
        i = int(np.argmin(log_loss))
        return float(np.exp(log_n[i])), float(np.exp(log_loss[i]))

    def optimum_interval(self, budget: float) -> tuple[float, float, float, float]:
        """2.5-97.5 percentiles over the bootstrap refits: (N lo, N hi, loss lo, loss hi)."""
        if not len(self.boots):
            return (float("nan"),) * 4
        optima = np.array([self.optimum(budget, theta) for theta in self.boots])
        (n_lo, l_lo), (n_hi, l_hi) = np.percentile(optima, [2.5, 97.5], axis=0)
        return float(n_lo), float(n_hi), float(l_lo), float(l_hi)


def fit_parametric(params: np.ndarray, tokens: np.ndarray, loss: np.ndarray, flops_per_token: np.ndarray,
                   num_bootstraps: int | None = None, seed: int = BOOTSTRAP_SEED) -> ParametricFit:
    """Fit one method's trials: backbone parameters, training tokens, final loss (nats), and training FLOPs
    per token (for the isoFLOP curves of the optimum); `num_bootstraps` defaults to NUM_BOOTSTRAPS."""
    log_n, log_d = np.log(np.asarray(params, float)), np.log(np.asarray(tokens, float))
    log_loss = np.log(np.asarray(loss, float))
    assert len(log_n) >= MIN_TRIALS
    theta, objective, converged = _fit(log_n, log_d, log_loss)
    slope, intercept = np.polyfit(log_n, np.log(np.asarray(flops_per_token, float)), 1)
    rng = np.random.default_rng(seed)
    num = NUM_BOOTSTRAPS if num_bootstraps is None else num_bootstraps
    weights = rng.multinomial(len(log_n), np.full(len(log_n), 1 / len(log_n)), size=num).astype(float)
    boots = _minimise(np.repeat(theta[None], num, axis=0), weights, log_n, log_d, log_loss) if num else \
        np.zeros((0, 5))
    return ParametricFit(theta, objective, converged, len(log_n), (float(intercept), float(slope)),
                         (float(log_n.min()), float(log_n.max())), boots)
