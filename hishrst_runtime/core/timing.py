"""Thread-safe per-stage timers."""

from __future__ import annotations

import threading

__all__ = ["StageTimer"]


class StageTimer:
    """Thread-safe accumulated seconds per pipeline stage."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` (wall-clock s) to ``stage``."""
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
