"""PyTorch model library of peer-sweeps: PEER and its baselines in one Transformer, with exact counts.

Imports nothing from `peer_sweeps` or `cluster`.
"""

from .config import ModelConfig, MoEConfig, PEERConfig, PKMConfig
from .ffw import DenseFFW
from .moe import MoE
from .peer import PEER
from .pkm import PKM
from .product_keys import product_key_topk
from .routing import usage, unevenness
from .transformer import Transformer, build_model, summarize_routing

__all__ = [
    "ModelConfig", "MoEConfig", "PEERConfig", "PKMConfig", "DenseFFW", "MoE", "PEER", "PKM",
    "product_key_topk", "usage", "unevenness", "Transformer", "build_model", "summarize_routing",
]
