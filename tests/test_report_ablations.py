"""The paper's ablations as shipped study files plan into what the report's Fig. 3 and Table 2 need: isoFLOP
curves (several sizes) per setting with seeds and a dense reference, h and k varied jointly, query BN on and
off with seeds - all on the default study's data suite and vocabulary."""

from collections import Counter

import pytest

from peer_sweeps.plan import load_and_plan, load_study

DEFAULT = load_study("studies/isoflop.yaml")


@pytest.mark.parametrize("name", ["experts", "active_experts", "query_bn"])
def test_ablation_is_on_the_default_data_with_seeds(name):
    study, trials = load_and_plan(f"studies/{name}.yaml")
    assert (study.data.suite, study.data.vocab_size) == (DEFAULT.data.suite, DEFAULT.data.vocab_size)
    assert len(study.training.seeds) >= 3
    cells = Counter((t.method, t.model["d_model"], t.budget_flops, str(t.model["sparse"])) for t in trials)
    assert set(cells.values()) == {len(study.training.seeds)}  # every cell once per seed


def test_fig3a_has_isoflop_curves_per_number_of_experts_and_a_dense_reference():
    _, trials = load_and_plan("studies/experts.yaml")
    peer = [t for t in trials if t.method == "peer"]
    sizes = {n: {t.model["d_model"] for t in peer if t.model["sparse"]["num_experts"] == n}
             for n in {t.model["sparse"]["num_experts"] for t in peer}}
    assert len(sizes) >= 4 and all(len(s) >= 3 for s in sizes.values())
    dense = {t.model["d_model"] for t in trials if t.method == "dense"}
    assert dense == set.union(*sizes.values())
    assert all(abs(t.total_flops / t.budget_flops - 1) <= 0.01 for t in trials)


def test_fig3b_varies_heads_and_top_k_jointly():
    _, trials = load_and_plan("studies/active_experts.yaml")
    pairs = {(t.model["sparse"]["heads"], t.model["sparse"]["top_k"]) for t in trials if t.method == "peer"}
    assert len({h for h, _ in pairs}) >= 3 and len({k for _, k in pairs}) >= 3
    assert len({h * k for h, k in pairs}) == len(pairs) >= 5
