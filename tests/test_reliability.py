"""Reliability: studies survive crashes, kills and bad input, and lose nothing (issues 8, 22).

End-to-end, through the real `peer-sweeps` process, on tiny studies of dense d16 L1 trials (conftest):
- `test_killed_run_resumes_without_retraining`: `peer-sweeps run` SIGKILLed (its whole process group,
  Ray included) once its second trial is half trained. While it ran: a second `run` and a `trial` of the
  same directory were refused (exit 2, the lock); `status` was read repeatedly (every read counting the two
  trials), `report` once, and trials.parquet and curves.parquet repeatedly, never torn, every trial that
  trials.parquet lists already in curves.parquet (curves are replaced first). After the kill:
  trials.parquet readable, no Ray process left. Then the same command again: the study completes; the
  trial recorded before the kill was not trained again (its row, `finished_at` and metrics.jsonl byte for
  byte unchanged); no duplicate rows.
- `test_failed_and_diverged_trials_and_unusable_wandb`: run 1, W&B online against a server that accepts
  connections and never answers (an init time-out of 3 s, which the server measures): one trial raises,
  the other is healthy. The study goes on, the raising trial is "failed" with its error, the healthy one
  completes with its whole local record, each trial's W&B failure is reported exactly once, and the exit
  code is 1. Run 2, the raise gone, W&B offline, and the study grown by a trial whose loss turns NaN: the
  failed trial is retried (attempts 2) and completes although its W&B service is killed part-way (one
  line), the new one is "diverged" with its error, the completed one is not touched; exit code 0; `status`
  counts the diverged trial. Run 3, after every kind of half-written file was left by the real writers
  (each killed at its rename): nothing is trained (the diverged trial is not retried) and the files are gone.
- `test_parquet_survives_sigkill_during_consolidation` (no Ray): a process rebuilding trials.parquet and
  curves.parquet in a loop, SIGKILLed at random moments while another reads them: every read, and the
  files after each kill, are whole.
- `test_curves_are_replaced_before_trials` (no Ray): a rebuild that dies between its two files leaves no
  trial listed in trials.parquet without its curve.
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


def _planned_steps(study: Path) -> list[int]:
    from peer_sweeps.plan import load_and_plan

    return [t.steps for t in load_and_plan(study)[1]]


def _steps_recorded(directory: Path) -> int:
    try:
        return len((directory / "metrics.jsonl").read_bytes().splitlines())
    except FileNotFoundError:
        return 0


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


LIVE_STATUS_READS, LIVE_PARQUET_READS = 20, 5  # at least, while a study runs (README states them)


def test_readme_states_the_live_reads():
    text = " ".join((REPO / "README.md").read_text().split())
    assert (f"`status` read at least {LIVE_STATUS_READS} times, `report` once and both Parquet files at least "
            f"{LIVE_PARQUET_READS} times while a study runs") in text


def _read_live_tables(out: Path) -> dict:
    """trials.parquet, then curves.parquet, as a reader does: both whole, and (curves being replaced first)
    every trial that trials.parquet lists has its curve in the curves.parquet read after it."""
    rows = _read_trials(out)
    with open(out / "curves.parquet", "rb") as f:
        curved = set(pq.read_table(f, columns=["trial_id"]).column("trial_id").to_pylist())
    assert set(rows) <= curved, f"trials listed without their curves: {set(rows) - curved}"
    return rows


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_run_resumes_without_retraining(small_study, tmp_path, monkeypatch):
    import cluster.runtime
    import peer_sweeps.runner
    from peer_sweeps.results import is_locked

    # Trials long enough to read the files while the second one trains (a trial trains in its Tune actor, and
    # the next one starts within a fraction of a second of the last one's row).
    study = small_study(tmp_path / "study.yaml", budgets=(1.0e10, 4.0e10))
    first, second = _plan(study)
    second_half_done = _planned_steps(study)[1] // 2
    out = tmp_path / "out"
    command = [*PEER_SWEEPS, "run", str(study), "--out", str(out), "--max-concurrent", "1", "--wandb", "disabled"]
    log = tmp_path / "run1.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path,
                                start_new_session=True)
    try:
        # While it runs: a second run and a `trial` of the same directory are refused, in this process (were
        # the lock broken, they must not start Ray here); status, report and the Parquet files are read.
        monkeypatch.setattr(peer_sweeps.runner, "_run_tune", lambda *a, **k: pytest.fail("lock not held"))
        monkeypatch.setattr(cluster.runtime, "ray_session", lambda *a, **k: pytest.fail("lock not held"))
        refused = trial_refused = report = None
        parquet_reads = status_reads = 0
        deadline = time.time() + 600
        while _steps_recorded(out / "trials" / second) < second_half_done:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "second trial not started in time"
            if refused is None and is_locked(out):
                refused = _cli("run", str(study), "--out", str(out), "--max-concurrent", "1")
                trial_refused = _cli("trial", str(study), first, "--out", str(out))
            if (out / "study.yaml").exists():
                status = _cli("status", str(out), "--json")
                assert status.exit_code == 0, status.output
                info = json.loads(status.stdout)
                assert info["total"] == 2 and info["completed"] + info["pending"] + info["running"] == 2, info
                status_reads += 1
            if report is None and (out / "trials" / first / "metrics.jsonl").exists():  # trial 1 training
                report = _cli("report", str(out), "--out", str(tmp_path / "report-running"))
                assert report.exit_code == 0, report.output
            if (out / "trials.parquet").exists():
                _read_live_tables(out)
                parquet_reads += 1
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed; the test proves nothing"
        status = _cli("status", str(out), "--json")
        info = json.loads(status.stdout)
        assert info["run_in_progress"] and info["completed"] == 1, info
        assert _read_live_tables(out)[first]["status"] == "completed"
    finally:
        stragglers = _kill_tree(proc)
    assert not stragglers, f"processes of the killed run still alive 60 s after the kill: {stragglers}"
    print(f"read while the study ran: status {status_reads} times, the Parquet files {parquet_reads} times")
    assert status_reads >= LIVE_STATUS_READS and parquet_reads >= LIVE_PARQUET_READS, (status_reads, parquet_reads)
    for refusal in (refused, trial_refused):
        assert refusal is not None, "never saw the first run holding its lock"
        assert refusal.exit_code == 2, refusal.output
        assert "another `peer-sweeps run` is using this results directory" in refusal.stderr
        assert len(refusal.stderr.strip().splitlines()) == 1
    assert report is not None and (tmp_path / "report-running" / "report.html").stat().st_size > 0

    # After the kill: whole files, a free lock, a status that says so.
    rows = _read_live_tables(out)
    assert rows[first]["status"] == "completed" and second not in rows, rows
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


WANDB_WARNING = "peer-sweeps: W&B ({}) unavailable for trial {}"


class SilentServer:
    """A TCP server that accepts connections and never answers: a W&B host that hangs. Records how long
    each connection stayed open until the client gave up and closed it."""

    def __init__(self):
        import socket
        import threading

        self.socket = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.socket.getsockname()[1]
        self.held: list[float] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.socket.accept()
            except OSError:
                return
            threading.Thread(target=self._hold, args=(conn, time.monotonic()), daemon=True).start()

    def _hold(self, conn, opened: float) -> None:
        with conn:
            while conn.recv(65536):
                pass
        self.held.append(time.monotonic() - opened)

    def close(self) -> None:
        self.socket.close()


def _kill_wandb_service_when(proc: subprocess.Popen, metrics: Path, timeout_s: float = 600) -> int:
    """Once `metrics` holds a step, SIGKILLs every W&B service process below `proc` (W&B then fails part-way
    through the trial that wrote it); returns how many it killed. Leaves `proc` running."""
    deadline = time.time() + timeout_s
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, "the trial never logged a step"
        time.sleep(0.02)
    killed = 0
    for pid in _descendants(proc.pid):
        try:
            command = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        if b"wandb-core" in command:
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


class _KilledBeforeRename(Exception):
    pass


def _leave_half_written_files(out: Path, study: Path, monkeypatch, writer_pid: int) -> list[Path]:
    """Every kind of file a writer killed before its rename leaves in a results directory, each left by the
    real writer (os.replace made to fail for the file it writes) as process `writer_pid` would have named
    it (not this process: the next run would write, and so rename, a temporary file of its own pid): the
    study file, a trial's record, both Parquet files, a trial's config.json and its metrics.jsonl. Returns
    the files left."""
    from peer_sweeps.results import ResultsDir, write_atomic
    from peer_sweeps.plan import load_and_plan
    from peer_sweeps.tracking import MetricsLog
    from peer_sweeps.trial import run_trial

    results = ResultsDir(out)
    trial = load_and_plan(study)[1][0]
    record = _record(out, trial.trial_id)
    writes = {  # trials.parquet first: a rebuild writes curves.parquet's temporary file again
        "study.yaml": lambda: write_atomic(out / "study.yaml", (out / "study.yaml").read_bytes()),
        f"{trial.trial_id}.json": lambda: results.save_row(record),
        "trials.parquet": results.consolidate,
        "curves.parquet": results.consolidate,
        "config.json": lambda: run_trial(trial, out, "disabled"),
        "metrics.jsonl": lambda: MetricsLog(out / "trials" / trial.trial_id / "metrics.jsonl",
                                            truncate_after_step=record["steps"]),
    }
    real_replace = os.replace
    left = []
    for name, write in writes.items():
        def killed_at_rename(src, dst, name=name):
            if Path(dst).name == name:
                raise _KilledBeforeRename(src)
            real_replace(src, dst)

        before = set(out.rglob("*"))
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", killed_at_rename)
            patch.setattr(os, "getpid", lambda: writer_pid)
            with pytest.raises(_KilledBeforeRename):
                write()
        new = set(out.rglob("*")) - before
        assert len(new) == 1, f"writing {name} left {new}"
        left += new
    assert all(path.exists() for path in left), left
    return left


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_failed_and_diverged_trials_and_unusable_wandb(small_study, tmp_path, monkeypatch):
    import peer_sweeps.runner

    study = small_study(tmp_path / "study.yaml", budgets=(1.0e9, 2.0e9))
    raising, healthy = _plan(study)
    out = tmp_path / "out"
    command = [*PEER_SWEEPS, "run", str(study), "--out", str(out), "--max-concurrent", "1"]
    hanging_wandb = SilentServer()
    unreachable_wandb = dict(
        WANDB_MODE="online", WANDB_BASE_URL=f"http://127.0.0.1:{hanging_wandb.port}", WANDB_API_KEY="x" * 40,
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        PEER_SWEEPS_WANDB_INIT_TIMEOUT="3",
    )
    # Run 1: the first trial raises, W&B hangs for every trial.
    try:
        run1 = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                              env=_env(PEER_SWEEPS_FAULT=f"raise:{raising}", **unreachable_wandb))
    finally:
        hanging_wandb.close()
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
    # ... W&B gave up after the 3 s init time-out, not its own default ...
    assert hanging_wandb.held and max(hanging_wandb.held) < 20, hanging_wandb.held
    # ... and each trial's W&B failure was reported exactly once, naming the trial and the cause.
    for tid in (raising, healthy):
        assert output.count(WANDB_WARNING.format("online", tid)) == 1, output[-6000:]
    assert output.count("peer-sweeps: W&B") == 2 and "CommError" in output, output[-6000:]
    status = _cli("status", str(out), "--json")
    info = json.loads(status.stdout)
    assert (info["completed"], info["failed"], info["pending"]) == (1, 1, 0) and raising in info["failed_trials"]
    kept = (out / "results" / f"{healthy}.json").read_bytes()

    # Run 2, the study grown by one budget whose trial diverges (NaN loss at step 2), the raise gone, W&B
    # offline: the failed trial is retried and completes although its W&B service dies part-way, the new
    # one is "diverged", the completed one is left alone.
    study = small_study(tmp_path / "study.yaml", budgets=(1.0e9, 2.0e9, 1.5e9))
    diverging = _plan(study)[2]
    proc = subprocess.Popen(command + ["--wandb", "offline"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path, env=_env(PEER_SWEEPS_FAULT=f"nan:{diverging}:2"),
                            start_new_session=True)
    try:
        assert _kill_wandb_service_when(proc, out / "trials" / raising / "metrics.jsonl") >= 1
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    assert proc.returncode == 0, output[-4000:]
    assert "3 trials, 1 already done, 2 to run" in output
    rows = _read_trials(out)
    assert sorted(rows) == sorted([raising, healthy, diverging])
    assert rows[raising]["status"] == "completed" and rows[raising]["attempts"] == 2
    assert rows[raising]["error"] is None and rows[raising]["ppl"] > 1
    metrics = [json.loads(line) for line in (out / "trials" / raising / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, rows[raising]["steps"] + 1))
    assert output.count(WANDB_WARNING.format("offline", raising)) == 1, output[-6000:]
    assert output.count("peer-sweeps: W&B") == 1, output[-6000:]
    assert rows[diverging]["status"] == "diverged" and rows[diverging]["ppl"] is None
    assert rows[diverging]["error"].startswith("diverged: loss nan at step 2"), rows[diverging]["error"]
    assert (out / "results" / f"{healthy}.json").read_bytes() == kept
    status = _cli("status", str(out), "--json")
    info = json.loads(status.stdout)
    assert [info[s] for s in ("completed", "running", "failed", "diverged", "pending")] == [2, 0, 0, 1, 0], info

    # Run 3, after writers were killed at their renames: the diverged trial is not retried (nothing is
    # trained: were it, Ray would start here), and every half-written file is gone.
    records = {path.name: path.read_bytes() for path in (out / "results").glob("*.json")}
    metrics = {tid: (out / "trials" / tid / "metrics.jsonl").read_bytes() for tid in rows}
    left = _leave_half_written_files(out, study, monkeypatch, writer_pid=proc.pid)  # run 2's
    monkeypatch.setattr(peer_sweeps.runner, "_run_tune", lambda *a, **k: pytest.fail("a done trial was retried"))
    run3 = _cli("run", str(study), "--out", str(out), "--max-concurrent", "1")
    assert run3.exit_code == 0, run3.output
    assert "3 trials, 3 already done, 0 to run" in run3.stdout
    assert [path for path in left if path.exists()] == []
    assert {path.name: path.read_bytes() for path in (out / "results").glob("*.json")} == records
    assert {tid: (out / "trials" / tid / "metrics.jsonl").read_bytes() for tid in rows} == metrics
    assert _read_live_tables(out) == rows


CONSOLIDATE_LOOP = """
import sys
from peer_sweeps.results import ResultsDir
results = ResultsDir(sys.argv[1])
results.consolidate()
print("ready", flush=True)
while True:
    results.consolidate()
