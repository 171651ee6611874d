"""Golden values: a refactor that changes no computation reproduces them (as torchtitan's CI does).

- `golden/loss_curves.json`: 20 AdamW steps of tiny dense, MoE, PKM and PEER models on a learnable synthetic
  sequence.
- `golden/evaluation.json`: perplexity, bits per byte and tokens scored on every evaluation set of the
  fixture suite, by a fixed model (seeded, then 20 AdamW steps on the fixture's training split, batches
  drawn by the trials' sampler).
One trial through the real worker loop (optimizer, schedule, clipping, weight-decay groups, batch sampler,
evaluation): `golden/trial.json`, tests/test_trial.py.

These tests only compare. After a deliberate change of the computation, regenerate the files with
`make golden` (tests/update_golden.py) and review their diff.
"""

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, build_model

GOLDEN = Path(__file__).parent / "golden"
LOSS_CURVES = GOLDEN / "loss_curves.json"
EVALUATION = GOLDEN / "evaluation.json"
TOLERANCE = 2e-4  # relative: float sums in another order (another CPU's kernels) move the last digits

SMALL = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
CONFIGS = {
    "dense": ModelConfig(**SMALL),
    "moe": ModelConfig(**SMALL, sparse={"method": "moe", "num_experts": 4}),
    "pkm": ModelConfig(**SMALL, sparse={"method": "pkm", "num_experts": 256, "heads": 2, "top_k": 4, "query_dim": 8}),
    "peer": ModelConfig(**SMALL, sparse={"method": "peer", "num_experts": 256, "heads": 2, "top_k": 4, "query_dim": 8}),
}


@contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_curve(cfg: ModelConfig, steps: int = 20) -> list[float]:
    with one_thread():
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


def evaluation_figures(data_root: Path, vocab_size: int = 512) -> dict[str, dict[str, float]]:
    """ppl, bpb and tokens of every evaluation set of the fixture suite (prepared under `data_root`) by a
    dense d32 L2 model, seeded and trained 20 steps of 8 x 32 tokens on the suite's training split."""
    from peer_sweeps.data import TrainBatches, evaluate_lm, load_suite

    data = load_suite("fixture", data_root, vocab_size)
    seq_len = 32
    cfg = ModelConfig(vocab_size=data.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=seq_len)
    with one_thread():
        torch.manual_seed(0)
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        batches = TrainBatches(data.train, seq_len, 8, seed=0)
        for step in range(20):
            x, y = batches.batch(step)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {name: {key: out[key] for key in ("ppl", "bpb", "tokens")}
                for name, tokens in data.eval_sets.items()
                for out in [evaluate_lm(model, tokens, seq_len, 8, 2048, data.token_bytes)]}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_golden_loss_curve(name):
    losses = train_curve(CONFIGS[name])
    golden = json.loads(LOSS_CURVES.read_text())[name]
    assert losses[-1] < losses[0] - 0.3, "the tiny model should learn"
    assert losses == pytest.approx(golden, rel=TOLERANCE)


def test_golden_evaluation_figures(data_root):
    figures = evaluation_figures(data_root)
    golden = json.loads(EVALUATION.read_text())
    assert list(figures) == list(golden) == ["validation", "verse", "prose"]
    for name, want in golden.items():
        assert figures[name]["tokens"] == want["tokens"], name
        assert figures[name]["ppl"] == pytest.approx(want["ppl"], rel=TOLERANCE), name
        assert figures[name]["bpb"] == pytest.approx(want["bpb"], rel=TOLERANCE), name
