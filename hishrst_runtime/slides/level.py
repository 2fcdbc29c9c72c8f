"""One pyramid level of an OME-Zarr slide: box reads, whole-chunk reads and chunk-aligned tiling (torch-free).

Coordinates are ``(x, y)``; a region ``(x0, y0, x1, y1)`` is half-open and in the pixels of the
level it is read from (level-0 pixels × ``1 / downsample``). Reads are safe from several threads
(zarr-python 3 keeps no per-read state on the array).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from hishrst_runtime.slides.errors import ChunkDecodeError, SlideError

__all__ = ["Level", "LevelImage", "iter_chunk_regions", "direct_ok"]

#: What zarr's codec pipeline raises for a chunk that does not decode (zstd/blosc, gzip/zlib, shapes).
_DECODE_ERRORS = (RuntimeError, ValueError, TypeError, OSError, EOFError, zlib.error)


def direct_ok(axes: Sequence[str], chunks: Sequence[int]) -> bool:
    """Whether :meth:`Level.read_chunk` can use direct chunk reads: a ``c, y, x`` or ``y, x, c`` order
    (leading singleton ``t`` / ``z`` allowed) whose singleton axes are chunked by 1."""
    kept = [a for a in axes if a in ("y", "x", "c")]
    return kept in (["c", "y", "x"], ["y", "x", "c"]) and all(
        int(c) == 1 for a, c in zip(axes, chunks) if a not in ("y", "x", "c"))


@dataclass(eq=False)
class Level:
    """One pyramid level of a slide.

    ``mpp`` is in µm / pixel (the mean of the y and x pixel sizes, ``mpp_yx`` holds both),
    ``downsample`` is relative to level 0 (from the scales), ``shape`` = (H, W) and ``chunks`` =
    (ch, cw) are in this level's pixels. A Level can be passed to
    :func:`hishrst_runtime.core.patches.cut_patch` directly (it reads ``shape[0:2]`` and slices
    ``level[y0:y1, x0:x1]``); :attr:`image` is the same view with ``shape == (H, W, 3)``.
    """

    index: int
    mpp: float
    mpp_yx: tuple[float, float]
    downsample: float
    shape: tuple[int, int]
    chunks: tuple[int, int]
    path: str
    _array: Any = field(repr=False)
    _axes: tuple[str, ...] = field(repr=False)
    _n_channels: int = field(repr=False)
    _direct: Any = field(default=None, repr=False)
    #: The store's path or URL (for messages).
    store: str = field(default="", repr=False)
    #: What a chunk that does not decode means and the fix (the end of :class:`ChunkDecodeError` messages).
    corrupt_hint: str = field(default="the slide store is corrupt, convert the slide again", repr=False)

    def _index(self, y: slice, x: slice) -> tuple[Any, ...]:
        return tuple(y if a == "y" else x if a == "x" else slice(0, 3) if a == "c" else 0 for a in self._axes)

    def _open_array(self) -> Any:
        if self._array is None:
            raise ValueError("the slide is closed; open it again with open_slide()")
        return self._array

    def _zarr_read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Box read through zarr; a chunk that does not decode becomes a :class:`ChunkDecodeError` naming it."""
        arr = self._open_array()
        try:
            return np.asarray(arr[self._index(slice(y0, y1), slice(x0, x1))])
        except SlideError:  # already names its file or URL (a remote read, a TIFF tile)
            raise
        except _DECODE_ERRORS as e:
            raise self._decode_error(y0, y1, x0, x1, e) from e

    def _decode_error(self, y0: int, y1: int, x0: int, x1: int, e: BaseException) -> ChunkDecodeError:
        ch, cw = self.chunks
        if self._direct is not None:  # find the culprit chunk file by decoding the box's chunks directly
            for cy in range(y0 // ch, (y1 - 1) // ch + 1):
                for cx in range(x0 // cw, (x1 - 1) // cw + 1):
                    try:
                        self.read_chunk(cy, cx)
                    except ChunkDecodeError as named:
                        return named
        spans = ((y0 // ch, (y1 - 1) // ch), (x0 // cw, (x1 - 1) // cw))
        rows, cols = (f"{a}" if a == b else f"{a}–{b}" for a, b in spans)
        return ChunkDecodeError(
            f"{self.store}/{self.path}: a chunk in chunk-grid row(s) {rows}, column(s) {cols} does not decode "
            f"({type(e).__name__}: {e}); {self.corrupt_hint}")

    def read_region(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Read the half-open box ``[y0:y1, x0:x1]`` (this level's pixels) as uint8 RGB ``(h, w, 3)``.

        The box is **clipped** to the level bounds, so the result can be smaller than requested
        (empty, ``(0, 0, 3)``, for a box entirely outside). Use ``cut_patch`` for white padding.
        """
        self._open_array()
        h, w = self.shape
        cx0, cy0 = min(max(int(x0), 0), w), min(max(int(y0), 0), h)
        cx1, cy1 = min(max(int(x1), cx0), w), min(max(int(y1), cy0), h)
        if cx1 <= cx0 or cy1 <= cy0:
            return np.zeros((max(cy1 - cy0, 0), max(cx1 - cx0, 0), 3), dtype=np.uint8)
        data = self._zarr_read(cy0, cy1, cx0, cx1)
        kept = [a for a in self._axes if a in ("y", "x", "c")]
        if "c" in kept:
            data = np.moveaxis(data, kept.index("c"), -1)
            if kept.index("y") > kept.index("x"):  # (x, y, c) -> (y, x, c)
                data = data.swapaxes(0, 1)
        else:  # pragma: no cover - rejected at open (needs 3 or 4 channels)
            data = np.repeat(data[..., None], 3, axis=-1)
        return np.ascontiguousarray(data, dtype=np.uint8)

    def _direct_block(self, cy: int, cx: int, bh: int, bw: int, kept: list[str]) -> np.ndarray:
        """Chunk (cy, cx) decoded directly, all channel chunks joined, cropped to (bh, bw) in ``kept`` order."""
        cc = self._direct.chunk_shape[self._axes.index("c")]
        parts = []
        for k in range(math.ceil(3 / cc)):
            coords = tuple(cy if a == "y" else cx if a == "x" else k if a == "c" else 0 for a in self._axes)
            block = self._direct.read(coords)
            parts.append(block.reshape([n for a, n in zip(self._axes, block.shape) if a in ("y", "x", "c")]))
        data = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=kept.index("c"))
        return data[tuple(slice(0, bh) if a == "y" else slice(0, bw) if a == "x" else slice(0, 3) for a in kept)]

    def read_chunk(self, cy: int, cx: int) -> Image.Image:
        """Chunk ``(cy, cx)`` of this level (chunk-grid row and column) as a Pillow RGB image.

        The image covers level pixels ``[cy*ch : (cy+1)*ch, cx*cw : (cx+1)*cw]`` clipped to the
        level, so edge chunks are smaller. This is the streaming pipeline's read primitive: for a
        simple local store the chunk file is decompressed directly (and its checksum verified)
        (:class:`hishrst_runtime.slides.chunks.DirectChunkReader`), and planar ``c, y, x`` data becomes
        an RGB image without a strided numpy transpose.
        """
        self._open_array()
        ch, cw = self.chunks
        h, w = self.shape
        y0, x0 = int(cy) * ch, int(cx) * cw
        if not (0 <= y0 < h and 0 <= x0 < w):
            raise IndexError(f"chunk ({cy}, {cx}) is outside the level's {math.ceil(h / ch)} x {math.ceil(w / cw)} chunks")
        bh, bw = min(ch, h - y0), min(cw, w - x0)
        kept = [a for a in self._axes if a in ("y", "x", "c")]
        if kept not in (["c", "y", "x"], ["y", "x", "c"]):  # unusual axis orders
            return Image.fromarray(self.read_region(x0, y0, x0 + bw, y0 + bh))
        if self._direct is not None:  # both orders have a c axis; it may be chunked by fewer than 3
            data = self._direct_block(int(cy), int(cx), bh, bw, kept)
        else:
            data = self._zarr_read(y0, y0 + bh, x0, x0 + bw)
        if kept == ["c", "y", "x"]:
            planes = [np.ascontiguousarray(data[i], dtype=np.uint8) for i in range(3)]
            return Image.merge("RGB", [Image.frombuffer("L", (bw, bh), p, "raw", "L", 0, 1) for p in planes])
        return Image.fromarray(np.ascontiguousarray(data, dtype=np.uint8))  # y, x, c

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        """``level[y0:y1, x0:x1]`` → uint8 RGB ``(h, w, 3)`` (step-less slices, clipped to bounds)."""
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, slice) for k in key)):
            raise TypeError("a Level is indexed as level[y0:y1, x0:x1]")
        ys, xs = key
        if (ys.step not in (None, 1)) or (xs.step not in (None, 1)):
            raise TypeError("a Level does not support strided slices")
        h, w = self.shape
        y0, y1, _ = ys.indices(h)
        x0, x1, _ = xs.indices(w)
        return self.read_region(x0, y0, x1, y1)

    @property
    def image(self) -> LevelImage:
        """This level as an array-like with ``shape == (H, W, 3)`` and ``[y-slice, x-slice]`` reads."""
        return LevelImage(self)

    def iter_regions(self, region_size_px: int | None = None) -> Iterator[tuple[int, int, int, int]]:
        """Chunk-aligned boxes covering the level; see :func:`iter_chunk_regions`."""
        return iter_chunk_regions(self, region_size_px)


class LevelImage:
    """Thin adapter: a :class:`Level` seen as an ``(H, W, 3)`` uint8 array (for ``cut_patch``)."""

    __slots__ = ("level",)

    def __init__(self, level: Level) -> None:
        self.level = level

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.level.shape[0], self.level.shape[1], 3)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        return self.level[key]


def iter_chunk_regions(level: Level, region_size_px: int | None = None) -> Iterator[tuple[int, int, int, int]]:
    """Yield boxes ``(x0, y0, x1, y1)`` (level pixels, half-open) tiling ``level`` in row-major order.

    Box edges fall on chunk boundaries: the box side is ``region_size_px`` rounded **up** to a
    whole number of chunks (one chunk when ``None``); boxes on the right / bottom edge are clipped
    to the level. Reading the boxes one by one decodes every chunk exactly once.
    """
    h, w = level.shape
    ch, cw = level.chunks
    if region_size_px is None:
        bh, bw = ch, cw
    else:
        if int(region_size_px) <= 0:
            raise ValueError(f"region_size_px must be a positive number of pixels, got {region_size_px!r}")
        bh = ch * max(1, math.ceil(int(region_size_px) / ch))
        bw = cw * max(1, math.ceil(int(region_size_px) / cw))
    for y0 in range(0, h, bh):
        for x0 in range(0, w, bw):
            yield x0, y0, min(x0 + bw, w), min(y0 + bh, h)
