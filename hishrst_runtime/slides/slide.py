"""An opened whole-slide image — OME-Zarr (local or remote) or any registered format (TIFF-family, OpenSlide,
DICOM, …) — its levels, level choice and a bounded-memory overview (torch-free)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from hishrst_runtime.slides.chunks import MissingChunks
from hishrst_runtime.slides.errors import check_slide_size
from hishrst_runtime.slides.level import Level

__all__ = ["Slide", "SlideKind"]

#: How a slide was opened: a local OME-Zarr store, one over http(s):// or s3://, an image element of a
#: SpatialData store, or the name of the registered format whose opener read it
#: (:mod:`hishrst_runtime.slides.formats`: ``"tiff"``, ``"openslide"``, ``"dicom"``, …).
SlideKind = str

#: Column width (pixels) of the blocks a single huge level is decimated in.
_THUMB_BLOCK_PX = 4096


class Slide:
    """An opened whole-slide image (see :func:`hishrst_runtime.slides.reader.open_slide`).

    ``levels`` are sorted finest first; ``mpp0`` is the level-0 pixel size in µm / pixel and
    ``shape0`` its (H, W) in pixels; ``kind`` says how it was opened (:data:`SlideKind`). Use as a
    context manager or call :meth:`close`.

    Level 0 (the coordinate space of points and outputs) is the finest level, unless ``base`` =
    ((H, W), µm / pixel) names a finer space the levels are scaled into (a SpatialData element with a
    ``Scale`` to its coordinate system; the levels' ``downsample`` are then relative to that space).

    Missing or corrupt chunks follow one rule (:mod:`hishrst_runtime.slides.integrity`);
    ``allow_missing_chunks`` (settable) reads those inside tissue as the fill value, and
    :attr:`filled_chunks` lists each chunk so read (thread-safe; for the run report).
    """

    def __init__(self, path: str, levels: list[Level], *, mpp_source: str, kind: SlideKind = "ome-zarr",
                 on_close: Callable[[], None] | None = None, allow_missing_chunks: bool = False,
                 base: tuple[tuple[int, int], float] | None = None) -> None:
        self.path = path
        self.levels = levels
        #: Where the pixel size came from: ``"metadata"`` or ``"override"`` (``mpp=``).
        self.mpp_source = mpp_source
        self.kind: SlideKind = kind
        self._on_close = on_close
        self._base = base
        self._missing = MissingChunks(allow=allow_missing_chunks)
        #: Names of the chunks / tiles read as the fill value because missing chunks were allowed.
        self.filled_chunks: list[str] = self._missing.filled
        stored = [lv for lv in levels if not lv.computed]
        for lv in levels:
            lv._missing = self._missing
            coarser = [c for c in stored if c.mpp > lv.mpp * 1.01]
            lv._coarser = coarser[0] if coarser and not lv.computed else None

    @property
    def allow_missing_chunks(self) -> bool:
        """Whether chunks / tiles with no data inside tissue read as the fill value (counted) instead of failing."""
        return self._missing.allow

    @allow_missing_chunks.setter
    def allow_missing_chunks(self, value: bool) -> None:
        self._missing.allow = bool(value)

    @property
    def mpp0(self) -> float:
        """Level-0 pixel size in µm / pixel."""
        return self.levels[0].mpp if self._base is None else self._base[1]

    @property
    def shape0(self) -> tuple[int, int]:
        """Level-0 (H, W) in pixels."""
        return self.levels[0].shape if self._base is None else self._base[0]

    def __repr__(self) -> str:
        return f"Slide({self.path!r}, shape0={self.shape0}, mpp0={self.mpp0:.4g}, levels={len(self.levels)})"

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the levels' pixel handles and close the slide's files (a TIFF, an OpenSlide handle); idempotent."""
        for lv in self.levels:
            lv.close()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    def level_for_mpp(self, target_mpp: float, *, tolerance: float = 0.1) -> int:
        """Index of the level to read for a target resolution of ``target_mpp`` µm / pixel.

        The level nearest the target in log space, among those no coarser than
        ``target_mpp * (1 + tolerance)`` (so little upsampling is ever needed); level 0 when even
        level 0 is coarser than that.
        """
        if not (np.isfinite(target_mpp) and target_mpp > 0):
            raise ValueError(f"target pixel size must be a positive number of µm/pixel, got {target_mpp!r}")
        ok = [lv for lv in self.levels if lv.mpp <= target_mpp * (1.0 + tolerance)]
        if not ok:
            return 0
        best = min(ok, key=lambda lv: (abs(math.log(lv.mpp / target_mpp)), lv.index))
        return best.index

    def thumbnail_level(self, max_side: int) -> int:
        """Index of the level :meth:`thumbnail` reads for ``max_side``: the coarsest one whose longer
        side is still ≥ ``max_side`` pixels, level 0 when even it is smaller."""
        big = [lv.index for lv in self.levels if max(lv.shape) >= max_side]
        return big[-1] if big else 0

    def thumbnail(self, *, max_side: int = 1024) -> np.ndarray:
        """A uint8 RGB ``(h, w, 3)`` overview whose longer side is ``max_side`` pixels (or less).

        Read from :meth:`thumbnail_level` (level 0, not upsampled, when even it is smaller) and resized
        with Pillow. A level more than twice ``max_side`` is first decimated block by block (every
        ``step``-th pixel, copied), so memory stays a few blocks plus the decimated image — at most
        about ``(4 * max_side)²`` pixels whatever the level size. Its pixel size in µm / pixel is
        :meth:`thumbnail_mpp` of its shape.
        """
        if max_side < 1:
            raise ValueError(f"max_side must be >= 1 pixel, got {max_side!r}")
        lv = self.levels[self.thumbnail_level(max_side)]
        h, w = lv.shape
        scale = min(1.0, max_side / max(h, w))
        oh, ow = max(1, round(h * scale)), max(1, round(w * scale))
        step = max(1, int(max(h, w) // (2 * max_side)))  # cheap pre-decimation of very large levels
        check_slide_size(-(-h // step), -(-w // step), kind="overview", where=f"{self.path} (overview of level "
                          f"{lv.index})", fix=f"ask for a smaller overview than max_side={max_side}")
        img = lv.read_region(0, 0, w, h) if step == 1 else _decimate(lv, step)
        if img.shape[:2] != (oh, ow):
            img = np.asarray(Image.fromarray(img).resize((ow, oh), Image.BILINEAR))
        return np.ascontiguousarray(img)

    def thumbnail_mpp(self, thumb_shape: Sequence[int]) -> float:
        """Pixel size (µm / pixel) of an overview of shape ``(h, w, ...)`` covering the whole slide."""
        h0, w0 = self.shape0
        return self.mpp0 * 0.5 * (h0 / thumb_shape[0] + w0 / thumb_shape[1])


def _decimate(lv: Level, step: int) -> np.ndarray:
    """``level[::step, ::step]`` as a new array, read in chunk-aligned blocks that are dropped once decimated."""
    h, w = lv.shape
    ch, cw = lv.chunks
    out = np.empty((-(-h // step), -(-w // step), 3), dtype=np.uint8)
    bw = cw * max(1, _THUMB_BLOCK_PX // cw)
    for y0 in range(0, h, ch):
        y1 = min(y0 + ch, h)
        oy = -(-y0 // step)  # first kept row at or after y0
        if oy * step >= y1:  # no kept row in this chunk row
            continue
        for x0 in range(0, w, bw):
            x1 = min(x0 + bw, w)
            ox = -(-x0 // step)
            block = lv.read_region(x0, y0, x1, y1)[oy * step - y0 :: step, ox * step - x0 :: step]
            out[oy : oy + block.shape[0], ox : ox + block.shape[1]] = block
    return out
