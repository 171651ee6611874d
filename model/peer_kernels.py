"""Gather-and-reduce kernels behind the fast PEER layer (model/peer.py) and RowSparseAdam (model/sparse_adam.py).

PEER touches h*k rows of two (N, D) tables per token and nothing else, so every step is one of a few
row-wise primitives; none of them materialises the gathered (R, M, D) rows and none does work that grows
with N (beyond an O(N) int32 counting array in `row_grads`):
  gather_dot(x, W, idx)[r, m]   = x[r] . W[idx[r, m]]                        (down projection, d gates)
  weighted_bag(idx, W, c)[r]    = sum_m c[r, m] W[idx[r, m]]                 (up projection, d x)
  row_grads(idx, N, (c, X)...)  = sorted unique rows u of idx and, per pair, G[u] = sum over (r, m) with
                                  idx[r, m] = u of c[r, m] X[r]              (row-sparse table gradients)
  dense_row_grads(idx, N, c, X) = the same as a dense [N, D] sum, for small tables (the sub-keys)
  topk_rows(S, k)               = per-row top-k of a score matrix, sorted descending (ties: lower column first)
  product_key_topk(q, keys, k)  = the exact product-key top-k (model/product_keys.py), fused: in float32 the
                                  sub-key scores are computed in registers and only those above a proven lower
                                  bound of the k-th best are ranked; never a full (R, S) score matrix
  row_adam_(...)                = AdamW on the listed rows of a table, in place (see sparse_adam.py)
  empty_table(N, D)             = memory for a table read at random rows, in transparent huge pages

Shapes: R rows (tokens, or tokens x heads), M entries per row, D row width, N table rows, U unique rows.

Two backends with the same results up to float summation order:
- "cpp": a small C++ extension, model/csrc/peer_kernels.cpp (OpenMP via at::parallel_for, one pass over each
  gathered row, software prefetch of rows a few entries ahead), built on first use with
  torch.utils.cpp_extension.load (needs a C++ compiler and ninja; the build is cached under
  TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions). CPU, float32 and float64 only.
- "torch": plain torch ops (F.embedding_bag and its per-sample-weight backwards): any device and dtype, used
  where "cpp" does not apply or cannot be built; the path GPUs run. Its dense table gradients are summed in at
  least fp32, never materialise [R, M, D] and never sync with the host.
PEER_KERNELS=torch|cpp in the environment forces one; the default is "cpp" where it applies.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

_CSRC = Path(__file__).resolve().parent / "csrc"
_CPP_SOURCES = [_CSRC / "peer_kernels.cpp"]
_CPP_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-Wall", "-Wextra"]

_cpp_module = None
_cpp_error: str | None = None


def _build_name() -> str:
    """peer_kernels_<hash of the sources, their folder and the flags>: a build cached from other sources or
    flags is never loaded, and two checkouts of the same sources do not rebuild over each other (ninja builds
    again when a source's path changes)."""
    digest = hashlib.sha256(f"{_CSRC} {_CPP_FLAGS}".encode())
    for path in _CPP_SOURCES:
        digest.update(path.read_bytes())
    return f"peer_kernels_{digest.hexdigest()[:16]}"


def _cpp():
    """The compiled extension, built on first use; None where it cannot be built (reason in _cpp_error)."""
    global _cpp_module, _cpp_error
    if _cpp_module is None and _cpp_error is None:
        try:
            from torch.utils.cpp_extension import load

            _cpp_module = load(name=_build_name(), sources=[str(p) for p in _CPP_SOURCES],
                               extra_cflags=_CPP_FLAGS, extra_ldflags=["-fopenmp"])
        except Exception as e:  # no compiler, no ninja, ...: the torch backend still works
            _cpp_error = f"{type(e).__name__}: {e}"
            warnings.warn(f"PEER C++ kernels unavailable, using the torch backend ({_cpp_error[:200]})")
    return _cpp_module


def backend(*tensors: torch.Tensor) -> str:
    """'cpp' where the C++ kernels apply to these tensors (CPU, float32/float64) and can be built, else 'torch'."""
    choice = os.environ.get("PEER_KERNELS", "cpp")
    if choice not in ("cpp", "torch"):
        raise ValueError(f"PEER_KERNELS={choice!r}: expected 'cpp' or 'torch'")
    applies = all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
                  for t in tensors if t.is_floating_point())
    return "cpp" if choice == "cpp" and applies and _cpp() is not None else "torch"


