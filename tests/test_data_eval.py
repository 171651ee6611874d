"""Evaluation helpers: loss, perplexity and bits per byte on a fixed number of tokens; the deterministic,
step-addressable training batch sampler."""

import math

import numpy as np
import pytest
import torch

from peer_sweeps.data import TrainBatches, evaluate_lm
from peer_sweeps.data.evaluate import evaluation_metrics


class Uniform(torch.nn.Module):
    """Equal logits over `vocab` ids: every target costs ln(vocab) nats."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return torch.zeros(*x.shape, self.vocab)


def test_bits_per_byte_by_hand():
    # vocab 4, token 0 is end-of-text (0 bytes), tokens 1, 2, 3 decode to 1, 2 and 3 bytes.
    token_bytes = np.array([0, 1, 2, 3])
    tokens = np.array([0, 1, 2, 3, 0, 3, 3, 1, 9, 9], dtype=np.uint16)  # the last two lie past max_tokens
    model = Uniform(4)
    out = evaluate_lm(model, tokens, seq_len=3, batch_size=1, max_tokens=8, token_bytes=token_bytes)
    # two windows of 4 tokens: targets [1, 2, 3] and [3, 3, 1]: 6 targets, 13 bytes, 2 bits each.
    assert model.calls == [(1, 3), (1, 3)]
    assert out["tokens"] == 6
    assert out["loss"] == pytest.approx(math.log(4))
    assert out["ppl"] == pytest.approx(4.0)
    assert out["bpb"] == pytest.approx(6 * 2 / 13)


def test_perplexity_past_float_range_is_infinite_not_an_error():
    """A wrecked model's loss of 1,000 nats per token: perplexity inf (math.exp raised OverflowError)."""
    metrics = evaluation_metrics(torch.tensor([1000.0 * 64, 900.0 * 64, 100.0, 64.0], dtype=torch.float64))
    assert metrics["loss"] == 1000.0 and metrics["ppl"] == math.inf and metrics["tokens"] == 64


def test_end_of_text_targets_count_in_loss_but_not_in_bits_per_byte():
    token_bytes = np.array([0, 2])
    tokens = np.array([1, 0, 1, 1], dtype=np.uint16)  # targets 0, 1, 1: the end-of-text carries no bytes
    out = evaluate_lm(Uniform(2), tokens, seq_len=3, batch_size=4, max_tokens=100, token_bytes=token_bytes)
    assert out["loss"] == pytest.approx(math.log(2))
    assert out["bpb"] == pytest.approx(2 * 1 / 4)


def test_evaluate_restores_training_mode_and_rejects_too_few_tokens():
    model = Uniform(2).train()
    evaluate_lm(model, np.zeros(5, np.uint16), 2, 1, 5, np.ones(2))
    assert model.training
    with pytest.raises(ValueError, match="at least"):
        evaluate_lm(model, np.zeros(5, np.uint16), 8, 1, 5, np.ones(2))


TOKENS = np.arange(10_000, dtype=np.uint16)


def test_global_batch_is_the_same_for_any_world_size():
    one = TrainBatches(TOKENS, seq_len=16, batch_size=8, seed=3)
    halves = [TrainBatches(TOKENS, seq_len=16, batch_size=8, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in (0, 1, 57):
        x, y = one.batch(step)
        parts = [h.batch(step) for h in halves]
        assert x.shape == (8, 16) and parts[0][0].shape == (4, 16)
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))


def test_batches_are_step_addressable_shifted_windows():
    a = TrainBatches(TOKENS, seq_len=16, batch_size=4, seed=0)
    x5, y5 = a.batch(5)
    b = TrainBatches(TOKENS, seq_len=16, batch_size=4, seed=0)  # a resumed run starting at step 5
    assert torch.equal(b.batch(5)[0], x5)
    assert not torch.equal(a.batch(6)[0], x5)
    assert not torch.equal(TrainBatches(TOKENS, 16, 4, seed=1).batch(5)[0], x5)
    assert x5.dtype == torch.int64
    assert torch.equal(y5[:, :-1], x5[:, 1:])
    assert torch.equal(x5[:, 1:] - x5[:, :-1], torch.ones(4, 15, dtype=torch.int64))  # contiguous windows
    assert int(y5.max()) < len(TOKENS)


def test_batches_reject_bad_sharding():
    with pytest.raises(ValueError, match="divisible"):
        TrainBatches(TOKENS, 16, 6, 0, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        TrainBatches(TOKENS, 16, 8, 0, rank=2, world_size=2)
