"""End to end: `write_report` on the synthetic study (isoFLOP and ablation trials, failed and diverged ones)
writes every file CONTRACT.md names, an HTML page that embeds its images, `optimal.csv` with the contract
columns and a summary computed from the data; partial results (no curves, only failures, nothing, a
corrupt file) still give a report that says what is missing."""

import base64
import re

import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest


from peer_sweeps.report import write_report
from peer_sweeps.report.write import answer
from synthetic_results import ABLATION_STUDY, EVAL_SETS, STUDY, synthetic_tables, write_synthetic_results

pytestmark = pytest.mark.usefixtures("few_bootstraps")

FIGURES = ["isoflop.png", "frontier.png", "ablations.png", "ablation_isoflop.png", "usage.png", "curves_isoflop.png",
           "curves_ablation.png"]
TABLES = ["optimal.csv", "verdicts.csv", "seed_noise.csv", "isoflop_fits.csv", "approach3.csv", "parametric_fits.csv", "power_laws.csv", "table1.csv", "iso_time.csv", "ablations.csv",
          "table2.csv", "failed_trials.csv", "status_counts.csv"]
CONTRACT_COLUMNS = (["method", "budget_flops", "params_opt", "ppl_opt"] + [f"ppl_opt_{s}" for s in EVAL_SETS]
                    + ["ppl_lo95", "ppl_hi95", "n_seeds", "n_sizes", "ppl_vertex"]  # ours, beside the contract's
                    + ["n_points", "flag"])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    results = write_synthetic_results(tmp_path_factory.mktemp("study"))
    out = write_report(results)
    assert out == results / "report"
    return out, pq.read_table(results / "trials.parquet").to_pandas()


def test_every_file_is_written(report):
    out, _ = report
    for name in ["report.md", "report.html"] + FIGURES + TABLES:
        assert (out / name).stat().st_size > 0, name
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_embeds_its_images(report):
    out, _ = report
    page = (out / "report.html").read_text()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(sources) == len(FIGURES)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert {base64.b64decode(s.split(",", 1)[1]) for s in sources} == {(out / f).read_bytes() for f in FIGURES}
    assert "http://" not in page and "https://" not in page and "<link" not in page


def test_optimal_csv_has_the_contract_columns(report):
    out, _ = report
    optimal = pd.read_csv(out / "optimal.csv", keep_default_na=False)
    assert list(optimal.columns) == CONTRACT_COLUMNS
    assert len(optimal) == 12  # 4 methods x 3 budgets
    flags = optimal.set_index(["method", "budget_flops"])["flag"]
    assert flags[("moe", 1e19)].startswith("minimum at edge of grid")
    assert flags[("pkm", 1e17)].startswith("fewer than 3 sizes")
    assert flags[("peer", 1e18)].startswith("residuals large next to the seed noise")  # the planted outlier
    assert (flags == "").sum() == 9


def test_markdown_summary_and_failures(report):
    out, trials = report
    md = (out / "report.md").read_text()
    assert STUDY in md and ABLATION_STUDY in md
    assert "| all | 302 | 16 | 1 | 319 |" in md  # kind, completed, failed, diverged, total (3 seeds)
    assert "equal compute?** Yes. " in md
    assert "against dense: better at 3 of 3 budget(s)" in md and "against MoE: better at 3 of 3 budget(s)" in md
    for figure in FIGURES:
        assert f"]({figure})" in md
    for _, row in trials[trials["status"] != "completed"].iterrows():
        assert row["trial_id"] in md and row["error"] in md
    table2 = pd.read_csv(out / "table2.csv")
    query_bn = table2[table2["budget_flops"] == 1e18]
    assert len(query_bn) == 8 and set(query_bn["query_bn"]) == {True, False}  # 4 num_experts x query BN
    assert len(table2) == 8 + 6  # and the Fig. 3a curves: 2 num_experts x 3 sizes
    assert (table2["n_trials"] % 3 == 0).all()  # the seeds of each setting averaged
    done = trials[(trials["kind"] == "ablation") & (trials["status"] == "completed")]
    for _, row in query_bn.iterrows():  # how often an expert is retrieved in training, from the trials' own counts
        same = done[(done["num_experts"] == row["num_experts"]) & (done["budget_flops"] == row["budget_flops"])
                    & (done["params_backbone"] == row["params_backbone"]) & (done["query_bn"] == row["query_bn"])
                    & (done["expert_heads"] == row["expert_heads"]) & (done["top_k"] == row["top_k"])]
        expected = same["tokens"].mean() * row["expert_heads"] * row["top_k"] / row["num_experts"]
        assert row["retrievals_per_expert"] == pytest.approx(expected)
    assert f"Here {table2['retrievals_per_expert'].min():,.0f} to" in md and "not the paper's levels" in md


