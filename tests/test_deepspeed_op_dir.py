"""DeepSpeed's JIT-built communication op is built and loaded in a directory of this Python environment's
own (cluster.deepspeed_config.deepspeed_extensions_dir), so that two checkouts on one machine do not rebuild
it over each other (about 40 s in the first engine of every Train worker; BENCHMARKS.md, issue 19)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from cluster.deepspeed_config import deepspeed_extensions_dir

ROOT = Path(__file__).resolve().parents[1]

ENGINE_IN_A_FRESH_PROCESS = textwrap.dedent("""
    import os, tempfile
    import torch, torch.distributed as dist
    from cluster.deepspeed_config import build_engine, deepspeed_config
    dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
    model = torch.nn.Linear(4, 4)
    build_engine(model, torch.optim.AdamW(model.parameters()), None, deepspeed_config(2, 2, 1, 1.0, "fp32", 1))
    assert "TORCH_EXTENSIONS_DIR" not in os.environ, "the caller's setting is restored"
    print("\\n".join(sorted({line.split()[-1] for line in open("/proc/self/maps") if "deepspeed_shm_comm" in line})))
""")


def test_engine_loads_deepspeed_op_from_this_environments_directory():
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env.update(DS_ACCELERATOR="cpu", LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", ENGINE_IN_A_FRESH_PROCESS], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = [Path(line) for line in done.stdout.splitlines() if line.endswith(".so")]
    assert loaded, done.stdout
    assert all(deepspeed_extensions_dir() in path.parents for path in loaded), loaded


def test_each_environment_has_its_own_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    mine = deepspeed_extensions_dir()
    monkeypatch.setattr(sys, "prefix", "/some/other/checkout/.venv")
    assert deepspeed_extensions_dir() != mine and deepspeed_extensions_dir().parent == mine.parent == tmp_path
