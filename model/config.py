"""Model configuration: one pydantic config per component, and `ModelConfig` for the whole Transformer.

`ModelConfig` answers the counts a scaling study needs without building the model (see model/flops.py):
`params_total()`, `params_active()`, `params_backbone()`, `forward_flops_per_token(seq_len)`,
`train_flops_per_token(seq_len)` and `flops_breakdown(seq_len)`.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .peer import check_product_key_shape


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MoEConfig(_Strict):
    """Coarse MoE (model/moe.py). Paper: 128 expert-choice experts, each the size of the dense FFW."""

    method: Literal["moe"] = "moe"
    num_experts: int = Field(128, ge=1)
    routing: Literal["expert_choice", "token_choice"] = "expert_choice"
    capacity_factor: float = Field(1.0, gt=0)  # expert choice: average experts per token
    top_k: int = Field(1, ge=1)  # token choice only

    @property
    def experts_per_token(self) -> float:
        return self.capacity_factor if self.routing == "expert_choice" else float(self.top_k)


class PKMConfig(_Strict):
    """Product-key memory (model/pkm.py). Paper: 1024^2 memories, 8 heads, top-32, query BN."""

    method: Literal["pkm"] = "pkm"
    num_experts: int = Field(1024**2, ge=1)  # memory slots
    heads: int = Field(8, ge=1)
    top_k: int = Field(32, ge=1)
    query_dim: int = Field(128, ge=2)  # not given by the paper
    query_bn: bool = True

    @model_validator(mode="after")
    def _product_keys(self):
        check_product_key_shape(self.num_experts, self.top_k, self.query_dim)
        return self


class PEERConfig(_Strict):
    """PEER (model/peer.py). Paper: 1024^2 experts, 8 heads, top-16, query BN, GELU, softmax."""

    method: Literal["peer"] = "peer"
    num_experts: int = Field(1024**2, ge=1)
    heads: int = Field(8, ge=1)
    top_k: int = Field(16, ge=1)
    query_dim: int = Field(128, ge=2)  # not given by the paper
    query_bn: bool = True
    activation: Literal["gelu", "relu"] = "gelu"
    score_fn: Literal["softmax", "sigmoid"] = "softmax"

    @model_validator(mode="after")
    def _product_keys(self):
        check_product_key_shape(self.num_experts, self.top_k, self.query_dim)
        return self


SparseConfig = Annotated[Union[MoEConfig, PKMConfig, PEERConfig], Field(discriminator="method")]


class ModelConfig(_Strict):
    """A decoder-only pre-norm Transformer whose FFW in `sparse_layers` is replaced by `sparse`.

    sparse = None is the dense baseline. sparse_layers defaults to the middle block, n_layers // 2
    (0-based), as the paper replaces only the middle block's FFW. d_ff defaults to 4 * d_model.
    Token and position embeddings are learned; the LM head is tied to the token embedding by default.
    """

    vocab_size: int = Field(8192, ge=2)
    max_seq_len: int = Field(256, ge=1)
    d_model: int = Field(256, ge=1)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    d_ff: int | None = Field(None, ge=1)
    tie_embeddings: bool = True
    sparse: SparseConfig | None = None
    sparse_layers: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        for layer in self.sparse_layers or ():
            if not 0 <= layer < self.n_layers:
                raise ValueError(f"sparse_layers: {layer} is not a block index in [0, {self.n_layers})")
        return self

    @property
    def method(self) -> str:
        return "dense" if self.sparse is None else self.sparse.method

    @property
    def ffw_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def sparse_layer_ids(self) -> tuple[int, ...]:
        if self.sparse is None:
            return ()
        return self.sparse_layers if self.sparse_layers is not None else (self.n_layers // 2,)

    def params_total(self) -> int:
        from .flops import params_total
        return params_total(self)

    def params_active(self) -> int:
        from .flops import params_active
        return params_active(self)

    def params_backbone(self) -> int:
        from .flops import params_backbone
        return params_backbone(self)

    def flops_breakdown(self, seq_len: int | None = None) -> dict[str, float]:
        from .flops import forward_flops_breakdown
        return forward_flops_breakdown(self, seq_len or self.max_seq_len)

    def forward_flops_per_token(self, seq_len: int | None = None) -> float:
        return sum(self.flops_breakdown(seq_len).values())

    def train_flops_per_token(self, seq_len: int | None = None) -> float:
        from .flops import train_flops_per_token
        return train_flops_per_token(self, seq_len or self.max_seq_len)
