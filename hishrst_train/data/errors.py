"""Errors shared by the data readers."""

from __future__ import annotations

from pathlib import Path

from hishrst_runtime.core.errors import InputError

__all__ = ["DataError"]


class DataError(InputError):
    """User data that cannot be read as given; the message names the file, the problem and the fix."""


def _error(path: str | Path, what: str, fix: str) -> DataError:
    return DataError(f"{path}: {what}. Fix: {fix}")
