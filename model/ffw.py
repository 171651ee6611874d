"""The dense feed-forward block: Linear(dim, d_ff) -> GELU -> Linear(d_ff, dim), no biases."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class DenseFFW(nn.Module):
    def __init__(self, dim: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(dim, d_ff, bias=False)
        self.down = nn.Linear(d_ff, dim, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))
