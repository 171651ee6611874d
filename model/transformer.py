"""A decoder-only pre-norm Transformer (GPT-2 style, learned positions) whose chosen blocks swap the dense
FFW for a sparse layer: MoE, PKM or PEER (the paper replaces the middle block's FFW)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CausalSelfAttention
from .config import ModelConfig, MoEConfig, PEERConfig, PKMConfig
from .ffw import DenseFFW
from .init import init_transformer
from .moe import MoE
from .peer import PEER
from .pkm import PKM
from .routing import usage, unevenness


def build_ffw(cfg: ModelConfig, layer: int) -> nn.Module:
    s, d = cfg.sparse, cfg.d_model
    if layer not in cfg.sparse_layer_ids:
        return DenseFFW(d, cfg.ffw_dim)
    if isinstance(s, MoEConfig):
        return MoE(d, cfg.ffw_dim, s.num_experts, s.routing, s.capacity_factor, s.top_k)
    if isinstance(s, PKMConfig):
        return PKM(d, s.num_experts, s.heads, s.top_k, s.query_dim, s.query_bn)
    assert isinstance(s, PEERConfig)
    return PEER(d, s.num_experts, s.heads, s.top_k, s.query_dim, s.query_bn, s.activation, s.score_fn)


def project_to_vocab(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits h @ weight^T (weight: [vocab, d_model], the LM head, tied or not)."""
    if h.is_cuda or not torch.is_grad_enabled():
        return F.linear(h, weight)
    return _CPUVocabProjection.apply(h, weight)


class _CPUVocabProjection(torch.autograd.Function):
    """F.linear's product with a backward that multiplies in the order CPU BLAS is fast at for a thin head.

    torch's backward computes grad_weight = G^T @ h from the transposed [vocab, tokens] view of the logits'
    gradient G. With a thin head that order is pathological here: 2048 tokens, vocab 2048, one thread,
    d_model 8: 43 ms against 3.8 ms for (h^T @ G)^T, and grad_h = (W^T G^T)^T 3.4 ms against 8.4 ms
    (never slower at d_model 16-64). Same products, so the same gradients up to float summation order.
    """

    @staticmethod
    def forward(ctx, h, weight):
        ctx.save_for_backward(h, weight)
        return F.linear(h, weight)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        grad_2d, h_2d = grad.reshape(-1, grad.shape[-1]), h.reshape(-1, h.shape[-1])
        grad_h = (weight.t() @ grad_2d.t()).t().reshape(h.shape) if ctx.needs_input_grad[0] else None
        grad_weight = (h_2d.t() @ grad_2d).t() if ctx.needs_input_grad[1] else None
        return grad_h, grad_weight


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffw = build_ffw(cfg, layer)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.ffw(self.ln2(x))


class Transformer(nn.Module):
    """Maps token ids LongTensor[B, T] to logits [B, T, vocab_size]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        init_transformer(self, cfg.n_layers, cfg.d_model, cfg.ffw_dim)  # model/init.py: one rule for every arm

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        return project_to_vocab(self.ln_f(x), self.lm_head.weight)  # (B, T, V)

    # Routing statistics of the sparse layers (usage, unevenness), accumulated over an evaluation pass.

    def sparse_layers(self) -> list[nn.Module]:
        return [block.ffw for block in self.blocks if hasattr(block.ffw, "routing_stats")]

    def collect_routing_stats(self, enabled: bool) -> None:
        for layer in self.sparse_layers():
            layer.routing_stats.reset()
            layer.routing_stats.enabled = enabled

    def routing_scores(self) -> list[torch.Tensor]:
        """Accumulated router scores per sparse layer (all-reduce them across ranks before summarising)."""
        return [layer.routing_stats.scores for layer in self.sparse_layers()]


def summarize_routing(scores_per_layer: list[torch.Tensor]) -> dict[str, float]:
    """usage and unevenness averaged over the sparse layers; empty for a dense model."""
    if not scores_per_layer:
        return {}
    return {
        "usage": sum(usage(s) for s in scores_per_layer) / len(scores_per_layer),
        "unevenness": sum(unevenness(s) for s in scores_per_layer) / len(scores_per_layer),
    }


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> Transformer:
    """The model, built on `device` (default the CPU): every tensor is created and initialised there, so a
    GPU worker never holds the model in host memory (and never builds the CPU kernels for its tables).
    "meta" gives shapes without memory."""
    with torch.device(device or "cpu"):
        return Transformer(cfg)
