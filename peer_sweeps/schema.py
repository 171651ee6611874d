"""The explicit pyarrow schemas of `trials.parquet` and `curves.parquet` (see shared CONTRACT.md).

Evaluation columns depend on the study's data suite: for every evaluation set `<set>` there are
`ppl_<set>`, `bpb_<set>` and `eval_tokens_<set>` (targets scored); `ppl` is the perplexity on the primary
validation set.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

TRIAL_STATUSES = ("completed", "failed", "diverged")

_TRIAL_FIELDS: list[tuple[str, pa.DataType]] = [
    ("trial_id", pa.string()),
    ("study", pa.string()),
    ("kind", pa.string()),  # "isoflop" | "ablation"
    ("method", pa.string()),  # "dense" | "moe" | "pkm" | "peer"
    ("status", pa.string()),  # one of TRIAL_STATUSES
    ("budget_flops", pa.float64()),
    ("total_flops", pa.float64()),
    ("tokens", pa.int64()),
    ("steps", pa.int64()),
    ("seq_len", pa.int64()),
    ("batch_tokens", pa.int64()),
    ("params_total", pa.int64()),
    ("params_active", pa.int64()),
    ("params_backbone", pa.int64()),  # non-embedding parameters of the dense backbone: the size an isoFLOP grid varies
    ("d_model", pa.int64()),
    ("n_layers", pa.int64()),
    ("n_heads", pa.int64()),
    ("num_experts", pa.int64()),
    ("expert_heads", pa.int64()),
    ("top_k", pa.int64()),
    ("query_bn", pa.bool_()),
    ("seed", pa.int64()),
    ("lr", pa.float64()),
    ("loss", pa.float64()),  # final validation loss (nats per token)
    ("ppl", pa.float64()),
]

_TRIAL_TAIL_FIELDS: list[tuple[str, pa.DataType]] = [
    ("usage", pa.float64()),
    ("unevenness", pa.float64()),
    ("train_seconds", pa.float64()),
    ("wall_seconds", pa.float64()),  # the trial's start (run_trial called) to its row written
    ("tokens_per_second", pa.float64()),
    ("mfu", pa.float64()),  # model FLOPs utilisation over the trial's training steps (GPU workers; null on CPU)
    ("gpu_memory_gb", pa.float64()),  # peak allocated GPU memory of rank 0 (GPU workers; null on CPU)
    ("ray_nodes", pa.list_(pa.string())),
    ("attempts", pa.int64()),
    ("error", pa.string()),
    ("finished_at", pa.string()),  # ISO 8601, UTC
]

_CURVE_FIELDS: list[tuple[str, pa.DataType]] = [
    ("trial_id", pa.string()),
    ("step", pa.int64()),
    ("tokens", pa.int64()),
    ("flops", pa.float64()),
    ("seconds", pa.float64()),  # training seconds so far (evaluation excluded)
    ("train_loss", pa.float64()),
    ("lr", pa.float64()),
    ("ppl", pa.float64()),
]

_CURVE_TAIL_FIELDS: list[tuple[str, pa.DataType]] = [
    ("usage", pa.float64()),
    ("unevenness", pa.float64()),
]


def _eval_fields(eval_sets: Iterable[str]) -> list[tuple[str, pa.DataType]]:
    fields = []
    for name in eval_sets:
        fields += [(f"ppl_{name}", pa.float64()), (f"bpb_{name}", pa.float64()), (f"eval_tokens_{name}", pa.int64())]
    return fields


def trials_schema(eval_sets: Iterable[str]) -> pa.Schema:
    """Schema of trials.parquet for a study evaluated on `eval_sets` (primary validation set first)."""
    return pa.schema(_TRIAL_FIELDS + _eval_fields(eval_sets) + _TRIAL_TAIL_FIELDS)


def curves_schema(eval_sets: Iterable[str]) -> pa.Schema:
    """Schema of curves.parquet; evaluation columns are null except at evaluation steps."""
    return pa.schema(_CURVE_FIELDS + _eval_fields(eval_sets) + _CURVE_TAIL_FIELDS)


def eval_sets_of(schema: pa.Schema) -> list[str]:
    """The evaluation set names a trials or curves schema carries, in order."""
    return [name[len("ppl_"):] for name in schema.names if name.startswith("ppl_")]
