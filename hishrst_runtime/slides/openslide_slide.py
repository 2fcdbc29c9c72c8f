"""Vendor formats through OpenSlide (MIRAX ``.mrxs``, Hamamatsu ``.vms`` / ``.vmu``, Sakura ``.svslide``,
DICOM, …), with the same :class:`~hishrst_runtime.slides.slide.Slide` interface (torch-free).

Needs the ``openslide`` extra (``pip install "hishrst[openslide]"``: openslide-python and the
openslide-bin library); without it, :func:`open_openslide_slide` raises
:class:`~hishrst_runtime.slides.errors.SlideExtraMissing` naming the extra. TIFF-family files (SVS,
TIFF, NDPI, SCN) never come here: they are read directly with tifffile.

Each OpenSlide level is a :class:`~hishrst_runtime.slides.level.Level` whose box source, an
:class:`OpenSlideBoxes`, calls ``read_region`` (OpenSlide is thread-safe); transparent pixels (outside the scanned area) are composited over white. The chunk grid
is a fixed :data:`CHUNK_PX` grid (OpenSlide hides the file's tiles). Pixel size: OpenSlide's
``openslide.mpp-x`` / ``mpp-y`` properties (µm / pixel), resolved with
:func:`~hishrst_runtime.core.units.resolve_mpp` (implausible values count as absent); ``mpp=`` overrides it. Levels below the coarsest stored one are
added by 2 × 2 mean pooling (:mod:`hishrst_runtime.slides.pooled`). Every level is checked against the
slide size limit (:mod:`hishrst_runtime.core.limits`) at open. Missing-chunk checks do not apply: OpenSlide
hides the file's tiles and returns areas it has no tile for as transparent, which is background (white)
by its format's definition.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.units import MppCandidate, resolve_mpp
from hishrst_runtime.slides.errors import SlideError, SlideExtraMissing, SlidePixelSizeError, check_slide_size
from hishrst_runtime.slides.level import Level
from hishrst_runtime.slides.pooled import extend_pyramid, level_downsample
from hishrst_runtime.slides.slide import Slide

__all__ = ["CHUNK_PX", "OpenSlideBoxes", "import_openslide", "open_openslide_slide"]

#: Side (pixels) of the chunk grid of an OpenSlide level.
CHUNK_PX = 512
_EXTRA = 'pip install "hishrst[openslide]"'


def import_openslide(path: str) -> Any:
    """The ``openslide`` module, or :class:`SlideExtraMissing` naming ``path`` and the extra to install."""
    try:
        import openslide
    except (ImportError, OSError) as e:  # OSError: the Python package without the C library
        raise SlideExtraMissing(f"{path}: this format is read through OpenSlide, which is not installed ({e}); "
                                f"install it with: {_EXTRA} (SVS / TIFF / NDPI / SCN need no extra)") from e
    return openslide


@dataclass(frozen=True)
class OpenSlideBoxes:
    """The :class:`~hishrst_runtime.slides.boxes.BoxSource` of OpenSlide level ``level`` of the handle ``osr``
    (``downsample``: of that level, to address it in level-0 pixels); transparent pixels over white."""

    osr: Any
    level: int
    downsample: float
    store: str
    corrupt_hint: str

    def read_box(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        loc = (int(round(x0 * self.downsample)), int(round(y0 * self.downsample)))
        try:
            rgba = np.asarray(self.osr.read_region(loc, self.level, (x1 - x0, y1 - y0)))
        except Exception as e:  # noqa: BLE001 - openslide.OpenSlideError and friends
            raise SlideError(f"{self.store}: OpenSlide cannot read level {self.level} pixels [{y0}:{y1}, {x0}:{x1}] "
                             f"({type(e).__name__}: {e}); {self.corrupt_hint}") from e
        rgb, alpha = rgba[..., :3].astype(np.uint16), rgba[..., 3:4].astype(np.uint16)
        if int(alpha.min()) == 255:
            return np.ascontiguousarray(rgba[..., :3])
        return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)  # over white


def _mpp0(osr: Any, openslide: Any, path: str, mpp: float | None, bounds: tuple[float, float] | None) -> tuple[float, str]:
    vals = []
    for key in (openslide.PROPERTY_NAME_MPP_Y, openslide.PROPERTY_NAME_MPP_X):
        try:
            vals.append(float(osr.properties[key]))
        except (KeyError, TypeError, ValueError):
            vals.append(None)
    value = (vals[0], vals[1]) if None not in vals else next((v for v in vals if v is not None), None)
    (my, mx), origin = resolve_mpp(path, override=mpp, candidates=[MppCandidate(value, "openslide.mpp-x/y")],
                                   bounds=bounds, missing="the file has no usable pixel size",
                                   error=SlidePixelSizeError)
    return 0.5 * (my + mx), "override" if origin == "override" else "metadata"


def open_openslide_slide(path: str | os.PathLike[str], *, mpp: float | None = None,
                         mpp_range: tuple[float, float] | None = None, allow_missing_chunks: bool = False) -> Slide:
    """Open a slide OpenSlide reads (see the module docstring); ``mpp`` (µm per level-0 pixel) overrides its
    pixel size; ``allow_missing_chunks`` is kept on the Slide (no tile of an OpenSlide level is ever missing).
    Raises :class:`SlideExtraMissing` without OpenSlide, :class:`SlideError` naming the file when
    OpenSlide cannot read it or it has no pixel size."""
    spath = os.fspath(path)
    openslide = import_openslide(spath)
    if not Path(spath).exists():
        raise SlideError(f"{spath}: no such file; check the path of the slide")
    if openslide.OpenSlide.detect_format(spath) is None:
        raise SlideError(f"{spath}: not a slide format hishrst or OpenSlide reads; pass an OME-Zarr store, a "
                         "TIFF / SVS / NDPI / SCN file, or a format OpenSlide supports (MRXS, VMS, …)")
    try:
        osr = openslide.OpenSlide(spath)
    except Exception as e:  # noqa: BLE001 - OpenSlideError, OpenSlideUnsupportedFormatError
        raise SlideError(f"{spath}: OpenSlide cannot open the file ({type(e).__name__}: {e}); check that it is "
                         "complete (for MRXS, the .mrxs file and its data directory)") from e
    try:
        mpp0, source = _mpp0(osr, openslide, spath, mpp, mpp_range)
        w0, h0 = osr.level_dimensions[0]
        levels: list[Level] = []
        for i, (w, h) in enumerate(osr.level_dimensions):
            check_slide_size(int(h), int(w), where=f"{spath} (OpenSlide level {i})",
                              fix="the file's header is probably damaged; copy or export the slide again")
            dy, dx = level_downsample((h0, w0), (h, w))
            hint = "the file is truncated or corrupt; copy it again"
            levels.append(Level(
                index=i, mpp=mpp0 * 0.5 * (dy + dx), mpp_yx=(mpp0 * dy, mpp0 * dx), downsample=0.5 * (dy + dx),
                shape=(int(h), int(w)), chunks=(min(CHUNK_PX, int(h)), min(CHUNK_PX, int(w))), path=f"level {i}",
                source=OpenSlideBoxes(osr, i, 0.5 * (dy + dx), spath, hint), store=spath,
                corrupt_hint=hint))
    except BaseException:
        osr.close()
        raise
    return Slide(spath, extend_pyramid(levels), mpp_source=source, kind="openslide", on_close=osr.close,
                 allow_missing_chunks=allow_missing_chunks)
