"""Typed field access on a bundle manifest (torch-free): every error a one-line :class:`BundleError` naming the
manifest and the field, e.g. ``manifest.json: encoder.input_size must be a positive integer, got 0; re-export the
bundle``. :mod:`hishrst_runtime.bundle.spec` builds its dataclasses with it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hishrst_runtime.core.errors import InputError

__all__ = ["BundleError", "ManifestReader"]


class BundleError(InputError):
    """A model bundle is missing, malformed, tampered with or unsupported."""


class ManifestReader:
    """Typed field access on one manifest, every error naming the manifest and the field."""

    def __init__(self, manifest: Mapping[str, Any], path: Path | str) -> None:
        self.m, self.path = manifest, path

    def fail(self, field: str, problem: str) -> BundleError:
        return BundleError(f"{self.path}: {field} {problem}; re-export the bundle")

    def get(self, field: str, default: Any = None) -> Any:
        node: Any = self.m
        for part in field.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return default if node is None else node

    def int_at_least(self, field: str, low: int, default: int | None = None, *, high: int | None = None) -> int:
        v = self.get(field, default)
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or int(v) != v or v < low
                or (high is not None and v > high)):
            what = (f"an integer from {low} to {high}" if high is not None
                    else "a positive integer" if low == 1 else f"an integer >= {low}")
            raise self.fail(field, f"must be {what}, got {v!r}")
        return int(v)

    def positive_int(self, field: str, default: int | None = None) -> int:
        return self.int_at_least(field, 1, default)

    def optional_int(self, field: str, low: int) -> int | None:
        return None if self.get(field) is None else self.int_at_least(field, low)

    def positive_float(self, field: str, unit: str, default: float | None = None) -> float:
        v = self.get(field, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise self.fail(field, f"must be a positive finite number ({unit}), got {v!r}")
        return float(v)

    def optional_positive_float(self, field: str, unit: str) -> float | None:
        return None if self.get(field) is None else self.positive_float(field, unit)

    def floats(self, field: str, default: Any) -> tuple[float, ...]:
        v = self.get(field, default)
        if not isinstance(v, (list, tuple)) or not all(
                not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) for x in v):
            raise self.fail(field, f"must be a list of finite numbers, got {v!r}")
        return tuple(float(x) for x in v)

    def text(self, field: str, default: str | None = None) -> str:
        v = self.get(field, default)
        if not isinstance(v, str) or not v:
            raise self.fail(field, f"must be a non-empty string, got {v!r}")
        return v

    def optional_text(self, field: str) -> str | None:
        v = self.get(field)
        return None if v is None else str(v)
