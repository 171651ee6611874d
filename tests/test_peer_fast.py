"""The fast PEER (model.PEER) computes what the simple reference (model.peer.PEERReference) computes, and
RowSparseAdam is AdamW on the rows a sparse gradient touches.

Checked for both kernel backends ("cpp": the C++ extension; "torch": plain torch ops) where available:
forward outputs and the gradients of every parameter and of the input, in float64 (tight) and float32
(float tolerance), over several layouts, gate and activation functions, with and without query BN, in train
and eval mode; a float64 training curve of a tiny Transformer; the row-sparse kernels and optimizer against
dense math; the sparse-gradient all-reduce on two gloo ranks.
"""

import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from model import ModelConfig, PEER, build_model
from model import peer_kernels
from model.peer import PEERReference
from model.sparse_adam import (ExpertTableOptimizer, RowSparseAdam, all_reduce_row_sparse_grads,
                               clip_row_sparse_grads_, expert_tables)

BACKENDS = ["torch"] + (["cpp"] if peer_kernels._cpp() is not None else [])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("PEER_KERNELS", request.param)
    return request.param


def twin_layers(dtype, **kwargs):
    ref = PEERReference(**kwargs).to(dtype)
    fast = PEER(**kwargs).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def forward_backward(layer, x, weight):
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * weight).sum().backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return y.detach(), x.grad, grads


