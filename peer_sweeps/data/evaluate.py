"""Evaluation: which tokens of a set are scored (`evaluation_sample`), scoring them (`evaluate_lm`); and the
deterministic training batch sampler."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


MIN_SAMPLE_TOKENS = 131_072  # a study's smallest sample per set (data.eval_tokens): ~40-200 documents here
SAMPLE_SEED = 0  # one seed for every study: every trial, and `peer-sweeps eval`, scores the same tokens


def scored_tokens(n_tokens: int, seq_len: int) -> int:
    """Targets `evaluate_lm` scores in n_tokens tokens: seq_len per whole window of seq_len + 1."""
    return n_tokens // (seq_len + 1) * seq_len


def evaluation_sample(tokens: np.ndarray, eot_id: int, sample_tokens: int | None, seq_len: int,
                      seed: int = SAMPLE_SEED) -> np.ndarray:
    """The tokens of an evaluation set that are scored: the whole split (sample_tokens None, or a split that
    scores no more than sample_tokens), else a seeded simple random sample of whole documents, drawn from
    all documents of the split whatever their source (each source is represented in proportion to its
    documents, on average), the fewest in the sample's random order that score at least sample_tokens
    targets; the chosen documents are joined in the split's order. The split holds documents each preceded
    by the end-of-text token. Depends only on its arguments: the same tokens for every trial of a study."""
    if sample_tokens is None or scored_tokens(len(tokens), seq_len) <= sample_tokens:
        return np.asarray(tokens)
    starts = np.flatnonzero(np.asarray(tokens) == eot_id)
    assert len(starts) and starts[0] == 0, "an evaluation split starts with the end-of-text token"
    ends = np.append(starts[1:], len(tokens))
    order = np.random.default_rng(seed).permutation(len(starts))
    total = np.cumsum((ends - starts)[order])
    count = int(np.searchsorted(total // (seq_len + 1) * seq_len, sample_tokens)) + 1
    chosen = np.sort(order[:count])
    return np.concatenate([tokens[starts[i]:ends[i]] for i in chosen])


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int,
                token_bytes: np.ndarray, device: str | torch.device = "cpu") -> dict[str, float]:
    """Loss (nats per token), perplexity and bits per byte of `model` on the first `max_tokens` tokens of
    `tokens` (all of them if the set is shorter), cut into non-overlapping windows of seq_len + 1
    (inputs: the first seq_len, targets: the last seq_len). `model` maps LongTensor[B, T] to logits
    [B, T, V].

    Bits per byte = summed nats / ln 2 / summed UTF-8 bytes of the target tokens, both sums over targets
    that decode to at least one byte: the end-of-text token carries no text, so its loss is left out of
    bits per byte (as nanochat does), keeping bpb comparable across tokenizers. Loss and perplexity count
    every target.
    """
    return evaluation_metrics(evaluation_sums(model, tokens, seq_len, batch_size, max_tokens, token_bytes, device))


EVALUATION_SUMS = ("nats", "text_nats", "bytes", "targets")


@torch.no_grad()
def evaluation_sums(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int,
                    token_bytes: np.ndarray, device: str | torch.device = "cpu", rank: int = 0,
                    world_size: int = 1) -> torch.Tensor:
    """The sums `evaluate_lm` divides (EVALUATION_SUMS, float64 [4] on `device`, never read to the host) over
    rank `rank`'s share of the windows: windows rank, rank + world_size, ... Every rank runs the same number of
    forward passes (ZeRO-3 gathers parameters in each): a rank with one window fewer scores window 0 again
    with weight 0. All-reduce the sums over ranks, then `evaluation_metrics`."""
    n_windows = min(max_tokens, len(tokens)) // (seq_len + 1)
    if n_windows == 0:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens to evaluate, got {min(max_tokens, len(tokens))}")
    windows = torch.from_numpy(np.asarray(tokens[: n_windows * (seq_len + 1)], dtype=np.int64)).view(n_windows, seq_len + 1)
    share = torch.arange(rank, n_windows, world_size)
    per_rank = -(-n_windows // world_size)
    weights = torch.cat([torch.ones(len(share), dtype=torch.float64), torch.zeros(per_rank - len(share), dtype=torch.float64)])
    share = torch.cat([share, share.new_zeros(per_rank - len(share))])
    nbytes = torch.from_numpy(np.asarray(token_bytes, dtype=np.int64)).to(device)
    sums = torch.zeros(len(EVALUATION_SUMS), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for rows, weight in zip(share.split(batch_size), weights.split(batch_size)):
            batch, weight = windows[rows].to(device), weight.to(device)
            logits = model(batch[:, :-1])  # (B, T, V)
            targets = batch[:, 1:]  # (B, T)
            nats = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").double()
            nats = nats * weight.repeat_interleave(seq_len)
            target_bytes = nbytes[targets.flatten()] * weight.repeat_interleave(seq_len)
            text_nats = torch.where(target_bytes > 0, nats, 0.0)  # a mask, not a selection: no host sync
            sums += torch.stack([nats.sum(), text_nats.sum(), target_bytes.sum(), weight.sum() * seq_len])
    finally:
        model.train(was_training)
    return sums


def evaluation_metrics(sums: torch.Tensor) -> dict[str, float]:
    """loss, ppl, bpb and tokens (targets scored) from the sums of `evaluation_sums` (one host read)."""
    nats, text_nats, total_bytes, targets = sums.tolist()
    loss = nats / targets
    try:
        ppl = math.exp(loss)
    except OverflowError:  # a wrecked model (loss above ~709.78 nats): inf, not an error
        ppl = math.inf
    return {"loss": loss, "ppl": ppl, "bpb": text_nats / math.log(2) / max(total_bytes, 1),
            "tokens": targets}


class TrainBatches:
    """Random training windows, addressable by step.

    The GLOBAL batch of step s is `batch_size` windows of seq_len + 1 tokens whose start offsets come from
    a generator seeded by (seed, s); rank r of `world_size` gets rows [r * b, (r + 1) * b) of it, with
    b = batch_size / world_size. So the global batch does not depend on the world size, and resuming at
    step s gives exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"global batch size {batch_size} is not divisible by world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if len(tokens) < seq_len + 2:
            raise ValueError(f"{len(tokens)} training tokens are too few for seq_len {seq_len}")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.per_rank = batch_size // world_size
        self.rank = rank
        self._offsets = np.arange(seq_len + 1)

    def starts(self, step: int) -> np.ndarray:
        """Start offsets of the global batch of `step`."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of this rank at `step`: LongTensors [batch_size / world_size, seq_len]."""
        starts = self.starts(step)[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        windows = torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))
        return windows[:, :-1], windows[:, 1:]
