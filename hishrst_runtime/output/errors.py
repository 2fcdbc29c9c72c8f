"""The output store's errors, all in the ``OutputStateError`` branch of :mod:`hishrst_runtime.core.errors`
(except :class:`MissingExtraError`, an ``EnvironmentProblem``: an optional output format's package is missing).

Each keeps the builtin base it had before (``FileExistsError``, ``ValueError``, ``OSError``) so older
``except`` clauses still catch it. :func:`writing` turns an ``OSError`` met while writing a store
(read-only location, permission denied, disk or quota full) into :class:`OutputNotWritableError` with
one line that names the path, the problem and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from hishrst_runtime.core.errors import HishrstError, OutputStateError
from hishrst_runtime.core.extras import MissingExtraError  # re-exported: an output format's missing extra

__all__ = ["OutputExistsError", "OutputMismatchError", "IncompleteOutputError", "OutputNotWritableError",
           "MissingExtraError", "not_writable", "writing"]

#: errno values that mean "this location cannot take the write" (rather than a bug or a broken store)
NOT_WRITABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class OutputExistsError(OutputStateError, FileExistsError):
    """An output (complete or incomplete) already exists and overwriting was not requested."""


class OutputMismatchError(OutputStateError, ValueError):
    """An incomplete output was made with different points, genes or metadata than this run."""


class IncompleteOutputError(OutputStateError):
    """An operation needs a complete output (or all rows written) but it is not."""


class OutputNotWritableError(OutputStateError, OSError):
    """The output location refused a write: read-only, permission denied, disk or quota full, or another
    file-system error. ``errno`` is the original error's; the rows already on disk are kept."""




def not_writable(e: OSError, path: Path, action: str) -> OutputNotWritableError:
    """The one-line :class:`OutputNotWritableError` for ``e``, met while doing ``action`` on the store ``path``."""
    where = f" ({e.filename})" if e.filename and os.fspath(e.filename) != os.fspath(path) else ""
    if e.errno in _FULL:
        problem = "no space left (disk or quota full)"
        fix = "free space or choose another --out, then rerun with --resume (rows already written are kept)"
    elif e.errno == errno.EROFS:
        problem, fix = "the file system is read-only", "choose a writable --out"
    elif e.errno in (errno.EACCES, errno.EPERM):
        problem, fix = "permission denied", "make the output folder writable or choose another --out"
    else:
        problem = " ".join((e.strerror or str(e) or type(e).__name__).split())
        fix = "check the output location, then rerun (with --resume to keep the rows already written)"
    err = OutputNotWritableError(f"{path}: cannot {action}: {problem}{where}; {fix}")
    err.errno = e.errno
    return err


@contextlib.contextmanager
def writing(path: Path, action: str) -> Iterator[None]:
    """Raise an ``OSError`` from the block as :func:`not_writable` (chained); hishrst errors pass as they are."""
    try:
        yield
    except HishrstError:
        raise
    except OSError as e:
        raise not_writable(e, path, action) from e
