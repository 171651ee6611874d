"""The two autograd functions of the fast PEER layer (model/peer.py), built on model/peer_kernels.py.

Shapes: T tokens, D model dim, H heads, K top-k, M = H*K experts per token, Q query dim, S = sqrt(N).

- `product_key_topk_sparse(q, sub_keys, K)`: the exact product-key top-k (same algorithm as
  model/product_keys.py) whose backward touches only the retrieved sub-keys: the score of expert
  i*S + j is q1 . C[i] + q2 . C'[j], so its gradient reaches K rows of each sub-key set per head and token,
  not the dense (T*H, S) score matrices.
- `weighted_rows(idx, table, weights)`: PKM's read, F.embedding_bag's weighted sum, with the table gradient
  summed in fp32 (for bf16 tables; embedding_bag's own backward sums in the table's dtype on CUDA).
- `peer_experts(x, gates, w_down, w_up, indices, activation, sparse_grad)`:
      y_t = sum_m gates[t, m] act(x_t . U[idx[t, m]]) V[idx[t, m]]
  without materialising the gathered rows; the (N, D) table gradients are row-sparse: a coalesced sparse
  COO tensor over the touched rows (sparse_grad=True, for RowSparseAdam) or a dense tensor (sparse_grad=False,
  for any torch optimizer; this costs O(N D) per step). On the torch backend (GPUs) the dense gradients are
  one fp32-accumulated scatter-sum per table, with no host sync in the backward.
"""

from __future__ import annotations

import torch

from . import peer_kernels as K

ACTIVATION_BACKWARD = {
    "gelu": lambda grad, a: torch.ops.aten.gelu_backward(grad, a),
    "relu": lambda grad, a: torch.ops.aten.threshold_backward(grad, a, 0),
}
ACTIVATION = {"gelu": torch.nn.functional.gelu, "relu": torch.nn.functional.relu}


class GradBuffers:
    """Reusable value buffers for the row-sparse table gradients of one layer.

    A new (U, D) gradient per step is fresh memory from the OS: faulting in ~0.4 GiB per table at N = 1024^2
    cost more than computing it (see benchmarks/NOTES_peer.md). The kernel writes into a buffer only when
    nothing but this object shares its memory (the previous step's gradient was released, e.g. by
    `zero_grad(set_to_none=True)`), so gradients that are kept or accumulated are never overwritten.
    """

    def __init__(self):
        self.buffers: list[torch.Tensor] = []

    def get(self, count: int, rows: int, like: torch.Tensor) -> list[torch.Tensor]:
        if len(self.buffers) != count or any(b.shape[0] < rows or b.dtype != like.dtype for b in self.buffers):
            self.buffers = [like.new_empty(rows, like.shape[1]) for _ in range(count)]
        return self.buffers


def _table_grads(idx: torch.Tensor, table: torch.Tensor, pairs, sparse: bool, buffers: GradBuffers | None):
    """The gradients of `table` [N, D] for each (c, X) in `pairs`: G[n] = sum over idx[r, m] = n of c[r, m] X[r].

    Dense on the torch backend: one scatter-sum per table (K.dense_row_grads), no unique rows, no host sync.
    Otherwise from the touched rows (K.row_grads): a coalesced sparse COO tensor, or scattered into zeros."""
    shape = table.shape
    if not sparse and K.backend(table, *(t for pair in pairs for t in pair)) == "torch":
        return [K.dense_row_grads(idx, shape[0], c, X).to(table.dtype) for c, X in pairs]
    out = buffers.get(len(pairs), idx.numel(), table) if sparse and buffers else []
    rows, *grads = K.row_grads(idx, shape[0], *pairs, out=out)
    if sparse:
        return [torch.sparse_coo_tensor(rows.unsqueeze(0), G, shape, is_coalesced=True, check_invariants=False)
                for G in grads]
    return [G.new_zeros(shape).index_copy_(0, rows, G) for G in grads]


class _ProductKeyTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, sub_keys, top_k):
        R, Q = q.shape[:-1].numel(), q.shape[-1]
        q_RQ = q.reshape(R, Q)
        with torch.no_grad():
            scores, indices = K.product_key_topk(q_RQ, sub_keys, top_k)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(q_RQ, sub_keys, indices)
        ctx.q_shape = q.shape
        return scores.view(*q.shape[:-1], top_k), indices.view(*q.shape[:-1], top_k)

    @staticmethod
    def backward(ctx, g_scores, _g_indices):
        q_RQ, sub_keys, indices = ctx.saved_tensors
        num_sub, half = sub_keys.shape[1], sub_keys.shape[2]
        R = q_RQ.shape[0]
        g_RK = g_scores.reshape(R, -1).contiguous()
        rows, cols = indices // num_sub, indices % num_sub
        g_q = g_sub = None
        if ctx.needs_input_grad[0]:
            g_q = torch.cat([K.weighted_bag(rows, sub_keys[0], g_RK), K.weighted_bag(cols, sub_keys[1], g_RK)], -1)
            g_q = g_q.view(ctx.q_shape)
        if ctx.needs_input_grad[1]:
            q1, q2 = q_RQ[:, :half].contiguous(), q_RQ[:, half:].contiguous()
            g_sub = torch.stack([K.dense_row_grads(rows, num_sub, g_RK, q1), K.dense_row_grads(cols, num_sub, g_RK, q2)])
        return g_q, g_sub, None


