"""Logging and progress-bar settings of the commands (the only place that configures logging).

Library code logs with ``logging.getLogger(__name__)`` and never configures handlers. A command calls
:func:`configure_logging` once: one stderr handler on the ``hishrst_runtime``, ``hishrst_train`` and
``hishrst_export`` loggers (not propagated to the root logger, so nothing is printed twice), at
``ERROR`` with ``-q``, ``WARNING`` by default, ``INFO`` with ``-v`` and ``DEBUG`` with ``-vv``; a
warning with the same text is shown once per invocation. Calling it again (a second command in the same
process, as in tests) replaces the handler instead of adding one.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

__all__ = ["LOGGERS", "configure_logging", "log_level", "progress_enabled"]

#: Loggers of hishrst's packages.
LOGGERS: tuple[str, ...] = ("hishrst_runtime", "hishrst_train", "hishrst_export")
_MARK = "_hishrst_cli_handler"


class _Once(logging.Filter):
    """Drops a WARNING-or-lower record whose logger and text were already shown by this handler."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING:
            return True
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def log_level(*, quiet: bool, verbose: int) -> int:
    """The level for ``-q`` (ERROR), default (WARNING), ``-v`` (INFO), ``-vv`` and more (DEBUG)."""
    if quiet:
        return logging.ERROR
    return {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)


def configure_logging(*, quiet: bool = False, verbose: int = 0, stream: TextIO | None = None) -> int:
    """Send hishrst's log records to ``stream`` (default: stderr) at the level of ``quiet`` / ``verbose``
    (see :func:`log_level`); returns the level."""
    level = log_level(quiet=quiet, verbose=verbose)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if level > logging.DEBUG
                                           else "%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Once())
    setattr(handler, _MARK, True)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, _MARK, False)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    return level


def progress_enabled(flag: bool | None, *, quiet: bool = False, stream: TextIO | None = None) -> bool:
    """Whether to draw progress bars: ``flag`` when given (``--progress`` / ``--no-progress``), else only
    when ``stream`` (default: stderr, where the bars go) is a terminal and not ``quiet``."""
    if flag is not None:
        return flag
    s = stream if stream is not None else sys.stderr
    try:
        return not quiet and bool(s.isatty())
    except (AttributeError, ValueError):  # closed or replaced stream
        return False
