"""Full-resolution H&E images (TIFF pyramids, PNG, JPEG) read lazily, and their pixel size."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.slides.formats import get_format
from hishrst_runtime.slides.tiff import TiffError, TiffLevel, tiff_pixel_size
from hishrst_train.data.errors import _error

__all__ = ['FullresImage', 'image_mpp', 'open_fullres_image']

log = logging.getLogger("hishrst")

#: TIFF-family name endings: the runtime's format registry (``tiff`` entry), so training reads what it reads.
_TIFF_SUFFIXES = get_format("tiff").suffixes
_IMAGE_SUFFIXES = _TIFF_SUFFIXES + (".png", ".jpg", ".jpeg")


def _tiff_named(path: Path) -> bool:
    return path.name.lower().endswith(_TIFF_SUFFIXES)

# ---------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------


class FullresImage:
    """A lazily read ``(H, W, 3)`` RGB uint8 view of an image (level 0 of a pyramid).

    ``img[y0:y1, x0:x1]`` reads only that region and returns an ``(h, w, 3)`` uint8 numpy array, so it
    works with :func:`hishrst_runtime.core.patches.cut_patch`. Greyscale is expanded to RGB, alpha dropped,
    16-bit scaled to 8-bit. ``source`` is an ``(H, W, C)`` array-like (a
    :class:`hishrst_runtime.slides.tiff.TiffLevel`, which also untangles planar layouts, or a numpy
    array); when it has ``chunks`` (tile rows, columns), decoded tiles are kept in a thread-safe LRU
    cache of ``cache_mb`` MiB, so neighbouring patches do not decode a tile twice.
    """

    def __init__(self, source: Any, *, path: str, closer: Any = None, cache_mb: float = 256.0) -> None:
        self._a, self.path, self._closer = source, path, closer
        if len(source.shape) != 3:
            raise _error(path, f"image shape {source.shape} is not (H, W, C)", "convert the image to an RGB TIFF or PNG")
        self.shape = (int(source.shape[0]), int(source.shape[1]), 3)
        self.dtype, self.ndim = np.dtype(np.uint8), 3
        chunks = getattr(source, "chunks", None)
        self._chunks = (int(chunks[0]), int(chunks[1])) if chunks is not None else None
        tile_bytes = self._chunks[0] * self._chunks[1] * int(source.shape[2]) * source.dtype.itemsize if chunks else 1
        self._cache_max = max(4, int(cache_mb * 2**20) // max(tile_bytes, 1))
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        ys, xs = (key + (slice(None), slice(None)))[:2]
        if not isinstance(ys, slice) or not isinstance(xs, slice) or len(key) > 2:
            raise TypeError("FullresImage supports slice indexing [y0:y1, x0:x1] only")
        try:
            a = _to_uint8(self._read(ys, xs))
        except TiffError as e:
            raise _error(self.path, e.reason, "check the file is a complete, valid TIFF (re-export it)") from e
        if a.shape[2] == 1:
            a = np.repeat(a, 3, axis=2)
        return np.ascontiguousarray(a[..., :3])

    def _read(self, ys: slice, xs: slice) -> np.ndarray:
        """The region ``(h, w, C)`` in the source's dtype, assembled from cached tiles where possible."""
        (y0, y1, sy), (x0, x1, sx) = ys.indices(self.shape[0]), xs.indices(self.shape[1])
        if self._chunks is None or sy != 1 or sx != 1 or y1 <= y0 or x1 <= x0:
            return np.asarray(self._a[ys, xs])
        ch, cw = self._chunks
        tys, txs = range(y0 // ch, (y1 - 1) // ch + 1), range(x0 // cw, (x1 - 1) // cw + 1)
        if len(tys) * len(txs) > self._cache_max // 2:  # a big region: read it directly
            return np.asarray(self._a[y0:y1, x0:x1])
        out = np.empty((y1 - y0, x1 - x0, self._a.shape[2]), self._a.dtype)
        for ty in tys:
            for tx in txs:
                tile, oy, ox = self._tile(ty, tx), ty * ch, tx * cw
                a0, a1, b0, b1 = max(y0, oy), min(y1, oy + ch), max(x0, ox), min(x1, ox + cw)
                out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = tile[a0 - oy : a1 - oy, b0 - ox : b1 - ox]
        return out

    def _tile(self, ty: int, tx: int) -> np.ndarray:
        with self._lock:
            tile = self._cache.get((ty, tx))
            if tile is not None:
                self._cache.move_to_end((ty, tx))
                return tile
        ch, cw = self._chunks or (1, 1)
        tile = np.asarray(self._a[ty * ch : (ty + 1) * ch, tx * cw : (tx + 1) * cw])
        with self._lock:
            self._cache[(ty, tx)] = tile
            while len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)
        return tile

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[:, :]
        return a.astype(dtype) if dtype is not None else a

    def close(self) -> None:
        if self._closer is not None:
            self._closer.close()
            self._closer = None

    def __enter__(self) -> FullresImage:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.uint16:
        return (a >> 8).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        return np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.clip(a, 0, 255).astype(np.uint8)


