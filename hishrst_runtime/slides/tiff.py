"""The one lazy view of a TIFF / SVS / OME-TIFF pyramid level, and the pixel size of a TIFF (torch-free).

:class:`TiffLevel` reads one level of a tifffile series through tifffile's zarr store (tile by tile or
strip by strip, so memory is bounded by what is asked for); an uncompressed contiguous image is
memory-mapped instead. ``level[y0:y1, x0:x1]`` returns ``(h, w, C)`` in the file's dtype with the
non-Y/X axes flattened into the last one in file order (``C`` = 3 for RGB, 1 for greyscale). Both
``hishrst convert`` and training's full-resolution image reader are built on it. A truncated or
corrupt file raises :class:`TiffError` naming it, at open or when the bad tile is read.

:func:`tiff_mpp_candidates` lists the pixel sizes (µm / pixel) a TIFF records, with the parsers of
:mod:`hishrst_runtime.core.units`, in order: Aperio ``MPP``, OME ``PhysicalSizeX/Y``, a JSON
ImageDescription, the resolution tags; the direct reader and ``hishrst convert`` decide with
:func:`~hishrst_runtime.core.units.resolve_mpp`, training with :func:`tiff_pixel_size`.
"""

from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.units import (
    MppCandidate,
    PixelSizeError,
    aperio_mpp,
    json_description_mpp,
    ome_physical_size_um,
    resolve_mpp,
    tiff_resolution_mpp,
)
from hishrst_runtime.slides.errors import SlideError

__all__ = ["TiffError", "TiffLevel", "open_tiff", "rgb8_problem", "tiff_pixel_size", "tiff_pixel_size_candidates",
           "tiff_mpp_candidates", "NO_TIFF_MPP", "jpeg_problem", "aperio_mag_problem"]

#: Aperio ``MPP`` may differ from ``10 / AppMag`` µm / pixel (20× ≈ 0.5) by at most this factor either way.
APPMAG_TOLERANCE = 1.6
#: Markers allowed after 0xFF inside JPEG data after the first SOS: stuffing, restarts, fill, the markers
#: between the scans of a multi-scan image (DHT, DQT, DRI, SOS, DNL) and EOI.
_JPEG_OK = frozenset({0x00, 0xFF, 0xC4, 0xDB, 0xDD, 0xDA, 0xDC, 0xD9, *range(0xD0, 0xD8)})
#: The complement of :data:`_JPEG_OK` as a lookup table over byte values (one vectorised test per tile).
_JPEG_BAD = np.ones(256, dtype=bool)
_JPEG_BAD[sorted(_JPEG_OK)] = False

#: What a damaged TIFF raises from tifffile / imagecodecs / zarr (TiffFileError is a ValueError,
#: the imagecodecs errors are RuntimeErrors; a truncated header is a struct.error).
_READ_ERRORS = (ValueError, RuntimeError, OSError, KeyError, IndexError, EOFError, struct.error)
_FIX = "check that the file is complete (copy it again) and a valid TIFF / SVS / OME-TIFF"
#: What a TIFF without a usable pixel size lacks (the start of the one "no usable pixel size" message).
NO_TIFF_MPP = "the file has no usable pixel size (no Aperio MPP, OME PhysicalSizeX or TIFF resolution in cm/inch)"


class TiffError(SlideError):
    """A TIFF that cannot be opened or read; ``path`` and ``reason`` let callers word their own message."""

    def __init__(self, path: str | os.PathLike[str], reason: str, fix: str = _FIX) -> None:
        self.path, self.reason, self.fix = str(path), reason, fix
        super().__init__(f"{path}: {reason}; {fix}")


def open_tiff(path: str | os.PathLike[str]) -> Any:
    """An open ``tifffile.TiffFile`` of ``path``; :class:`TiffError` naming the file when it is not a readable TIFF."""
    import tifffile

    try:
        return tifffile.TiffFile(str(path))
    except (tifffile.TiffFileError, *_READ_ERRORS) as e:
        raise TiffError(path, f"not a readable SVS / TIFF / OME-TIFF file ({e})") from e


def rgb8_problem(axes: str, dims: tuple[int, ...], dtype: Any) -> str | None:
    """Why a TIFF level of tifffile ``axes`` / ``dims`` / ``dtype`` is not one 8-bit RGB(A) plane, or None if it is."""
    ch_axes = [a for a in axes if a in "SC"]
    nch = dims[axes.index(ch_axes[0])] if len(ch_axes) == 1 else 1
    extra = [(a, s) for a, s in zip(axes, dims) if a not in "YXSC" and s != 1]
    if len(ch_axes) > 1 or extra or nch not in (3, 4):
        return f"not an RGB image (axes {axes!r}, shape {dims}); only brightfield RGB(A) slides are supported"
    if np.dtype(dtype) != np.uint8:
        return f"pixels are {np.dtype(dtype)}, expected 8-bit RGB"
    return None


