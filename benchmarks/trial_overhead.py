"""Fixed cost of a 1-worker Ray Train + DeepSpeed job, apart from its training time.

One embedded Ray instance (started once, as a sweep does), then N jobs of cluster.smoke's MLP loop, each a
fresh Train run: controller, worker process, gloo process group, `import deepspeed` + ZeRO engine, first
batch, the remaining steps, shutdown. The first job also JIT-builds DeepSpeed's shm op when
~/.cache/torch_extensions lacks it; it is run as a warm-up and left out of the median.

    .venv/bin/python benchmarks/trial_overhead.py [--runs 5] [--steps 20] [--zero-stage 2]

Columns (seconds): start = fit() called -> loop function entered (controller, placement group, worker
process, process group); engine = import deepspeed + deepspeed.initialize; first = first batch;
train = the other steps; end = loop returned -> fit() returned; fixed = total - train.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.runtime import ray_session  # noqa: E402
from cluster.smoke import mlp_regression_loop  # noqa: E402
from cluster.train_job import run_train_job  # noqa: E402


def one_job(storage: str, name: str, steps: int, zero_stage: int, lean: bool) -> dict[str, float]:
    config = {"steps": steps, "global_batch": 32, "zero_stage": zero_stage, "dim": 16, "hidden": 64}
    t0 = time.time()
    result = run_train_job(mlp_regression_loop, config, run_name=name, storage_path=storage,
                           num_workers=1, cpus_per_worker=1, lean=lean)
    total = time.time() - t0
    t = result.return_value["timings"]
    loop_start = t["worker_started_at"]
    train = t["loop_s"] - t["engine_s"] - t["first_step_s"]
    return {
        "start": loop_start - t0,
        "engine": t["engine_s"],
        "first": t["first_step_s"],
        "train": train,
        "end": total - (loop_start - t0) - t["loop_s"],
        "total": total,
        "fixed": total - train,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--compare", action="store_true",
                        help="alternate lean jobs with stock Ray Train jobs (lean=False)")
    args = parser.parse_args()
    variants = [True, False] if args.compare else [True]

    storage = tempfile.mkdtemp(prefix="trial-overhead-")
    t0 = time.time()
    with ray_session(None, num_cpus=2, storage_path=storage) as session:
        ray_start = time.time() - t0
        rows = {lean: [] for lean in variants}
        loads = []
        for i in range(args.runs + 1):
            for lean in variants:
                name = f"overhead-{os.getpid()}-{i}-{'lean' if lean else 'stock'}"
                rows[lean].append(one_job(session.storage_path, name, args.steps, args.zero_stage, lean))
                loads.append(os.getloadavg()[0])
    print(f"ray.init (once per sweep): {ray_start:.2f} s; {os.cpu_count()} CPUs; 1-min load average during "
          f"the runs {min(loads):.1f}-{max(loads):.1f}; {args.steps} steps, ZeRO-{args.zero_stage}")
    for lean in variants:
        cols = list(rows[lean][0])
        print(f"\n{'lean (default)' if lean else 'stock Ray Train (lean=False)'}")
        print("run     " + "".join(f"{c:>9}" for c in cols))
        for i, row in enumerate(rows[lean]):
            label = "warm-up" if i == 0 else f"{i}"
            print(f"{label:<8}" + "".join(f"{row[c]:9.2f}" for c in cols))
        timed = rows[lean][1:]
        print("median  " + "".join(f"{statistics.median(r[c] for r in timed):9.2f}" for c in cols))


if __name__ == "__main__":
    main()
