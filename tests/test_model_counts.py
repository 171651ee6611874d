"""Parameter and FLOP accounting of ModelConfig matches the built model and torch's FLOP counter."""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import ModelConfig, build_model, unevenness, usage
from model.flops import (forward_flops_breakdown, forward_flops_per_token, params_active, params_total,
                         train_flops_per_token)

BASE = dict(vocab_size=384, d_model=64, n_layers=4, n_heads=4, max_seq_len=32)
SPARSE = {
    "dense": None,
    "moe_ec": {"method": "moe", "num_experts": 8},
    "moe_tc": {"method": "moe", "num_experts": 8, "routing": "token_choice", "top_k": 2},
    "pkm": {"method": "pkm", "num_experts": 256, "heads": 2, "top_k": 4, "query_dim": 16},
    "peer": {"method": "peer", "num_experts": 1024, "heads": 4, "top_k": 8, "query_dim": 16},
    "peer_nobn": {"method": "peer", "num_experts": 256, "heads": 2, "top_k": 4, "query_dim": 16, "query_bn": False},
}


@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize("tie", [True, False])
def test_params_total_equals_numel(name, tie):
    cfg = ModelConfig(**BASE, sparse=SPARSE[name], tie_embeddings=tie, sparse_layers=(1, 3) if name == "peer" else None)
    model = build_model(cfg)
    assert params_total(cfg) == sum(p.numel() for p in model.parameters())


def test_params_active_by_hand():
    d, V, T, L, F = 64, 384, 32, 4, 256
    cfg = ModelConfig(**BASE, sparse=SPARSE["peer"])
    embeddings = (V + T) * d
    block = 2 * 2 * d + 4 * d * d  # two layer norms, attention
    dense_blocks = 3 * (block + 2 * d * F)
    # PEER block: query map 64 x (4 heads x 16), batch norm 2 x 64, sub-keys 32 x 16, 4 heads x top-8 experts of u, v
    peer_block = block + 64 * 64 + 2 * 64 + 32 * 16 + 4 * 8 * 2 * d
    assert params_active(cfg) == embeddings + dense_blocks + peer_block + 2 * d
    moe = ModelConfig(**BASE, sparse=SPARSE["moe_tc"])
    assert params_active(moe) == embeddings + dense_blocks + block + 64 * 8 + 2 * (2 * d * F) + 2 * d
    dense = ModelConfig(**BASE)
    assert params_active(dense) == params_total(dense) == embeddings + 4 * (block + 2 * d * F) + 2 * d


def counted_forward_flops(cfg, batch=2):
    model = build_model(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len))
    # The counter has no formula for the fused CPU attention kernel; the math backend lowers it to bmm.
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(idx)
    return counter.get_total_flops() / (batch * cfg.max_seq_len)


def test_dense_flops_match_flop_counter():
    for seq_len in (32, 128):
        cfg = ModelConfig(**(BASE | {"max_seq_len": seq_len}))
        assert forward_flops_per_token(cfg) == pytest.approx(counted_forward_flops(cfg), rel=0.01)
        assert train_flops_per_token(cfg) == 3 * forward_flops_per_token(cfg)


@pytest.mark.parametrize("name", ["moe_ec", "moe_tc", "pkm", "peer"])
def test_sparse_forward_flops_match_flop_counter(name):
    cfg = ModelConfig(**BASE, sparse=SPARSE[name])
    parts = forward_flops_breakdown(cfg)
    assert parts["router"] > 0 and parts["experts"] > 0
    assert forward_flops_per_token(cfg) == pytest.approx(counted_forward_flops(cfg), rel=0.01)


def counted_train_flops(cfg, batch=4):
    """FlopCounterMode over one forward and backward pass, per token (math attention, as above)."""
    model = build_model(cfg).train()
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(idx).float().square().mean().backward()
    return counter.get_total_flops() / (batch * cfg.max_seq_len)


def shipped_cpu_models() -> dict[str, ModelConfig]:
    """Every distinct model of the shipped CPU studies (studies/*.yaml; the paper's studies are the same
    layers at sizes a test cannot build here)."""
    from pathlib import Path

    from peer_sweeps.plan import plan_study
    from peer_sweeps.study import load_study

    models = {}
    for path in sorted(Path(__file__).parent.parent.glob("studies/*.yaml")):
        for trial in plan_study(load_study(path)):
            models.setdefault(f"{path.stem}: {trial.label.split(' seed=')[0].rsplit(' ', 2)[0]}", trial.model_config)
    return models


def test_train_flops_match_flop_counter_for_every_shipped_model():
    """train_flops_per_token is what forward + backward compute, within 5%, for every method and size of the
    shipped studies (the sparse retrieval's backward as the kernels do it, not 3 x forward)."""
    models = shipped_cpu_models()
    errors = {label: train_flops_per_token(cfg) / counted_train_flops(cfg) - 1 for label, cfg in models.items()}
    assert {cfg.method for cfg in models.values()} == {"dense", "moe", "pkm", "peer"}
    assert max(abs(e) for e in errors.values()) < 0.05, {k: f"{e:+.1%}" for k, e in errors.items() if abs(e) >= 0.05}


def test_flops_breakdown_of_paper_peer_layer():
    """Research note: N = 1024^2, h = 8, k = 16, d = 1024, d_q = 256: retrieval costs more than the experts."""
    cfg = ModelConfig(vocab_size=32000, d_model=1024, n_layers=12, n_heads=16, max_seq_len=2048,
                      sparse={"method": "peer", "num_experts": 1024**2, "heads": 8, "top_k": 16, "query_dim": 256})
    p = forward_flops_breakdown(cfg)
    assert p["router"] == 2 * 1024 * 8 * 256
    assert p["subkey_scoring"] == 2 * 8 * 1024 * 256
    assert p["candidate_sums"] == 8 * 16**2
    assert p["experts"] == 4 * 8 * 16 * 1024
    assert p["router"] + p["subkey_scoring"] > p["experts"]


def test_usage_and_unevenness_on_hand_made_distributions():
    n = 1024
    assert usage(torch.ones(n)) == 1.0
    assert unevenness(torch.ones(n)) == pytest.approx(0.0, abs=1e-12)
    one_expert = torch.zeros(n)
    one_expert[7] = 3.5
    assert usage(one_expert) == 1 / n
    assert unevenness(one_expert) == pytest.approx(math.log(n))
    half = torch.cat([torch.ones(n // 2), torch.zeros(n // 2)])
    assert unevenness(half) == pytest.approx(math.log(2))


def test_routing_stats_accumulate_over_an_eval_pass():
    cfg = ModelConfig(**BASE, sparse=SPARSE["peer"])
    model = build_model(cfg).eval()
    model.collect_routing_stats(True)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (2, 32)))
    (scores,) = model.routing_scores()
    # softmax gates of each head sum to 1: total mass = tokens x heads
    assert scores.sum().item() == pytest.approx(2 * 32 * 4)
    model.collect_routing_stats(False)
    assert scores.sum().item() == 0
