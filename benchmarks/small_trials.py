"""Where a small trial's time goes (issue 19): the trials phase of a subset of the default study, taken apart,
and the default study's models' training step side by side with an older commit.

    .venv/bin/python benchmarks/small_trials.py phase [--budget 1.5e11] [--sizes 8,24] [--methods ...]
    .venv/bin/python benchmarks/small_trials.py phase --results runs/isoflop    # a finished run, taken apart
    .venv/bin/python benchmarks/small_trials.py steps [--base b2ef9ce] [--rounds 3] [--steps 10]

`phase`: a copy of studies/isoflop.yaml cut to one budget and the given d_model sizes and the study's first seed
(default: every method at d8 and d24 of 1.5e11 FLOPs, 8 trials), run as `peer-sweeps run` runs it (embedded Ray,
Ray Tune, one Ray Train job running a DeepSpeed engine per trial, W&B offline, as many at a time as the study's
resources fit). Each trial's row keeps wall-clock timestamps of its parts (the `timings` of results/<id>.json, written
by peer_sweeps.trial); per trial (seconds):
  train    the optimizer steps (the row's train_seconds)
  start    run_trial called -> the Train worker's loop entered (driver set-up, Train controller, placement
           group, worker process, process group)
  import   the loop's imports (torch, the model, DeepSpeed's config, the data package)
  data     the data suite loaded, the batch sampler built
  engine   model, optimizer, deepspeed.initialize, checkpoint restore
  wandb    W&B run started (init) and finished (finish)
  eval     evaluations
  ckpt     checkpoints (DeepSpeed save + Ray Train report)
  log      metrics.jsonl appends and W&B log calls
  loop     the rest of the loop (per-step Python besides the step; the summary)
  teardown the worker's return -> Ray Train's fit() returned, and the row built
  gap      this trial's row -> the next trial started in its slot (Tune scheduling, a fresh actor)
  overhead wall_seconds - train (gap not included)
and for the phase: its wall time (first trial started -> last row built), its training time (sum of
train_seconds over the concurrency), their ratio (issue 19's goal: at most 1.25), the median overhead per
trial (goal: at most 3 s).

`steps`: for every method and size of studies/isoflop.yaml, training tokens/s of the trial's own step
(DeepSpeed ZeRO engine of the study's stage over a one-rank gloo group, torch's AdamW as EagerAdamW, fp32,
one thread, the study's batch of random tokens; no Ray or W&B) in two persistent subprocesses, one per tree:
`--base` checked out by `git worktree add` into a temporary directory, and this tree. Both build the models
this tree plans for the study, from their configuration (fields the older tree lacks dropped, so it builds
them as it would have), and each imports only its own tree (PYTHONPATH); the two alternate model by model,
`--rounds` times, and the medians of the per-round medians are compared. The step code is this script's (the same for both trees): it measures what
the model and engine packages make of a step, not the trial loop's Python around it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "studies" / "isoflop.yaml"


# ------------------------------------------------------------------------------------------ trials phase


def subset_study(budget: float, sizes: list[int], methods: list[str] | None, out: Path, suite: str = "",
                 data_root: str = "") -> Path:
    import yaml

    study = yaml.safe_load(STUDY.read_text())
    study["data"].update({"suite": suite} if suite else {}, **({"root": data_root} if data_root else {}))
    if methods:
        study["methods"] = {m: study["methods"][m] for m in methods}
    study["training"]["seeds"] = study["training"].get("seeds", [0])[:1]  # overhead does not depend on the seed
    kept = [s for s in study["design"]["sizes"]  # YAML 1.1 reads 8.0e10 (no exponent sign) as a string
            if s["d_model"] in sizes and budget in [float(b) for b in s.get("budgets", [budget])]]
    if not kept:
        raise SystemExit(f"no size of {STUDY.name} among d_model {sizes} at budget {budget:g}")
    study["design"] = {"kind": "isoflop", "budgets": [budget], "sizes": [{k: v for k, v in s.items() if k != "budgets"}
                                                                       for s in kept]}
    study["name"] = "small-trials-bench"
    path = out / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def breakdown(row: dict) -> dict[str, float]:
    t = row["timings"]
    parts = {
        "train": t["train_s"],
        "start": t["worker_started"] - t["trial_started"],
        "import": t["imported"] - t["worker_started"],
        "data": (t["data_loaded"] - t["imported"]) + (t["setup_done"] - t["tracking_started"]),
        "engine": t["engine_ready"] - t["data_loaded"],
        "wandb": (t["tracking_started"] - t["engine_ready"]) + (t["tracking_finished"] - t["loop_done"]),
        "eval": t["evaluation_s"],
        "ckpt": t["checkpoint_s"],
        "log": t["logging_s"],
        "teardown": t["row_built"] - t["worker_returned"],
    }
    in_loop = t["loop_done"] - t["setup_done"] + (t["worker_returned"] - t["tracking_finished"])
    parts["loop"] = in_loop - t["train_s"] - t["evaluation_s"] - t["checkpoint_s"] - t["logging_s"]
    parts["overhead"] = row["wall_seconds"] - t["train_s"]
    return parts


def gaps(rows: list[dict], concurrency: int) -> dict[str, float]:
    """Per trial: its row built -> the next trial started in the slot it freed (trials start in finish order)."""
    starts = sorted(r["timings"]["trial_started"] for r in rows)
    finished = sorted(rows, key=lambda r: r["timings"]["row_built"])
    return {r["trial_id"]: starts[i + concurrency] - r["timings"]["row_built"]
            for i, r in enumerate(finished) if i + concurrency < len(starts)}


def run_phase(args) -> None:
    if args.results:  # a finished run, e.g. the default study's own (`make run`): taken apart, not run again
        out = Path(args.results)
        print_phase(out, "a finished run", None, None, None)
        return
    from peer_sweeps.data import DataError, load_suite, prepare_suite
    from peer_sweeps.runner import RunOptions, run_study
    from peer_sweeps.study import load_study

    work = Path(tempfile.mkdtemp(prefix="small-trials-"))
    path = subset_study(args.budget, [int(s) for s in args.sizes.split(",")], args.methods.split(",") if args.methods else None,
                        work, args.suite, args.data_root)
    study = load_study(path)
    try:
        load_suite(study.data.suite, study.data.root, study.data.vocab_size)
    except DataError:
        print(f"# preparing the {study.data.suite} data suite first (not timed)", flush=True)
        prepare_suite(study.data.suite, study.data.root, study.data.vocab_size)
    out = work / "run"
    loads = [os.getloadavg()[0]]
    t0 = time.time()
    code = run_study(path, RunOptions(out=out, wandb_mode="offline"))
    total = time.time() - t0
    loads.append(os.getloadavg()[0])
    print_phase(out, f"{path.name} (budget {args.budget:g}, d_model {args.sizes})", loads, total, code)


def print_phase(out: Path, what: str, loads: list[float] | None, total: float | None, code: int | None) -> None:
    """The per-trial table (per model, medians over its trials, beyond 16 trials) and the phase's figures."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    rows = [r for r in rows if "timings" in r and "worker_started" in r["timings"]]
    if not rows:
        raise SystemExit(f"no trial recorded its timings (exit code {code}); see {out}")
    concurrency = _concurrency(rows)
    gap = gaps(rows, concurrency)
    cols = ["train", "start", "import", "data", "engine", "wandb", "eval", "ckpt", "log", "loop", "teardown", "gap",
            "overhead"]
    load = f"; 1-min load average {loads[0]:.1f} at start, {loads[1]:.1f} at the end" if loads else ""
    print(f"\n# {_machine()}{load}")
    print(f"# {len(rows)} trials of {what}; {concurrency} at a time; results in {out}")
    parts_of = {r["trial_id"]: breakdown(r) | {"gap": gap.get(r["trial_id"], float("nan"))} for r in rows}
    ordered = sorted(rows, key=lambda r: r["timings"]["trial_started"])
    grouped = len(rows) > 16
    groups: dict[str, list[dict]] = {}
    for r in ordered:
        label = f"{r['method']} d{r['d_model']} L{r['n_layers']}"
        groups.setdefault(label if grouped else r["trial_id"], []).append(r)
    print(f"\n| {'model (median of its trials)' if grouped else 'trial'} | steps | wall | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))

    def median(values) -> str:
        values = [v for v in values if v == v]
        return f"{statistics.median(values):.2f}" if values else ""

    for key, group in groups.items():
        first = group[0]
        label = f"{first['method']} d{first['d_model']} L{first['n_layers']}" + (f" ({len(group)})" if grouped else "")
        steps, wall = median(r["steps"] for r in group).split(".")[0], median(r["wall_seconds"] for r in group)
        print(f"| {label} | {steps} | {wall} | " + " | ".join(median(parts_of[r["trial_id"]][c] for r in group)
                                                          for c in cols) + " |")
    print("| median | | " + f"{median(r['wall_seconds'] for r in rows)} | "
          + " | ".join(median(p[c] for p in parts_of.values()) for c in cols) + " |")
    phase = max(r["timings"]["row_built"] for r in rows) - min(r["timings"]["trial_started"] for r in rows)
    training = sum(r["train_seconds"] for r in rows) / concurrency
    overheads = [p["overhead"] + (p["gap"] if p["gap"] == p["gap"] else 0.0) for p in parts_of.values()]
    print(f"\ntrials phase: {phase:.1f} s wall for {training:.1f} s of training (sum of train_seconds "
          f"{sum(r['train_seconds'] for r in rows):.1f} s / {concurrency}): ratio {phase / training:.2f} (goal <= 1.25)")
    print(f"median overhead per trial (wall - train + gap): {statistics.median(overheads):.2f} s (goal <= 3)")
    pids = {r["timings"].get("driver_pid") for r in rows}
    print(f"trials driven from {len(pids)} Tune actor process(es) for {len(rows)} trials")
    if total is not None:
        print(f"peer-sweeps run as a whole (Ray start, Tune, consolidation): {total:.1f} s; exit code {code}")


def _concurrency(rows: list[dict]) -> int:
    """The most trials that ran at once (their [started, row built] intervals)."""
    events = sorted([(r["timings"]["trial_started"], 1) for r in rows] + [(r["timings"]["row_built"], -1) for r in rows])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


# ------------------------------------------------------------------------------------ steps side by side


def step_worker() -> None:
    """Serves measurements over stdin/stdout: one JSON request per line {"key", "model", "training",
    "steps", "warmup"} (study_models), one JSON answer.
    Imports only the tree on PYTHONPATH (this file's directory is not a package root)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from cluster.deepspeed_config import build_engine, deepspeed_config
    from cluster.eager_adamw import EagerAdamW
    from model import build_model
    from model.config import ModelConfig
    from peer_sweeps.trial import param_groups

    torch.set_num_threads(1)
    store = tempfile.mktemp(prefix="small-trials-gloo-")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    engines: dict[str, tuple] = {}
    print(json.dumps({"ready": True, "tree": os.environ["PYTHONPATH"]}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        key = request["key"]
        if key not in engines:  # the model as this tree builds it, from the configuration this tree can read
            spec, training = request["model"], request["training"]
            torch.manual_seed(0)
            model = build_model(ModelConfig.model_validate(_known_fields(ModelConfig, spec)))
            sequences = training["batch_tokens"] // training["seq_len"]
            optimizer = EagerAdamW(param_groups(model, training["weight_decay"]), lr=training["lr"],
                                   betas=tuple(training["adam_betas"]))
            engine = build_engine(model, optimizer, None,
                                  deepspeed_config(training["zero_stage"], sequences, 1, training["grad_clip"], "fp32", 1))
            tokens = torch.randint(0, spec["vocab_size"], (sequences, training["seq_len"] + 1))
            engines[key] = (engine, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), training["batch_tokens"])
        engine, x, y, batch_tokens = engines[key]
        times = []
        for _ in range(request["warmup"] + request["steps"]):
            tick = time.perf_counter()
            logits = engine(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            engine.backward(loss)
            engine.step()
            float(loss.detach().double().cpu())
            times.append(time.perf_counter() - tick)
        print(json.dumps({"tokens_per_s": batch_tokens / statistics.median(times[request["warmup"]:])}), flush=True)


def _known_fields(config_class, spec: dict) -> dict:
    """`spec` (this tree's ModelConfig dump) cut to the fields `config_class` of the tree being measured has:
    the same architecture, without options an older tree does not know (they default to what it did)."""
    known = {k: v for k, v in spec.items() if k in config_class.model_fields}
    sparse = known.get("sparse")
    if isinstance(sparse, dict):
        for candidate in _model_classes(config_class.model_fields["sparse"].annotation):
            if "method" in candidate.model_fields and sparse.get("method") == candidate.model_fields["method"].default:
                known["sparse"] = {k: v for k, v in sparse.items() if k in candidate.model_fields}
    return known


def _model_classes(annotation) -> list[type]:
    """The pydantic classes inside a (possibly Optional, Annotated, Union) annotation."""
    import typing

    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return [annotation]
    return [c for arg in typing.get_args(annotation) for c in _model_classes(arg)]


def study_models() -> dict[str, dict]:
    """One request per distinct model of studies/isoflop.yaml (this tree's plan): its config and training."""
    from peer_sweeps.plan import load_and_plan

    _, trials = load_and_plan(STUDY)
    models = {}
    for trial in trials:
        training = {k: trial.training[k] for k in ("lr", "weight_decay", "adam_betas", "zero_stage", "grad_clip")}
        models.setdefault(model_key(trial), {"model": trial.model_config.model_dump(mode="json"),
                                             "training": training | {"batch_tokens": trial.batch_tokens,
                                                                     "seq_len": trial.seq_len}})
    return models


def model_key(trial) -> str:
    return f"{trial.method} d{trial.model['d_model']} L{trial.model['n_layers']}"


class StepWorker:
    def __init__(self, tree: Path):
        from cluster.allocator import TRAINING_MALLOC_ENV

        # as a Train worker runs: glibc malloc settings, DeepSpeed on the CPU, one thread
        env = {**os.environ, **TRAINING_MALLOC_ENV, "PYTHONPATH": str(tree), "DS_ACCELERATOR": "cpu",
               "OMP_NUM_THREADS": "1", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}
        self.tree = tree
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "step-worker"], cwd=tree, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._answer()  # ready

    def _answer(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit(f"the step worker of {self.tree} died (exit code {self.proc.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def measure(self, key: str, spec: dict, steps: int, warmup: int) -> float:
        self.proc.stdin.write(json.dumps({"key": key, **spec, "steps": steps, "warmup": warmup}) + "\n")
        self.proc.stdin.flush()
        return self._answer()["tokens_per_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def run_steps(args) -> None:
    base_tree = Path(tempfile.mkdtemp(prefix=f"small-trials-{args.base}-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_tree), args.base], check=True,
                   capture_output=True)
    workers = {}
    try:
        workers = {"base": StepWorker(base_tree), "this": StepWorker(ROOT)}
        models = study_models()
        keys = list(models)
        if args.models:
            keys = [k for k in keys if any(k.startswith(m) for m in args.models.split(","))]
        loads = [os.getloadavg()[0]]
        figures = {k: {"base": [], "this": []} for k in keys}
        for key in keys:
            for i in range(args.rounds):  # alternate, starting with each tree every other round
                for side in (("base", "this") if i % 2 == 0 else ("this", "base")):
                    figures[key][side].append(workers[side].measure(key, models[key], args.steps, args.warmup))
            old, new = (statistics.median(figures[key][s]) for s in ("base", "this"))
            print(f"# {key}: {old:,.0f} -> {new:,.0f} tokens/s ({new / old:.2f}x)", file=sys.stderr, flush=True)
        loads.append(os.getloadavg()[0])
    finally:
        for worker in workers.values():
            worker.close()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], capture_output=True)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\n# {_machine()}; 1-min load average {loads[0]:.1f} at start, {loads[1]:.1f} at the end")
    print(f"# {STUDY.name}'s models, the trial's step (ZeRO engine, fp32, 1 thread); median of {args.steps} steps after "
          f"{args.warmup}, median over {args.rounds} alternating rounds")
    print(f"\n| model | {args.base} tokens/s | this tree ({head}{'+' if _dirty() else ''}) tokens/s | ratio |")
    print("|---|---|---|---|")
    ratios = []
    for key in keys:
        old, new = (statistics.median(figures[key][s]) for s in ("base", "this"))
        ratios.append(new / old)
        print(f"| {key} | {old:,.0f} | {new:,.0f} | {new / old:.2f} |")
    print(f"\nratio: min {min(ratios):.2f}, median {statistics.median(ratios):.2f} (goal: >= 1.5 for every model)")


def _dirty() -> bool:
    return bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip())


def _machine() -> str:
    name = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
            break
    return f"{name}, {os.cpu_count()} cores"


def main() -> None:
    if sys.argv[1:] == ["step-worker"]:
        return step_worker()
    sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    phase = sub.add_parser("phase", help="a subset of the default study's trials phase, taken apart")
    phase.add_argument("--budget", type=float, default=1.5e11)
    phase.add_argument("--sizes", default="8,24", help="d_model values of the study's size grid")
    phase.add_argument("--methods", default="", help="comma-separated; default every method of the study")
    phase.add_argument("--data-root", default="", help="where the data suite is (prepared there if it is not); "
                       "default the study's, ./data")
    phase.add_argument("--results", default="", help="take apart a finished run's results directory instead "
                       "(e.g. runs/isoflop after `make run`)")
    phase.add_argument("--suite", default="", help="another data suite (e.g. 'fixture' for a quick check)")
    steps = sub.add_parser("steps", help="the study's models' step, --base vs this tree, alternating")
    steps.add_argument("--base", default="b2ef9ce")
    steps.add_argument("--rounds", type=int, default=3)
    steps.add_argument("--steps", type=int, default=10)
    steps.add_argument("--warmup", type=int, default=3)
    steps.add_argument("--models", default="", help="comma-separated prefixes (e.g. 'dense d16,peer'); default all")
    args = parser.parse_args()
    run_phase(args) if args.mode == "phase" else run_steps(args)


if __name__ == "__main__":
    main()
