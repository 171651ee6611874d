"""The W&B mirror logs every evaluation and a bounded number of training steps (issue 19: each `run.log` costs
the trial ~0.35 ms and the W&B service CPU); metrics.jsonl keeps every step."""

from __future__ import annotations

from peer_sweeps.tracking import WANDB_TRAINING_POINTS, WandbMirror


class FakeRun:
    def __init__(self):
        self.steps = []

    def log(self, values, step):
        self.steps.append(step)


def mirrored_steps(total_steps: int, eval_steps: set[int]) -> list[int]:
    run = FakeRun()
    mirror = WandbMirror(run, "t", "offline", total_steps)
    for step in range(1, total_steps + 1):
        mirror.log({"step": step, "train_loss": 1.0, **({"ppl": 2.0} if step in eval_steps else {})})
    return run.steps


def test_a_long_trial_logs_a_bounded_stride_and_every_evaluation():
    steps = mirrored_steps(1589, {397, 794, 1192, 1589})
    assert len(steps) <= WANDB_TRAINING_POINTS + 4 and len(steps) >= WANDB_TRAINING_POINTS - 5
    assert {397, 794, 1192, 1589} <= set(steps) and steps == sorted(steps)
    stride = steps[0]
    assert stride > 1 and [s for s in steps if s % stride] == [397, 794, 1589]  # the rest: one stride


def test_a_short_trial_logs_every_step():
    assert mirrored_steps(WANDB_TRAINING_POINTS, {WANDB_TRAINING_POINTS}) == list(range(1, WANDB_TRAINING_POINTS + 1))
