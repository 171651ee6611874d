"""FLOP formulas for the aten ops of these models that torch.utils.flop_counter leaves uncounted.

PKM's value read is an embedding bag with per-sample weights (a weighted sum of k rows per head): 2 FLOPs
per multiply-add, like a matmul, forward and backward (the weights' gradient rows and the per-sample
weights' gradient, one dot product per retrieved row). Without per-sample weights a bag is a plain sum, one
FLOP per element. The custom PEER kernels carry their own formulas (model/peer_kernels.py).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

aten = torch.ops.aten


def _bag_flops(entries: int, width: int, weighted: bool) -> int:
    return (2 if weighted else 1) * entries * width


def _numel(shape) -> int:
    return int(torch.Size(shape).numel())


@register_flop_formula([aten._embedding_bag, aten._embedding_bag_forward_only])
def _embedding_bag_flops(weight_shape, indices_shape, offsets_shape, scale_grad_by_freq=False, mode=0,
                         sparse=False, per_sample_weights_shape=None, *args, out_shape=None, **kwargs) -> int:
    return _bag_flops(_numel(indices_shape), weight_shape[1], per_sample_weights_shape is not None)


@register_flop_formula(aten._embedding_bag_backward)
def _embedding_bag_backward_flops(grad_shape, indices_shape, offsets_shape, offset2bag_shape, bag_size_shape,
                                  maximum_indices_shape, num_weights, scale_grad_by_freq, mode, sparse,
                                  per_sample_weights_shape, *args, out_shape=None, **kwargs) -> int:
    return _bag_flops(_numel(indices_shape), grad_shape[1], per_sample_weights_shape is not None)


@register_flop_formula(aten._embedding_bag_per_sample_weights_backward)
def _per_sample_weights_backward_flops(grad_shape, weight_shape, indices_shape, *args, out_shape=None, **kwargs) -> int:
    return _bag_flops(_numel(indices_shape), weight_shape[1], weighted=True)
