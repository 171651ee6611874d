"""Send a process's console output to a log file for the duration of a block.

`redirect_output(path)` points file descriptors 1 and 2 at `path` (appended to), then puts them back. It works
at the descriptor level, not on `sys.stdout`, because most of what Ray, Tune and DeepSpeed print does not
pass through the Python stream a caller could swap: log handlers bound to the stream object at import
(DeepSpeed's), Ray's C++ core and its log monitor, the compiler output of a JIT-built extension. Every
process of a trial (its Tune function, its Train workers) calls it with the trial's log file; the driver
calls it with its own. The file is opened with O_APPEND, so several processes can share one.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def redirect_output(path: str | os.PathLike | None) -> Iterator[None]:
    """Within the block, whatever this process writes to stdout or stderr lands in `path`. None: no-op."""
    if path is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(target, 1)
    os.dup2(target, 2)
    os.close(target)
    try:
        yield
    finally:
        _flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
