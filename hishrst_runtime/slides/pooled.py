"""Pyramid levels computed on the fly by 2 × 2 mean pooling, exactly as ``hishrst convert`` writes them (torch-free).

A slide read directly (a TIFF, an OpenSlide format) may stop its pyramid early — a single-level TIFF has
none at all. :func:`extend_pyramid` appends levels read through :class:`PooledBoxes` below the coarsest stored level with
the rule of :func:`~hishrst_runtime.slides.pyramid.pyramid_shapes` (halve, rounding up, while the smaller
side exceeds 1024 pixels), each one the 2 × 2 mean of the level above it (odd edges replicated,
:func:`~hishrst_runtime.slides.pyramid._pool2`), with exactly twice its downsample. So a single-level slide
has the same levels, pixels, thumbnails and tissue masks read directly as after ``hishrst convert``.

The TIFF reader replaces the source of the 2×, 4× and 8× levels of JPEG-tiled files with reduced-scale
decoding (:mod:`hishrst_runtime.slides.jpeg_scaled`), which keeps a :class:`PooledBoxes` for what it cannot
decode so.

Reads are blockwise: a box of a pooled level is assembled from blocks of at most
:data:`BLOCK_PX` × :data:`BLOCK_PX` pixels, each read from the level above (itself blockwise), so
memory stays a few blocks per level whatever the box. Pooled levels are meant for overviews and
coarse inference; each read decodes the stored level's pixels again (there is no cache here beyond
the pipeline's chunk cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hishrst_runtime.slides.level import Level
from hishrst_runtime.slides.pyramid import _pool2

__all__ = ["BLOCK_PX", "MIN_SIDE_PX", "PooledBoxes", "extend_pyramid", "level_downsample"]

#: Side (pixels of the pooled level) of the blocks a box is assembled from.
BLOCK_PX = 1024
#: Levels are added while the smaller side of the coarsest one exceeds this (pixels), as in ``hishrst convert``.
MIN_SIDE_PX = 1024
_CHUNK_PX = 512


@dataclass(frozen=True)
class PooledBoxes:
    """The :class:`~hishrst_runtime.slides.boxes.BoxSource` of a level computed from ``parent``, the level above
    it, by 2 × 2 mean pooling; see the module docstring."""

    parent: Level

    def read_box(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        parent = self.parent
        ph, pw = parent.shape
        out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        for by in range(y0, y1, BLOCK_PX):
            by1 = min(by + BLOCK_PX, y1)
            for bx in range(x0, x1, BLOCK_PX):
                bx1 = min(bx + BLOCK_PX, x1)
                block = parent.read_region(2 * bx, 2 * by, min(2 * bx1, pw), min(2 * by1, ph))
                out[by - y0 : by1 - y0, bx - x0 : bx1 - x0] = _pool2(block)
        return out


def _pooled(parent: Level) -> Level:
    h, w = parent.shape
    shape = (math.ceil(h / 2), math.ceil(w / 2))
    return Level(
        index=parent.index + 1, mpp=parent.mpp * 2.0, mpp_yx=(parent.mpp_yx[0] * 2.0, parent.mpp_yx[1] * 2.0),
        downsample=parent.downsample * 2.0, shape=shape, chunks=(min(_CHUNK_PX, shape[0]), min(_CHUNK_PX, shape[1])),
        path=f"{parent.path} pooled 2x", source=PooledBoxes(parent), computed=True, store=parent.store,
        corrupt_hint=parent.corrupt_hint,
    )


def extend_pyramid(levels: list[Level], *, min_side: int = MIN_SIDE_PX) -> list[Level]:
    """``levels`` (finest first) plus pooled levels below the coarsest while its smaller side exceeds
    ``min_side`` pixels; returns the new list (the stored levels are not changed)."""
    out = list(levels)
    while min(out[-1].shape) > min_side:
        out.append(_pooled(out[-1]))
    return out


def level_downsample(shape0: tuple[int, int], shape: tuple[int, int]) -> tuple[float, float]:
    """(y, x) downsample of a stored level of (H, W) ``shape`` pixels relative to level 0's ``shape0``.

    Exactly ``2**k`` when both sides are level 0's divided by ``2**k`` rounded either way (as scanners
    and ``hishrst convert`` write them: the level covers the same area), else the ratio of the sizes.
    """
    ry, rx = shape0[0] / shape[0], shape0[1] / shape[1]
    f = 2 ** round(math.log2(max(0.5 * (ry + rx), 1.0)))
    if all(n in (math.floor(n0 / f), math.ceil(n0 / f)) for n0, n in zip(shape0, shape)):
        return float(f), float(f)
    return ry, rx
