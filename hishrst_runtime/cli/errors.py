"""The one place where hishrst errors become click errors (one line, exit status 1).

Library code raises :class:`~hishrst_runtime.core.errors.HishrstError` subclasses and never click
exceptions; every command body runs inside :func:`user_errors`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click

from hishrst_runtime.core.errors import HishrstError, InputError
from hishrst_runtime.core.urls import redact_text

__all__ = ["user_errors", "option_errors", "one_line"]


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
