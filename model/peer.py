"""PEER: Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts", sec. 2).

N single-neuron experts e_i(x) = act(u_i . x) v_i, retrieved per token and head by product keys:
  I_h(x)    = top-k over i of q_h(x) . k_i                      (exact, via product keys; sec. 2.1)
  g_hi(x)   = softmax over the k retrieved scores of head h        (Algorithm 1; "sigmoid" option)
  f(x)      = sum over heads h, sum over i in I_h(x) of g_hi(x) e_i(x)
The h heads have their own query networks but share one pool of experts and one set of sub-keys.
With top_k = 1 an h-head PEER is exactly an MLP with h hidden neurons (Eq. 8).

Defaults and choices the paper leaves open (stated here because they differ from, or add to, it):
- Query network: one bias-free linear map dim -> heads * query_dim.
- Query batch norm (on by default, as in the paper): BatchNorm1d over the heads * query_dim features,
  statistics taken over all tokens of the batch in training mode; in eval mode the running statistics are
  used, so evaluation is per-token and batch-independent. Padding tokens would enter the training-mode
  statistics: feed full sequences (peer-sweeps never pads) or mask them out before the layer.
- Initialisation: standalone, u, v ~ N(0, 1/dim); sub-keys ~ N(0, 1/(query_dim/2)); query map as nn.Linear.
  In a Transformer, model/init.py's rule, the same for every arm, replaces it.
- In bf16 (DeepSpeed casts the whole module) the query batch norm still runs in fp32 and keeps fp32 running
  statistics (`QueryBatchNorm`): statistics tracked in bf16 drift (running_var 2.20 against a true 2.25
  after 200 batches), and sub-key and table gradients are summed in fp32 (model/peer_kernels.py).

Two implementations of the same layer (same parameters, state dict and results up to float summation order):
- `PEERReference`: the simple one, a transcription of the paper's pseudo-code; it gathers the
  [..., H, K, dim] expert rows and gets dense (N, dim) table gradients. The tests' reference.
- `PEER`: the fast one (model/peer_ops.py): gather-and-reduce kernels that never materialise the gathered
  rows, a retrieval whose backward touches only the retrieved sub-keys, and row-sparse table gradients.
  `sparse_grad=False` (default) gives dense `.grad` on `w_down.weight` / `w_up.weight`, usable with any torch
  optimizer (costs O(N dim) per step); `sparse_grad=True` gives coalesced sparse COO `.grad` over the
  touched rows, for `model.sparse_adam.RowSparseAdam` (cost independent of N).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .peer_kernels import empty_table
from .peer_ops import GradBuffers, peer_experts, product_key_topk_sparse, topk_softmax
from .product_keys import batch_normed_queries, product_key_topk
from .routing import RoutingStats

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


def check_product_key_shape(num_experts: int, top_k: int, query_dim: int) -> int:
    """Validates a product-key layout; returns sqrt(num_experts)."""
    num_sub_keys = math.isqrt(num_experts)
    if num_sub_keys * num_sub_keys != num_experts:
        raise ValueError(f"num_experts={num_experts} is not a perfect square")
    if query_dim % 2:
        raise ValueError(f"query_dim={query_dim} must be even (it is split into two sub-queries)")
    if not 1 <= top_k <= num_sub_keys:
        raise ValueError(f"top_k={top_k} must be between 1 and sqrt(num_experts)={num_sub_keys}")
    return num_sub_keys


class QueryBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d that normalises in at least fp32 and keeps its running statistics in at least fp32.

    A bf16 input is normalised in fp32 (the affine parameters cast up) and the result cast back to bf16.
    Casting the module to a 16-bit float type (`module.bfloat16()`, as DeepSpeed's bf16 mode does) moves the
    running statistics but keeps their fp32 values. In fp32 and fp64 it is nn.BatchNorm1d, bit for bit.
    """

    LOW_PRECISION = (torch.bfloat16, torch.float16)

    def _apply(self, fn, recurse=True):
        kept = {name: buf for name, buf in self._buffers.items() if buf is not None and buf.is_floating_point()}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype in self.LOW_PRECISION and before.dtype not in self.LOW_PRECISION:
                self._buffers[name] = before.to(after.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in self.LOW_PRECISION and self.weight.dtype == x.dtype:
            return super().forward(x)
        self._check_input_dim(x)
        assert self.track_running_stats and self.momentum is not None, "QueryBatchNorm keeps running statistics"
        if self.training:
            self.num_batches_tracked.add_(1)
        dtype = torch.promote_types(self.running_mean.dtype, torch.float32)
        y = F.batch_norm(x.to(dtype), self.running_mean, self.running_var, self.weight.to(dtype),
                         self.bias.to(dtype), self.training, self.momentum, self.eps)
        return y.to(x.dtype)


class PEERReference(nn.Module):
    """A PEER layer mapping x[..., dim] to the same shape (see the module docstring): the simple version."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        heads: int,
        top_k: int,
        query_dim: int,
        query_bn: bool = True,
        activation: str = "gelu",
        score_fn: str = "softmax",
    ):
        super().__init__()
        num_sub_keys = check_product_key_shape(num_experts, top_k, query_dim)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}: expected one of {sorted(ACTIVATIONS)}")
        if score_fn not in ("softmax", "sigmoid"):
            raise ValueError(f"score_fn={score_fn!r}: expected 'softmax' or 'sigmoid'")
        self.dim, self.num_experts, self.heads, self.top_k = dim, num_experts, heads, top_k
        self.query_dim, self.activation, self.score_fn = query_dim, activation, score_fn

        self.query_proj = nn.Linear(dim, heads * query_dim, bias=False)
        self.query_norm = QueryBatchNorm(heads * query_dim) if query_bn else None
        self.sub_keys = nn.Parameter(torch.randn(2, num_sub_keys, query_dim // 2) * (query_dim / 2) ** -0.5)
        self.w_down = nn.Embedding(num_experts, dim, _weight=empty_table(num_experts, dim).normal_(std=dim**-0.5))
        self.w_up = nn.Embedding(num_experts, dim, _weight=empty_table(num_experts, dim).normal_(std=dim**-0.5))
        self.routing_stats = RoutingStats(num_experts)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The retrieval queries, after batch norm: [..., heads, query_dim]."""
        return batch_normed_queries(self.query_proj, self.query_norm, x, self.heads, self.query_dim)

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, indices), each [..., heads, top_k]: the exact top-k experts and their raw scores."""
        return product_key_topk(self.query(x), self.sub_keys, self.top_k)

    def gates(self, scores: torch.Tensor) -> torch.Tensor:
        if self.score_fn == "softmax":
            return scores.softmax(dim=-1)
        return scores.sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, indices = self.retrieve(x)  # [..., H, K]
        gates = self.gates(scores)
        self.routing_stats.add(indices, gates)
        down = self.w_down(indices)  # [..., H, K, D]
        up = self.w_up(indices)  # [..., H, K, D]
        hidden = torch.einsum("...d,...hkd->...hk", x, down)
        hidden = ACTIVATIONS[self.activation](hidden) * gates
        return torch.einsum("...hk,...hkd->...d", hidden, up)


class PEER(PEERReference):
    """The fast PEER layer (see the module docstring); the arguments of PEERReference, and `sparse_grad`."""

    def __init__(self, *args, sparse_grad: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.sparse_grad = sparse_grad
        self._grad_buffers = GradBuffers()

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return product_key_topk_sparse(self.query(x), self.sub_keys, self.top_k)

    def gates(self, scores: torch.Tensor) -> torch.Tensor:
        return topk_softmax(scores) if self.score_fn == "softmax" else scores.sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, indices = self.retrieve(x)  # [..., H, K]
        gates = self.gates(scores)
        self.routing_stats.add(indices, gates)
        M = self.heads * self.top_k
        y = peer_experts(
            x.reshape(-1, self.dim), gates.reshape(-1, M), self.w_down.weight, self.w_up.weight,
            indices.reshape(-1, M), self.activation, self.sparse_grad, self._grad_buffers,
        )
        return y.view(x.shape)