class TiffLevel:
    """Lazy ``(H, W, C)`` view of level ``level`` of series ``series`` of a TIFF file (see the module docstring).

    Attributes: ``path``; ``axes`` (tifffile's axis letters, e.g. ``"YXS"``, ``"SYX"``) and ``dims``
    (their sizes); ``shape`` = (H, W, C) pixels; ``dtype``; ``chunks`` = the (rows, columns) of one
    tile or strip, or None for a memory-mapped image; ``align_rows``, the natural row block to read in;
    ``tif``, the open ``tifffile.TiffFile`` (for metadata). Close it, or use it as a context manager.
    """

    def __init__(self, path: str | os.PathLike[str], *, series: int = 0, level: int = 0, memmap: bool = True,
                 tif: Any = None) -> None:
        self.path = Path(path)
        #: Whether :meth:`close` closes ``tif`` (not when an open ``tifffile.TiffFile`` was passed in).
        self._owns = tif is None
        self.tif: Any = open_tiff(self.path) if tif is None else tif
        try:
            self._open(series, level, memmap)
        except BaseException:
            if self._owns:
                self.tif.close()
            raise

    def _open(self, series: int, level: int, memmap: bool) -> None:
        import tifffile
        import zarr

        if not self.tif.series:
            raise TiffError(self.path, "the file contains no image", "check that it is a slide")
        s = self.tif.series[series]
        lvl = s.levels[level] if getattr(s, "levels", None) else s
        self.axes, self.dims = str(lvl.axes).upper(), tuple(int(n) for n in lvl.shape)
        if "Y" not in self.axes or "X" not in self.axes:
            raise TiffError(self.path, f"the first image has axes {self.axes!r}, not a 2-D image",
                            "export one RGB plane of the slide first")
        self.dtype = np.dtype(lvl.dtype)
        other = [n for a, n in zip(self.axes, self.dims) if a not in "YX"]
        self.shape = (self.dims[self.axes.index("Y")], self.dims[self.axes.index("X")], int(np.prod(other, dtype=np.int64)))
        page = lvl.keyframe if hasattr(lvl, "keyframe") else self.tif.pages[0]
        self.page = page
        self.align_rows = int(page.tilelength) if page.is_tiled else int(page.rowsperstrip or self.shape[0])
        self.array: Any = None
        if memmap and page.compression == 1 and getattr(page, "is_contiguous", False) and not page.is_tiled:
            try:  # uncompressed contiguous data: memory-map instead of decoding whole strips
                self.array = tifffile.memmap(str(self.path), page=page.index, mode="r").reshape(self.dims)
                self.align_rows = 256
            except (ValueError, OSError):
                self.array = None
        self.chunks: tuple[int, int] | None = None
        if self.array is None:
            try:
                self.array = zarr.open(s.aszarr(level=level), mode="r")
            except _READ_ERRORS as e:
                raise TiffError(self.path, f"cannot open the image data ({e})") from e
            if hasattr(self.array, "keys"):  # a group: its level
                self.array = self.array[str(level)]
            ch = tuple(int(c) for c in self.array.chunks)
            self.chunks = (ch[self.axes.index("Y")], ch[self.axes.index("X")])
            self.align_rows = min(self.align_rows, 4096)  # giant strips: read them in smaller pieces
        if tuple(self.array.shape) != self.dims:
            raise TiffError(self.path, f"unexpected TIFF layout (axes {self.axes!r}, data shape {self.array.shape})",
                            "convert it to a plain RGB TIFF")

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        """``level[ys, xs]`` → ``(h, w, C)`` in the file's dtype (slices may have steps)."""
        ys, xs = key
        idx = tuple(ys if a == "Y" else xs if a == "X" else slice(None) for a in self.axes)
        try:
            data = np.asarray(self.array[idx])
        except _READ_ERRORS as e:
            raise TiffError(self.path, f"cannot read pixels [{ys.start}:{ys.stop}, {xs.start}:{xs.stop}] "
                            f"({type(e).__name__}: {e}); the file is truncated or corrupt") from e
        other = [i for i, a in enumerate(self.axes) if a not in "YX"]
        data = data.transpose([self.axes.index("Y"), self.axes.index("X"), *other])
        return data.reshape(data.shape[0], data.shape[1], -1)

    def close(self) -> None:
        """Close the file (further reads fail); a ``tif`` passed in by the caller stays open."""
        if self._owns:
            self.tif.close()

    def __enter__(self) -> TiffLevel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def jpeg_problem(raw: bytes) -> str | None:
    """Why the JPEG stream ``raw`` (one TIFF tile) is damaged in a way libjpeg only warns about, or None.

    libjpeg decodes a stream cut short ("Premature end of JPEG file") or with junk before a marker
    ("Corrupt JPEG data: extraneous bytes") with a warning that imagecodecs does not pass on, so these
    are checked on the bytes: SOI at the start, EOI at the end (after any zero padding), and only
    stuffing / restart / scan markers after 0xFF inside the entropy-coded data.
    """
    data = bytes(raw).rstrip(b"\x00")
    if not data.startswith(b"\xff\xd8"):
        return "the JPEG tile does not start with a start-of-image marker"
    if not data.endswith(b"\xff\xd9"):
        return "the JPEG tile is cut short (no end-of-image marker; libjpeg: premature end of JPEG file)"
    sos = data.find(b"\xff\xda")
    if sos < 0:
        return None  # an abbreviated stream without a scan is decoded (and refused) by the codec itself
    body = np.frombuffer(data, dtype=np.uint8, offset=sos + 2)[:-2]
    after_ff = body[1:][body[:-1] == 0xFF]
    bad = after_ff[_JPEG_BAD[after_ff]]
    if bad.size:
        return f"the JPEG tile has corrupt data (unexpected marker 0xFF{int(bad[0]):02X} inside the image data)"
    return None


