"""A bounded LRU cache of decoded whole chunks of one pyramid level, and box reads through it."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
from PIL import Image

from hishrst_runtime.core.patches import PAD_VALUE
from hishrst_runtime.core.timing import StageTimer

__all__ = ["ChunkCache", "DEFAULT_CACHE_BYTES"]

#: Default bound of the decoded-chunk cache (bytes).
DEFAULT_CACHE_BYTES = 128 << 20


class ChunkCache:
    """Bounded LRU cache of decoded level chunks (Pillow RGB images), shared by the reader threads.

    Every read of the level is one whole chunk (:meth:`hishrst_runtime.slides.reader.Level.read_chunk`);
    patches and regions are assembled from cached chunks, so neighbouring patches never decode a
    chunk twice and no read is ever bigger than a chunk. The cache holds at most ``max(max_bytes,
    one chunk)`` bytes of decoded pixels (4 bytes per pixel, Pillow's RGB layout), momentarily one
    chunk more while inserting. Concurrent requests for the same chunk wait for one decode instead
    of decoding it twice.
    """

    def __init__(self, level: Any, *, max_bytes: int = DEFAULT_CACHE_BYTES, timer: StageTimer | None = None) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
        self.level, self.max_bytes, self.timer = level, int(max_bytes), timer
        self.shape = (int(level.shape[0]), int(level.shape[1]))
        self.chunks = (int(level.chunks[0]), int(level.chunks[1]))
        self._data: OrderedDict[tuple[int, int], Image.Image] = OrderedDict()
        self._loading: dict[tuple[int, int], threading.Event] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        #: Largest number of bytes the cache ever held (for tests and benchmarks).
        self.peak_bytes = 0

    def chunk(self, cy: int, cx: int) -> Image.Image:
        """Chunk ``(cy, cx)`` (chunk-grid row, column) as a Pillow RGB image, decoded at most once while cached."""
        key = (cy, cx)
        while True:
            with self._lock:
                img = self._data.get(key)
                if img is not None:
                    self._data.move_to_end(key)
                    self.hits += 1
                    return img
                event = self._loading.get(key)
                if event is None:  # this thread decodes it
                    event = self._loading[key] = threading.Event()
                    self.misses += 1
                    break
            event.wait()  # another thread is decoding it; then look again (it may be evicted already)
        try:
            t0 = time.perf_counter()
            img = self.level.read_chunk(cy, cx)
            if self.timer:
                self.timer.add("read_decode", time.perf_counter() - t0)
            nbytes = img.width * img.height * 4
            with self._lock:
                self._data[key] = img
                self._bytes += nbytes
                self.peak_bytes = max(self.peak_bytes, self._bytes)
                while self._bytes > self.max_bytes and len(self._data) > 1:
                    _, old = self._data.popitem(last=False)
                    self._bytes -= old.width * old.height * 4
        finally:
            with self._lock:
                self._loading.pop(key).set()
        return img

    def patch(self, x0: int, y0: int, side_x: int, side_y: int | None = None, *, fill: int = PAD_VALUE) -> Image.Image:
        """The box ``[y0 : y0+side_y, x0 : x0+side_x]`` (level pixels) as an RGB image, ``fill`` outside the level.

        Exactly :func:`hishrst_runtime.core.patches.cut_patch`'s pixels, without a numpy round trip.
        """
        side_y = side_x if side_y is None else side_y
        (h, w), (ch, cw) = self.shape, self.chunks
        x1, y1 = x0 + side_x, y0 + side_y
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if sx1 <= sx0 or sy1 <= sy0:
            return Image.new("RGB", (side_x, side_y), (fill,) * 3)
        cy0, cy1, cx0, cx1 = sy0 // ch, (sy1 - 1) // ch, sx0 // cw, (sx1 - 1) // cw
        if cy0 == cy1 and cx0 == cx1 and (sx0, sy0, sx1, sy1) == (x0, y0, x1, y1):  # inside one chunk
            return self.chunk(cy0, cx0).crop((x0 - cx0 * cw, y0 - cy0 * ch, x1 - cx0 * cw, y1 - cy0 * ch))
        out = Image.new("RGB", (side_x, side_y), (fill,) * 3)
        for cy in range(cy0, cy1 + 1):
            for cx in range(cx0, cx1 + 1):
                oy, ox = cy * ch, cx * cw
                bx0, by0 = max(sx0, ox), max(sy0, oy)
                bx1, by1 = min(sx1, ox + cw), min(sy1, oy + ch)
                piece = self.chunk(cy, cx).crop((bx0 - ox, by0 - oy, bx1 - ox, by1 - oy))
                out.paste(piece, (bx0 - x0, by0 - y0))
        return out

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Region ``[y0:y1, x0:x1]`` (level pixels, clipped to the level) as uint8 ``(h, w, 3)``."""
        h, w = self.shape
        x0, y0, x1, y1 = max(int(x0), 0), max(int(y0), 0), min(int(x1), w), min(int(y1), h)
        if x1 <= x0 or y1 <= y0:
            return np.empty((max(0, y1 - y0), max(0, x1 - x0), 3), dtype=np.uint8)
        return np.array(self.patch(x0, y0, x1 - x0, y1 - y0))
