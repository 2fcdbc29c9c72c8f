"""A larger slide around a rendered section: background glass with the section pasted at a pixel offset.

The section's own strips are rendered on *its* strip grid (``STRIP_ROWS`` rows from its first row), so its
pixels are exactly those of the same section without a canvas, whatever the offset; each is kept only
until the (at most two) canvas strips that overlap it have been assembled.
"""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np

from hishrst_train.synth.render import _OD_GLASS, STRIP_ROWS, Renderer, transmit

__all__ = ["CanvasRenderer"]

#: Relative standard deviation of the glass's grain (as in :class:`Renderer`'s background).
_GRAIN = 0.15


class CanvasRenderer:
    """Strips of a ``shape`` = (rows, cols) px canvas with ``inner`` drawn at ``offset_px`` = (x, y) px.

    ``strip(y0, y1)`` returns canvas rows ``[y0, y1)`` as RGB uint8; it is thread-safe (the TIFF writer
    renders strips ahead on a small pool) provided strips are requested on the ``STRIP_ROWS`` grid.
    Pixels outside the section are background glass with per-pixel grain keyed by ``seed``.
    """

    def __init__(self, inner: Renderer, *, shape: tuple[int, int], offset_px: tuple[int, int], seed: int) -> None:
        self.inner, self.h, self.w, self.seed = inner, int(shape[0]), int(shape[1]), int(seed)
        self.ox, self.oy = int(offset_px[0]), int(offset_px[1])
        if self.ox < 0 or self.oy < 0 or self.ox + inner.w > self.w or self.oy + inner.h > self.h:
            raise ValueError(f"a {inner.w}×{inner.h}-px section at {offset_px} does not fit a {self.w}×{self.h} canvas")
        self._lock = threading.Lock()
        self._slots: dict[int, threading.Lock] = {}
        self._cache: dict[int, np.ndarray] = {}
        # how many canvas strips still need each inner strip (freed when it drops to 0)
        self._uses: Counter[int] = Counter(k for y in range(0, self.h, STRIP_ROWS)
                                           for k in self._inner_strips(y, min(self.h, y + STRIP_ROWS)))

    def _inner_strips(self, y0: int, y1: int) -> range:
        """Indices of the inner strips that canvas rows ``[y0, y1)`` overlap."""
        a, b = max(y0, self.oy) - self.oy, min(y1, self.oy + self.inner.h) - self.oy
        return range(a // STRIP_ROWS, (b - 1) // STRIP_ROWS + 1) if a < b else range(0)

    def _inner(self, k: int) -> np.ndarray:
        """Inner strip ``k`` (rendered once, even when two threads ask for it at the same time)."""
        with self._lock:
            slot = self._slots.setdefault(k, threading.Lock())
        with slot:
            with self._lock:
                hit = self._cache.get(k)
            if hit is None:
                y0 = k * STRIP_ROWS
                hit = self.inner.strip(y0, min(self.inner.h, y0 + STRIP_ROWS))
                with self._lock:
                    self._cache[k] = hit
            return hit

    def _release(self, k: int) -> None:
        with self._lock:
            self._uses[k] -= 1
            if self._uses[k] <= 0:
                self._cache.pop(k, None)
                self._slots.pop(k, None)

    def glass(self, y0: int, y1: int) -> np.ndarray:
        """Background glass for canvas rows ``[y0, y1)``: Beer–Lambert glass density with grain."""
        grain = np.random.default_rng([self.seed, 77, y0]).standard_normal((y1 - y0, self.w), dtype=np.float32)
        grain *= _GRAIN
        grain += 1.0
        out = np.empty((y1 - y0, self.w, 3), np.uint8)
        od = np.empty_like(grain)
        for ch in range(3):
            np.multiply(grain, -_OD_GLASS[ch], out=od)
            transmit(od, out[..., ch])
        return out

    def strip(self, y0: int, y1: int) -> np.ndarray:
        """Canvas rows ``[y0, y1)`` (RGB uint8)."""
        out = self.glass(y0, y1)
        for k in self._inner_strips(y0, y1):
            s = self._inner(k)
            r0 = self.oy + k * STRIP_ROWS  # canvas row of the inner strip's first row
            lo, hi = max(y0, r0), min(y1, r0 + s.shape[0])
            out[lo - y0 : hi - y0, self.ox : self.ox + self.inner.w] = s[lo - r0 : hi - r0]
            self._release(k)
        return out
