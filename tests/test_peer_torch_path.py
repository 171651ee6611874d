"""PEER's torch kernel path (the one GPUs run, PEER_KERNELS=torch) and bf16, checked on CPU.

- The fast layer on the torch backend against the reference layer, in fp32 and bf16, with duplicate expert
  indices (a few experts, many heads: the same expert is retrieved many times per token and per batch) and
  tied scores (duplicated sub-keys).
- Its table gradients never materialise the gathered [R, M, D] rows: the largest tensor any op of a
  forward + backward allocates (counted by a TorchDispatchMode) is the same at h*k = 8 and h*k = 128.
- bf16: gradients summed over many rows (the sub-keys get ~1,000 contributions per row) are summed in fp32,
  and the query batch norm keeps fp32 statistics under a module-wide bf16 cast (what DeepSpeed's bf16 does).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model.peer import PEER, PEERReference, QueryBatchNorm


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("PEER_KERNELS", "torch")


def pair(dim=16, num_experts=16, heads=4, top_k=4, query_dim=8, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    reference = PEERReference(dim, num_experts, heads, top_k, query_dim).to(torch.float64)
    fast = PEER(dim, num_experts, heads, top_k, query_dim).to(torch.float64)
    fast.load_state_dict(reference.state_dict())
    return reference, fast.to(dtype)


def forward_backward(layer, x, grad_out):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad_out.to(y.dtype))
    grads = {name: p.grad.double() for name, p in layer.named_parameters()}
    return y.double(), x.grad.double(), grads


def retrieving(reference: PEERReference, indices: torch.Tensor) -> None:
    """Makes `reference` retrieve `indices` (scored by its own sub-keys, differentiably) instead of its top-k:
    in bf16 a near-tie can rank other experts than float64 does, which is rounding, not a bug."""
    def retrieve(x):
        q1, q2 = reference.query(x).chunk(2, dim=-1)  # [..., H, Q/2]
        rows, cols = indices // reference.sub_keys.shape[1], indices % reference.sub_keys.shape[1]
        scores = (q1.unsqueeze(-2) * reference.sub_keys[0][rows]).sum(-1)
        return scores + (q2.unsqueeze(-2) * reference.sub_keys[1][cols]).sum(-1), indices

    reference.retrieve = retrieve


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_torch_path_matches_reference_with_duplicate_indices_and_ties(dtype, tol, ties):
    """N = 16 experts, 4 heads x top-4: every token retrieves some experts twice, every expert ~400 times a
    batch; with ties, sub-key row 1 equals row 0 in both halves (experts 0*4+j and 1*4+j score the same). The
    reference runs in float64 on the layer's own (dtype-rounded) parameters and input; in bf16 it retrieves
    the experts the bf16 layer retrieved. Tolerance: of the largest entry, 1e-5 in fp32, 2e-2 in bf16 (bf16
    keeps 8 significant bits: 4e-3 per rounding)."""
    reference, fast = pair(dtype=dtype)
    if ties:
        with torch.no_grad():
            fast.sub_keys[:, 1] = fast.sub_keys[:, 0]
    reference.load_state_dict({k: v.double() for k, v in fast.state_dict().items()})
    x = torch.randn(2, 200, 16).to(dtype)
    grad_out = torch.randn(2, 200, 16)
    _, indices = fast.retrieve(x)
    assert (indices.unsqueeze(-1) == indices.flatten(-2).unsqueeze(-2).unsqueeze(-2)).sum(-1).gt(1).any()
    if dtype != torch.float32:
        retrieving(reference, indices)
    y_ref, gx_ref, g_ref = forward_backward(reference, x.double(), grad_out.double())
    y, gx, g = forward_backward(fast, x, grad_out)

    def error(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    assert error(y, y_ref) <= tol and error(gx, gx_ref) <= tol
    for name in g_ref:
        assert error(g[name], g_ref[name]) <= tol, name


def inside_project_op(mode: TorchDispatchMode, func, args, kwargs):
    """Runs one of the project's torch ops (peer_sweeps::..., registered for their FLOP formulas) by its
    Python body with `mode` active, so that the mode sees the aten ops inside it, not one opaque op."""
    from torch._library.custom_ops import OPDEFS

    with mode:
        return OPDEFS[func._schema.name]._init_fn(*args, **(kwargs or {}))


class LargestAllocation(TorchDispatchMode):
    """Counts the largest tensor (elements) any op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "peer_sweeps":
            return inside_project_op(self, func, args, kwargs)
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_allocation(heads: int, top_k: int, tokens=256, dim=256, num_experts=4096) -> int:
    torch.manual_seed(0)
    layer = PEER(dim, num_experts, heads, top_k, query_dim=16)
    x = torch.randn(tokens, dim, requires_grad=True)
    with LargestAllocation() as mode:
        layer(x).sum().backward()
    return mode.largest