def empty_table(rows: int, cols: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised [rows, cols] CPU tensor for a table read at random rows (PEER's experts, their optimizer
    state): backed by transparent huge pages where the C++ kernels apply, since with 4 KiB pages nearly every
    random row read of a 1 GiB table is also a TLB miss (gathers 1.5-1.8x slower at N = 1024^2). A no-op
    where the kernel does not back madvised memory with huge pages."""
    dtype = dtype or torch.get_default_dtype()
    if backend(torch.empty(0, dtype=dtype)) == "cpp":
        return _cpp().empty_huge([rows, cols], dtype)
    return torch.empty(rows, cols, dtype=dtype)


def _bag_offsets(R: int, M: int, device) -> torch.Tensor:
    return torch.arange(0, R * M, M, device=device)


def _bag_of_entry(R: int, M: int, device) -> torch.Tensor:
    """[R * M]: the bag (row r) of each flattened entry (r, m)."""
    return torch.arange(R, device=device).repeat_interleave(M)


# The kernels that do arithmetic are registered as torch ops (peer_sweeps::...) with FLOP formulas, so that
# torch.utils.flop_counter.FlopCounterMode counts PEER's and PKM's retrieval and experts, forward and
# backward, as it counts an einsum's.
@torch.library.custom_op("peer_sweeps::gather_dot", mutates_args=())
def gather_dot(x: torch.Tensor, W: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[R, M]: out[r, m] = x[r] . W[idx[r, m]]. x [R, D], W [N, D], idx [R, M] int64."""
    x, idx = x.contiguous(), idx.contiguous()
    if backend(x, W) == "cpp":
        return _cpp().gather_dot(x, W.contiguous(), idx)
    R, M = idx.shape
    # The per-sample-weight gradient of embedding_bag is exactly this gather-dot, computed row by row.
    flat = idx.reshape(-1)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        x, W, flat, _bag_offsets(R, M, x.device), _bag_of_entry(R, M, x.device), 0, -1
    ).view(R, M)