def aperio_mag_problem(description: str, mpp: float) -> str | None:
    """Why an Aperio ``MPP`` of ``mpp`` µm / pixel contradicts the ``AppMag`` of ``description``, or None.

    ``AppMag`` M implies about ``10 / M`` µm / pixel (20× ≈ 0.5, 40× ≈ 0.25); more than
    :data:`APPMAG_TOLERANCE` × off either way (a value written in the wrong unit, 10× off) is a problem.
    """
    m = re.search(r"\bAppMag\s*=\s*([0-9.eE+-]+)", description or "")
    try:
        mag = float(m.group(1)) if m else 0.0
    except ValueError:
        return None
    if not (math.isfinite(mag) and mag > 0):
        return None
    expected = 10.0 / mag
    if 1.0 / APPMAG_TOLERANCE <= mpp / expected <= APPMAG_TOLERANCE:
        return None
    return (f"its Aperio MPP = {mpp:g} µm/pixel contradicts AppMag = {mag:g} (about {expected:.3g} µm/pixel; the "
            f"two differ {max(mpp / expected, expected / mpp):.1f}×)")


def tiff_pixel_size_candidates(tif: Any, *, page: Any = None) -> list[tuple[float, str]]:
    """Every pixel size (µm / pixel, origin) recorded in ``page`` (default: the first page) of an open
    ``tifffile.TiffFile``, in order of trust: Aperio MPP, OME PhysicalSizeX/Y, a JSON ImageDescription,
    the resolution tags."""
    page = tif.pages[0] if page is None else page
    desc = page.description or ""
    found: list[tuple[float | None, str]] = []
    if desc.startswith("Aperio") or getattr(tif, "is_svs", False):
        found.append((aperio_mpp(desc), "Aperio MPP"))
    if getattr(tif, "is_ome", False) and tif.ome_metadata:
        found.append((ome_physical_size_um(tif.ome_metadata), "OME PhysicalSizeX/Y"))
    found.append((json_description_mpp(desc), "ImageDescription JSON"))

    def tag(name: str) -> Any:
        t = page.tags.get(name)
        return None if t is None else t.value

    found.append((tiff_resolution_mpp(tag("XResolution"), tag("YResolution"), tag("ResolutionUnit")),
                  "TIFF resolution tags"))
    return [(float(v), origin) for v, origin in found if v is not None]


def tiff_pixel_size(tif: Any, *, mpp_range: tuple[float, float] | None = None) -> tuple[float | None, str]:
    """The first plausible pixel size (µm / pixel) of an open ``tifffile.TiffFile`` and its origin
    (:func:`~hishrst_runtime.core.units.resolve_mpp` of :func:`tiff_pixel_size_candidates`).

    Implausible values (outside :func:`hishrst_runtime.core.units.mpp_range`, e.g. a 72 dpi
    placeholder) count as absent. Returns ``(None, "none")`` when the file has no usable pixel size.
    """
    try:
        (value, _), origin = resolve_mpp("", candidates=tiff_pixel_size_candidates(tif), bounds=mpp_range)
    except PixelSizeError:
        return None, "none"
    return value, origin


def tiff_mpp_candidates(tif: Any, *, page: Any = None) -> list[MppCandidate]:
    """The pixel sizes ``page`` (default: the first page) records, in order of trust, as candidates for
    :func:`~hishrst_runtime.core.units.resolve_mpp`; an Aperio MPP that contradicts the ``AppMag`` carries
    that conflict (:func:`aperio_mag_problem`)."""
    desc = (tif.pages[0] if page is None else page).description or ""
    return [MppCandidate(value, origin, aperio_mag_problem(desc, value) if origin == "Aperio MPP" else None)
            for value, origin in tiff_pixel_size_candidates(tif, page=page)]