def test_torch_path_peak_allocation_does_not_grow_with_heads_times_top_k():
    """At h*k = 128 the gathered rows would be tokens x 128 x dim = 8.4 M elements; the table gradients
    ([N, D] = 1 M elements) must stay the largest tensor, as at h*k = 8 (the retrieval's [tokens x h, k^2]
    candidate scores, 0.5 M at top-16, are the next largest)."""
    small, large = largest_allocation(heads=2, top_k=4), largest_allocation(heads=8, top_k=16)
    assert small == large == 4096 * 256


def test_row_gradients_in_bf16_are_summed_in_fp32():
    """dense_row_grads (the sub-keys' and, on GPUs, the tables' gradients) on bf16 inputs: 64 rows, 4096 x 16
    positive contributions, ~1,000 a row. A bf16 running sum stalls once the sum outgrows its addends
    (8 significant bits); summed in fp32 and rounded once, each row is within bf16's 2^-8 of the exact sum."""
    from model.peer_kernels import dense_row_grads

    torch.manual_seed(0)
    idx = torch.randint(0, 64, (4096, 16))
    c, X = torch.rand(4096, 16).bfloat16(), torch.rand(4096, 8).bfloat16()
    with ScatterSums() as sums:
        G = dense_row_grads(idx, 64, c, X)
    exact = dense_row_grads(idx, 64, c.double(), X.double())
    assert G.dtype == torch.bfloat16
    assert ((G.double() - exact).abs() / exact).max() <= 2**-8
    # CPU kernels may sum bf16 in fp32 internally, CUDA's atomics do not: the sum itself must be asked in fp32
    assert sums.dtypes and set(sums.dtypes) == {torch.float32}, sums.dtypes


class ScatterSums(TorchDispatchMode):
    """The result dtypes of the ops that sum many rows into one (index_add, embedding backwards)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "peer_sweeps":
            return inside_project_op(self, func, args, kwargs)
        out = func(*args, **(kwargs or {}))
        if any(name in func.__name__ for name in ("index_add", "embedding_bag_backward", "embedding_bag_dense")):
            self.dtypes.append(out.dtype)
        return out


def test_query_batch_norm_keeps_fp32_statistics_under_a_bf16_cast():
    """module.bfloat16() (DeepSpeed's bf16 mode) leaves the running statistics fp32; a bf16 input is
    normalised in fp32; 200 batches of N(0.03, 1.5^2) track the variance as fp32 does (bf16: 2.20)."""
    torch.manual_seed(0)
    norm = QueryBatchNorm(8).bfloat16()
    assert norm.weight.dtype == torch.bfloat16
    assert norm.running_mean.dtype == norm.running_var.dtype == torch.float32
    fp32 = torch.nn.BatchNorm1d(8)
    for _ in range(200):
        batch = torch.randn(256, 8) * 1.5 + 0.03
        out = norm(batch.bfloat16())
        fp32(batch.bfloat16().float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(norm.running_var, fp32.running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.running_mean, fp32.running_mean, rtol=1e-5, atol=1e-6)
    assert norm.running_var.mean().item() == pytest.approx(2.25, abs=0.03)
    norm.eval()
    x = torch.randn(16, 8)
    torch.testing.assert_close(norm(x.bfloat16()).float(), fp32.eval()(x.bfloat16().float()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("layer", ["peer", "pkm"])
def test_every_gradient_sum_over_rows_of_a_bf16_layer_is_taken_in_fp32(layer):
    """The whole backward of a bf16 PEER or PKM layer: sub-keys, expert tables, PKM's values."""
    from model.pkm import PKM

    torch.manual_seed(0)
    module = (PEER(16, 256, 4, 4, 8) if layer == "peer" else PKM(16, 256, 4, 4, 8)).bfloat16()
    with ScatterSums() as sums:
        module(torch.randn(512, 16).bfloat16()).float().square().sum().backward()
    assert len(sums.dtypes) >= 2 and set(sums.dtypes) == {torch.float32}, sums.dtypes
    assert all(p.grad.dtype == torch.bfloat16 for p in module.parameters())
