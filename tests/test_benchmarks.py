"""The PEER layer benchmark (`make bench`) runs end to end and prints its tables, sized tiny."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_peer_layer_benchmark_prints_its_tables(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "peer_layer.py"), "--ns", "16", "--repeats", "1",
         "--slow-repeats", "1", "--study", str(ROOT / "studies" / "smoke.yaml"), "--json", str(tmp_path / "b.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    layer_rows = [line for line in lines if line.startswith("| 16^2 |")]
    assert len(layer_rows) == 1 + 2  # the PEER table, and two dense FFWs
    for row in layer_rows[:1]:  # every column of the PEER table measured (PEER-pytorch's only where installed)
        assert "nan" not in row.split("|")[1:13], row
    assert any(line.startswith("| smoke.yaml: method |") for line in lines)
    assert sum(line.startswith("| peer |") for line in lines) >= 1
    assert sum(line.startswith("- ") and ("met" in line or "n/a" in line) for line in lines) == 4
    assert (tmp_path / "b.json").exists()