def open_fullres_image(path: str | Path, *, cache_mb: float = 256.0) -> FullresImage:
    """Open a full-resolution image lazily as an ``(H, W, 3)`` RGB uint8 array-like.

    TIFF (incl. pyramidal, tiled, JPEG/zlib, SVS/OME) is read through the runtime's lazy TIFF level
    view (:class:`hishrst_runtime.slides.tiff.TiffLevel`: level 0 only, tile by tile, ``cache_mb`` MiB
    of decoded tiles cached); PNG/JPEG are decoded with Pillow into memory.
    """
    path = Path(path)
    if not path.is_file():
        raise _error(path, "the full-resolution image does not exist", "pass the path of the H&E image used by Space Ranger")
    if _tiff_named(path) or _is_tiff(path):
        try:
            level = TiffLevel(path)
        except TiffError as e:
            raise _error(path, f"cannot read the TIFF image ({e.reason})",
                         "check the file is a complete, valid TIFF (re-export it)") from e
        return FullresImage(level, path=str(path), closer=level, cache_mb=cache_mb)
    return FullresImage(_pil_read(path, decode=True), path=str(path))


def _pil_read(path: Path, *, decode: bool) -> Any:
    """Decode a PNG/JPEG to RGB uint8 (``decode``) or return its (height, width) without decoding."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # slides are legitimately huge
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")) if decode else (int(im.size[1]), int(im.size[0]))
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise _error(path, f"cannot read the image ({e})", "pass a TIFF, PNG or JPEG image") from e
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def image_mpp(path: str | Path) -> float | None:
    """Pixel size in µm/px recorded in an image file, or ``None`` when it records none.

    The runtime's one parser (:func:`hishrst_runtime.slides.tiff.tiff_pixel_size`): Aperio ``MPP``,
    OME-XML ``PhysicalSizeX``, a JSON ImageDescription ``{"mpp": ...}``, then the TIFF
    XResolution/ResolutionUnit tags (centimetre or inch; a missing unit records no pixel size).
    Values outside the plausible range (:func:`hishrst_runtime.core.units.mpp_range`, e.g. a 72-dpi
    default) are ignored. PNG / JPEG record none.
    """
    path = Path(path)
    if not (_tiff_named(path) or _is_tiff(path)):
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return tiff_pixel_size(tif)[0]
    except (tifffile.TiffFileError, OSError, ValueError) as e:
        raise _error(path, f"cannot read the TIFF image ({e})", "check the file is a complete, valid TIFF") from e


def _image_hw(path: Path) -> tuple[int, int]:
    """(height, width) of an image without decoding it."""
    if _tiff_named(path) or _is_tiff(path):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                s = tif.series[0]
                shp = dict(zip(s.axes, s.shape))
        except (tifffile.TiffFileError, OSError, ValueError, IndexError) as e:
            raise _error(path, f"cannot read the TIFF image ({e})", "check the file is a complete, valid TIFF") from e
        return int(shp.get("Y", 0)), int(shp.get("X", 0))
    return _pil_read(path, decode=False)


def _check_bounds(xy: np.ndarray, hw: tuple[int, int], path: Path, *, tol_px: float, what: str) -> None:
    """Raise if spot pixel coordinates fall outside an image of size ``hw`` (with a tolerance)."""
    if len(xy) == 0:
        return
    h, w = hw
    xmax, ymax = float(np.max(xy[:, 0])), float(np.max(xy[:, 1]))
    xmin, ymin = float(np.min(xy[:, 0])), float(np.min(xy[:, 1]))
    if xmax > w - 1 + tol_px or ymax > h - 1 + tol_px or xmin < -tol_px or ymin < -tol_px:
        raise _error(path, f"the image is {w}×{h} px but the spot coordinates ({what}) span x {xmin:.0f}..{xmax:.0f}, "
                     f"y {ymin:.0f}..{ymax:.0f} px: it is smaller than the coordinates imply (a downscaled image?)",
                     "pass the full-resolution image Space Ranger was run on (or the matching coordinates)")


