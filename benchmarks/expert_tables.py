"""Where PEER's expert tables are optimised in a real trial: `training.expert_tables` zero vs row_sparse.

Each cell is one real trial (`peer_sweeps.trial.run_trial`: embedded Ray, a Ray Train worker, a DeepSpeed
ZeRO-2 engine, fp32 on CPU) of the `experts` ablation's model - PEER d_model 64, 2 blocks, 4 heads x top-8,
query_dim 32 - on the bundled fixture text, for a fixed number of steps, at several numbers of experts.

    .venv/bin/python benchmarks/expert_tables.py [--experts 4096 65536 1048576] [--steps 12] [--threads 2]

Prints, per number of experts and option: the median training step (the first step left out: it faults in
the tables and allocates the optimizer state), training tokens/s, and the final training loss.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.runtime import ray_session  # noqa: E402
from peer_sweeps.data import prepare_suite  # noqa: E402
from peer_sweeps.plan import plan_study  # noqa: E402
from peer_sweeps.study import parse_study  # noqa: E402
from peer_sweeps.tracking import read_metrics  # noqa: E402
from peer_sweeps.trial import METRICS_FILE, run_trial, trial_dir  # noqa: E402

OPTIONS = ("zero", "row_sparse")


def experts_trial(data_root: Path, num_experts: int, expert_tables: str, steps: int, threads: int):
    batch_tokens = 2048
    study = {
        "name": "expert-tables",
        "data": {"suite": "fixture", "vocab_size": 512, "root": str(data_root)},
        "training": {"seq_len": 64, "batch_tokens": batch_tokens, "lr": 1.0e-2, "evals": 1, "checkpoints": 1,
                     "max_failures": 0, "zero_stage": 2, "expert_tables": expert_tables},
        "model": {"head_dim": 32},
        "methods": {"peer": {"num_experts": num_experts, "heads": 4, "top_k": 8, "query_dim": 32}},
        "design": {"kind": "ablation", "method": "peer", "size": {"d_model": 64, "n_layers": 2},
                   "tokens": steps * batch_tokens, "axes": {"num_experts": [num_experts]}},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": threads},
        "tracking": {"wandb_mode": "disabled"},
    }
    (trial,) = plan_study(parse_study(study))
    return trial


def step_seconds(results_dir: Path, trial) -> list[float]:
    seconds = [r["seconds"] for r in read_metrics(trial_dir(results_dir, trial.trial_id) / METRICS_FILE)]
    return [b - a for a, b in zip(seconds, seconds[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[4096, 65536, 1024**2])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="expert-tables-") as tmp:
        tmp = Path(tmp)
        prepare_suite("fixture", tmp / "data", 512)
        rows = []
        with ray_session(None, num_cpus=args.threads, storage_path=tmp / "ray"):
            for num_experts in args.experts:
                for option in OPTIONS:
                    trial = experts_trial(tmp / "data", num_experts, option, args.steps, args.threads)
                    results = tmp / f"{num_experts}-{option}"
                    row = run_trial(trial, results, "disabled", data_root=tmp / "data")
                    if row["status"] != "completed":
                        raise SystemExit(f"{num_experts} experts, {option}: {row['status']}: {row['error']}")
                    step = statistics.median(step_seconds(results, trial))
                    loss = read_metrics(trial_dir(results, trial.trial_id) / METRICS_FILE)[-1]["train_loss"]
                    rows.append((num_experts, option, step, trial.batch_tokens / step, loss))
                    print(f"  {num_experts} experts, {option}: {step:.3f} s/step", file=sys.stderr, flush=True)

    print(f"\nPEER d_model 64, 2 blocks, 4 heads x top-8, {args.steps} steps of 2048 tokens, "
          f"{args.threads} threads, ZeRO-2 fp32\n")
    print("| experts | expert_tables | step (s, median) | training tokens/s | final train loss |")
    print("|---|---|---|---|---|")
    for num_experts, option, step, tokens_per_second, loss in rows:
        print(f"| {num_experts:,} | {option} | {step:.3f} | {tokens_per_second:,.0f} | {loss:.3f} |")


if __name__ == "__main__":
    main()
