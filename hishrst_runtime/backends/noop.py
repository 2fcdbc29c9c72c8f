"""A stand-in engine that returns zeros (benchmarks: the pipeline's ceiling). Not a user choice.

:mod:`.latency` is its sibling that takes a set time per batch (an engine of a given speed).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["NoopBackend"]


class NoopBackend:
    """A stand-in engine that returns zeros instantly: measures the pipeline's ceiling in benchmarks."""

    def __init__(self, output_shape: Callable[[dict[str, np.ndarray]], tuple[int, ...]], name: str = "noop") -> None:
        self._shape, self.name, self.provider = output_shape, name, "noop"

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Zeros of the shape ``output_shape(feeds)`` (float32)."""
        return [np.zeros(self._shape(feeds), dtype=np.float32)]

    def close(self) -> None:
        """Nothing to release."""