LAYOUTS = [  # (dim, num_experts, heads, top_k, query_dim)
    (16, 64, 2, 4, 8), (24, 256, 3, 1, 8), (32, 1024, 4, 8, 16), (8, 16, 1, 4, 4),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("score_fn,activation", [("softmax", "gelu"), ("sigmoid", "relu"), ("softmax", "relu"),
                                                 ("sigmoid", "gelu")])
@pytest.mark.parametrize("query_bn", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fast_peer_matches_reference_float64(backend, layout, score_fn, activation, query_bn, mode):
    dim, num_experts, heads, top_k, query_dim = layout
    torch.manual_seed(hash((layout, score_fn, activation, query_bn, mode)) % 2**31)
    ref, fast = twin_layers(torch.float64, dim=dim, num_experts=num_experts, heads=heads, top_k=top_k,
                            query_dim=query_dim, query_bn=query_bn, activation=activation, score_fn=score_fn)
    if mode == "eval":  # non-trivial running statistics first
        for layer in (ref, fast):
            layer.train()(torch.randn(64, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    ref.train(mode == "train"), fast.train(mode == "train")
    x = torch.randn(3, 7, dim, dtype=torch.float64)
    weight = torch.randn(3, 7, dim, dtype=torch.float64)
    y_ref, gx_ref, g_ref = forward_backward(ref, x, weight)
    y, gx, g = forward_backward(fast, x, weight)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-10, atol=1e-12, msg=name)
    if mode == "train" and query_bn:
        torch.testing.assert_close(fast.query_norm.running_var, ref.query_norm.running_var)


@pytest.mark.parametrize("num_experts,heads,top_k", [(64**2, 8, 16), (32**2, 2, 32), (64**2, 4, 8)])
def test_fast_peer_matches_reference_float32(backend, num_experts, heads, top_k):
    torch.manual_seed(num_experts + heads)
    dim = 64
    ref, fast = twin_layers(torch.float32, dim=dim, num_experts=num_experts, heads=heads, top_k=top_k,
                            query_dim=32)
    x, weight = torch.randn(2, 50, dim), torch.randn(2, 50, dim)
    y_ref, gx_ref, g_ref = forward_backward(ref, x, weight)
    y, gx, g = forward_backward(fast, x, weight)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    for name in g_ref:
        scale = g_ref[name].abs().max()
        torch.testing.assert_close(g[name] / scale, g_ref[name] / scale, rtol=1e-4, atol=1e-5, msg=name)


def test_sparse_grads_are_the_touched_rows_of_the_dense_grads(backend):
    torch.manual_seed(0)
    ref, fast = twin_layers(torch.float64, dim=16, num_experts=1024, heads=2, top_k=4, query_dim=8)
    fast.sparse_grad = True
    x, weight = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    _, _, g_ref = forward_backward(ref, x, weight)
    _, _, g = forward_backward(fast, x, weight)
    _, indices = fast.retrieve(x)
    for name in ("w_down.weight", "w_up.weight"):
        assert g[name].is_sparse
        assert torch.equal(g[name]._indices()[0], indices.unique())  # exactly the retrieved rows, sorted, unique
        torch.testing.assert_close(g[name].to_dense(), g_ref[name])


def test_fast_peer_trains_like_reference_float64():
    """A tiny Transformer's loss curve (AdamW, 20 steps) with the fast layer equals the reference's in float64
    (float32 curves of this tiny model amplify summation-order differences: see tests/test_model_golden.py)."""
    import model.transformer as transformer

    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=8,
                      sparse={"method": "peer", "num_experts": 256, "heads": 2, "top_k": 4, "query_dim": 8})

    def curve():
        torch.manual_seed(3)
        model = build_model(cfg).double()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        g = torch.Generator().manual_seed(4)
        losses = []
        for _ in range(20):
            seq = torch.randint(0, 64, (4, 9), generator=g)
            loss = F.cross_entropy(model(seq[:, :-1]).reshape(-1, 64), seq[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    fast = curve()
    saved = transformer.PEER
    transformer.PEER = PEERReference
    try:
        ref = curve()
    finally:
        transformer.PEER = saved
    assert fast == pytest.approx(ref, rel=1e-9)


def test_kernels_match_dense_math(backend):
    torch.manual_seed(0)
    R, M, D, N = 9, 5, 12, 7  # N < R*M: rows repeat
    x, W, c = torch.randn(R, D, dtype=torch.float64), torch.randn(N, D, dtype=torch.float64), torch.randn(R, M, dtype=torch.float64)
    idx = torch.randint(0, N, (R, M))
    torch.testing.assert_close(peer_kernels.gather_dot(x, W, idx), torch.einsum("rd,rmd->rm", x, W[idx]))
    torch.testing.assert_close(peer_kernels.weighted_bag(idx, W, c), torch.einsum("rm,rmd->rd", c, W[idx]))
    rows, G = peer_kernels.row_grads(idx, N, (c, x))
    dense = torch.zeros(N, D, dtype=torch.float64).index_add_(0, idx.reshape(-1), (c[..., None] * x[:, None]).reshape(-1, D))
    assert torch.equal(rows, idx.unique())
    torch.testing.assert_close(G, dense[rows])
    S = torch.randn(6, 40)
    vals, cols = peer_kernels.topk_rows(S, 5)
    ref_vals, ref_cols = S.topk(5, dim=-1)
    assert torch.equal(vals, ref_vals) and torch.equal(cols, ref_cols)


@pytest.mark.parametrize("num_sub,half,top_k", [(128, 64, 16), (20, 3, 5), (37, 8, 20), (16, 4, 16), (33, 5, 33),
                                                (64, 16, 1), (48, 7, 40), (64, 8, 8), (16, 8, 8)])
def test_product_key_topk_float32_is_exact(backend, num_sub, half, top_k):
    """The float32 C++ retrieval (scores in registers, candidates above a group-maxima bound) returns the exact
    top-k over all S^2 composed keys, for S not a multiple of 16 and k above 16 too."""
    torch.manual_seed(num_sub * 1000 + half * 10 + top_k)
    q = torch.randn(200, 2 * half)
    sub_keys = torch.randn(2, num_sub, half)
    scores, indices = peer_kernels.product_key_topk(q, sub_keys, top_k)
    keys = torch.cat([sub_keys[0].repeat_interleave(num_sub, 0), sub_keys[1].repeat(num_sub, 1)], -1).double()
    ref_scores, ref_indices = (q.double() @ keys.t()).topk(top_k, dim=-1)
    assert torch.equal(indices.sort(-1).values, ref_indices.sort(-1).values)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=1e-5, atol=1e-5)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all()), "scores sorted descending"


def test_product_key_topk_survives_nan_queries(backend):
    q = torch.randn(6, 16)
    q[2] = float("nan")
    scores, indices = peer_kernels.product_key_topk(q, torch.randn(2, 32, 8), 8)
    assert bool(((indices >= 0) & (indices < 32 * 32)).all())
    assert bool(scores[2].isnan().all()) and not bool(scores[[0, 1, 3, 4, 5]].isnan().any())


def test_dense_row_grads_match_dense_math(backend):
    torch.manual_seed(2)
    R, M, D, N = 300, 6, 10, 17
    idx, c, X = torch.randint(0, N, (R, M)), torch.randn(R, M, dtype=torch.float64), torch.randn(R, D, dtype=torch.float64)
    dense = torch.zeros(N, D, dtype=torch.float64).index_add_(0, idx.reshape(-1), (c[..., None] * X[:, None]).reshape(-1, D))
    torch.testing.assert_close(peer_kernels.dense_row_grads(idx, N, c, X), dense)


def test_row_grads_of_large_tables_and_reused_buffers(backend):
    """Gradients larger than the cache are written with streaming stores; a released buffer is written in place."""
    torch.manual_seed(3)
    R, M, D, N = 60_000, 2, 128, 200_000  # U ~ 90k touched rows: 2 x U x D x 4 bytes > 64 MiB
    idx, X, Y = torch.randint(0, N, (R, M)), torch.randn(R, D), torch.randn(R, D)
    c1, c2 = torch.randn(R, M), torch.randn(R, M)
    buffers = [torch.empty(R * M, D), torch.empty(R * M, D)]
    rows, G1, G2 = peer_kernels.row_grads(idx, N, (c1, X), (c2, Y), out=buffers)
    for c, Z, G in ((c1, X, G1), (c2, Y, G2)):
        dense = torch.zeros(N, D).index_add_(0, idx.reshape(-1), (c[..., None] * Z[:, None]).reshape(-1, D))
        torch.testing.assert_close(G, dense[rows])
    if backend == "cpp":
        assert G1.data_ptr() == buffers[0].data_ptr() and G2.data_ptr() == buffers[1].data_ptr()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_row_sparse_adam_is_adamw_on_touched_rows(backend, weight_decay):
    torch.manual_seed(0)
    N, D = 50, 8
    table = torch.nn.Parameter(torch.randn(N, D, dtype=torch.float64))
    dense = torch.nn.Parameter(table.detach().clone())
    initial = table.detach().clone()
    sparse_opt = RowSparseAdam([table], lr=0.05, betas=(0.8, 0.95), weight_decay=weight_decay)
    dense_opt = torch.optim.AdamW([dense], lr=0.05, betas=(0.8, 0.95), weight_decay=weight_decay)
    always = torch.arange(0, 10)  # touched every step: exactly AdamW
    never = torch.arange(40, 50)  # never touched: unchanged
    for step in range(6):
        rows = torch.cat([always, torch.randint(10, 40, (5,))]).unique()
        values = torch.randn(rows.numel(), D, dtype=torch.float64)
        table.grad = torch.sparse_coo_tensor(rows[None], values, (N, D))
        sparse_opt.step()
        dense.grad = torch.zeros(N, D, dtype=torch.float64).index_copy_(0, rows, values)
        dense_opt.step()
        torch.testing.assert_close(table.detach()[always], dense.detach()[always])
    assert torch.equal(table.detach()[never], initial[never])
    assert not torch.equal(dense.detach()[never], initial[never]) or weight_decay == 0


def test_row_sparse_adam_on_dense_grads_is_adamw(backend):
    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.randn(20, 6))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a, opt_b = RowSparseAdam([a], lr=0.01, weight_decay=0.1), torch.optim.AdamW([b], lr=0.01, weight_decay=0.1)
    for _ in range(4):
        g = torch.randn(20, 6)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step(), opt_b.step()
    torch.testing.assert_close(a.detach(), b.detach())


def test_clip_row_sparse_grads():
    p, q = torch.nn.Parameter(torch.zeros(10, 3)), torch.nn.Parameter(torch.zeros(4, 3))
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1, 7]]), torch.full((3, 3), 2.0), (10, 3))  # row 1 twice
    q.grad = torch.full((4, 3), 1.0)
    norm = clip_row_sparse_grads_([p, q], max_norm=1.0)
    expected = (4.0**2 * 3 + 2.0**2 * 3 + 12) ** 0.5
    assert norm.item() == pytest.approx(expected)
    total = (p.grad.to_dense().norm() ** 2 + q.grad.norm() ** 2) ** 0.5
    assert total.item() == pytest.approx(1.0, rel=1e-5)