@torch.library.custom_op("peer_sweeps::weighted_bag", mutates_args=())
def weighted_bag(idx: torch.Tensor, W: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[R, D]: out[r] = sum_m c[r, m] W[idx[r, m]]."""
    idx, c = idx.contiguous(), c.contiguous()
    if backend(W, c) == "cpp":
        return _cpp().weighted_bag(idx, W.contiguous(), c)
    return F.embedding_bag(idx, W, per_sample_weights=c, mode="sum")


@gather_dot.register_fake
def _(x, W, idx):
    return x.new_empty(idx.shape)


@weighted_bag.register_fake
def _(idx, W, c):
    return W.new_empty(idx.shape[0], W.shape[1])


@register_flop_formula(torch.ops.peer_sweeps.gather_dot)
def _gather_dot_flops(x_shape, W_shape, idx_shape, out_shape=None, **kwargs) -> int:
    return 2 * idx_shape[0] * idx_shape[1] * W_shape[1]


@register_flop_formula(torch.ops.peer_sweeps.weighted_bag)
def _weighted_bag_flops(idx_shape, W_shape, c_shape, out_shape=None, **kwargs) -> int:
    return 2 * idx_shape[0] * idx_shape[1] * W_shape[1]


def row_grads(idx: torch.Tensor, N: int, *pairs: tuple[torch.Tensor, torch.Tensor],
              out: list[torch.Tensor] = ()) -> list[torch.Tensor]:
    """[rows [U] (sorted, unique), G_1 [U, D], ...]: G_j[u] = sum over idx[r, m] = rows[u] of c_j[r, m] X_j[r],
    every X_j [R, D] of one width (the cpp backend sums all pairs in one pass). `out`: optional buffers (cpp backend): G_j is the first U rows of out[j] where out[j] is large enough and
    no other tensor shares its memory, else fresh memory. The torch backend reads the touched rows out of
    `dense_row_grads` (O(N D) memory, never [R, M, D]); its torch.unique is a host sync, acceptable because
    row-sparse gradients are a CPU path (the dense path, `dense_row_grads`, is what GPUs run)."""
    out = list(out)
    rows, in_buffer, *grads = _row_grads_op(idx, N, [c for c, _ in pairs], [X for _, X in pairs], out)
    return [rows] + [out[j][: rows.numel()] if in_buffer[j] else G for j, G in enumerate(grads)]


# A torch op, so that FlopCounterMode sees the table gradients; an op may not return its inputs' memory, so
# a gradient written into out[j] comes back as an empty placeholder and in_buffer[j] = True.
@torch.library.custom_op("peer_sweeps::row_grads", mutates_args=("out",))
def _row_grads_op(idx: torch.Tensor, N: int, coefs: list[torch.Tensor], xs: list[torch.Tensor],
                  out: list[torch.Tensor]) -> list[torch.Tensor]:
    idx = idx.contiguous()
    coefs = [c.contiguous() for c in coefs]
    xs = [X.contiguous() for X in xs]
    if backend(*coefs, *xs) == "cpp":
        rows, *grads = _cpp().row_grads(idx, N, coefs, xs, out)
    else:
        rows = torch.unique(idx.reshape(-1), sorted=True)
        grads = [dense_row_grads(idx, N, c, X).index_select(0, rows) for c, X in zip(coefs, xs)]
    in_buffer = [j < len(out) and G.numel() > 0 and G.data_ptr() == out[j].data_ptr() for j, G in enumerate(grads)]
    grads = [G.new_empty(0) if used else G for G, used in zip(grads, in_buffer)]
    return [rows, torch.tensor(in_buffer)] + grads


@register_flop_formula(torch.ops.peer_sweeps.row_grads)
def _row_grads_flops(idx_shape, N, coefs_shapes, xs_shapes, out_shapes, out_shape=None, **kwargs) -> int:
    return sum(2 * idx_shape[0] * idx_shape[1] * X[1] for X in xs_shapes)


@torch.library.custom_op("peer_sweeps::dense_row_grads", mutates_args=())
def dense_row_grads(idx: torch.Tensor, N: int, c: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """G [N, D]: G[n] = sum over idx[r, m] = n of c[r, m] X[r], in X's dtype.

    cpp backend: for small tables (a dense copy per thread). torch backend: embedding_bag's per-sample-weight
    backward (sort and segment-sum on CUDA, a row-wise scatter on CPU), summed in at least fp32 whatever the
    inputs' dtype (a bf16 sum over the ~1,000 contributions a sub-key row gets per step loses most of them);
    no [R, M, D] tensor, no host sync."""
    idx, c, X = idx.contiguous(), c.contiguous(), X.contiguous()
    if backend(c, X) == "cpp":
        return _cpp().dense_row_grads(idx, N, c, X)
    R, M = idx.shape
    acc = torch.promote_types(X.dtype, torch.float32)
    no_bags = idx.new_empty(0)  # bag sizes and max indices: only read by the mean and max modes
    G = torch.ops.aten._embedding_bag_backward(
        X.to(acc), idx.reshape(-1), _bag_offsets(R, M, idx.device), _bag_of_entry(R, M, idx.device), no_bags,
        no_bags, N, False, 0, False, c.reshape(-1).to(acc), -1)
    return G.to(X.dtype)


@dense_row_grads.register_fake
def _(idx, N, c, X):
    return X.new_empty(N, X.shape[1])


@register_flop_formula(torch.ops.peer_sweeps.dense_row_grads)
def _dense_row_grads_flops(idx_shape, N, c_shape, X_shape, out_shape=None, **kwargs) -> int:
    return 2 * idx_shape[0] * idx_shape[1] * X_shape[1]


def topk_rows(S: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, columns), each [R, k]: per-row top-k of S [R, C], sorted descending."""
    if backend(S) == "cpp":
        vals, cols = _cpp().topk_rows(S.contiguous(), k)
        return vals, cols
    return S.topk(k, dim=-1)


@torch.library.custom_op("peer_sweeps::product_key_topk", mutates_args=())
def product_key_topk(q_RQ: torch.Tensor, sub_keys: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices), each [R, K]: the exact top-k of R queries over the S^2 composed keys (sorted descending)."""
    if backend(q_RQ, sub_keys) == "cpp":
        scores, indices = _cpp().product_key_topk(q_RQ, sub_keys.contiguous(), top_k)
        return scores, indices
    num_sub = sub_keys.shape[1]
    q1, q2 = q_RQ.chunk(2, dim=-1)
    top1, idx1 = (q1 @ sub_keys[0].t()).topk(top_k, dim=-1)  # (R, K)
    top2, idx2 = (q2 @ sub_keys[1].t()).topk(top_k, dim=-1)
    candidates = (top1.unsqueeze(-1) + top2.unsqueeze(-2)).flatten(-2)  # (R, K*K)
    scores, flat = candidates.topk(top_k, dim=-1)
    return scores, idx1.gather(-1, flat // top_k) * num_sub + idx2.gather(-1, flat % top_k)


@product_key_topk.register_fake
def _(q_RQ, sub_keys, top_k):
    shape = (q_RQ.shape[0], top_k)
    return q_RQ.new_empty(shape), q_RQ.new_empty(shape, dtype=torch.long)


@register_flop_formula(torch.ops.peer_sweeps.product_key_topk)
def _product_key_topk_flops(q_shape, sub_keys_shape, top_k, out_shape=None, **kwargs) -> int:
    """Every sub-key score of both halves (2 R S Q/2 multiply-adds: the float32 kernel bounds which scores it
    ranks, not which it computes), then the k^2 candidate sums (one FLOP each)."""
    return 2 * q_shape[0] * sub_keys_shape[1] * q_shape[1] + q_shape[0] * top_k * top_k


def row_adam_(param, exp_avg, exp_avg_sq, rows, grad, *, lr, beta1, beta2, eps, weight_decay,
              bias_correction1, bias_correction2) -> None:
    """AdamW on rows `rows` of param (and its moments), in place; grad [U, D] holds those rows' gradients."""
    if backend(param, grad) == "cpp":
        _cpp().row_adam_(param, exp_avg, exp_avg_sq, rows.contiguous(), grad.contiguous(), lr, beta1, beta2, eps,
                         weight_decay, bias_correction1, bias_correction2)
        return
    p, m, v = param.index_select(0, rows), exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows)
    p.mul_(1 - lr * weight_decay)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (v.sqrt() / bias_correction2**0.5).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bias_correction1)
    param.index_copy_(0, rows, p)
    exp_avg.index_copy_(0, rows, m)
    exp_avg_sq.index_copy_(0, rows, v)
