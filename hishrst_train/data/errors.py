"""Errors shared by the data readers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.units import PixelSizeError, check_mpp

__all__ = ["DataError", "SectionPixelSizeError", "check_section_mpp"]


class DataError(InputError):
    """User data that cannot be read as given; the message names the file, the problem and the fix."""


class SectionPixelSizeError(DataError, PixelSizeError):
    """A training section's pixel size (``--mpp`` or read from its files) that is not plausible."""


def _error(path: str | Path, what: str, fix: str) -> DataError:
    return DataError(f"{path}: {what}. Fix: {fix}")


def check_section_mpp(value: Any, *, where: str | Path, source: str,
                      fix: str = "pass --mpp with the µm per full-resolution pixel (e.g. 0.5 for a 20× scan)") -> float:
    """:func:`hishrst_runtime.core.units.check_mpp` for training: ``value`` (µm / pixel) as a float, or a
    :class:`SectionPixelSizeError` naming ``where`` and ``source`` (plausible range 0.05–50 µm/px,
    ``$HISHRST_MPP_RANGE`` overrides)."""
    return check_mpp(value, where=str(where), source=source, fix=fix, error=SectionPixelSizeError)