def test_expert_tables_lists_every_peer_table():
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=3, n_heads=2, max_seq_len=8,
                      sparse={"method": "peer", "num_experts": 64, "heads": 2, "top_k": 4, "query_dim": 8})
    model = build_model(cfg)
    tables = expert_tables(model)
    peers = [m for m in model.modules() if isinstance(m, PEER)]
    assert len(tables) == 2 * len(peers) > 0
    assert all(t.shape == (64, 16) for t in tables)


def test_expert_table_optimizer_beside_adamw_is_adamw_when_every_row_is_touched(backend):
    """The trial's row_sparse split - ExpertTableOptimizer for the tables, AdamW for the rest, the schedule's lr
    handed to both - trains exactly like one AdamW over everything when every expert is retrieved every step
    (16 experts, 64 tokens) and nothing is clipped."""
    cfg = ModelConfig(vocab_size=32, d_model=8, n_layers=1, n_heads=2, max_seq_len=16,
                      sparse={"method": "peer", "num_experts": 16, "heads": 2, "top_k": 4, "query_dim": 4,
                              "query_bn": False})
    torch.manual_seed(0)
    split, whole = build_model(cfg).double(), build_model(cfg).double()
    whole.load_state_dict(split.state_dict())
    hyper = dict(betas=(0.9, 0.95), weight_decay=0.1)
    tables = ExpertTableOptimizer(split, lr=1e-2, grad_clip=None, **hyper)
    rest = [p for p in split.parameters() if not tables.is_table(p)]
    assert len(rest) + 2 == len(list(split.parameters())) and all(t.grad is None for t in tables.tables)
    rest_opt = torch.optim.AdamW(rest, lr=1e-2, **hyper)
    whole_opt = torch.optim.AdamW(whole.parameters(), lr=1e-2, **hyper)
    for step, lr in enumerate((1e-2, 5e-3, 2e-3)):
        tokens = torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(step))
        for model in (split, whole):
            F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        assert all(t.grad.is_sparse for t in tables.tables)
        for group in rest_opt.param_groups + whole_opt.param_groups:
            group["lr"] = lr
        tables.step(lr)
        rest_opt.step(), whole_opt.step()
        rest_opt.zero_grad(), whole_opt.zero_grad()
        assert all(t.grad is None for t in tables.tables)  # released: the layer may reuse its buffers
    for (name, a), b in zip(split.named_parameters(), whole.parameters()):
        torch.testing.assert_close(a, b, msg=name)
    assert tables.state_dict()["state"][0]["step"] == 3


