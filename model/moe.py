"""Coarse-grained mixture of experts, the paper's MoE baseline (sec. 3.1).

Each expert is an MLP the size of the dense FFW (dim -> d_ff -> dim, GELU, no biases). Router
probabilities p(x) = softmax(W_r x) over the experts.
- "expert_choice" (Zhou et al. 2022; the paper's baseline): over the batch's n tokens each expert takes its
  top C = floor(capacity_factor * n / E) tokens by p; the output of token x is sum over the experts that
  took it of p_e(x) * expert_e(x). A token may be taken by several experts or by none. Note that in a
  causal LM the choice looks across the batch, future tokens included (as in the paper's baseline).
- "token_choice": each token goes to its top_k experts, gates renormalised over them; no capacity limit
  and no auxiliary balancing loss.
In a Transformer the initialisation is model/init.py's, the same rule as every arm's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .routing import RoutingStats


class MoE(nn.Module):
    def __init__(
        self, dim: int, d_ff: int, num_experts: int, routing: str = "expert_choice",
        capacity_factor: float = 1.0, top_k: int = 1,
    ):
        super().__init__()
        if routing not in ("expert_choice", "token_choice"):
            raise ValueError(f"routing={routing!r}: expected 'expert_choice' or 'token_choice'")
        if routing == "token_choice" and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.num_experts, self.routing = num_experts, routing
        self.capacity_factor, self.top_k = capacity_factor, top_k
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(num_experts, dim, d_ff) * dim**-0.5)
        self.w_out = nn.Parameter(torch.randn(num_experts, d_ff, dim) * d_ff**-0.5)
        self.routing_stats = RoutingStats(num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])  # (n, D)
        probs = self.router(tokens).softmax(dim=-1)  # (n, E)
        if self.routing == "expert_choice":
            out = self._expert_choice(tokens, probs)
        else:
            out = self._token_choice(tokens, probs)
        return out.view_as(x)

    def _expert_choice(self, tokens, probs):
        capacity = max(1, int(self.capacity_factor * tokens.shape[0] / self.num_experts))
        gates, chosen = probs.t().topk(capacity, dim=-1)  # (E, C)
        hidden = F.gelu(torch.bmm(tokens[chosen], self.w_in))  # (E, C, F)
        expert_out = torch.bmm(hidden, self.w_out) * gates.unsqueeze(-1)  # (E, C, D)
        experts = torch.arange(self.num_experts, device=tokens.device).unsqueeze(-1).expand_as(chosen)
        self.routing_stats.add(experts, gates)
        return torch.zeros_like(tokens).index_add_(0, chosen.reshape(-1), expert_out.reshape(-1, tokens.shape[-1]))

    def _token_choice(self, tokens, probs):
        gates, experts = probs.topk(self.top_k, dim=-1)  # (n, K)
        gates = gates / gates.sum(dim=-1, keepdim=True)
        self.routing_stats.add(experts, gates)
        out = torch.zeros_like(tokens)
        for e in range(self.num_experts):
            token_idx, slot = (experts == e).nonzero(as_tuple=True)
            if token_idx.numel() == 0:
                continue
            hidden = F.gelu(tokens[token_idx] @ self.w_in[e])
            out.index_add_(0, token_idx, (hidden @ self.w_out[e]) * gates[token_idx, slot].unsqueeze(-1))
        return out