def test_answer_follows_the_verdicts():
    optimal = pd.DataFrame({"method": ["dense", "peer", "dense", "peer"], "budget_flops": [1e18, 1e18, 1e19, 1e19],
                            "ppl_opt": [30.0, 33.0, 25.0, 24.0], "flag": ["", "", "", "minimum at edge of grid"]})
    verdicts = pd.DataFrame({"budget_flops": [1e18, 1e19], "method": ["peer", "peer"], "baseline": ["dense", "dense"],
                             "change_pct": [10.0, -4.0], "change_lo": [4.0, float("nan")],
                             "change_hi": [16.0, float("nan")], "verdict": ["worse", "indistinguishable"]})
    text = answer(verdicts, optimal, (100.0, {"dense": 29.0, "peer": 31.0}, {"dense": 10.0, "peer": 50.0}))
    assert text.startswith("No.") and "indistinguishable at 1, worse at 1 of 2 budget(s)" in text
    assert "1e18 +10.0% [+4.0, +16.0]" in text and "1e19 -4.0% [no interval]" in text
    assert "counted indistinguishable, whatever its sign" in text
    assert "PEER is ahead of none of them" in text
    verdicts.loc[0, ["change_hi", "verdict"]] = [-1.0, "better"]
    assert answer(verdicts, optimal, (float("nan"), {}, {})).startswith("Partly.")
    assert "PEER has no trial that short (its fastest took 150 s)" in answer(
        verdicts, optimal, (100.0, {"dense": 29.0}, {"dense": 10.0, "peer": 150.0}))
    assert "cannot be compared" in answer(verdicts, optimal[optimal["method"] == "dense"], (float("nan"), {}, {}))


def test_report_without_curves(tmp_path):
    write_synthetic_results(tmp_path, curves=False)
    out = write_report(tmp_path, tmp_path / "elsewhere")
    md = (out / "report.md").read_text()
    assert "`curves.parquet` is missing." in md
    assert not (out / "curves_isoflop.png").exists() and (out / "isoflop.png").exists()


def test_report_when_every_trial_failed(tmp_path):
    write_synthetic_results(tmp_path, all_failed=True)
    out = tmp_path / "report"
    out.mkdir()
    (out / "isoflop.png").write_bytes(b"stale")  # from an earlier report: must not survive
    write_report(tmp_path)
    md = (out / "report.md").read_text()
    assert "No isoFLOP trial has completed yet" in md
    assert "| all | 0 | 319 | 0 | 319 |" in md
    assert not any((out / f).exists() for f in FIGURES)
    assert list(pd.read_csv(out / "optimal.csv").columns) == CONTRACT_COLUMNS
    assert "<img" not in (out / "report.html").read_text()


def test_report_of_an_empty_or_corrupt_directory(tmp_path):
    md = (write_report(tmp_path) / "report.md").read_text()
    assert "`trials.parquet` is missing." in md and "`curves.parquet` is missing." in md
    (tmp_path / "trials.parquet").write_bytes(b"PAR1 half written")
    md = (write_report(tmp_path) / "report.md").read_text()
    assert "`trials.parquet` could not be read" in md


def test_report_of_one_budget(tmp_path):
    trials, _ = synthetic_tables()
    pq.write_table(trials.filter(pc.equal(trials["budget_flops"], 1e18)), tmp_path / "trials.parquet")
    out = write_report(tmp_path)
    laws = pd.read_csv(out / "power_laws.csv")
    assert laws["params_exponent"].isna().all()
    assert (out / "frontier.png").exists() and (out / "isoflop.png").exists()
