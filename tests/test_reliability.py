"""Reliability: studies survive crashes, kills and bad input, and lose nothing (issue 8).

End-to-end, through the real `peer-sweeps` process, on tiny studies of dense d16 L1 trials (conftest):
- `test_killed_run_resumes_without_retraining`: `peer-sweeps run` SIGKILLed (its whole process group,
  Ray included) once its first trial is recorded. While it ran: a second `run` of the same directory was
  refused (exit 2, the lock), and `status`, `report` and trials.parquet were read repeatedly, never torn.
  After the kill: trials.parquet readable, no Ray process left. Then the same command again: the study
  completes; the trial recorded before the kill was not trained again (its row, `finished_at` and
  metrics.jsonl byte for byte unchanged); no duplicate rows.
- `test_failed_and_diverged_trials_and_unusable_wandb`: run 1, W&B online against an address where
  nothing listens: one trial raises, the other is healthy. The study goes on, the raising trial is
  "failed" with its error, the healthy one completes with its whole local record, each trial's W&B
  failure is reported exactly once, and the exit code is 1. Run 2, the raise gone and the study grown by
  a trial whose loss turns NaN: the failed trial is retried (attempts 2) and completes, the new one is
  "diverged" with its error, the completed one is not touched; exit code 0.
- `test_parquet_survives_sigkill_during_consolidation` (no Ray): a process rebuilding trials.parquet and
  curves.parquet in a loop, SIGKILLed at random moments while another reads them: every read, and the
  files after each kill, are whole.
Faults are injected through $PEER_SWEEPS_FAULT (see `Fault` in peer_sweeps/trial.py).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
PEER_SWEEPS = [sys.executable, "-m", "peer_sweeps.cli"]


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PEER_SWEEPS_", "RAY_ADDRESS"))}
    return env | {"PYTHONPATH": str(REPO)} | extra


def _plan(study: Path) -> list[str]:
    from peer_sweeps.plan import load_and_plan

    return [t.trial_id for t in load_and_plan(study)[1]]


def _cli(*argv: str):
    from peer_sweeps.cli import app

    return CliRunner().invoke(app, list(argv), prog_name="peer-sweeps")


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (Ray's raylet, GCS and workers, whatever their process group)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_tree(proc: subprocess.Popen, wait_s: float = 60) -> set[int]:
    """SIGKILLs the process group of `proc` (started with start_new_session) and every process below it;
    returns those still alive `wait_s` seconds after the group was killed (they are then killed too)."""
    tree = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + wait_s
    while time.time() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.5)
    stragglers = {p for p in tree if _alive(p)}
    for pid in stragglers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return stragglers


def _read_trials(out: Path):
    """trials.parquet as {trial_id: row}; it must be readable whenever it exists, and hold no duplicates."""
    with open(out / "trials.parquet", "rb") as f:  # one handle: a concurrent rename cannot mix versions
        rows = pq.read_table(f).to_pylist()
    ids = [r["trial_id"] for r in rows]
    assert len(ids) == len(set(ids)), f"duplicate rows: {ids}"
    return {r["trial_id"]: r for r in rows}


def _record(out: Path, tid: str) -> dict:
    return json.loads((out / "results" / f"{tid}.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_run_resumes_without_retraining(small_study, tmp_path, monkeypatch):
    import peer_sweeps.runner
    from peer_sweeps.results import is_locked

    study = small_study(tmp_path / "study.yaml", budgets=(1.0e9, 2.0e9))
    first, second = _plan(study)
    out = tmp_path / "out"
    command = [*PEER_SWEEPS, "run", str(study), "--out", str(out), "--max-concurrent", "1", "--wandb", "disabled"]
    log = tmp_path / "run1.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path,
                                start_new_session=True)
    try:
        # While it runs: a second run of the same directory is refused, in this process (were the lock
        # broken, it must not start Ray here); status, report and trials.parquet are read.
        monkeypatch.setattr(peer_sweeps.runner, "_run_tune", lambda *a, **k: pytest.fail("lock not held"))
        refused = report = None
        parquet_reads = status_reads = 0
        deadline = time.time() + 600
        while not (out / "results" / f"{first}.json").exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "first trial not recorded in time"
            if refused is None and is_locked(out):
                refused = _cli("run", str(study), "--out", str(out), "--max-concurrent", "1")
            if (out / "study.yaml").exists():
                status = _cli("status", str(out), "--json")
                assert status.exit_code == 0, status.output
                info = json.loads(status.stdout)
                assert info["total"] == 2 and info["completed"] + info["pending"] + info["running"] == 2
                status_reads += 1
            if report is None and (out / "trials" / first / "metrics.jsonl").exists():  # trial 1 training
                report = _cli("report", str(out), "--out", str(tmp_path / "report-running"))
                assert report.exit_code == 0, report.output
            if (out / "trials.parquet").exists():
                _read_trials(out)
                parquet_reads += 1
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be killed; the test proves nothing"
        status = _cli("status", str(out), "--json")
        info = json.loads(status.stdout)
        assert info["run_in_progress"] and info["completed"] == 1, info
        assert _read_trials(out)[first]["status"] == "completed"
    finally:
        stragglers = _kill_tree(proc)
    assert not stragglers, f"processes of the killed run still alive 60 s after the kill: {stragglers}"
    assert refused is not None, "never saw the first run holding its lock"
    assert refused.exit_code == 2, refused.output
    assert "another `peer-sweeps run` is using this results directory" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert report is not None and (tmp_path / "report-running" / "report.html").stat().st_size > 0

    # After the kill: whole files, a free lock, a status that says so.
    rows = _read_trials(out)
    assert rows[first]["status"] == "completed" and second not in rows or rows[second]["status"] == "completed"
    status = _cli("status", str(out), "--json")
    assert status.exit_code == 0 and not json.loads(status.stdout)["run_in_progress"]
    report = _cli("report", str(out), "--out", str(tmp_path / "report-killed"))
    assert report.exit_code == 0, report.output
    assert "all,1,0,0,1" in (tmp_path / "report-killed" / "status_counts.csv").read_text()
    kept_record = (out / "results" / f"{first}.json").read_bytes()
    metrics = out / "trials" / first / "metrics.jsonl"
    kept_metrics, kept_mtime = metrics.read_bytes(), metrics.stat().st_mtime_ns

    # The same command again: resumes, does not train the recorded trial again.
    rerun = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "2 trials, 1 already done, 1 to run" in rerun.stdout
    assert (out / "results" / f"{first}.json").read_bytes() == kept_record
    assert metrics.read_bytes() == kept_metrics and metrics.stat().st_mtime_ns == kept_mtime
    rows = _read_trials(out)
    assert sorted(rows) == sorted([first, second])
    assert all(r["status"] == "completed" and r["ppl"] > 1 for r in rows.values())
    assert rows[first]["finished_at"] == _record(out, first)["finished_at"]
    assert rows[second]["attempts"] == 1 and rows[first]["attempts"] == 1
    curves = pq.read_table(out / "curves.parquet").to_pylist()
    assert {r["trial_id"] for r in curves} == {first, second}
    assert len(curves) == len({(r["trial_id"], r["step"]) for r in curves})  # no step twice
    assert not list(out.glob(".*.tmp*")) and not list((out / "results").glob(".*.tmp*"))
    print(f"parquet reads while running: {parquet_reads}, status reads: {status_reads}")


WANDB_WARNING = "peer-sweeps: W&B (online) unavailable for trial {}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_failed_and_diverged_trials_and_unusable_wandb(small_study, tmp_path):
    study = small_study(tmp_path / "study.yaml", budgets=(1.0e9, 2.0e9))
    raising, healthy = _plan(study)
    out = tmp_path / "out"
    command = [*PEER_SWEEPS, "run", str(study), "--out", str(out), "--max-concurrent", "1"]
    unreachable_wandb = dict(
        WANDB_MODE="online", WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY="x" * 40,
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        PEER_SWEEPS_WANDB_INIT_TIMEOUT="3",
    )
    # Run 1: the first trial raises, W&B is unreachable for every trial.
    run1 = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=_env(PEER_SWEEPS_FAULT=f"raise:{raising}", **unreachable_wandb))
    output = run1.stdout + run1.stderr
    assert run1.returncode == 1, output[-4000:]
    rows = _read_trials(out)
    assert [rows[t]["status"] for t in (raising, healthy)] == ["failed", "completed"], output[-4000:]
    assert "injected fault at step 1" in rows[raising]["error"]
    assert rows[raising]["ppl"] is None and rows[raising]["attempts"] == 1
    assert rows[healthy]["error"] is None and rows[healthy]["ppl"] > 1
    # The healthy trial's local record is whole although W&B never answered ...
    metrics = [json.loads(line) for line in (out / "trials" / healthy / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, rows[healthy]["steps"] + 1))
    # ... and each trial's W&B failure was reported exactly once, naming the trial and the cause.
    for tid in (raising, healthy):
        assert output.count(WANDB_WARNING.format(tid)) == 1, output[-6000:]
    assert output.count("peer-sweeps: W&B") == 2 and "CommError" in output
    status = _cli("status", str(out), "--json")
    info = json.loads(status.stdout)
    assert (info["completed"], info["failed"], info["pending"]) == (1, 1, 0) and raising in info["failed_trials"]
    kept = (out / "results" / f"{healthy}.json").read_bytes()

    # Run 2, the study grown by one budget whose trial diverges (NaN loss at step 2), the raise gone: the
    # failed trial is retried and completes, the new one is "diverged", the completed one is left alone.
    study = small_study(tmp_path / "study.yaml", budgets=(1.0e9, 2.0e9, 1.5e9))
    diverging = _plan(study)[2]
    run2 = subprocess.run(command + ["--wandb", "disabled"], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env=_env(PEER_SWEEPS_FAULT=f"nan:{diverging}:2"))
    output = run2.stdout + run2.stderr
    assert run2.returncode == 0, output[-4000:]
    assert "3 trials, 1 already done, 2 to run" in run2.stdout
    rows = _read_trials(out)
    assert sorted(rows) == sorted([raising, healthy, diverging])
    assert rows[raising]["status"] == "completed" and rows[raising]["attempts"] == 2
    assert rows[raising]["error"] is None and rows[raising]["ppl"] > 1
    assert rows[diverging]["status"] == "diverged" and rows[diverging]["ppl"] is None
    assert rows[diverging]["error"].startswith("diverged: loss nan at step 2"), rows[diverging]["error"]
    assert (out / "results" / f"{healthy}.json").read_bytes() == kept
    assert "peer-sweeps: W&B" not in output


CONSOLIDATE_LOOP = """
import sys
from peer_sweeps.results import ResultsDir
results = ResultsDir(sys.argv[1])
results.consolidate()
print("ready", flush=True)
while True:
    results.consolidate()
