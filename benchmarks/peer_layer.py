"""Benchmark of one PEER layer against its memory-traffic floor (issue 7), and of dense FFWs beside it.

    .venv/bin/python benchmarks/peer_layer.py [--ns 128,512,1024] [--threads 2] [--repeats 7]

Setting (the issue's): T = 4096 tokens, d = 256, h = 8 heads, k = 16, query_dim = 128, fp32, 2 threads,
train mode (query BN on batch statistics), GELU, softmax gates. For each N = n^2:
- fast fwd+bwd: model.PEER (sparse_grad=True) forward + backward, median of `repeats`;
- floor: 8 T h k d x 4 bytes (expert rows read twice, gradient rows read and written) over the copy
  bandwidth measured in the same worker process right after (read + write bytes of a 256 MiB copy);
- peak memory: the growth of the worker's max RSS over the forward + backward repeats (one subprocess per
  measurement, so every figure starts from a fresh process);
- full step: forward + backward + RowSparseAdam on the expert tables + AdamW on the rest (the recipe in
  BENCHMARKS.md), and, for comparison, the same layer with dense table gradients and one dense AdamW over
  every parameter (what keeping the tables inside DeepSpeed ZeRO costs);
- reference: model.peer.PEERReference (gathers the [T, h, k, d] rows), and PEER-pytorch 0.2.2 if importable
  (configured like-for-like: dim_key = query_dim / 2, non_competing_scores=False so that h*k experts are
  active with softmax gates; its sub-keys are per head);
- of which retrieval: the query network, batch norm and product-key top-k alone (forward + backward into the
  scores), the part that is arithmetic (2 h sqrt(N) query_dim FLOPs per token for the sub-key scores) rather
  than memory traffic;
- dense FFWs: hidden h*k = 128 (equal active parameters) and hidden = PEER forward FLOPs / (4 d) (equal FLOPs);
- the default study's models: training tokens/s of each distinct model of studies/isoflop.yaml with the study's
  batch and one thread (as one trial worker has), the model's step alone (no Ray, DeepSpeed or W&B).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T, D, H, K, Q = 4096, 256, 8, 16, 128


def peer_forward_flops_per_token(num_experts: int) -> float:
    """Query projection + sub-key scores + candidate sums + experts (research note, 2 FLOPs per multiply-add)."""
    return 2 * D * H * Q + 2 * H * math.isqrt(num_experts) * Q + H * K * K + 4 * H * K * D


def floor_seconds(copy_gbps: float) -> float:
    return 8 * T * H * K * D * 4 / (copy_gbps * 1e9)


# ---------------------------------------------------------------------------------------------- worker side

def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch allocations, optimizer state
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth_gbps(repeats: int = 7) -> float:
    """Read + write bytes per second of a 256 MiB tensor copy."""
    import torch

    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _median_time(lambda: dst.copy_(src), repeats) / 1e9


def _layer(kind: str, num_experts: int):
    import torch

    from model import PEER
    from model.ffw import DenseFFW
    from model.peer import PEERReference

    if kind in ("fast", "fast_dense_adamw", "retrieval"):
        return PEER(D, num_experts, H, K, Q, sparse_grad=kind == "fast")
    if kind == "reference":
        return PEERReference(D, num_experts, H, K, Q)
    if kind == "peer_pytorch":
        from PEER_pytorch import PEER as LucidPEER

        return LucidPEER(dim=D, heads=H, num_experts=num_experts, num_experts_per_head=K, dim_key=Q // 2,
                         non_competing_scores=False)
    if kind == "ffw_active":
        return DenseFFW(D, H * K)
    if kind == "ffw_flops":
        return DenseFFW(D, round(peer_forward_flops_per_token(num_experts) / (4 * D)))
    raise ValueError(kind)


def _optimizer_step(kind: str, layer):
    import torch

    from model.sparse_adam import RowSparseAdam, expert_tables

    if kind == "fast":
        tables = expert_tables(layer)
        rest = [p for p in layer.parameters() if all(p is not t for t in tables)]
        opts = [RowSparseAdam(tables, lr=1e-3, weight_decay=0.1), torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.1)]
    else:
        opts = [torch.optim.AdamW(layer.parameters(), lr=1e-3, weight_decay=0.1)]
    return lambda: [opt.step() for opt in opts]


def worker(kind: str, num_experts: int, repeats: int, threads: int, with_step: bool) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    result = {"kind": kind, "num_experts": num_experts, "threads": torch.get_num_threads()}
    layer = _layer(kind, num_experts).train()
    x = torch.randn(1, T, D, requires_grad=True)  # (B, T, D): PEER-pytorch wants a batch dimension
    grad_y = torch.randn(1, T, D)

    def fwd_bwd():
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        layer(x).backward(grad_y)

    if kind == "retrieval":
        scores_grad = torch.randn(1, T, H, K)

        def fwd_bwd():
            for p in layer.parameters():
                p.grad = None
            x.grad = None
            layer.retrieve(x)[0].backward(scores_grad)

    base = _maxrss_mib()
    result["fwd_bwd_s"] = _median_time(fwd_bwd, repeats)
    result["peak_mib"] = _maxrss_mib() - base
    if kind == "fast":  # after the peak-memory figure: the copy's own buffers would mask it
        result["copy_gbps"] = copy_bandwidth_gbps()
    if with_step:
        step = _optimizer_step(kind, layer)
        result["step_s"] = _median_time(lambda: (fwd_bwd(), step()), repeats)
    return result


# ---------------------------------------------------------------------------------------------- driver side

def _run_worker(kind: str, num_experts: int, repeats: int, threads: int, with_step: bool) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", kind, "--n", str(num_experts), "--repeats", str(repeats),
           "--threads", str(threads)] + (["--with-step"] if with_step else [])
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        print(f"[{kind} N={num_experts}] failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def peer_pytorch_available() -> bool:
    try:
        import PEER_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def machine() -> str:
    import torch

    model_name = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return (f"{model_name}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()}), load average {os.getloadavg()[0]:.2f} at start")


def training_tokens_per_second(cfg, batch: int, steps: int = 5, threads: int | None = None) -> float:
    """Training throughput of a whole model (`model.ModelConfig`) with the recipe of BENCHMARKS.md: PEER tables
    with sparse gradients under RowSparseAdam, everything else under AdamW. Median over `steps` steps."""
    import torch
    import torch.nn.functional as F

    from model import PEER, build_model
    from model.sparse_adam import RowSparseAdam, expert_tables

    if threads:
        torch.set_num_threads(threads)
    model = build_model(cfg).train()
    for m in model.modules():
        if isinstance(m, PEER):
            m.sparse_grad = True
    tables = expert_tables(model)
    rest = [p for p in model.parameters() if all(p is not t for t in tables)]
    opts = [torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.1)] + ([RowSparseAdam(tables, lr=1e-3)] if tables else [])
    seq = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len + 1))

    def step():
        logits = model(seq[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), seq[:, 1:].reshape(-1))
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()

    return batch * cfg.max_seq_len / _median_time(step, steps)


def study_throughput(study_path: Path, threads: int, steps: int) -> list[dict]:
    """Training tokens per second of every distinct model of a study (one row per method and size), with the
    study's batch, `threads` threads, in this process: the model's own step, without Ray, DeepSpeed or W&B."""
    from peer_sweeps.plan import load_and_plan

    _, trials = load_and_plan(study_path)
    seen, rows = set(), []
    for t in trials:
        key = json.dumps(t.model, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        cfg = t.model_config
        tps = training_tokens_per_second(cfg, t.batch_tokens // t.seq_len, steps=steps, threads=threads)
        rows.append({"method": t.method, "model": f"d{cfg.d_model} L{cfg.n_layers}", "params": t.params_total,
                     "tokens_per_s": tps})
        print(f"# {t.method} d{cfg.d_model} L{cfg.n_layers}: {tps:,.0f} tokens/s", file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", default="128,512,1024", help="sqrt(N) values, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--slow-repeats", type=int, default=3, help="repeats for the reference and PEER-pytorch")
    ap.add_argument("--study", type=Path, default=ROOT / "studies" / "isoflop.yaml",
                    help="whose models' training throughput to measure ('' to skip)")
    ap.add_argument("--study-threads", type=int, default=1, help="threads per model, as one trial worker has")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    ap.add_argument("--worker")
    ap.add_argument("--n", type=int)
    ap.add_argument("--with-step", action="store_true")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.repeats, args.threads, args.with_step)))
        return

    ns = [int(s) ** 2 for s in args.ns.split(",")]
    have_lucid = peer_pytorch_available()
    print(f"# PEER layer, T={T} d={D} h={H} k={K} query_dim={Q}, fp32, {args.threads} threads")
    print(f"# {machine()}")
    if not have_lucid:
        print("# PEER-pytorch not importable: its column is left empty (pip install --no-deps PEER-pytorch==0.2.2 "
              "einx frozendict into a directory on PYTHONPATH)")
    rows = []
    for n in ns:
        row = {"N": n, "fast": _run_worker("fast", n, args.repeats, args.threads, True),
               "retrieval": _run_worker("retrieval", n, args.repeats, args.threads, False),
               "dense_adamw": _run_worker("fast_dense_adamw", n, max(3, args.slow_repeats), args.threads, True),
               "reference": _run_worker("reference", n, args.slow_repeats, args.threads, False),
               "peer_pytorch": _run_worker("peer_pytorch", n, args.slow_repeats, args.threads, False) if have_lucid else None,
               "ffw_active": _run_worker("ffw_active", n, args.repeats, args.threads, True),
               "ffw_flops": _run_worker("ffw_flops", n, args.repeats, args.threads, True)}
        rows.append(row)
        print(f"# done N={n}", file=sys.stderr)

    def get(row, kind, key):
        return (row[kind] or {}).get(key, float("nan"))

    base_time, base_step = get(rows[0], "fast", "fwd_bwd_s"), get(rows[0], "fast", "step_s")
    print("\n| N | fwd+bwd (s) | of which retrieval (s) | copy GB/s | floor (s) | time/floor | rel. to first N | peak MiB "
          "| full step (s) | step rel. | step, dense AdamW (s) | reference (s) | PEER-pytorch (s) "
          "| x faster than PEER-pytorch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        t, gbps = get(row, "fast", "fwd_bwd_s"), get(row, "fast", "copy_gbps")
        lucid = get(row, "peer_pytorch", "fwd_bwd_s")
        row["floor_s"] = floor_seconds(gbps)
        print(f"| {math.isqrt(row['N'])}^2 | {t:.3f} | {get(row, 'retrieval', 'fwd_bwd_s'):.3f} | {gbps:.1f} "
              f"| {row['floor_s']:.3f} | {t / row['floor_s']:.2f} "
              f"| {t / base_time:.2f} | {get(row, 'fast', 'peak_mib'):.0f} | {get(row, 'fast', 'step_s'):.3f} "
              f"| {get(row, 'fast', 'step_s') / base_step:.2f} | {get(row, 'dense_adamw', 'step_s'):.3f} "
              f"| {get(row, 'reference', 'fwd_bwd_s'):.3f} | {lucid:.3f} | {lucid / t:.1f} |")
    print("\n| N | dense FFW | hidden | fwd+bwd (s) | full step (s) | peak MiB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        for kind, hidden in (("ffw_active", H * K), ("ffw_flops", round(peer_forward_flops_per_token(row["N"]) / (4 * D)))):
            print(f"| {math.isqrt(row['N'])}^2 | {'equal active params' if kind == 'ffw_active' else 'equal FLOPs'} "
                  f"| {hidden} | {get(row, kind, 'fwd_bwd_s'):.3f} | {get(row, kind, 'step_s'):.3f} "
                  f"| {get(row, kind, 'peak_mib'):.0f} |")

    study_rows = study_throughput(args.study, args.study_threads, steps=3) if str(args.study) not in ("", ".") else []
    if study_rows:
        print(f"\n| {args.study.name}: method | model | params | training tokens/s ({args.study_threads} thread) |")
        print("|---|---|---|---|")
        for r in study_rows:
            print(f"| {r['method']} | {r['model']} | {r['params']:,} | {r['tokens_per_s']:,.0f} |")

    last = rows[-1]
    goals = [
        ("fwd+bwd within 2.5x of the floor at every N",
         all(get(r, "fast", "fwd_bwd_s") <= 2.5 * r["floor_s"] for r in rows)),
        ("time(last N) <= 1.3 x time(first N)", get(last, "fast", "fwd_bwd_s") <= 1.3 * base_time),
        ("full step(last N) <= 1.5 x step(first N)", get(last, "fast", "step_s") <= 1.5 * base_step),
        (">= 4x faster than PEER-pytorch at the last N",
         get(last, "peer_pytorch", "fwd_bwd_s") >= 4 * get(last, "fast", "fwd_bwd_s") if have_lucid else None),
    ]
    print()
    for name, met in goals:
        print(f"- {name}: {'n/a' if met is None else 'met' if met else 'NOT met'}")
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        args.json.write_text(json.dumps({"layer": rows, "study": study_rows}, indent=1))


if __name__ == "__main__":
    main()