def _all_reduce_worker(rank, port, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    p = torch.nn.Parameter(torch.zeros(10, 2))
    rows = [torch.tensor([1, 4, 4]), torch.tensor([4, 9])][rank]
    p.grad = torch.sparse_coo_tensor(rows[None], torch.ones(rows.numel(), 2) * (rank + 1), (10, 2))
    all_reduce_row_sparse_grads([p])
    results[rank] = p.grad.to_dense()
    dist.destroy_process_group()


def test_all_reduce_row_sparse_grads_averages_over_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_all_reduce_worker, args=(port, results), nprocs=2)
    expected = torch.zeros(10, 2)
    expected[1], expected[4], expected[9] = 0.5, (2 * 1 + 2) / 2, 1.0
    for rank in range(2):
        torch.testing.assert_close(results[rank], expected)


def test_sparse_grads_accumulate_and_released_buffers_are_reused(backend):
    """Gradient buffers are reused across steps only once released: a kept gradient is never overwritten."""
    torch.manual_seed(0)
    layer = PEER(dim=16, num_experts=1024, heads=2, top_k=4, query_dim=8, query_bn=False, sparse_grad=True)
    x1, x2 = torch.randn(20, 16), torch.randn(20, 16)
    layer(x1).sum().backward()
    first = layer.w_up.weight.grad.to_dense().clone()
    layer.zero_grad(set_to_none=True)
    layer(x2).sum().backward()
    second = layer.w_up.weight.grad.to_dense().clone()
    layer(x1).sum().backward()  # accumulates onto the kept gradient of x2
    torch.testing.assert_close(layer.w_up.weight.grad.to_dense(), first + second)
    layer.zero_grad(set_to_none=True)
    layer(x1).sum().backward()
    torch.testing.assert_close(layer.w_up.weight.grad.to_dense(), first)


