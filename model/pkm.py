"""Product-key memory (Lample et al. 2019), the paper's PKM baseline (sec. 3.1).

Per head h: a query q_h(x) (one shared linear map, then batch norm over all heads' features), its own
product keys (two sets of sqrt(N) sub-keys of dimension query_dim/2), exact top-k retrieval, softmax over
the k scores. The output is sum over heads of the score-weighted sum of the retrieved value rows; the
values (N, dim) are shared by the heads. The weighted sums are PEER's kernels (`weighted_rows`: a weighted bag
forward, a scatter-sum of the values' gradient, ~T h k / N contributions a row, in at least fp32, as PEER's),
so the [..., H*K, dim] gathered rows are never materialised; on the CPU this replaced F.embedding_bag, whose
backward sorted every index each step (issue 19: PKM d24's step 12% faster). Query batch norm behaves as in
PEER (see model/peer.py). In a Transformer the initialisation is model/init.py's, the same rule as every arm's.
"""

from __future__ import annotations

import torch
from torch import nn

from . import flop_formulas  # noqa: F401  (FlopCounterMode counts the value reads)
from .peer import QueryBatchNorm, check_product_key_shape
from .peer_ops import product_key_topk_sparse, topk_softmax, weighted_rows
from .product_keys import batch_normed_queries
from .routing import RoutingStats


class PKM(nn.Module):
    def __init__(self, dim: int, num_memories: int, heads: int, top_k: int, query_dim: int, query_bn: bool = True):
        super().__init__()
        num_sub_keys = check_product_key_shape(num_memories, top_k, query_dim)
        self.dim, self.num_memories, self.heads, self.top_k, self.query_dim = dim, num_memories, heads, top_k, query_dim
        self.query_proj = nn.Linear(dim, heads * query_dim, bias=False)
        self.query_norm = QueryBatchNorm(heads * query_dim) if query_bn else None
        self.sub_keys = nn.Parameter(torch.randn(heads, 2, num_sub_keys, query_dim // 2) * (query_dim / 2) ** -0.5)
        self.values = nn.Parameter(torch.randn(num_memories, dim) * dim**-0.5)
        self.routing_stats = RoutingStats(num_memories)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return batch_normed_queries(self.query_proj, self.query_norm, x, self.heads, self.query_dim)

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, indices) [..., H, K]: each head's exact top-k over its own product keys, by PEER's
        retrieval kernel (torch.topk on many short rows took 22 ms of a 85 ms training step here)."""
        q = self.query(x)
        per_head = [product_key_topk_sparse(q[..., h : h + 1, :], self.sub_keys[h], self.top_k)
                    for h in range(self.heads)]
        return torch.cat([s for s, _ in per_head], -2), torch.cat([i for _, i in per_head], -2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, indices = self.retrieve(x)  # [..., H, K]
        weights = topk_softmax(scores)
        self.routing_stats.add(indices, weights)
        bags = indices.reshape(-1, self.heads * self.top_k)
        out = weighted_rows(bags, self.values, weights.reshape(bags.shape))
        return out.view(*x.shape[:-1], self.dim)
