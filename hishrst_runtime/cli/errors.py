"""The one place where hishrst errors become click errors (one line, exit status 1).

Library code raises :class:`~hishrst_runtime.core.errors.HishrstError` subclasses and never click
exceptions; every command body runs inside :func:`user_errors`.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

import click

from hishrst_runtime.core.errors import HishrstError, InputError, OutputStateError
from hishrst_runtime.core.urls import redact_text

__all__ = ["user_errors", "option_errors", "one_line", "command_errors"]

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def one_line(e: BaseException) -> str:
    """``e``'s message on one line (embedded newlines folded, URLs without credentials or query strings)."""
    text = str(e).strip() or type(e).__name__
    return redact_text(" ".join(part.strip() for part in text.splitlines() if part.strip()))


@contextlib.contextmanager
def user_errors(*also: type[BaseException]) -> Iterator[None]:
    """Turn :class:`HishrstError` (and the exception types in ``also``) into a one-line
    :class:`click.ClickException`; anything else propagates (a bug: its traceback is wanted)."""
    try:
        yield
    except click.ClickException:
        raise
    except (HishrstError, *also) as e:
        raise click.ClickException(one_line(e)) from e


@contextlib.contextmanager
def option_errors() -> Iterator[None]:
    """Turn :class:`InputError` from option validation into a one-line :class:`click.UsageError` (exit 2)."""
    try:
        yield
    except InputError as e:
        raise click.UsageError(one_line(e)) from e


@contextlib.contextmanager
def command_errors(out: Path | None = None) -> Iterator[None]:
    """:func:`user_errors`, plus file-system refusals (permissions, full disk, read-only) as one line naming
    the path (``out``, the command's output, when the error names no file)."""
    with user_errors():
        try:
            yield
        except HishrstError:
            raise
        except (PermissionError, IsADirectoryError, NotADirectoryError) as e:
            raise OutputStateError(f"{e.filename or out or '?'}: {e.strerror or e}; check the path and its "
                                   "permissions, or choose another location") from e
        except OSError as e:
            where = e.filename or (out if e.errno in _NO_SPACE else None)
            if e.errno is None or where is None:
                raise
            raise OutputStateError(f"{where}: {e.strerror or e}; free space or choose another location") from e
        except Exception as e:  # the safetensors reader's error type, without importing safetensors here
            if type(e).__name__ != "SafetensorError":
                raise
            raise OutputStateError(f"{out or '?'}: a safetensors file could not be read ({e}); re-create it") from e
