"""A refactor that changes no computation reproduces the stored loss curves of tiny dense and PEER models.

Regenerate (only after a deliberate change of the computation) with PEER_SWEEPS_UPDATE_GOLDEN=1.
"""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, build_model

GOLDEN = Path(__file__).parent / "golden" / "loss_curves.json"
CONFIGS = {
    "dense": ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, max_seq_len=16),
    "peer": ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, max_seq_len=16,
                        sparse={"method": "peer", "num_experts": 256, "heads": 2, "top_k": 4, "query_dim": 8}),
}


def train_curve(cfg: ModelConfig, steps: int = 20) -> list[float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(1234)
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        data = torch.Generator().manual_seed(99)
        # A learnable sequence: token t+1 = (a * token t + b) mod vocab, per-row (a, b).
        losses = []
        for _ in range(steps):
            a = torch.randint(1, 8, (8, 1), generator=data)
            start = torch.randint(0, cfg.vocab_size, (8, 1), generator=data)
            seq = (start + a * torch.arange(cfg.max_seq_len + 1)) % cfg.vocab_size
            logits = model(seq[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), seq[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_golden_loss_curve(name):
    losses = train_curve(CONFIGS[name])
    if os.environ.get("PEER_SWEEPS_UPDATE_GOLDEN"):
        stored = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        GOLDEN.write_text(json.dumps(stored | {name: losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())[name]
    assert losses[-1] < losses[0] - 0.3, "the tiny model should learn"
    assert losses == pytest.approx(golden, rel=2e-4)