"""


def _results_with_trials(path: Path, num_trials: int, steps: int):
    """A results directory holding `num_trials` finished trials' records and metrics (no training)."""
    from peer_sweeps.results import ResultsDir

    results = ResultsDir(path)
    results.create()
    for i in range(num_trials):
        _add_trial(results, f"{i:012x}", steps)
    return results


def _add_trial(results, tid: str, steps: int) -> None:
    results.save_row({"trial_id": tid, "study": "s", "status": "completed", "ppl": 10.0, "ppl_validation": 10.0,
                      "finished_at": "2026-01-01T00:00:00+00:00"})
    directory = results.path / "trials" / tid
    directory.mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "tokens": 256 * s, "flops": 1e7 * s, "seconds": 0.1 * s, "train_loss": 5.0,
                    "lr": 1e-3}) + "\n" for s in range(1, steps + 1)))


def test_parquet_survives_sigkill_during_consolidation(tmp_path):
    """Consolidation killed at random moments never leaves trials.parquet or curves.parquet torn."""
    num_trials, steps = 40, 400
    results = _results_with_trials(tmp_path / "out", num_trials, steps)
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


def test_curves_are_replaced_before_trials(tmp_path):
    """A rebuild that dies between writing its two files (here: curves.parquet cannot be replaced) has not yet
    listed the new trial in trials.parquet: a reader never finds a trial there without its curve."""
    results = _results_with_trials(tmp_path / "out", 2, 5)
    results.consolidate()
    _add_trial(results, "new000000000", 5)
    curves = results.path / "curves.parquet"
    curves.unlink()
    curves.mkdir()  # the rename onto it fails
    with pytest.raises(OSError):
        results.consolidate()
    assert "new000000000" not in _read_trials(results.path)
    curves.rmdir()
    results.consolidate()
    assert "new000000000" in _read_live_tables(results.path)
