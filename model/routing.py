"""Expert usage and unevenness (PEER paper sec. 3.4, after Lample et al. 2019).

Router scores are accumulated over an evaluation pass: z'_i = sum over tokens x of g_i(x), with
g_i(x) = 0 when expert i is not retrieved for x. With z = z' / ||z'||_1:
  usage      = fraction of experts with z_i != 0
  unevenness = KL(z || uniform) = log N + sum_i z_i log z_i   (nats; 0 is perfectly even, log N is one expert)
"""

from __future__ import annotations

import math

import torch


class RoutingStats:
    """Accumulates router scores per expert (float64, on the layer's device) while `enabled`; owned by a sparse
    layer."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.enabled = False
        self.scores = torch.zeros(num_experts, dtype=torch.float64)

    def reset(self) -> None:
        self.scores.zero_()

    @torch.no_grad()
    def add(self, indices: torch.Tensor, gates: torch.Tensor) -> None:
        """indices, gates: same shape; gates[j] is the router score given to expert indices[j]."""
        if not self.enabled:
            return
        if self.scores.device != indices.device:  # kept where the layer runs: no host copy per batch
            self.scores = self.scores.to(indices.device)
        self.scores.index_add_(0, indices.reshape(-1), gates.reshape(-1).detach().to(self.scores.dtype))


def usage(accumulated: torch.Tensor) -> float:
    """Fraction of experts that received any router score."""
    return float((accumulated != 0).double().mean())


def unevenness(accumulated: torch.Tensor) -> float:
    """KL divergence (nats) of the normalised accumulated scores from the uniform distribution."""
    total = accumulated.double().sum()
    if total <= 0:
        return float("nan")
    z = accumulated.double() / total
    nonzero = z[z > 0]
    return float(math.log(accumulated.numel()) + (nonzero * nonzero.log()).sum())
