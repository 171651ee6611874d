"""PEER retrieval is exact, and PEER computes what the paper says it computes (sec. 2, Eq. 8)."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import PEER, PKM


def brute_force_topk(query, sub_keys, top_k):
    """Independent reference: score every one of the N composed keys [c_i; c'_j], then top-k."""
    num_sub = sub_keys.shape[-2]
    keys = torch.cat(  # (N, Q): key i * S + j = [sub_keys[0, i]; sub_keys[1, j]]
        [sub_keys[0].repeat_interleave(num_sub, dim=0), sub_keys[1].repeat(num_sub, 1)], dim=-1
    )
    assert keys.shape[0] == num_sub * num_sub
    return (query @ keys.t()).topk(top_k, dim=-1)


@pytest.mark.parametrize("num_experts,heads,top_k", [(16, 1, 1), (64, 2, 4), (256, 4, 8), (1024, 3, 32), (4096, 8, 16)])
def test_retrieve_equals_exhaustive_topk(num_experts, heads, top_k):
    torch.manual_seed(num_experts + heads + top_k)
    layer = PEER(dim=32, num_experts=num_experts, heads=heads, top_k=top_k, query_dim=16).double().eval()
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    scores, indices = layer.retrieve(x)
    assert scores.shape == indices.shape == (3, 5, heads, top_k)
    ref_scores, ref_indices = brute_force_topk(layer.query(x), layer.sub_keys.detach(), top_k)
    assert torch.equal(indices.sort(-1).values, ref_indices.sort(-1).values)
    torch.testing.assert_close(scores.sort(-1).values, ref_scores.sort(-1).values)


def test_retrieval_reaches_every_expert():
    """Combining the two halves as i * top_k + j (a published bug) leaves most experts unreachable."""
    torch.manual_seed(0)
    layer = PEER(dim=16, num_experts=64, heads=1, top_k=2, query_dim=8, query_bn=False)
    _, indices = layer.retrieve(torch.randn(4096, 16))
    assert indices.unique().numel() > 48


def test_large_expert_pool_retrieval_is_exact():
    torch.manual_seed(1)
    layer = PEER(dim=8, num_experts=1024**2, heads=2, top_k=4, query_dim=8, query_bn=False).double()
    x = torch.randn(6, 8, dtype=torch.float64)
    scores, indices = layer.retrieve(x)
    ref_scores, ref_indices = brute_force_topk(layer.query(x), layer.sub_keys.detach(), 4)
    assert torch.equal(indices.sort(-1).values, ref_indices.sort(-1).values)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_top1_peer_is_an_mlp_with_h_neurons(activation):
    """Eq. 8: with k = 1, f(x) = sum_h act(u_{i_h} . x) v_{i_h} - an MLP whose h hidden neurons are the
    retrieved experts (the softmax over one score is 1)."""
    torch.manual_seed(0)
    heads, dim = 6, 24
    layer = PEER(dim=dim, num_experts=256, heads=heads, top_k=1, query_dim=8, activation=activation).double().eval()
    act = {"gelu": F.gelu, "relu": F.relu}[activation]
    x = torch.randn(10, dim, dtype=torch.float64)
    _, ref_indices = brute_force_topk(layer.query(x), layer.sub_keys.detach(), 1)
    for token in range(x.shape[0]):
        experts = ref_indices[token, :, 0]  # h neurons
        w_in, w_out = layer.w_down.weight[experts], layer.w_up.weight[experts]  # (h, d) each
        mlp = act(x[token] @ w_in.t()) @ w_out
        torch.testing.assert_close(layer(x[token : token + 1])[0], mlp)


def test_gradients_reach_every_peer_parameter():
    torch.manual_seed(0)
    layer = PEER(dim=16, num_experts=64, heads=2, top_k=4, query_dim=8).train()
    layer(torch.randn(4, 7, 16)).pow(2).sum().backward()
    for name in ["query_proj.weight", "sub_keys", "query_norm.weight", "query_norm.bias", "w_down.weight", "w_up.weight"]:
        grad = dict(layer.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_sigmoid_scores_and_shapes():
    layer = PEER(dim=16, num_experts=64, heads=2, top_k=4, query_dim=8, score_fn="sigmoid")
    x = torch.randn(2, 3, 16)
    assert layer(x).shape == x.shape
    assert layer.query(x).shape == (2, 3, 2, 8)
    assert layer.sub_keys.shape == (2, 8, 4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_experts=50), "perfect square"),
    (dict(top_k=9), "sqrt(num_experts)=8"),
    (dict(query_dim=7), "even"),
    (dict(activation="tanh"), "activation"),
])
def test_invalid_peer_shapes_are_rejected(kwargs, message):
    args = dict(dim=16, num_experts=64, heads=2, top_k=4, query_dim=8) | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PEER(**args)


def test_pkm_retrieval_is_exact_per_head():
    torch.manual_seed(0)
    layer = PKM(dim=16, num_memories=256, heads=3, top_k=8, query_dim=8).double().eval()
    x = torch.randn(5, 16, dtype=torch.float64)
    scores, indices = layer.retrieve(x)
    q = layer.query(x)
    for h in range(3):
        _, ref = brute_force_topk(q[:, h], layer.sub_keys[h].detach(), 8)
        assert torch.equal(indices[:, h].sort(-1).values, ref.sort(-1).values)
    weights = scores.softmax(-1)
    expected = torch.einsum("nhk,nhkd->nd", weights, layer.values[indices])
    torch.testing.assert_close(layer(x), expected)


def test_pkm_gradients_match_the_reference_retrieval():
    from model.product_keys import product_key_topk

    torch.manual_seed(0)
    layer = PKM(dim=16, num_memories=256, heads=3, top_k=8, query_dim=8)
    x = torch.randn(4, 7, 16)
    loss_weights = torch.rand(4, 7, 3, 8)
    grads = []
    for retrieve in (layer.retrieve, lambda x: product_key_topk(layer.query(x), layer.sub_keys, layer.top_k)):
        layer.zero_grad()
        scores, indices = retrieve(x)
        (scores.softmax(-1) * loss_weights).sum().backward()
        grads.append([p.grad.clone() for p in (layer.sub_keys, layer.query_proj.weight)])
    for fast, reference in zip(*grads):
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
