"""The scaling-law fits of the report recover what tests/synthetic_results.py planted: isoFLOP vertices
(with noise and an outlier), flags for an edge minimum, a 2-point budget and a concave curve, the power law
of the optimal size, and the other evaluation sets' perplexity at the optimum."""

import numpy as np
import pytest
from scipy.optimize import least_squares

from peer_sweeps.report.fits import AT_EDGE, FEWER_THAN_3, NON_CONVEX, fit_isoflop, fit_parabola, lower_envelope
from peer_sweeps.report.results import load_results
from peer_sweeps.report.tables import isoflop_curves, optimal_table, power_laws
from synthetic_results import (
    BUDGETS,
    EDGE,
    METHODS,
    OUTLIER,
    SET_OFFSETS,
    TWO_POINTS,
    true_vertex,
    write_synthetic_results,
)

VERTEX_TOLERANCE = 0.05  # log10 params: 12%


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    results = load_results(write_synthetic_results(tmp_path_factory.mktemp("synthetic")))
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


def test_vertices_land_where_planted(curves):
    by_key, _ = curves
    assert set(by_key) == {(m, b) for m in METHODS for b in BUDGETS}
    for key, c in by_key.items():
        if key in (EDGE, TWO_POINTS):
            continue
        assert c.fit.flag == "", key
        assert abs(c.fit.x_opt - true_vertex(*key)) < VERTEX_TOLERANCE, key
        assert c.fit.x_lo <= c.fit.x_opt <= c.fit.x_hi, key
        assert c.fit.num_bootstraps > 150


def test_huber_fit_resists_the_outlier(curves):
    c = curves[0][OUTLIER]
    x, y = np.log10(c.points["params_backbone"].to_numpy(float)), np.log(c.points["ppl"].to_numpy(float))
    a, b, _ = np.polyfit(x, y, 2)
    assert abs(-b / (2 * a) - true_vertex(*OUTLIER)) > 0.3  # the outlier does drag a plain fit away
    assert abs(c.fit.x_opt - true_vertex(*OUTLIER)) < VERTEX_TOLERANCE


def test_edge_minimum_and_two_point_budget_are_flagged(curves):
    by_key, _ = curves
    edge, two = by_key[EDGE], by_key[TWO_POINTS]
    assert edge.fit.flag.startswith(AT_EDGE) and "best observed point used" in edge.fit.flag
    assert two.fit.flag.startswith(FEWER_THAN_3) and two.fit.num_points == 2
    for c in (edge, two):  # the fallback is the best observed trial
        best = c.points["ppl"].idxmin()
        assert c.params_opt == pytest.approx(c.points.loc[best, "params_backbone"])
        assert c.ppl_opt == pytest.approx(c.points.loc[best, "ppl"])


def test_concave_curve_is_flagged():
    x = np.array([6.0, 6.2, 6.4, 6.6, 6.8])
    fit = fit_isoflop(x, 3.5 - 0.3 * (x - 6.4) ** 2)
    assert fit.flag.startswith(NON_CONVEX)
    assert fit.x_opt in (6.0, 6.8)


def test_optimal_table_and_power_law(curves):
    by_key, eval_sets = curves
    optimal = optimal_table(list(by_key.values()), eval_sets)
    trusted = optimal[optimal["flag"] == ""]
    # other sets: their own parabolas at the primary vertex, planted at a fixed log-perplexity offset
    for name in eval_sets[1:]:
        ratio = trusted[f"ppl_opt_{name}"] / trusted["ppl_opt"]
        np.testing.assert_allclose(ratio, np.exp(SET_OFFSETS[name]), rtol=0.01)
    np.testing.assert_allclose(optimal[f"ppl_opt_{eval_sets[0]}"], optimal["ppl_opt"])
    table, laws = power_laws(optimal)
    assert laws["dense"].exponent == pytest.approx(0.5, abs=0.03)
    assert laws["peer"].exponent == pytest.approx(0.5, abs=0.03)
    assert "moe" not in laws and "pkm" not in laws  # each has a flagged budget: 2 trusted of 3
    assert table.set_index("method").loc["moe", "note"].startswith("2 trusted")


def test_lower_envelope_is_best_so_far():
    xs, best = lower_envelope(np.array([3.0, 1.0, 2.0, 4.0]), np.array([5.0, 9.0, 7.0, 6.0]))
    assert list(xs) == [1.0, 2.0, 3.0, 4.0] and list(best) == [9.0, 7.0, 5.0, 5.0]
