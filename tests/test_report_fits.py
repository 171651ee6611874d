"""The scaling-law fits of the report recover what tests/synthetic_results.py planted (three seeds per cell):
isoFLOP vertices (with noise and an outlier), the seed noise, flags for an edge minimum, a 2-size budget, a
concave curve and a fit whose residuals are large next to the noise, the power law of the optimal size; and
a compute-optimal perplexity that is always a trained model's (a collapsed right arm keeps its minimum)."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.optimize import least_squares

from peer_sweeps.report.fits import (
    AT_EDGE,
    FEWER_THAN_3,
    LARGE_RESIDUALS,
    NON_CONVEX,
    fit_isoflop,
    fit_parabola,
    lower_envelope,
)
from peer_sweeps.report.results import load_results
from peer_sweeps.report.tables import completed_isoflop, isoflop_curves, noise_model, optimal_table, power_laws
from synthetic_results import (
    BUDGETS,
    EDGE,
    METHODS,
    OUTLIER,
    SET_OFFSETS,
    TWO_POINTS,
    curve_table,
    true_vertex,
    write_synthetic_results,
)

VERTEX_TOLERANCE = 0.05  # log10 params: 12%
NOISE = 0.004  # the synthetic study's seed noise (sd of log-perplexity)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return load_results(write_synthetic_results(tmp_path_factory.mktemp("synthetic"), noise=NOISE))


@pytest.fixture(scope="module")
def curves(results):
    return {(c.method, c.budget): c for c in isoflop_curves(results)}, results.eval_sets


def test_reweighted_fit_equals_scipy_huber():
    rng = np.random.default_rng(1)
    x = np.linspace(5, 7, 9)
    y = 0.4 * (x - 6.2) ** 2 + 3 + rng.normal(0, 0.01, len(x))
    y[3] += 0.5
    ours = fit_parabola(x, y, huber_scale=0.02)
    u = x - ours.x_ref
    ref = least_squares(lambda p: p[0] * u**2 + p[1] * u + p[2] - y, np.polyfit(u, y, 2), loss="huber",
                        f_scale=0.02, xtol=1e-14, ftol=1e-14, gtol=1e-14).x
    np.testing.assert_allclose([ours.a, ours.b, ours.c], ref, atol=1e-6)


def test_seed_noise_is_measured(results):
    noise = noise_model(completed_isoflop(results))
    for method in METHODS:
        assert noise.per_method[method].sd == pytest.approx(NOISE, rel=0.25), method
        assert noise.per_method[method].dof >= 30
    assert noise.pooled.sd == pytest.approx(NOISE, rel=0.1)


def test_vertices_land_where_planted(curves):
    by_key, _ = curves
    assert set(by_key) == {(m, b) for m in METHODS for b in BUDGETS}
    for key, c in by_key.items():
        if key in (EDGE, TWO_POINTS, OUTLIER):
            continue
        assert c.fit.flag == "", key
        assert abs(c.fit.x_opt - true_vertex(*key)) < VERTEX_TOLERANCE, key
        assert c.interval.n == 3 and c.interval.lo < c.fit.y_opt < c.interval.hi, key
        assert c.fit.huber_scale == pytest.approx(1.345 * NOISE / np.sqrt(3), rel=0.3)


def test_outlier_moves_no_vertex_but_is_flagged(curves):
    c = curves[0][OUTLIER]
    x, y = np.log10(c.sizes["params_backbone"].to_numpy(float)), c.sizes["log_ppl"].to_numpy()
    a, b, _ = np.polyfit(x, y, 2)
    assert abs(-b / (2 * a) - true_vertex(*OUTLIER)) > 0.3  # the outlier does drag a plain fit away
    assert abs(c.fit.parabola.vertex_x - true_vertex(*OUTLIER)) < VERTEX_TOLERANCE
    assert LARGE_RESIDUALS in c.fit.flag  # a 40% jump is ~100 standard errors: the fit is not trusted


def test_edge_minimum_and_two_size_budget_are_flagged(curves):
    by_key, _ = curves
    edge, two = by_key[EDGE], by_key[TWO_POINTS]
    assert edge.fit.flag.startswith(AT_EDGE) and "best trained size used" in edge.fit.flag
    assert two.fit.flag.startswith(FEWER_THAN_3) and two.fit.num_points == 2
    for c in (edge, two):  # the fallback is the best trained size, its perplexity the mean over seeds
        best = c.sizes["log_ppl"].idxmin()
        assert c.params_opt == pytest.approx(c.sizes.loc[best, "params_backbone"])
        assert c.ppl_opt == pytest.approx(np.exp(c.sizes.loc[best, "log_ppl"]))


def test_concave_curve_is_flagged():
    x = np.array([6.0, 6.2, 6.4, 6.6, 6.8])
    fit = fit_isoflop(x, 3.5 - 0.3 * (x - 6.4) ** 2, np.full(5, 0.01))
    assert fit.flag.startswith(NON_CONVEX)
    assert fit.x_opt in (6.0, 6.8)


@pytest.mark.parametrize("ppl", [
    [89.3, 70.8, 65.5, 97.2],  # dense at 1.5e11 in a fresh-clone run: the old fit reported 69.8
    [92.8, 81.4, 79.1, 151.2],  # dense at 8e10: the old fit reported 77.4 at a vertex of 2.0k parameters
])
def test_collapsed_right_arm_keeps_its_minimum(tmp_path, ppl):
    params = [768, 3072, 6912, 12288]  # d8, d16, d24, d32 at one layer
    pq.write_table(curve_table("dense", 1.5e11, params, [ppl]), tmp_path / "trials.parquet")
    results = load_results(tmp_path)
    optimal = optimal_table(isoflop_curves(results), results.eval_sets)
    assert len(optimal) == 1
    # never worse than the best trained model, never below it
    assert optimal["ppl_opt"].iloc[0] == pytest.approx(min(ppl), rel=1e-9)


def test_optimal_table_and_power_law(curves):
    by_key, eval_sets = curves
    optimal = optimal_table(list(by_key.values()), eval_sets)
    for name in eval_sets[1:]:  # the other sets: the same trials, planted at a fixed offset (+ noise)
        ratio = optimal[f"ppl_opt_{name}"] / optimal["ppl_opt"]
        np.testing.assert_allclose(ratio, np.exp(SET_OFFSETS[name]), rtol=0.02)
    np.testing.assert_allclose(optimal[f"ppl_opt_{eval_sets[0]}"], optimal["ppl_opt"])
    assert (optimal["ppl_lo95"] < optimal["ppl_opt"]).all() and (optimal["ppl_opt"] < optimal["ppl_hi95"]).all()
    table, laws = power_laws(optimal)
    assert laws["dense"].exponent == pytest.approx(0.5, abs=0.03)
    assert "moe" not in laws and "pkm" not in laws and "peer" not in laws  # each has a flagged budget
    assert table.set_index("method").loc["moe", "note"].startswith("2 trusted")


def test_lower_envelope_is_best_so_far():
    xs, best = lower_envelope(np.array([3.0, 1.0, 2.0, 4.0]), np.array([5.0, 9.0, 7.0, 6.0]))
    assert list(xs) == [1.0, 2.0, 3.0, 4.0] and list(best) == [9.0, 7.0, 5.0, 5.0]


def test_approach3_recovers_a_planted_law_and_matches_lbfgs():
    """Loss from L = E + A/N^alpha + B/D^beta (Chinchilla's fitted values) at 5 budgets x 5 sizes with 0.2%
    noise: the fit recovers E, alpha and beta, and no L-BFGS run from the grid's best starts goes lower."""
    from scipy.optimize import minimize as scipy_minimize

    from peer_sweeps.report import parametric

    rng = np.random.default_rng(0)
    budgets, sizes = np.logspace(17, 19, 5), np.logspace(-0.6, 0.6, 5)
    n = np.concatenate([10 ** (6 + 0.5 * np.log10(c / 1e17)) * sizes for c in budgets])
    d = np.repeat(budgets, 5) / (6 * n)
    loss = (1.69 + 406.4 / n**0.34 + 410.7 / d**0.28) * np.exp(rng.normal(0, 0.002, len(n)))
    fit = parametric.fit_parametric(n, d, loss, 6 * np.ones_like(n), num_bootstraps=20)
    assert fit.converged
    assert fit.params["E"] == pytest.approx(1.69, rel=0.1)
    assert fit.params["alpha"] == pytest.approx(0.34, abs=0.05) and fit.params["beta"] == pytest.approx(0.28, abs=0.05)
    args = (np.log(n), np.log(d), np.log(loss))
    starts = parametric._GRID[np.argsort(parametric.objective(parametric._GRID, np.ones((len(parametric._GRID), len(n))),
                                                              *args))[:3]]
    for start in starts:
        ref = scipy_minimize(parametric._value_and_grad, start, args=args, jac=True, method="L-BFGS-B")
        assert fit.objective <= ref.fun + 1e-9
    n_lo, n_hi, _, _ = fit.optimum_interval(1e18)
    assert n_lo <= fit.optimum(1e18)[0] <= n_hi
