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


def _chunk_pixels(level: Any, cy: int, cx: int) -> tuple[np.ndarray, bool]:
    """Chunk (cy, cx) of ``level`` as (uint8 pixels, planar): the level's own array form when it has one
    (:meth:`~hishrst_runtime.slides.level.Level.read_chunk_array`), else its Pillow image as ``(h, w, 3)``."""
    read = getattr(level, "read_chunk_array", None)
    if read is not None:
        data, planar = read(cy, cx)
    else:
        data, planar = np.asarray(level.read_chunk(cy, cx)), False
    if not data.flags.c_contiguous:  # an edge chunk's view of the padded chunk: keep only its pixels
        data = np.ascontiguousarray(data)
    return data, planar


class ChunkCache:
    """Bounded LRU cache of decoded level chunks, shared by the reader threads.

    Every read of the level is one whole chunk (:meth:`hishrst_runtime.slides.level.Level.read_chunk_array`);
    patches and regions are assembled from cached chunks, so neighbouring patches never decode a chunk twice
    and no read is ever bigger than a chunk. Chunks are kept as the level decodes them — planar ``(3, h, w)``
    for ``c, y, x`` stores, else ``(h, w, 3)``, 3 bytes per pixel — and :meth:`copy_box` copies a box of them
    straight into a caller's ``(h, w, 3)`` or ``(3, h, w)`` array (a tile of the encoder's batch). The
    cache holds at most ``max(max_bytes, one chunk)`` bytes of decoded pixels, momentarily one chunk more while
    inserting. Concurrent requests for the same chunk wait for one decode instead of decoding it twice.
    """

    def __init__(self, level: Any, *, max_bytes: int = DEFAULT_CACHE_BYTES, timer: StageTimer | None = None) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
        self.level, self.max_bytes, self.timer = level, int(max_bytes), timer
        self.shape = (int(level.shape[0]), int(level.shape[1]))
        self.chunks = (int(level.chunks[0]), int(level.chunks[1]))
        self._data: OrderedDict[tuple[int, int], tuple[np.ndarray, bool]] = OrderedDict()
        self._loading: dict[tuple[int, int], threading.Event] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        #: Largest number of bytes the cache ever held (for tests and benchmarks).
        self.peak_bytes = 0

    def chunk_array(self, cy: int, cx: int) -> tuple[np.ndarray, bool]:
        """Chunk ``(cy, cx)`` (chunk-grid row, column) as (uint8 pixels, planar) — ``(3, h, w)`` when planar, else
        ``(h, w, 3)``, clipped to the level — decoded at most once while cached. Do not write to the pixels."""
        key = (cy, cx)
        while True:
            with self._lock:
                got = self._data.get(key)
                if got is not None:
                    self._data.move_to_end(key)
                    self.hits += 1
                    return got
                event = self._loading.get(key)
                if event is None:  # this thread decodes it
                    event = self._loading[key] = threading.Event()
                    self.misses += 1
                    break
            event.wait()  # another thread is decoding it; then look again (it may be evicted already)
        try:
            t0 = time.perf_counter()
            got = _chunk_pixels(self.level, cy, cx)
            if self.timer:
                self.timer.add("read_decode", time.perf_counter() - t0)
            with self._lock:
                self._data[key] = got
                self._bytes += got[0].nbytes
                self.peak_bytes = max(self.peak_bytes, self._bytes)
                while self._bytes > self.max_bytes and len(self._data) > 1:
                    _, (old, _planar) = self._data.popitem(last=False)
                    self._bytes -= old.nbytes
        finally:
            with self._lock:
                self._loading.pop(key).set()
        return got

    def chunk(self, cy: int, cx: int) -> Image.Image:
        """Chunk ``(cy, cx)`` as a Pillow RGB image (through the cache)."""
        data, planar = self.chunk_array(cy, cx)
        return Image.fromarray(np.ascontiguousarray(data.transpose(1, 2, 0) if planar else data))

    def copy_box(self, out: np.ndarray, x0: int, y0: int, *, fill: int = PAD_VALUE,
                 channels_first: bool = False) -> np.ndarray:
        """Write the level box ``[y0 : y0+h, x0 : x0+w]`` into ``out`` (uint8 ``(h, w, 3)``, or ``(3, h, w)`` with
        ``channels_first``; e.g. one tile of the encoder's batch), ``fill`` outside the level: exactly
        :func:`hishrst_runtime.core.patches.cut_patch`'s pixels, copied once from the cached chunks. A planar chunk
        into a ``channels_first`` box is one copy of whole rows per plane — about 2.5× cheaper than interleaving
        the planes into ``(h, w, 3)``. Returns ``out``."""
        bh, bw = (int(out.shape[1]), int(out.shape[2])) if channels_first else (int(out.shape[0]), int(out.shape[1]))
        (h, w), (ch, cw) = self.shape, self.chunks
        x1, y1 = x0 + bw, y0 + bh
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if (sx0, sy0, sx1, sy1) != (x0, y0, x1, y1):  # over the level's edge: the outside is fill
            out[...] = fill
        if sx1 <= sx0 or sy1 <= sy0:
            return out
        for cy in range(sy0 // ch, (sy1 - 1) // ch + 1):
            oy = cy * ch
            ya, yb = max(sy0, oy), min(sy1, oy + ch)
            for cx in range(sx0 // cw, (sx1 - 1) // cw + 1):
                ox = cx * cw
                xa, xb = max(sx0, ox), min(sx1, ox + cw)
                data, planar = self.chunk_array(cy, cx)
                box = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
                src = (slice(ya - oy, yb - oy), slice(xa - ox, xb - ox))
                if channels_first:
                    dst = out[(slice(None), *box)]
                    np.copyto(dst, data[(slice(None), *src)] if planar else data[src].transpose(2, 0, 1))
                elif planar:  # one channel at a time: contiguous source rows, the GIL released by numpy
                    dst = out[box]
                    for c in range(3):
                        np.copyto(dst[..., c], data[(c, *src)])
                else:
                    np.copyto(out[box], data[src])
        return out

    def patch(self, x0: int, y0: int, side_x: int, side_y: int | None = None, *, fill: int = PAD_VALUE) -> Image.Image:
        """The box ``[y0 : y0+side_y, x0 : x0+side_x]`` (level pixels) as an RGB image, ``fill`` outside the level.

        Exactly :func:`hishrst_runtime.core.patches.cut_patch`'s pixels.
        """
        side_y = side_x if side_y is None else side_y
        return Image.fromarray(self.copy_box(np.empty((side_y, side_x, 3), np.uint8), x0, y0, fill=fill))

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Region ``[y0:y1, x0:x1]`` (level pixels, clipped to the level) as uint8 ``(h, w, 3)``."""
        h, w = self.shape
        x0, y0, x1, y1 = max(int(x0), 0), max(int(y0), 0), min(int(x1), w), min(int(y1), h)
        if x1 <= x0 or y1 <= y0:
            return np.empty((max(0, y1 - y0), max(0, x1 - x0), 3), dtype=np.uint8)
        return self.copy_box(np.empty((y1 - y0, x1 - x0, 3), np.uint8), x0, y0)
