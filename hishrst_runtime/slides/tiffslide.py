"""Open a TIFF-family whole slide directly, without conversion (torch-free).

SVS, (pyramidal / OME-) TIFF, NDPI, SCN, BIF and other files tifffile reads become a
:class:`~hishrst_runtime.slides.slide.Slide` with the same interface as an OME-Zarr store:

* **Image.** The tifffile *series* with the largest level-0 area (the baseline image, not the label,
  macro or thumbnail). Each of its pyramid levels (SubIFDs, SVS reduced pages, NDPI / SCN levels) is a
  lazy :class:`~hishrst_runtime.slides.tiff.TiffLevel`; it must be one 8-bit RGB(A) plane.
* **Reads.** Box reads go through tifffile's zarr view (or a memory map for uncompressed strips);
  whole-chunk reads — the streaming pipeline's primitive — read one tile's bytes with ``os.pread``
  and decode them with tifffile's own decoder (JPEG, JPEG 2000, LZW, deflate, …: the same pixels its
  zarr view gives) on the calling thread, so reader threads decode in parallel. Memory is bounded by
  what is asked for; nothing is loaded whole; a level larger than the slide limit
  (:mod:`hishrst_runtime.core.limits`) is refused at open, before anything is decoded.
* **Missing and corrupt tiles.** A tile with ``TileByteCounts`` or ``TileOffsets`` 0 has no data: it is
  judged by the rule of :mod:`hishrst_runtime.slides.integrity` (background when the next coarser stored
  level is uniform white there, else an error naming the tile, or white fill counted in
  ``Slide.filled_chunks`` with ``--allow-missing-chunks``). A tile that does not decode, and a JPEG tile
  that is cut short (no end-of-image marker) or has bytes after a marker libjpeg would skip, is a
  :class:`~hishrst_runtime.slides.errors.ChunkDecodeError` naming the tile (fill, counted, when allowed).
* **Pixel size.** From the baseline page, with the candidates ``hishrst convert`` uses
  (:func:`~hishrst_runtime.slides.tiff.tiff_mpp_candidates`; Aperio MPP, OME PhysicalSize, JSON
  description, resolution tags in cm / inch) and the one resolver
  (:func:`~hishrst_runtime.core.units.resolve_mpp`); ``mpp=`` overrides it.
* **Levels.** A level whose size is the level-0 size divided by a power of two (rounded either way)
  has exactly that downsample, as in a converted store; other levels use the ratio of the sizes per
  axis. Below the coarsest stored level, 2 × 2 mean-pooled levels are added exactly as
  ``hishrst convert`` builds its pyramid (:mod:`hishrst_runtime.slides.pooled`), so a single-level TIFF
  gives the same levels, thumbnails and predictions as its converted store — except that the 2×, 4× and 8×
  levels of JPEG tiles are decoded at reduced scale (:mod:`hishrst_runtime.slides.jpeg_scaled`: about 3×
  faster, within a few grey levels of the 2 × 2 means; ``HISHRST_JPEG_SCALED=0`` for the exact means).
* **Aperio AppMag.** An SVS whose ``MPP`` is far (more than 1.6×) from what its ``AppMag`` implies is
  refused unless ``mpp=`` states the pixel size (:func:`~hishrst_runtime.slides.tiff.tiff_mpp_candidates`).

The file name endings read here are the ``tiff`` entry of the format registry
(:mod:`hishrst_runtime.slides.formats`), whose content sniff is :func:`is_tiff_file`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.units import resolve_mpp
from hishrst_runtime.slides.errors import ChunkDecodeError, SlideError, SlidePixelSizeError, check_slide_size
from hishrst_runtime.slides.jpeg_scaled import attach_scaled_sources
from hishrst_runtime.slides.level import Level, direct_ok
from hishrst_runtime.slides.pooled import extend_pyramid, level_downsample
from hishrst_runtime.slides.slide import Slide
from hishrst_runtime.slides.tiff import (NO_TIFF_MPP, TiffError, TiffLevel, jpeg_problem, open_tiff, rgb8_problem,
                                         tiff_mpp_candidates)

__all__ = ["TileReader", "open_tiff_slide", "is_tiff_file"]

_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_CORRUPT = "the file is truncated or corrupt; copy it again (or re-export it)"
_DECODE_ERRORS = (ValueError, RuntimeError, OSError, KeyError, IndexError, EOFError, NotImplementedError)


def is_tiff_file(path: Path) -> bool:
    """Whether ``path`` starts with a TIFF / BigTIFF header (whatever its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in _MAGIC
    except OSError:
        return False


class TileReader:
    """Whole-tile (or whole-strip) reads of one TIFF page: ``os.pread`` + tifffile's decoder, thread-safe.

    Used as a :class:`~hishrst_runtime.slides.level.Level`'s direct chunk reader: :meth:`read` takes
    chunk-grid coordinates in the level's axis order and returns the segment **padded** to
    ``chunk_shape`` (``(rows, columns, samples)`` of a tile or strip). A tile with no data (offset or
    byte count 0) is :attr:`fill_value` (white) from :meth:`read`, None from :meth:`read_or_none`.
    """

    #: What a tile with no data reads as once allowed: white, the background of a brightfield slide.
    fill_value = 255

    def __init__(self, path: Path, fd: int, page: Any, chunk_shape: tuple[int, int, int]) -> None:
        self.path, self._fd, self._page = path, fd, page
        self.chunk_shape = chunk_shape
        self._across = -(-int(page.imagewidth) // chunk_shape[1])
        self._offsets, self._counts = page.dataoffsets, page.databytecounts
        self._args: dict[str, Any] = {"_fullsize": True}
        if page.jpegtables is not None:
            self._args["jpegtables"] = page.jpegtables
        if getattr(page, "jpegheader", None) is not None:
            self._args["jpegheader"] = page.jpegheader
        self._decode = page.decode  # tifffile's (cached, thread-safe) decoder closure
        self._jpeg = int(page.compression) in (7, 6)  # JPEG (and old-style JPEG): checked for truncation
        self._lock = None if hasattr(os, "pread") else threading.Lock()

    @classmethod
    def for_level(cls, src: TiffLevel, fd: int) -> TileReader | None:
        """A reader for a ``YXS`` tiled or stripped, chunky level; None for other layouts (tifffile's zarr view is used)."""
        page = src.page
        if src.axes not in ("YXS",) or src.chunks is None or getattr(page, "is_ndpi", False):
            return None
        if int(getattr(page, "planarconfig", 1)) != 1 or len(page.dataoffsets) != len(page.databytecounts):
            return None
        h, w = src.chunks
        if w != int(page.imagewidth) and not page.is_tiled:
            return None
        return cls(src.path, fd, page, (int(h), int(w), int(src.shape[2])))

    @property
    def page(self) -> Any:
        """The tifffile page whose tiles or strips this reads."""
        return self._page

    def _pread(self, n: int, offset: int) -> bytes:
        if self._lock is None:
            return os.pread(self._fd, n, offset)
        with self._lock:  # pragma: no cover - platforms without pread
            os.lseek(self._fd, offset, os.SEEK_SET)
            return os.read(self._fd, n)

    def name(self, coords: tuple[int, ...]) -> str:
        """The file and tile of chunk-grid ``coords`` (for messages)."""
        index = int(coords[0]) * self._across + int(coords[1])
        return f"{self.path} (page {self._page.index}, tile {index})"

    def read(self, coords: tuple[int, ...]) -> np.ndarray:
        """Segment at chunk-grid ``(cy, cx, 0)`` as uint8 ``chunk_shape`` (:attr:`fill_value` when it has no data)."""
        data = self.read_or_none(coords)
        return np.full(self.chunk_shape, self.fill_value, dtype=np.uint8) if data is None else data

    def raw(self, cy: int, cx: int) -> bytes | None:
        """The stored bytes of segment (cy, cx) (chunk-grid row, column), None when it has no data (offset or
        byte count 0); EOFError when the file ends first."""
        index = int(cy) * self._across + int(cx)
        offset, count = int(self._offsets[index]), int(self._counts[index])
        if offset == 0 or count == 0:
            return None
        raw = self._pread(count, offset)
        if len(raw) != count:
            raise EOFError(f"read {len(raw)} of {count} bytes")
        return raw

    def read_or_none(self, coords: tuple[int, ...]) -> np.ndarray | None:
        """Like :meth:`read`, but None for a segment with no data (offset or byte count 0)."""
        cy, cx = int(coords[0]), int(coords[1])
        index = cy * self._across + cx
        offset = int(self._offsets[index])
        try:
            raw = self.raw(cy, cx)
            if raw is None:
                return None
            problem = jpeg_problem(raw) if self._jpeg else None
            if problem is not None:
                raise ValueError(problem)
            data = self._decode(raw, index, **self._args)[0]
        except _DECODE_ERRORS as e:
            raise ChunkDecodeError(f"{self.name(coords)}: tile ({cy}, {cx}) at byte {offset} cannot be read or decoded "
                                   f"({type(e).__name__}: {e}); {_CORRUPT}") from e
        block = np.asarray(data).reshape(-1, *self.chunk_shape[1:])
        if block.shape[0] != self.chunk_shape[0]:  # a short last strip
            full = np.zeros(self.chunk_shape, dtype=np.uint8)
            full[: block.shape[0]] = block[: self.chunk_shape[0]]
            block = full
        return block


def _pick_series(tif: Any, path: Path) -> int:
    """Index of the series with the largest level-0 Y × X area."""
    best, area = -1, -1
    for i, s in enumerate(tif.series):
        axes, shape = str(s.axes).upper(), tuple(int(n) for n in s.shape)
        if "Y" in axes and "X" in axes:
            a = shape[axes.index("Y")] * shape[axes.index("X")]
            if a > area:
                best, area = i, a
    if best < 0:
        raise SlideError(f"{path}: the file contains no 2-D image; check that it is a slide")
    return best


def _axis_names(axes: str) -> tuple[str, ...]:
    """tifffile axis letters → the Level's axis names (``S`` / ``C`` → ``c``, others lower case)."""
    return tuple("y" if a == "Y" else "x" if a == "X" else "c" if a in "SC" else a.lower() for a in axes)


def _level0_mpp(tif: Any, page: Any, path: Path, mpp: float | None, bounds: tuple[float, float] | None) -> tuple[float, str]:
    candidates = [] if mpp is not None else tiff_mpp_candidates(tif, page=page)
    (value, _), origin = resolve_mpp(str(path), override=mpp, candidates=candidates, bounds=bounds,
                                     missing=NO_TIFF_MPP, error=SlidePixelSizeError)
    return value, "override" if origin == "override" else "metadata"


def _open_levels(path: Path, tif: Any, series: int) -> list[TiffLevel]:
    s = tif.series[series]
    n = len(s.levels) if getattr(s, "levels", None) else 1
    levels: list[TiffLevel] = []
    for i in range(n):
        try:
            lv = TiffLevel(path, series=series, level=i, tif=tif)
        except TiffError as e:
            raise SlideError(f"{path}: pyramid level {i}: {e.reason}; {e.fix}") from e
        problem = rgb8_problem(lv.axes, lv.dims, lv.dtype)
        check_slide_size(lv.shape[0], lv.shape[1], where=f"{path} (pyramid level {i})",
                          fix="the file's header is probably damaged; copy or export the slide again")
        if problem is not None:
            raise SlideError(f"{path}: {problem}; convert it to 8-bit RGB, e.g. with `hishrst convert`")
        levels.append(lv)
    return levels


def _as_level(i: int, src: TiffLevel, shape0: tuple[int, int], mpp0: float, fd: int, store: str) -> Level:
    h, w = src.shape[:2]
    dy, dx = level_downsample(shape0, (h, w))
    names = _axis_names(src.axes)
    chunks = src.chunks or (min(256, h), min(256, w))  # a memory-mapped image: any grid, reads are free
    direct = TileReader.for_level(src, fd) if src.chunks is not None and direct_ok(names, _chunk_tuple(src)) else None
    return Level(index=i, mpp=mpp0 * 0.5 * (dy + dx), mpp_yx=(mpp0 * dy, mpp0 * dx), downsample=0.5 * (dy + dx),
                 shape=(int(h), int(w)), chunks=(int(chunks[0]), int(chunks[1])), path=f"level {i}",
                 _array=src.array, _axes=names, _n_channels=int(src.shape[2]), _direct=direct, store=store,
                 corrupt_hint=_CORRUPT)


def _chunk_tuple(src: TiffLevel) -> tuple[int, ...]:
    return tuple(int(c) for c in getattr(src.array, "chunks", src.dims))


def open_tiff_slide(path: str | os.PathLike[str], *, mpp: float | None = None,
                    mpp_range: tuple[float, float] | None = None, allow_missing_chunks: bool = False) -> Slide:
    """Open a TIFF-family slide (SVS, TIFF, OME-TIFF, NDPI, SCN, …) lazily; see the module docstring.

    ``mpp`` (µm per level-0 pixel) overrides or supplies the file's pixel size; values outside
    ``mpp_range`` (µm / pixel) are refused. ``allow_missing_chunks``: see :class:`Slide`. Raises :class:`SlideError` naming the file for an
    unreadable, truncated or non-RGB file or a missing pixel size.
    """
    p = Path(path)
    try:
        tif = open_tiff(p)
    except TiffError as e:
        raise SlideError(f"{p}: {e.reason}; check that the file is complete (copy it again); formats other than "
                         "TIFF / SVS / NDPI / SCN need `pip install \"hishrst[openslide]\"`, or pass an OME-Zarr store "
                         "made with `hishrst convert`") from e
    fd = -1
    try:
        series = _pick_series(tif, p)
        srcs = _open_levels(p, tif, series)
        mpp0, source = _level0_mpp(tif, srcs[0].page, p, mpp, mpp_range)
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        shape0 = srcs[0].shape[:2]
        levels = [_as_level(i, src, shape0, mpp0, fd, str(p)) for i, src in enumerate(srcs)]
        levels.sort(key=lambda lv: lv.mpp)
        for i, lv in enumerate(levels):
            lv.index = i
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tif.close()
        raise

    def close() -> None:
        os.close(fd)
        tif.close()

    levels = extend_pyramid(levels)
    attach_scaled_sources(levels)  # computed 2×/4×/8× levels of JPEG tiles: reduced-scale decoding
    return Slide(str(p), levels, mpp_source=source, kind="tiff", on_close=close,
                 allow_missing_chunks=allow_missing_chunks)
