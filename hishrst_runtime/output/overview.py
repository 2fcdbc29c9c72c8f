"""The slide image of the SpatialData output: a few low-resolution pyramid levels read in bounded memory.

A *level source* is anything with ``shape`` (``(H, W)`` or ``(H, W, C)``, this level's pixels),
``downsample`` (level-0 pixels per pixel of this level) and ``read_region(x0, y0, x1, y1)`` returning
uint8 RGB ``(h, w, 3)`` for a half-open box in this level's pixels — a
:class:`hishrst_runtime.slides.level.Level` is one (pass ``slide.levels``), :class:`ArrayLevel` wraps an
in-memory image. Only levels whose longer side is at most ``max_side`` are read (each whole); when even
the coarsest is larger, it is reduced block by block, so level 0 of a big slide is never materialised.
Numpy and Pillow only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ImageScale", "ArrayLevel", "as_level_sources", "read_pyramid", "with_coarser_scale",
           "DEFAULT_MAX_IMAGE_SIDE"]

#: Longest side (pixels) of the finest image scale written to the SpatialData store.
DEFAULT_MAX_IMAGE_SIDE = 4096
#: Scales smaller than this (pixels, shorter side) are left out, except the first.
_MIN_SCALE_SIDE = 16
#: Side (pixels, before reduction) of the blocks a too-large level is reduced in.
_BLOCK_PX = 2048


@dataclass(frozen=True)
class ImageScale:
    """One image scale: ``image`` uint8 RGB ``(h, w, 3)``, ``downsample`` (level-0 pixels per image pixel)
    and, where the axes differ, ``downsample_yx`` (per axis, y then x)."""

    image: np.ndarray
    downsample: float
    downsample_yx: tuple[float, float] | None = None

    @property
    def yx(self) -> tuple[float, float]:
        """Level-0 pixels per image pixel along y and x."""
        return self.downsample_yx or (float(self.downsample), float(self.downsample))


@dataclass(frozen=True)
class ArrayLevel:
    """An in-memory uint8 RGB ``(H, W, 3)`` image seen as a level source (``downsample``: level-0 px per px)."""

    image: np.ndarray
    downsample: float

    def __post_init__(self) -> None:
        img = self.image
        if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] in (3, 4)):
            raise ValueError(f"a slide image level must be a uint8 HxWx3 (RGB) array, got "
                             f"{getattr(img, 'dtype', type(img))} {getattr(img, 'shape', '')}")
        if not (math.isfinite(self.downsample) and self.downsample > 0):
            raise ValueError(f"a level downsample must be a positive number of level-0 pixels per pixel, "
                             f"got {self.downsample!r}")

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) in this level's pixels."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    def read_region(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """The box ``[y0:y1, x0:x1]`` (clipped) as uint8 RGB ``(h, w, 3)``."""
        return np.ascontiguousarray(self.image[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0), :3])


def as_level_sources(levels: Sequence[Any], level_downsamples: Sequence[float] | None) -> list[Any]:
    """``levels`` as level sources: numpy arrays are wrapped in :class:`ArrayLevel` with the matching
    ``level_downsamples`` entry (required for arrays), other items are used as they are."""
    if level_downsamples is not None and len(level_downsamples) != len(levels):
        raise ValueError(f"level_downsamples has {len(level_downsamples)} entries for {len(levels)} levels")
    out = []
    for i, lv in enumerate(levels):
        if isinstance(lv, np.ndarray):
            if level_downsamples is None:
                raise ValueError("slide images given as arrays need level_downsamples (level-0 pixels per pixel)")
            out.append(ArrayLevel(lv, float(level_downsamples[i])))
        elif not (hasattr(lv, "read_region") and hasattr(lv, "shape") and hasattr(lv, "downsample")):
            raise ValueError(f"level {i} ({type(lv).__name__}) is neither an array nor a level with shape, "
                             "downsample and read_region (pass slide.levels)")
        else:
            out.append(lv if level_downsamples is None else _Rescaled(lv, float(level_downsamples[i])))
    return out


@dataclass(frozen=True)
class _Rescaled:
    """A level source whose downsample is overridden by the caller."""

    level: Any
    downsample: float

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.level.shape[0]), int(self.level.shape[1])

    def read_region(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self.level.read_region(x0, y0, x1, y1)


def _downsample_yx(lv: Any, ref: Any) -> tuple[float, float] | None:
    """Per-axis downsample of ``lv`` from the pixel sizes (``mpp_yx``) of it and the finest level ``ref``
    (slide levels have them; a level's scalar ``downsample`` is the mean of the two), else None."""
    a, b = getattr(lv, "mpp_yx", None), getattr(ref, "mpp_yx", None)
    try:
        yx = (float(a[0]) / float(b[0]) * float(ref.downsample), float(a[1]) / float(b[1]) * float(ref.downsample))
    except (TypeError, IndexError, ValueError, ZeroDivisionError):
        return None
    return yx if all(math.isfinite(v) and v > 0 for v in yx) else None


def _side(lv: Any) -> int:
    return max(int(lv.shape[0]), int(lv.shape[1]))


def _read_whole(lv: Any) -> np.ndarray:
    h, w = int(lv.shape[0]), int(lv.shape[1])
    img = np.asarray(lv.read_region(0, 0, w, h))
    if img.shape[:2] != (h, w):
        raise ValueError(f"a level of shape {(h, w)} returned {img.shape[:2]} for its whole box")
    return np.ascontiguousarray(img[..., :3], dtype=np.uint8)


def _reduce(lv: Any, factor: int) -> np.ndarray:
    """``lv`` box-averaged by the integer ``factor`` (Pillow ``reduce``), read in blocks of about
    ``_BLOCK_PX`` pixels (a multiple of ``factor``), so memory stays one block plus the result."""
    from PIL import Image

    h, w = int(lv.shape[0]), int(lv.shape[1])
    out = np.zeros((-(-h // factor), -(-w // factor), 3), dtype=np.uint8)
    block = factor * max(1, _BLOCK_PX // factor)
    for y0 in range(0, h, block):
        for x0 in range(0, w, block):
            part = np.ascontiguousarray(lv.read_region(x0, y0, min(x0 + block, w), min(y0 + block, h))[..., :3])
            small = np.asarray(Image.fromarray(part).reduce(factor))
            oy, ox = y0 // factor, x0 // factor
            out[oy:oy + small.shape[0], ox:ox + small.shape[1]] = small
    return out


def read_pyramid(levels: Sequence[Any], *, max_side: int = DEFAULT_MAX_IMAGE_SIDE) -> list[ImageScale]:
    """The image scales (finest first) for ``levels`` (level sources, any order).

    Every level whose longer side is at most ``max_side`` pixels is read whole and kept, finest first,
    each strictly smaller than the one before (tiny ones, under 16 px, are left out); per-axis downsamples
    come from the levels' ``mpp_yx`` where they have them. When no level is
    that small, the coarsest is reduced by the smallest integer factor that brings it to ``max_side``,
    block by block. Memory: about ``4/3 * max_side² * 3`` bytes plus one block.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1 pixel, got {max_side!r}")
    if not levels:
        raise ValueError("no slide image levels given")
    ordered = sorted(levels, key=lambda lv: float(lv.downsample))
    small = [lv for lv in ordered if _side(lv) <= max_side]
    if not small:
        coarsest = ordered[-1]
        factor = math.ceil(_side(coarsest) / max_side)
        yx = _downsample_yx(coarsest, ordered[0])
        return [ImageScale(_reduce(coarsest, factor), float(coarsest.downsample) * factor,
                           None if yx is None else (yx[0] * factor, yx[1] * factor))]
    scales: list[ImageScale] = []
    for lv in small:
        h, w = int(lv.shape[0]), int(lv.shape[1])
        if scales:
            ph, pw = scales[-1].image.shape[:2]
            if not (h < ph and w < pw) or min(h, w) < _MIN_SCALE_SIDE:
                continue
        scales.append(ImageScale(_read_whole(lv), float(lv.downsample), _downsample_yx(lv, ordered[0])))
    return scales


def with_coarser_scale(scales: list[ImageScale]) -> list[ImageScale]:
    """``scales`` with a 2x box-reduced copy of the last one appended when there is only one and it is
    at least 32 pixels on its shorter side (so the image is a real multiscale pyramid)."""
    from PIL import Image

    last = scales[-1]
    if len(scales) > 1 or min(last.image.shape[:2]) < 2 * _MIN_SCALE_SIDE:
        return list(scales)
    half = np.asarray(Image.fromarray(np.ascontiguousarray(last.image)).reduce(2))
    return [*scales, ImageScale(half, last.downsample * 2, (last.yx[0] * 2, last.yx[1] * 2))]
