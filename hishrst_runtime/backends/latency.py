"""A stand-in engine that takes a set time per batch and returns zeros (benchmarks and tests). Not a user choice.

:class:`LatencyBackend` behaves like an engine of a given speed: each :meth:`~LatencyBackend.run` sleeps
``seconds_per_call + batch / tiles_per_s`` seconds in :func:`time.sleep` (which releases the GIL, as a
GPU engine waiting on its device does), then returns float32 zeros of the shape ``output_shape(feeds)``.
It records its *busy* time (the seconds spent inside ``run``), the wall *span* from the start of its
first call to the end of its last one, and the calls and items, so a benchmark can report how busy
the engine was kept (:meth:`~LatencyBackend.stats`: ``busy_fraction`` = busy / span). Like the no-op
engine (:mod:`.noop`) it is not in the provider registry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["LatencyBackend"]

#: A call ends when at most this much (seconds) of its latency is left (clock rounding, early wake-ups).
_TOLERANCE_S = 1e-6


def _first_dim(feeds: Mapping[str, np.ndarray]) -> int:
    """The batch of ``feeds``: the leading dimension of the first input."""
    return int(np.shape(next(iter(feeds.values())))[0]) if feeds else 0


class LatencyBackend:
    """Sleeps a set time per batch, returns zeros, and records how busy it was kept.

    Args:
        output_shape: ``feeds → shape`` of the one output (as :class:`~.noop.NoopBackend`).
        tiles_per_s: simulated speed, items per second (``None``: no per-item time).
        seconds_per_call: fixed time of every call, seconds (launch and copy overhead).
        batch_of: ``feeds → items`` in the call (default: the first input's leading dimension).
        name: the engine's name in reports.
        clock / sleep: time source and sleeper (tests replace them).
    """

    def __init__(self, output_shape: Callable[[Mapping[str, np.ndarray]], tuple[int, ...]], *,
                 tiles_per_s: float | None = None, seconds_per_call: float = 0.0,
                 batch_of: Callable[[Mapping[str, np.ndarray]], int] = _first_dim, name: str = "latency",
                 clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], Any] = time.sleep) -> None:
        if tiles_per_s is not None and not tiles_per_s > 0:
            raise ValueError(f"tiles_per_s must be a positive number of items per second, got {tiles_per_s!r}")
        if not seconds_per_call >= 0:
            raise ValueError(f"seconds_per_call must be >= 0 seconds, got {seconds_per_call!r}")
        self._shape, self._batch_of = output_shape, batch_of
        self.tiles_per_s, self.seconds_per_call = tiles_per_s, float(seconds_per_call)
        self.name, self.provider = name, "latency"
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self.reset()

    def latency_s(self, n: int) -> float:
        """Seconds one call on ``n`` items takes (``seconds_per_call + n / tiles_per_s``)."""
        return self.seconds_per_call + (n / self.tiles_per_s if self.tiles_per_s else 0.0)

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Sleep :meth:`latency_s` of the batch (GIL released), then zeros of ``output_shape(feeds)`` (float32)."""
        n = self._batch_of(feeds)
        want = self.latency_s(n)
        t0 = self._clock()
        left = want
        while left > _TOLERANCE_S:  # sleep may wake early on some platforms: sleep until the deadline
            self._sleep(left)
            left = want - (self._clock() - t0)
        out = np.zeros(self._shape(feeds), dtype=np.float32)
        t1 = self._clock()
        with self._lock:
            self.calls += 1
            self.items += n
            self.busy_s += t1 - t0
            self.requested_s += want
            self.first_start = t0 if self.first_start is None else min(self.first_start, t0)
            self.last_end = t1 if self.last_end is None else max(self.last_end, t1)
        return [out]

    def reset(self) -> None:
        """Forget the recorded calls (e.g. after a warm-up)."""
        with self._lock:
            self.calls = self.items = 0
            self.busy_s = self.requested_s = 0.0
            self.first_start: float | None = None
            self.last_end: float | None = None

    def span_s(self) -> float:
        """Seconds from the start of the first recorded call to the end of the last (0 without calls)."""
        return 0.0 if self.first_start is None or self.last_end is None else self.last_end - self.first_start

    def stats(self, wall_s: float | None = None) -> dict[str, Any]:
        """Calls, items, ``busy_s`` (time inside ``run``), ``requested_s`` (the sleeps asked for), ``span_s``,
        ``busy_fraction`` = busy / span; with ``wall_s`` (a caller's wall clock, seconds) also
        ``busy_fraction_of_wall`` = busy / ``wall_s``."""
        span = self.span_s()
        out: dict[str, Any] = {"engine": self.name, "tiles_per_s_set": self.tiles_per_s,
                               "seconds_per_call": self.seconds_per_call, "calls": self.calls, "items": self.items,
                               "busy_s": self.busy_s, "requested_s": self.requested_s, "span_s": span,
                               "busy_fraction": self.busy_s / span if span > 0 else None}
        if wall_s is not None:
            out["wall_s"] = wall_s
            out["busy_fraction_of_wall"] = self.busy_s / wall_s if wall_s > 0 else None
        return out

    def close(self) -> None:
        """Nothing to release (the recorded figures stay readable)."""
