"""Every arm starts alike (model/init.py): at initialisation each sparse layer adds to the residual stream
what the dense FFW at the same block adds, within 2x in RMS, on the same input - for every model of the
shipped default study and for a few layouts beyond it, in training mode (query batch norm on batch
statistics, as at the first step) and eval mode."""

from pathlib import Path

import pytest
import torch

from model import ModelConfig, build_model
from peer_sweeps.plan import plan_study
from peer_sweeps.study import load_study

LAYOUTS = {
    "moe_ec": {"method": "moe", "num_experts": 16},
    "moe_tc": {"method": "moe", "num_experts": 8, "routing": "token_choice", "top_k": 2},
    "pkm": {"method": "pkm", "num_experts": 4096, "heads": 8, "top_k": 32, "query_dim": 32},
    "peer": {"method": "peer", "num_experts": 16384, "heads": 8, "top_k": 16, "query_dim": 32},
    "peer_relu_nobn": {"method": "peer", "num_experts": 1024, "heads": 2, "top_k": 8, "query_dim": 16,
                       "activation": "relu", "query_bn": False},
}


def default_study_models() -> list[ModelConfig]:
    configs = {}
    for trial in plan_study(load_study(Path(__file__).parent.parent / "studies" / "isoflop.yaml")):
        if trial.method != "dense":
            configs[(trial.method, trial.model["d_model"], trial.model["n_layers"])] = trial.model_config
    return list(configs.values())


def output_rms_ratio(cfg: ModelConfig, train: bool) -> float:
    """RMS of the sparse layer's output over the dense FFW's, same block, same unit-RMS input."""
    torch.manual_seed(0)
    layer_id = cfg.sparse_layer_ids[0]
    sparse = build_model(cfg).blocks[layer_id]
    dense = build_model(cfg.model_copy(update={"sparse": None})).blocks[layer_id]
    x = sparse.ln2(torch.randn(8, cfg.max_seq_len, cfg.d_model) * 3 + 1)
    sparse.train(train), dense.train(train)
    with torch.no_grad():
        return float(sparse.ffw(x).pow(2).mean().sqrt() / dense.ffw(x).pow(2).mean().sqrt())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_default_study_sparse_layers_start_like_dense(train):
    models = default_study_models()
    assert {cfg.method for cfg in models} == {"moe", "pkm", "peer"}
    ratios = {f"{cfg.method} d{cfg.d_model} L{cfg.n_layers}": output_rms_ratio(cfg, train) for cfg in models}
    assert all(0.5 <= r <= 2 for r in ratios.values()), ratios


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("d_model", [16, 64])
def test_sparse_layouts_start_like_dense(name, d_model):
    cfg = ModelConfig(vocab_size=64, d_model=d_model, n_layers=4, n_heads=2, max_seq_len=32, sparse=LAYOUTS[name])
    for train in (True, False):
        assert 0.5 <= output_rms_ratio(cfg, train) <= 2
