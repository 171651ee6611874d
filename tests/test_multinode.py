"""`peer-sweeps run --address` against a real two-node Ray cluster started on this machine.

Two `ray start --block` processes (a head and one more node, each with 1 logical CPU) form the cluster;
the study's two trials use 0.75 CPU per Train worker and each Tune trial holds 0.1 CPU, so a node fits at
most one Train worker and the two concurrent trials must run on different nodes. The study runs as a
subprocess with `--address HEAD`, like a user against an existing cluster (the runner first checks that
every node sees the results directory and the data); the test checks from trials.parquet's `ray_nodes`
that the trials' workers ran on both nodes, then stops only the processes it started (about 65 s on a
loaded 2-core machine: 12 s cluster start, 48 s study, 5 s stop).

Token authentication (on by default for new clusters in Ray 2.60) gets a token made for this test and
handed to every process through RAY_AUTH_MODE / RAY_AUTH_TOKEN. All nodes live on this machine: Ray
replaces 127.0.0.1 with the machine's own interface address, which never leaves the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def _started(log: Path) -> bool:
    return log.exists() and "Ray runtime started" in log.read_text()


class LocalCluster:
    """A head node and `len(cpus) - 1` more nodes, each a `ray start --block` in its own process group."""

    def __init__(self, directory: Path, cpus: list[int]):
        self.directory, self.cpus = directory, cpus
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Unix socket paths under the temp dir must stay short (about 107 bytes): a short dir in /tmp.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-mn-", dir="/tmp"))
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                        RAY_USAGE_STATS_ENABLED="0")
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def _start_node(self, name: str, args: list[str]) -> Path:
        log = self.directory / f"{name}.log"
        with open(log, "w") as f:
            self.processes.append(subprocess.Popen(
                [str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args],
                stdout=f, stderr=subprocess.STDOUT, env=self.env, start_new_session=True))
        self.logs.append(log)
        return log

    def start(self) -> None:
        # The other nodes retry until the head's GCS answers: start them all at once.
        head = self._start_node("head", ["--head", f"--port={self.port}", f"--num-cpus={self.cpus[0]}",
                                         "--include-dashboard=false", f"--temp-dir={self.temp_dir}"])
        others = [self._start_node(f"node{i}", [f"--address={self.address}", f"--num-cpus={n}"])
                  for i, n in enumerate(self.cpus[1:], start=1)]
        for log in (head, *others):
            _wait_for(lambda: _started(log), 60, f"{log.stem} to start", self.logs)

    def stop(self) -> None:
        """SIGTERM to each `ray start --block` (it shuts its node down); after a few seconds SIGKILL to the
        process group of each (its GCS, raylet and workers), then to any leftover process of this cluster's
        temp dir. Nothing of the cluster is worth a graceful shutdown."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 5
        for process in reversed(self.processes):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=10)
        for pid in self._leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _leftover_pids(self) -> list[int]:
        """Processes whose command line names this cluster's temp dir (raylets, GCS, workers of its nodes)."""
        marker = str(self.temp_dir).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "cmdline").read_bytes():
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids


@pytest.mark.slow
def test_study_on_an_existing_two_node_cluster_spreads_trials(tmp_path, small_study):
    study = small_study(tmp_path / "multinode.yaml", budgets=(1.0e9, 2.0e9),
                        resources={"workers_per_trial": 1, "cpus_per_worker": 0.75})
    out = tmp_path / "out"
    cluster = LocalCluster(tmp_path, cpus=[1, 1])
    times = {"start": time.monotonic()}
    try:
        cluster.start()
        times["cluster up"] = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-m", "peer_sweeps.cli", "run", str(study), "--out", str(out),
             "--address", cluster.address, "--max-concurrent", "2", "--wandb", "disabled"],
            cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=240)
        times["study run"] = time.monotonic()
    finally:
        cluster.stop()
        times["cluster down"] = time.monotonic()
    print(", ".join(f"{k} {t - times['start']:.1f} s" for k, t in times.items() if k != "start"))
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert "Ray: 2 node(s)" in output, output[-3000:]
    assert "2 trial(s) at a time" in output, output[-3000:]

    rows = pd.read_parquet(out / "trials.parquet")
    assert len(rows) == 2 and set(rows["status"]) == {"completed"}, rows[["trial_id", "status", "error"]]
    per_trial = [list(nodes) for nodes in rows["ray_nodes"]]
    assert all(len(nodes) == 1 for nodes in per_trial), per_trial  # one worker per trial
    nodes = {n for trial_nodes in per_trial for n in trial_nodes}
    assert len(nodes) == 2, per_trial
    assert all(len(n) == 56 and int(n, 16) >= 0 for n in nodes), nodes  # Ray node ids (28 bytes, hex)
    for tid in rows["trial_id"]:  # workers on either node wrote into the shared results directory
        assert (out / "trials" / tid / "metrics.jsonl").stat().st_size > 0
    assert not cluster._leftover_pids()


def test_node_side_storage_check_names_what_a_node_cannot_see(tmp_path):
    """What each node's probe in `check_shared_storage` reports (run here without Ray)."""
    from cluster.runtime import MARKER_NAME, paths_seen_here

    marker = tmp_path / MARKER_NAME
    marker.write_text("token-1")
    assert paths_seen_here(str(marker), "token-1", [str(tmp_path)]) == []
    assert "another run's check file" in paths_seen_here(str(marker), "token-2", [])[0]
    assert "not shared storage" in paths_seen_here(str(tmp_path / "elsewhere" / MARKER_NAME), "token-1", [])[0]
    assert paths_seen_here(str(marker), "token-1", [str(tmp_path / "data")]) == [f"{tmp_path / 'data'} does not exist"]


def test_storage_check_skips_an_embedded_or_one_node_instance(tmp_path):
    """No probe, no file written, no Ray call: the driver's own machine is all there is."""
    from cluster.runtime import RaySession, check_shared_storage

    for owns, nodes in ((True, 3), (False, 1)):
        session = RaySession(address=None, owns_cluster=owns, storage_path=str(tmp_path), num_nodes=nodes,
                             num_cpus=2, num_gpus=0)
        check_shared_storage(session, tmp_path, [str(tmp_path / "missing")])
    assert list(tmp_path.iterdir()) == []
