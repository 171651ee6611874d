"""What `peer-sweeps run` shows: the study's header, then its progress, and nothing else.

On a terminal, one live view (rich): each running trial's step / steps, train loss, tokens per second and
ETA (read from its metrics.jsonl, see peer_sweeps.status), and the totals: done, failed, diverged, running,
pending, the study's ETA. Above it, and alone where stdout is not a terminal, one line per finished trial;
a failed trial adds the path of its log. Lines that the project's own code in a trial addressed to the user
(they start with "peer-sweeps: ", like a W&B warning) are copied from the trial's log to the console.

Unless `verbose`, everything else - Ray's, Tune's and DeepSpeed's output - goes to `DIR/logs/`:
`driver.log` for this process (Tune's banners, Ray's start-up and what Ray forwards from its actors, such
as the Train controllers) and `<trial id>.log` per trial (its Tune function and its Train workers), appended
to across attempts. With `verbose` nothing is redirected and Ray prints as it always does.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .plan import Trial
from .status import study_eta_seconds, trial_progress

USER_MESSAGE_PREFIX = "peer-sweeps: "


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


@dataclass
class StudyProgress:
    """The state of a run, as the driver sees it: every trial's status, which are running since when."""

    results_dir: Path
    trials: list[Trial]
    states: dict[str, str]  # trial id -> pending, running, completed, failed or diverged
    started_at: float = field(default_factory=time.time)
    finished_this_run: set[str] = field(default_factory=set)

    def start(self, trial_id: str) -> None:
        self.states[trial_id] = "running"

    def finish(self, trial_id: str, status: str) -> None:
        self.states[trial_id] = status
        self.finished_this_run.add(trial_id)

    def count(self, state: str) -> int:
        return sum(s == state for s in self.states.values())

    def running(self) -> dict[str, Any]:
        by_id = {t.trial_id: t for t in self.trials}
        return {tid: trial_progress(self.results_dir, by_id[tid]) for tid, s in list(self.states.items())
                if s == "running"}

    def eta_seconds(self, running: dict[str, Any]) -> float | None:
        return study_eta_seconds(self.trials, dict(self.states), running, set(self.finished_this_run),
                                 time.time() - self.started_at)

    def totals(self, running: dict[str, Any]) -> str:
        done = sum(self.count(s) for s in ("completed", "failed", "diverged"))
        return (f"done {done}/{len(self.trials)}: completed {self.count('completed')}, failed {self.count('failed')}, "
                f"diverged {self.count('diverged')}; running {len(running)}, pending {self.count('pending')}; "
                f"elapsed {duration(time.time() - self.started_at)}, ETA {duration(self.eta_seconds(running))}")

    def __rich__(self) -> Group:
        running = self.running()
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("trial", "cell", "step", "loss", "tokens/s", "ETA"):
            table.add_column(column, justify="left" if column in ("trial", "cell") else "right")
        for p in running.values():
            table.add_row(p.trial_id[:12], p.label, f"{p.step}/{p.steps}",
                          f"{p.loss:.3f}" if p.loss is not None else "-",
                          f"{p.tokens_per_second:,.0f}" if p.tokens_per_second else "-", duration(p.eta_seconds))
        return Group(table, Text(self.totals(running), style="bold"))


class RunConsole:
    """The console of one `peer-sweeps run` (see the module docstring)."""

    def __init__(self, results_dir: Path, verbose: bool = False):
        self.logs = Path(results_dir) / "logs"
        self.verbose = verbose
        self.stream = _own_stdout()
        self.console = Console(file=self.stream, highlight=False, soft_wrap=True)
        self._log_offsets: dict[str, int] = {}

    def say(self, text: str, style: str | None = None) -> None:
        self.console.print(text, style=style, markup=False)

    def driver_log(self) -> Path | None:
        return None if self.verbose else self.logs / "driver.log"

    def trial_log(self, trial_id: str) -> Path | None:
        return None if self.verbose else self.logs / f"{trial_id}.log"

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """Within the block this process's own stdout and stderr go to logs/driver.log (unless verbose)."""
        from cluster.logs import redirect_output

        with redirect_output(self.driver_log()):
            yield

    def live(self, progress: StudyProgress):
        """The live view of `progress` on a terminal; nothing elsewhere."""
        if not self.console.is_terminal or self.verbose:
            return nullcontext()
        return Live(progress, console=self.console, refresh_per_second=2, redirect_stdout=False,
                    redirect_stderr=False)

    def trial_started(self, trial_id: str) -> None:
        log = self.trial_log(trial_id)
        self._log_offsets[trial_id] = log.stat().st_size if log is not None and log.exists() else 0

    def trial_finished(self, row: dict[str, Any], label: str, progress: StudyProgress) -> None:
        """One line for a finished trial (two when it failed: its log's path); then the messages its code
        addressed to the user during this attempt."""
        tid, status = row["trial_id"], row["status"]
        done = sum(progress.count(s) for s in ("completed", "failed", "diverged"))
        if status == "completed" and row.get("ppl") is not None:
            result = f"ppl {row['ppl']:.2f}"
        else:
            result = _last_line(row.get("error"))
        style = {"completed": None, "diverged": "yellow", "failed": "red"}.get(status)
        self.say(f"[{done}/{len(progress.trials)}] {status:<9} {label:<40} {result}  | "
                 f"{progress.totals(progress.running())}", style=style)
        log = self.trial_log(tid)
        if status == "failed" and log is not None:
            self.say(f"    log: {log}", style=style)
        for message in self._user_messages(tid):
            self.say(message, style="yellow")

    def _user_messages(self, trial_id: str) -> list[str]:
        log = self.trial_log(trial_id)
        if log is None or not log.exists():
            return []
        with open(log, "rb") as f:
            f.seek(self._log_offsets.get(trial_id, 0))
            text = f.read().decode(errors="replace")
        return [line.strip() for line in text.splitlines() if line.strip().startswith(USER_MESSAGE_PREFIX)]

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment's state; the stream stays with this process.
        return {k: v for k, v in self.__dict__.items() if k not in ("stream", "console")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, stream=sys.stdout, console=Console(highlight=False, soft_wrap=True))

    def close(self) -> None:
        self.console.file.flush()
        if self.stream is not sys.stdout:
            self.stream.close()


def _own_stdout():
    """A stream on this process's stdout that later redirection of descriptors 1 and 2 does not move.
    Where sys.stdout has no descriptor (a test runner capturing it), sys.stdout itself."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return sys.stdout
    sys.stdout.flush()
    return os.fdopen(os.dup(fd), "w", buffering=1)


def _last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
