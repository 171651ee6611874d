"""Exact parameter and FLOP accounting of a `ModelConfig`, without building the model.

FLOP convention: 2 FLOPs per multiply-add; attention scores counted in full (not causally halved), as in
Chinchilla (Hoffmann et al. 2022, app. F); training = forward + backward as the code computes them:
backward = 2 x forward for every matmul (its input's and its weight's gradients), except product-key
retrieval, whose backward reaches only the k retrieved scores per head (4 h k d_q: the query halves' and the
retrieved sub-key rows' gradients, model/peer_ops.py), not the dense sub-key score matrices, and whose k^2
candidate sums have none. Element-wise work (norms, activations,
softmax, embedding look-ups, top-k) is not counted, except the k^2 candidate sums of product-key retrieval
(one FLOP each), which grow with top_k and are the only non-matmul term of retrieval that does.

Per token, with d = d_model, T = seq_len, V = vocab, F = d_ff, L layers, h heads, k top-k, d_q query dim,
S = sqrt(N) sub-keys per half:
  attention_proj    8 d^2 per layer              (qkv and output projections)
  attention_scores  4 T d per layer              (QK^T and AV over all T positions)
  ffw               4 d F per dense layer
  router            2 d E  (MoE)  |  2 d h d_q  (PKM / PEER query projection)
  subkey_scoring    2 h S d_q                    (both halves: 2 x S x d_q/2 multiply-adds per head)
  candidate_sums    h k^2
  experts           4 d F c  (MoE, c experts per token)  |  2 h k d  (PKM values)  |  4 h k d  (PEER u, v)
  lm_head           2 d V
Backward per token: 2 x each of the above, except subkey_scoring 4 h k d_q and candidate_sums 0.

Parameters: params_active = params_total minus the expert parameters a token does not use (MoE experts
beyond its c, PKM value rows and PEER expert rows beyond its h k); embeddings count in both.
params_backbone = non-embedding parameters of the same Transformer with dense FFW everywhere: the model
size an isoFLOP grid varies, comparable across methods.
"""

from __future__ import annotations

import math

from .config import ModelConfig, MoEConfig, PEERConfig, PKMConfig


def _layer_norm(cfg: ModelConfig) -> int:
    return 2 * cfg.d_model


def _dense_block(cfg: ModelConfig) -> int:
    d = cfg.d_model
    return 2 * _layer_norm(cfg) + 4 * d * d + 2 * d * cfg.ffw_dim


def _sparse_layer_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters of one sparse layer."""
    s, d = cfg.sparse, cfg.d_model
    if isinstance(s, MoEConfig):
        expert = 2 * d * cfg.ffw_dim
        router = d * s.num_experts
        return router + s.num_experts * expert, router + round(s.experts_per_token * expert)
    query = d * s.heads * s.query_dim + (2 * s.heads * s.query_dim if s.query_bn else 0)
    sub_keys = math.isqrt(s.num_experts) * s.query_dim
    if isinstance(s, PKMConfig):
        sub_keys *= s.heads  # one set of product keys per head
        return query + sub_keys + s.num_experts * d, query + sub_keys + s.heads * s.top_k * d
    assert isinstance(s, PEERConfig)
    return query + sub_keys + 2 * s.num_experts * d, query + sub_keys + 2 * s.heads * s.top_k * d


def _embeddings(cfg: ModelConfig) -> int:
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    return (cfg.vocab_size + cfg.max_seq_len) * cfg.d_model + head


def params_backbone(cfg: ModelConfig) -> int:
    return cfg.n_layers * _dense_block(cfg) + _layer_norm(cfg)


def _params(cfg: ModelConfig, active: bool) -> int:
    n_sparse = len(cfg.sparse_layer_ids)
    dense_ffw = 2 * cfg.d_model * cfg.ffw_dim
    total = _embeddings(cfg) + params_backbone(cfg) - n_sparse * dense_ffw
    if n_sparse:
        total += n_sparse * _sparse_layer_params(cfg)[1 if active else 0]
    return total


def params_total(cfg: ModelConfig) -> int:
    return _params(cfg, active=False)


def params_active(cfg: ModelConfig) -> int:
    return _params(cfg, active=True)


def forward_flops_breakdown(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Forward FLOPs per token by part (see the module docstring); seq_len defaults to cfg.max_seq_len."""
    seq_len = seq_len or cfg.max_seq_len
    d, L = cfg.d_model, cfg.n_layers
    n_sparse = len(cfg.sparse_layer_ids)
    parts = {
        "attention_proj": 8.0 * d * d * L,
        "attention_scores": 4.0 * seq_len * d * L,
        "ffw": 4.0 * d * cfg.ffw_dim * (L - n_sparse),
        "router": 0.0,
        "subkey_scoring": 0.0,
        "candidate_sums": 0.0,
        "experts": 0.0,
        "lm_head": 2.0 * d * cfg.vocab_size,
    }
    s = cfg.sparse
    if isinstance(s, MoEConfig):
        parts["router"] = 2.0 * d * s.num_experts * n_sparse
        parts["experts"] = 4.0 * d * cfg.ffw_dim * s.experts_per_token * n_sparse
    elif isinstance(s, (PKMConfig, PEERConfig)):
        parts["router"] = 2.0 * d * s.heads * s.query_dim * n_sparse
        parts["subkey_scoring"] = 2.0 * s.heads * math.isqrt(s.num_experts) * s.query_dim * n_sparse
        parts["candidate_sums"] = float(s.heads * s.top_k**2 * n_sparse)
        per_expert = 2.0 if isinstance(s, PKMConfig) else 4.0
        parts["experts"] = per_expert * s.heads * s.top_k * d * n_sparse
    return parts


def forward_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    return sum(forward_flops_breakdown(cfg, seq_len).values())


def backward_flops_breakdown(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Backward FLOPs per token by part, as the code computes them (see the module docstring)."""
    backward = {part: 2.0 * flops for part, flops in forward_flops_breakdown(cfg, seq_len).items()}
    s = cfg.sparse
    if isinstance(s, (PKMConfig, PEERConfig)):
        backward["subkey_scoring"] = 4.0 * s.heads * s.top_k * s.query_dim * len(cfg.sparse_layer_ids)
        backward["candidate_sums"] = 0.0
    return backward


def train_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Forward + backward FLOPs per training token."""
    return forward_flops_per_token(cfg, seq_len) + sum(backward_flops_breakdown(cfg, seq_len).values())
