"""A stand-in engine that returns zeros (benchmarks: the pipeline's ceiling). Not a user choice.

:mod:`.latency` is its sibling that takes a set time per batch (an engine of a given speed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["NoopBackend"]


class NoopBackend:
    """A stand-in engine that returns zeros instantly: measures the pipeline's ceiling in benchmarks.

    ``output_shape(feeds)``: the shape of the one output, or a list of shapes (one per ``output_names``, e.g.
    ``features`` and ``tokens`` of a sub-spot encoder)."""

    def __init__(self, output_shape: Callable[[dict[str, np.ndarray]], Any], name: str = "noop", *,
                 output_names: Sequence[str] = ("output",)) -> None:
        self._shape, self.name, self.provider = output_shape, name, "noop"
        self.output_names = list(output_names)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Zeros of the shape(s) ``output_shape(feeds)`` (float32)."""
        shape = self._shape(feeds)
        shapes = shape if isinstance(shape, list) else [shape]
        return [np.zeros(s, dtype=np.float32) for s in shapes]

    def close(self) -> None:
        """Nothing to release."""