@pytest.mark.parametrize("top_k", [4, 8, 9, 16, 20])
def test_product_key_topk_float32_is_exact_under_ties(backend, top_k):
    """Small integer queries and keys: many composed scores tie, also across the k-th place. The result is a
    top-k all the same: the k best scores, each at an index whose score it is, no index twice."""
    torch.manual_seed(top_k)
    num_sub, half = 64, 4
    q = torch.randint(-1, 2, (300, 2 * half)).float()
    sub_keys = torch.randint(-1, 2, (2, num_sub, half)).float()
    scores, indices = peer_kernels.product_key_topk(q, sub_keys, top_k)
    keys = torch.cat([sub_keys[0].repeat_interleave(num_sub, 0), sub_keys[1].repeat(num_sub, 1)], -1)
    all_scores = q @ keys.t()
    assert torch.equal(scores, all_scores.topk(top_k, dim=-1).values)
    assert torch.equal(all_scores.gather(1, indices), scores)
    assert bool((indices.sort(-1).values.diff(dim=-1) > 0).all()), "no index twice"


def test_pkm_value_read_matches_embedding_bag(backend):
    """PKM reads its values through the project's kernels (weighted_rows: weighted_bag forward, dense_row_grads
    and gather_dot backward) instead of F.embedding_bag, whose CPU backward sorted every index each step: the
    same output and gradients of every parameter and of the input, up to float summation order."""
    from model.pkm import PKM

    torch.manual_seed(0)
    layer = PKM(24, 4096, 4, 16, 16).train()
    x, weight = torch.randn(2048, 24), torch.randn(2048, 24)
    y, g_x, grads = forward_backward(layer, x, weight)

    def embedding_bag_forward(inp):
        scores, indices = layer.retrieve(inp)
        bags = indices.reshape(-1, layer.heads * layer.top_k)
        weights = scores.softmax(dim=-1).reshape(bags.shape)
        return F.embedding_bag(bags, layer.values, per_sample_weights=weights, mode="sum").view_as(inp)

    layer.zero_grad(set_to_none=True)
    x_ref = x.clone().requires_grad_()
    y_ref = embedding_bag_forward(x_ref)
    (y_ref * weight).sum().backward()
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_x, x_ref.grad, rtol=1e-5, atol=1e-6)
    for name, p in layer.named_parameters():  # sums of thousands of terms: to rounding of the largest
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-5 * p.grad.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("top_k", [1, 4, 8, 12, 16])
def test_topk_softmax_is_softmax(top_k):
    """The gates of PEER and PKM: torch's softmax, forward and backward, up to float rounding, on retrieval
    scores (sorted descending), including a row of equal scores and rows far from zero."""
    from model.peer_ops import topk_softmax

    torch.manual_seed(top_k)
    scores = (torch.randn(512, 4, top_k) * 3).sort(-1, descending=True).values
    scores[0, 0] = 1.5
    scores[1, 0] += 200.0  # a row far from zero: exp overflows float32 unless a score is subtracted
    scores[2, 0, 0] += 200.0  # a first score far above the rest: unless it is the one subtracted
    scores.requires_grad_()
    weight = torch.randn_like(scores)
    gates = topk_softmax(scores)
    (g,) = torch.autograd.grad((gates * weight).sum(), scores)
    ref = scores.detach().requires_grad_()
    (g_ref,) = torch.autograd.grad((ref.softmax(-1) * weight).sum(), ref)
    torch.testing.assert_close(gates, ref.softmax(-1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
