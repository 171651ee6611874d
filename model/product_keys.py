"""Product-key retrieval (Lample et al. 2019, sec. 3.2; PEER paper sec. 2).

A key is the concatenation [c; c'] of a sub-key c from set C and c' from set C', each of size sqrt(N)
and dimension d_q / 2, so expert `i * sqrt(N) + j` has score `q1 . C[i] + q2 . C'[j]`.
The top-k over all N composed keys is found exactly from the top-k of each half: any key in the overall
top-k has both halves within their half's top-k.

Shapes: ... any leading dims, H heads, Q query dim, S = sqrt(N) sub-keys per half, K top-k.
"""

from __future__ import annotations

import torch


def batch_normed_queries(
    query_proj: torch.nn.Module, query_norm: torch.nn.Module | None, x: torch.Tensor, heads: int, query_dim: int
) -> torch.Tensor:
    """Queries [..., H, Q] from x [..., D]: the query projection, then batch norm over all H*Q features
    (statistics over every token of the batch in training mode, running statistics in eval mode)."""
    q = query_proj(x)
    if query_norm is not None:
        q = query_norm(q.reshape(-1, q.shape[-1])).reshape(q.shape)
    return q.unflatten(-1, (heads, query_dim))


def product_key_topk(
    query: torch.Tensor, sub_keys: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the N = S^2 composed keys.

    query: [..., H, Q]; sub_keys: [2, S, Q/2] (shared by all heads) or [H, 2, S, Q/2] (one set per head).
    Returns (scores, indices), each [..., H, K], scores raw (before any softmax), sorted descending.
    """
    num_sub_keys = sub_keys.shape[-2]
    q1, q2 = query.chunk(2, dim=-1)  # [..., H, Q/2] each
    if sub_keys.dim() == 3:
        scores1 = q1 @ sub_keys[0].t()  # [..., H, S]
        scores2 = q2 @ sub_keys[1].t()
    else:
        scores1 = torch.einsum("...hq,hsq->...hs", q1, sub_keys[:, 0])
        scores2 = torch.einsum("...hq,hsq->...hs", q2, sub_keys[:, 1])
    top1, idx1 = scores1.topk(top_k, dim=-1)  # [..., H, K]
    top2, idx2 = scores2.topk(top_k, dim=-1)
    candidates = (top1.unsqueeze(-1) + top2.unsqueeze(-2)).flatten(-2)  # [..., H, K*K]
    scores, flat = candidates.topk(top_k, dim=-1)  # [..., H, K]
    rows = idx1.gather(-1, flat // top_k)
    cols = idx2.gather(-1, flat % top_k)
    return scores, rows * num_sub_keys + cols
