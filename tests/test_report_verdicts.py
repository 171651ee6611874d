"""Verdicts (`verdicts.csv`, CONTRACT.md) from a synthetic study with a known difference and a known seed
noise: PEER planted 5% better than dense, MoE 5% worse, PKM equal; each is called so at every budget. The
intervals over seeds have their nominal coverage, every verdict agrees with its interval, one seed gives no
interval (and no claim), and the report's headline follows `verdicts.csv`."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from peer_sweeps.report import write_report
from peer_sweeps.report.results import load_results
from peer_sweeps.report.seeds import compare, log_pct, verdict
from peer_sweeps.report.tables import isoflop_curves, verdicts_table
from synthetic_results import EDGE, TWO_POINTS, synthetic_tables

pytestmark = pytest.mark.usefixtures("few_bootstraps")

GAIN = {"dense": 0.0, "moe": -0.05, "pkm": 0.0, "peer": 0.05}  # log-perplexity below dense
EXPECTED = {"moe": "worse", "pkm": "indistinguishable", "peer": "better"}


def _verdicts(tmp_path, seeds: int) -> pd.DataFrame:
    trials, _ = synthetic_tables(noise=0.01, seeds=seeds, gain=GAIN)
    pq.write_table(trials, tmp_path / "trials.parquet")
    return verdicts_table(isoflop_curves(load_results(tmp_path)))


def test_known_differences_are_called_correctly(tmp_path):
    verdicts = _verdicts(tmp_path, seeds=5)
    against_dense = verdicts[verdicts["baseline"] == "dense"]
    assert len(against_dense) == 9  # 3 methods x 3 budgets
    for _, r in against_dense.iterrows():
        if (r["method"], r["budget_flops"]) == TWO_POINTS:
            continue  # two sizes only: its best trained size is truly ~1% off its optimum
        assert r["verdict"] == EXPECTED[r["method"]], (r["method"], r["budget_flops"])
        assert r["n_seeds"] == 5 and r["interval"] == "paired over 5 seeds"
        if (r["method"], r["budget_flops"]) != EDGE:  # near the truth (grid points are up to 0.5% off it)
            assert r["change_lo"] - 0.5 <= log_pct(-GAIN[r["method"]]) <= r["change_hi"] + 0.5
    peer_vs = verdicts[verdicts["method"] == "peer"].set_index(["baseline", "budget_flops"])["verdict"]
    assert (peer_vs.loc["moe"] == "better").all()  # 10% apart


def test_verdicts_agree_with_their_intervals(tmp_path):
    verdicts = _verdicts(tmp_path, seeds=3)
    for _, r in verdicts.iterrows():
        assert r["change_lo"] <= r["change_pct"] <= r["change_hi"]
        expected = "better" if r["change_hi"] < 0 else "worse" if r["change_lo"] > 0 else "indistinguishable"
        assert r["verdict"] == expected
    assert verdict(-3.0, -0.1) == "better" and verdict(0.1, 2.0) == "worse" and verdict(-1.0, 1.0) == verdict(
        float("nan"), float("nan")) == "indistinguishable"


def test_one_seed_gives_no_interval_and_no_claim(tmp_path):
    verdicts = _verdicts(tmp_path, seeds=1)
    assert verdicts["change_lo"].isna().all() and verdicts["change_hi"].isna().all()
    assert (verdicts["verdict"] == "indistinguishable").all()
    assert (verdicts.loc[verdicts["method"] == "peer", "change_pct"] < 0).all()  # the point estimate is kept


@pytest.mark.parametrize("paired", [True, False])
def test_intervals_cover_the_true_change_95_percent_of_the_time(paired):
    rng = np.random.default_rng(0)
    true_log, sd, seeds, trials = 0.03, 0.02, 3, 2000
    covered = 0
    for _ in range(trials):
        a = true_log + rng.normal(0, sd, seeds)
        b = rng.normal(0, sd, seeds)
        change = compare(dict(enumerate(a)), dict(enumerate(b)) if paired else {s + 10: v for s, v in enumerate(b)})
        covered += change.lo <= log_pct(true_log) <= change.hi
    assert 0.93 <= covered / trials <= 0.97


def test_headline_follows_verdicts(tmp_path):
    trials, _ = synthetic_tables(noise=0.01, seeds=3, gain=GAIN)
    pq.write_table(trials, tmp_path / "trials.parquet")
    out = write_report(tmp_path)
    verdicts = pd.read_csv(out / "verdicts.csv")
    assert list(verdicts.columns[:7]) == ["budget_flops", "method", "baseline", "change_pct", "change_lo",
                                          "change_hi", "verdict"]
    md = (out / "report.md").read_text()
    headline = md.split("equal compute?** ", 1)[1].split("\n", 1)[0]
    of_peer = verdicts[verdicts["method"] == "peer"]
    better = (of_peer["verdict"] == "better").sum()
    assert headline.startswith("Yes." if better == len(of_peer) else "No." if better == 0 else "Partly.")
    for baseline, rows in of_peer.groupby("baseline"):
        counts = rows["verdict"].value_counts()
        said = ", ".join(f"{v} at {counts[v]}" for v in ("better", "indistinguishable", "worse") if v in counts)
        assert f"against {baseline if baseline == 'dense' else baseline.upper().replace('MOE', 'MoE')}: {said} of" \
            f" {len(rows)} budget(s)" in headline
    assert "[-" in headline and "[no interval]" not in headline
    assert "Seed noise" in md and "seed_noise.csv" in md
