#!/usr/bin/env bash
# The GPU checks (tests marked `gpu`) on one H100/H200, in at most 8 minutes, and one summary.
#   benchmarks/gpu_check.sh            from the repository root or anywhere; uses .venv
# A one-GPU bf16 trial of each method (fixture text), and the PEER layer at d1024, N = 1024^2, 8 heads,
# top-16: forward + backward time against its HBM floor, peak memory. Record the summary in BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD
export PEER_SWEEPS_GPU_SUMMARY
PEER_SWEEPS_GPU_SUMMARY=$(mktemp)
trap 'rm -f "$PEER_SWEEPS_GPU_SUMMARY"' EXIT

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PYTHON; nothing run" >&2
    exit 2
fi
start=$(date +%s)
timeout 470 "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -n 15
status=${PIPESTATUS[0]}
"$PYTHON" - "$PEER_SWEEPS_GPU_SUMMARY" "$status" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
path, status, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3]
records = [json.loads(line) for line in open(path)]
print(f"\n== gpu_check summary: pytest exit {status}{' (timed out)' if status == 124 else ''}, {seconds} s ==")
for r in records:
    if r["check"] == "trial":
        print(f"trial {r['method']:6s} {r['status']:9s} ppl {r['ppl']}  {r['steps']} steps  {r['seconds']} s"
              + (f"  error: {r['error']}" if r["error"] else ""))
    else:
        print(f"PEER d1024 N=1024^2 h8 k16 T4096 bf16 on {r['device']}: fwd+bwd {r['fwd_bwd_ms']} ms, HBM floor "
              f"{r['hbm_floor_ms']} ms ({r['x_floor']}x), peak {r['peak_gb']} GB (tables {r['tables_gb']} GB)")
if not records:
    print("no figures recorded")
PY
exit "$status"