def product_key_topk_sparse(q: torch.Tensor, sub_keys: torch.Tensor, top_k: int):
    """Like model.product_keys.product_key_topk for shared sub-keys [2, S, Q/2]: (scores, indices) [..., H, K]."""
    return _ProductKeyTopK.apply(q, sub_keys, top_k)


class _SortedSoftmax(torch.autograd.Function):
    """Softmax over the last dim of rows sorted descending, so that each row's maximum is its first entry."""

    @staticmethod
    def forward(ctx, scores):
        e = (scores - scores[..., :1]).exp_()
        gates = e.mul_(e.sum(-1, keepdim=True).reciprocal_())
        ctx.save_for_backward(gates)
        return gates

    @staticmethod
    def backward(ctx, g_gates):
        (gates,) = ctx.saved_tensors
        return gates * (g_gates - (g_gates * gates).sum(-1, keepdim=True))


def topk_softmax(scores: torch.Tensor) -> torch.Tensor:
    """scores.softmax(-1) for retrieval scores [..., K] sorted descending (as product_key_topk_sparse returns
    them), equal up to float rounding. torch's CPU softmax takes a slow path when K is not a multiple of 16:
    on [8192, 8] fp32, 1.20 ms forward and 0.46 ms backward against 0.17 and 0.10 ms for these few ops
    (LOG.md 2026-12-01); elsewhere (K = 16, 32: as fast or faster; CUDA; 16-bit types, which torch's kernel
    normalises in fp32) torch's softmax is used."""
    if scores.device.type != "cpu" or scores.dtype != torch.float32 or scores.shape[-1] % 16 == 0:
        return scores.softmax(dim=-1)
    return _SortedSoftmax.apply(scores)


class _WeightedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx_TM, table, weights_TM):
        ctx.save_for_backward(idx_TM, table, weights_TM)
        return K.weighted_bag(idx_TM, table, weights_TM)

    @staticmethod
    def backward(ctx, g_out_TD):
        idx_TM, table, weights_TM = ctx.saved_tensors
        g_out_TD = g_out_TD.contiguous()
        g_table = K.dense_row_grads(idx_TM, table.shape[0], weights_TM, g_out_TD).to(table.dtype) \
            if ctx.needs_input_grad[1] else None
        g_weights = K.gather_dot(g_out_TD, table, idx_TM) if ctx.needs_input_grad[2] else None
        return None, g_table, g_weights


def weighted_rows(idx_TM: torch.Tensor, table: torch.Tensor, weights_TM: torch.Tensor) -> torch.Tensor:
    """[T, D] = sum_m weights[t, m] table[idx[t, m]] (F.embedding_bag, mode "sum"), whose table gradient is one
    fp32-accumulated scatter-sum (K.dense_row_grads)."""
    return _WeightedRows.apply(idx_TM, table, weights_TM)


class _PEERExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, gates_TM, w_down, w_up, idx_TM, activation, sparse_grad, buffers):
        a_TM = K.gather_dot(x_TD, w_down, idx_TM)  # u_i . x
        hidden_TM = ACTIVATION[activation](a_TM) * gates_TM
        y_TD = K.weighted_bag(idx_TM, w_up, hidden_TM)
        ctx.save_for_backward(x_TD, gates_TM, w_down, w_up, idx_TM, a_TM)
        ctx.activation, ctx.sparse_grad, ctx.buffers = activation, sparse_grad, buffers
        return y_TD

    @staticmethod
    def backward(ctx, g_y_TD):
        x_TD, gates_TM, w_down, w_up, idx_TM, a_TM = ctx.saved_tensors
        g_y_TD = g_y_TD.contiguous()
        act_TM = ACTIVATION[ctx.activation](a_TM)
        g_hidden_TM = K.gather_dot(g_y_TD, w_up, idx_TM)
        g_gates = g_hidden_TM * act_TM if ctx.needs_input_grad[1] else None
        g_a_TM = ACTIVATION_BACKWARD[ctx.activation](g_hidden_TM * gates_TM, a_TM)
        g_x = K.weighted_bag(idx_TM, w_down, g_a_TM) if ctx.needs_input_grad[0] else None
        g_down = g_up = None
        pairs = []
        if ctx.needs_input_grad[2]:
            pairs.append((g_a_TM, x_TD))
        if ctx.needs_input_grad[3]:
            pairs.append((act_TM * gates_TM, g_y_TD))
        if pairs:
            grads = _table_grads(idx_TM, w_down, pairs, ctx.sparse_grad, ctx.buffers)
            if ctx.needs_input_grad[2]:
                g_down = grads.pop(0)
            if ctx.needs_input_grad[3]:
                g_up = grads.pop(0)
        return g_x, g_gates, g_down, g_up, None, None, None, None


def peer_experts(x_TD, gates_TM, w_down, w_up, idx_TM, activation: str, sparse_grad: bool,
                 buffers: GradBuffers | None = None) -> torch.Tensor:
    """y [T, D] = sum_m gates[t, m] act(x_t . w_down[idx[t, m]]) w_up[idx[t, m]] (see the module docstring).
    `buffers`: where sparse table gradients may be written (reused across steps when released)."""
    return _PEERExperts.apply(x_TD, gates_TM, w_down, w_up, idx_TM, activation, sparse_grad, buffers)
