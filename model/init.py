"""One initialisation rule for every arm: dense FFW, MoE, PKM and PEER start alike.

The rule (GPT-2, Radford et al. 2019, extended to gated layers so that every arm adds the same to the
residual stream at initialisation):
- Every matrix that reads the residual stream (attention qkv, FFW up, MoE router and expert inputs, PKM and
  PEER query maps, PEER's u table) and the token and position embeddings: N(0, 0.02^2).
- Every matrix that writes into the residual stream: N(0, s^2) with s = 0.02 / sqrt(2 n_layers) for the
  attention output and the dense FFW's down projection (GPT-2), and for a sparse layer the s that gives its
  output the variance of a dense FFW of width d_ff on the same input, with its gates at their uniform
  value at initialisation:
      Var(out) = s^2 * sum over the terms of gate^2 * E[act^2]
      dense     d_ff terms, gate 1, act GELU                       -> s_dense = 0.02 / sqrt(2 n_layers)
      MoE       c experts per token of d_ff terms, gate 1/E        -> s = s_dense * E / sqrt(c)
                (expert choice, c = capacity_factor: router softmax over E; token choice, gates renormalised
                over its top_k: gate 1/top_k, c = top_k)
      PEER      h heads x k experts, gate 1/k (softmax over k; sigmoid: gate ~ 1, its top scores are large)
                                                                   -> s = s_dense * sqrt(d_ff k / h) * rms(GELU) / rms(act)
      PKM       h heads x k value rows, gate 1/k, no activation    -> s = s_dense * sqrt(d_ff k / h) * rms(GELU)
  where rms(act) is the RMS of act(z), z ~ N(0, (0.02^2) d_model): the pre-activation of a unit-RMS input
  (the block's layer norm) through an N(0, 0.02^2) row.
- Product keys (PKM, PEER): N(0, 2 / query_dim), so that each half-score q1 . c of a unit-variance query
  (after query batch norm) has unit variance. They set the retrieval's sharpness, not an output scale.
- Layer norms and batch norms: weight 1, bias 0 (torch's default).
tests/test_model_init.py checks the outcome: every sparse layer's output RMS within 2x of the dense FFW's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CausalSelfAttention
from .ffw import DenseFFW
from .moe import MoE
from .peer import ACTIVATIONS, PEERReference
from .pkm import PKM

STD = 0.02


def activation_rms(activation, std: float) -> float:
    """RMS of activation(z) for z ~ N(0, std^2), by quadrature on a fixed grid (deterministic). A number, not
    a tensor: computed on the CPU even while the model is built on another device or under FakeTensorMode."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.device("cpu"):
        z = torch.linspace(-10.0, 10.0, 4001, dtype=torch.float64)
        density = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
        values = activation(z * std) ** 2 * density
        return math.sqrt(float(torch.trapezoid(values, z)))


def residual_std(n_layers: int) -> float:
    return STD / math.sqrt(2 * n_layers)


def init_transformer(model: nn.Module, n_layers: int, d_model: int, d_ff: int) -> None:
    """Applies the rule to a Transformer (model/transformer.py) in place."""
    out_std = residual_std(n_layers)
    nn.init.normal_(model.tok_emb.weight, std=STD)
    nn.init.normal_(model.pos_emb.weight, std=STD)
    for block in model.blocks:
        init_attention(block.attn, out_std)
        init_ffw_layer(block.ffw, out_std, d_model, d_ff)
    if model.lm_head.weight is not model.tok_emb.weight:
        nn.init.normal_(model.lm_head.weight, std=STD)


def init_attention(attn: CausalSelfAttention, out_std: float) -> None:
    nn.init.normal_(attn.qkv.weight, std=STD)
    nn.init.normal_(attn.out.weight, std=out_std)


def init_ffw_layer(layer: nn.Module, out_std: float, d_model: int, d_ff: int) -> None:
    """A block's FFW, dense or sparse; `out_std` is the dense FFW's output std, d_ff the dense FFW's width."""
    gelu_rms = activation_rms(F.gelu, STD * math.sqrt(d_model))
    if isinstance(layer, DenseFFW):
        nn.init.normal_(layer.up.weight, std=STD)
        nn.init.normal_(layer.down.weight, std=out_std)
    elif isinstance(layer, MoE):
        per_token = layer.capacity_factor if layer.routing == "expert_choice" else layer.top_k
        gate = 1 / layer.num_experts if layer.routing == "expert_choice" else 1 / layer.top_k
        nn.init.normal_(layer.router.weight, std=STD)
        nn.init.normal_(layer.w_in, std=STD)
        nn.init.normal_(layer.w_out, std=out_std / (gate * math.sqrt(per_token)))
    elif isinstance(layer, PEERReference):
        gate = 1 / layer.top_k if layer.score_fn == "softmax" else 1.0
        act_rms = activation_rms(ACTIVATIONS[layer.activation], STD * math.sqrt(d_model))
        nn.init.normal_(layer.query_proj.weight, std=STD)
        _init_sub_keys(layer.sub_keys, layer.query_dim)
        layer.w_down.weight.data.normal_(std=STD)
        layer.w_up.weight.data.normal_(std=out_std * math.sqrt(d_ff / (layer.heads * layer.top_k * gate**2))
                                        * gelu_rms / act_rms)
    elif isinstance(layer, PKM):
        gate = 1 / layer.top_k
        nn.init.normal_(layer.query_proj.weight, std=STD)
        _init_sub_keys(layer.sub_keys, layer.query_dim)
        nn.init.normal_(layer.values, std=out_std * math.sqrt(d_ff / (layer.heads * layer.top_k * gate**2)) * gelu_rms)
    else:
        raise AssertionError(f"no initialisation rule for {type(layer).__name__}")


@torch.no_grad()
def _init_sub_keys(sub_keys: torch.Tensor, query_dim: int) -> None:
    sub_keys.normal_(std=(query_dim / 2) ** -0.5)
