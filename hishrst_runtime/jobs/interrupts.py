"""SIGTERM and SIGINT during a run: stop cleanly, keep finished rows, say which slide was interrupted.

:func:`raising_on_signals` makes SIGTERM (Slurm's time limit, ``kill``) and SIGINT (Ctrl-C) raise
:class:`Interrupted` in the main thread. The slide in flight then stops the way any failure stops it
(finished rows flushed and claimed in its ``.partial``, its lock released), the runner records it as
``interrupted`` and raises :class:`Interrupted` again carrying the results so far, and the command writes
the run report and exits with ``128 + signum`` (143 for SIGTERM, 130 for SIGINT), as a shell does.
After the first signal further SIGTERM / SIGINT are ignored, so the cleanup and the report are not cut
short (``kill -9`` still stops the process; ``--resume`` is exact either way).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["Interrupted", "SIGNALS", "raising_on_signals", "signal_name"]

#: The signals that interrupt a run (those a batch system or a terminal sends to stop a job).
SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    """``SIGTERM``, ``SIGINT``, ... (or ``signal N``)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(KeyboardInterrupt):
    """The run was stopped by signal ``signum``; ``results``: the slide results so far (the runner adds them,
    with the slide in flight as ``interrupted``)."""

    def __init__(self, signum: int, results: list[Any] | None = None) -> None:
        super().__init__(f"interrupted by {signal_name(signum)}")
        self.signum = int(signum)
        self.results: list[Any] = list(results or [])

    @property
    def name(self) -> str:
        """The signal's name."""
        return signal_name(self.signum)

    @property
    def exit_status(self) -> int:
        """``128 + signum``, the status a shell reports for a process stopped by the signal."""
        return 128 + self.signum


@contextlib.contextmanager
def raising_on_signals() -> Iterator[None]:
    """Inside the block, the first SIGTERM / SIGINT raises :class:`Interrupted` in the main thread and later
    ones are ignored; the previous handlers are restored after it. Outside the main thread (where
    handlers cannot be installed) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if fired:  # cleaning up after the first one: let it finish
            return
        fired.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
