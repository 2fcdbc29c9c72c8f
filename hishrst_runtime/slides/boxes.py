"""Where a pyramid level's pixels come from — the public extension point of a slide reader — and the
level-independent helpers of :mod:`hishrst_runtime.slides.level` (torch-free).

A :class:`~hishrst_runtime.slides.level.Level` reads its pixels through :meth:`Level.read_box
<hishrst_runtime.slides.level.Level.read_box>`, from one of two places:

* a zarr-like **array** (an OME-Zarr store, tifffile's zarr view of a TIFF level), built in, with direct
  whole-chunk decoding (:class:`~hishrst_runtime.slides.chunks.DirectChunkReader`, the TIFF
  :class:`~hishrst_runtime.slides.tiffslide.TileReader`) and the missing / corrupt chunk rule
  (:mod:`hishrst_runtime.slides.integrity`);
* a :class:`BoxSource`, any object with ``read_box(y0, y1, x0, x1)``, passed as ``Level(..., source=...)``:
  OpenSlide (:class:`~hishrst_runtime.slides.openslide_slide.OpenSlideBoxes`), DICOM
  (:class:`~hishrst_runtime.slides.dicom_slide.DicomBoxes`) and the 2 × 2-pooled levels
  (:class:`~hishrst_runtime.slides.pooled.PooledBoxes`).

A source may also have ``read_image(y0, y1, x0, x1)`` returning the same pixels as a Pillow RGB image; whole-chunk
reads (:meth:`Level.read_chunk <hishrst_runtime.slides.level.Level.read_chunk>`, the chunk cache's form) then skip
the numpy round trip (:class:`~hishrst_runtime.slides.jpeg_scaled.ScaledJpegBoxes` does).

A new reader module therefore builds plain :class:`Level` objects with its own box source; it subclasses
nothing and overrides nothing. A :class:`Level` is itself a :class:`BoxSource` (pooled levels read their
parent level through it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from hishrst_runtime.slides.level import Level

__all__ = ["BoxSource", "LevelImage", "iter_chunk_regions", "direct_ok"]


@runtime_checkable
class BoxSource(Protocol):
    """The pixels of one pyramid level, read box by box (see the module docstring)."""

    def read_box(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Level pixels ``[y0:y1, x0:x1]`` (half-open, inside the level, non-empty) as uint8 RGB
        ``(y1 - y0, x1 - x0, 3)``. May be called from several threads at once. Unreadable data raises a
        :class:`~hishrst_runtime.slides.errors.SlideError` (a ``ChunkDecodeError`` for a damaged tile)
        naming the file, what is wrong and the fix."""
        ...  # pragma: no cover


def direct_ok(axes: Sequence[str], chunks: Sequence[int]) -> bool:
    """Whether :meth:`Level.read_chunk` can use direct chunk reads: a ``c, y, x`` or ``y, x, c`` order
    (leading singleton ``t`` / ``z`` allowed) whose singleton axes are chunked by 1."""
    kept = [a for a in axes if a in ("y", "x", "c")]
    return kept in (["c", "y", "x"], ["y", "x", "c"]) and all(
        int(c) == 1 for a, c in zip(axes, chunks) if a not in ("y", "x", "c"))


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
