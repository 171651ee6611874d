"""`ensure_prepared`: a study's data suite is there before anything runs, prepared on the spot if it can be.

`peer-sweeps run`, `trial` and `plan --check-data` call it. A suite that is not prepared yet is prepared
(with progress) when the suite says it can be without help (`Suite.auto_prepare`: the shipped suites, whose
text comes from the package registries or this repository) and `prepare` is true; otherwise it stops with
a DataError holding the exact command that prepares it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from peer_sweeps.data.errors import DataError
from peer_sweeps.data.load import load_suite
from peer_sweeps.data.prepare import Progress, default_root, prepare_suite
from peer_sweeps.data.suites import suite


def ensure_prepared(suite_name: str, root: str | Path | None, vocab_size: int, study_path: str | Path,
                    prepare: bool = True, progress: Progress | None = None) -> bool:
    """Whether the suite had to be prepared (False: it already was). Raises DataError naming the command
    to run when it is missing and cannot, or may not, be prepared here."""
    try:
        load_suite(suite_name, root, vocab_size)
        return False
    except DataError as missing:
        if not (prepare and suite(suite_name).auto_prepare):
            why = "" if prepare else " (--no-prepare)"
            reason = str(missing).split(": run `")[0]
            raise DataError(f"{reason}{why}: run `peer-sweeps data prepare --study {study_path}`") from None
    prepare_suite(suite_name, root, vocab_size, progress=progress)
    return True


def ensure_study_data(spec, study_path: str | Path, prepare: bool, say: Callable[..., None]) -> None:
    """`ensure_prepared` for a study's `data` section; `say(text, style=None)` shows the progress of a
    preparation. Raises DataError naming the study file and its data.suite field."""
    announced = []

    def progress(message: str) -> None:
        if not announced:
            announced.append(True)
            say(f"data: preparing suite {spec.suite!r} (vocabulary {spec.vocab_size}) under "
                f"{Path(spec.root or default_root())}", style="bold")
        say(f"  {message}", style="dim")

    try:
        ensure_prepared(spec.suite, spec.root, spec.vocab_size, study_path, prepare, progress=progress)
    except DataError as e:
        raise DataError(f"{study_path}: data.suite: {e}") from None