"""


def test_parquet_survives_sigkill_during_consolidation(tmp_path):
    """Consolidation killed at random moments never leaves trials.parquet or curves.parquet torn, and the
    next run clears what the killed writer left behind."""
    from peer_sweeps.results import ResultsDir

    results = ResultsDir(tmp_path / "out")
    results.create()
    num_trials, steps = 40, 400
    for i in range(num_trials):
        tid = f"{i:012x}"
        results.save_row({"trial_id": tid, "study": "s", "status": "completed", "ppl": 10.0 + i,
                          "ppl_validation": 10.0 + i, "finished_at": "2026-01-01T00:00:00+00:00"})
        directory = results.path / "trials" / tid
        directory.mkdir(parents=True)
        (directory / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "tokens": 256 * s, "flops": 1e7 * s, "seconds": 0.1 * s, "train_loss": 5.0,
                        "lr": 1e-3}) + "\n" for s in range(1, steps + 1)))
    rng = random.Random(0)
    reads = 0
    for _ in range(2):  # each kill costs a fresh interpreter (torch is imported with the results module)
        proc = subprocess.Popen([sys.executable, "-c", CONSOLIDATE_LOOP, str(results.path)], stdout=subprocess.PIPE,
                                text=True, env=_env(), start_new_session=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            until = time.time() + rng.uniform(0.3, 1.5)
            while time.time() < until:  # a reader racing the writer
                assert len(_read_trials(results.path)) == num_trials
                reads += 1
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert len(_read_trials(results.path)) == num_trials
        assert pq.read_table(results.path / "curves.parquet").num_rows == num_trials * steps
    assert reads > 2
    results.remove_partial_files()
    assert not [p for p in results.path.rglob("*") if ".tmp" in p.name]
    results.consolidate()
    assert len(_read_trials(results.path)) == num_trials
