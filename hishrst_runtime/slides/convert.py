"""Whole-slide conversion to OME-Zarr, and a bounded-memory OME-Zarr pyramid writer (torch-free).

* :func:`write_ome_zarr` writes an RGB uint8 image (a numpy array or any lazy ``(H, W, 3|4)``
  array-like with ``[y0:y1, x0:x1]`` slicing) as an NGFF multiscale pyramid: NGFF 0.5 (zarr v3,
  ``ome`` attributes, ``dimension_names``) or 0.4 (zarr v2, ``multiscales`` in ``.zattrs``,
  ``/``-separated chunk keys). Every level is 2× smaller than the one before (2 × 2 mean
  pooling), with ``scale`` transformations in micrometres.
* :func:`convert_slide` converts an Aperio SVS, a tiled / pyramidal TIFF or an OME-TIFF into an
  NGFF 0.5 store, streaming: level 0 is read through tifffile's lazy zarr view of the source in
  bands of chunk rows, each lower level is built from the level just written, so memory stays
  at a few bands whatever the slide size. The store is written to a hidden temporary directory
  next to the output and renamed at the end.
* ``convert_cmd`` is ``hishrst convert IN OUT.zarr [--mpp F] [--chunk N] [--overwrite]``.

The pixel size (µm / pixel) of a source comes from, in order: ``mpp=`` / ``--mpp``; Aperio's
``MPP = ...`` in the ImageDescription; OME-XML ``PhysicalSizeX/Y`` (with units); the TIFF
``XResolution``/``YResolution`` tags with ``ResolutionUnit`` inch or centimetre.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from hishrst_runtime.core.errors import InputError

__all__ = [
    "ConvertError",
    "DEFAULT_CHUNK",
    "pyramid_shapes",
    "write_ome_zarr",
    "tiff_pixel_size",
    "convert_slide",
]

DEFAULT_CHUNK = 512
#: Width (pixels) of the column bands a level is streamed in; bounds memory for very wide slides.
_BAND_PX = 8192
#: Pixel sizes outside this range (µm / pixel) read from TIFF resolution tags are treated as absent
#: (e.g. the 72 dpi or "1 pixel per inch" placeholders written by many tools).
_PLAUSIBLE_MPP = (0.01, 100.0)
_OME_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "micrometer": 1.0, "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3,
                   "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4, "m": 1e6, "meter": 1e6, "Å": 1e-4, "pm": 1e-6}
_MPP_HINT = "pass the pixel size with --mpp (µm per pixel, e.g. --mpp 0.5 for a 20x scan)"


class ConvertError(InputError):
    """A source or output that cannot be converted; the message names the file, the problem and the fix."""


# --------------------------------------------------------------------------------------------
# Pyramid writer
# --------------------------------------------------------------------------------------------


def pyramid_shapes(
    height: int, width: int, *, n_levels: int | None = None, min_side: int = 1024
) -> list[tuple[int, int]]:
    """(H, W) in pixels of each pyramid level; each is ``ceil(previous / 2)``.

    With ``n_levels=None`` levels are added while the smallest side of the last one exceeds
    ``min_side`` pixels, so the coarsest level's smaller side is in ``(min_side/2, min_side]``
    (or the image itself when it is already that small).
    """
    shapes = [(int(height), int(width))]
    while (len(shapes) < n_levels) if n_levels is not None else (min(shapes[-1]) > min_side):
        h, w = shapes[-1]
        if h == 1 and w == 1:
            break
        shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


def _pool2(block: np.ndarray, row_axis: int = 0) -> np.ndarray:
    """2 × 2 mean pooling of a uint8 block whose rows / columns are axes ``row_axis`` / ``row_axis + 1``.

    Odd edges are replicated, so the result has ``ceil(h / 2) × ceil(w / 2)`` pixels.
    """
    for ax in (row_axis, row_axis + 1):
        if block.shape[ax] % 2:
            block = np.concatenate([block, block.take([-1], axis=ax)], axis=ax)

    def part(r: int, c: int) -> np.ndarray:
        idx: list[slice] = [slice(None)] * block.ndim
        idx[row_axis], idx[row_axis + 1] = slice(r, None, 2), slice(c, None, 2)
        return block[tuple(idx)]

    s = part(0, 0).astype(np.uint16)
    s += part(1, 0)
    s += part(0, 1)
    s += part(1, 1)
    s += 2
    return (s >> 2).astype(np.uint8)


#: read(y0, y1, x0, x1) -> uint8 RGB block in the store layout: (3, h, w) for "cyx", (h, w, 3) for "yxc"
_Reader = Callable[[int, int, int, int], np.ndarray]


class _RowCache:
    """Serves increasing row ranges of one column band, reading the source in aligned pieces once."""

    def __init__(self, read: _Reader, x0: int, x1: int, height: int, align: int, *, row_axis: int) -> None:
        self.read, self.x0, self.x1, self.height, self.align = read, x0, x1, height, max(1, align)
        self.row_axis = row_axis
        self.buf: np.ndarray | None = None
        self.b0 = self.b1 = 0

    def _rows(self, buf: np.ndarray, a: int, b: int | None) -> np.ndarray:
        return buf[a:b] if self.row_axis == 0 else buf[:, a:b]

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows ``[a, b)`` of the band (store layout); ``a`` must not decrease between calls."""
        if self.buf is None or a < self.b0 or a > self.b1:
            start = a - a % self.align
            w = self.x1 - self.x0
            self.buf = np.empty((0, w, 3) if self.row_axis == 0 else (3, 0, w), dtype=np.uint8)
            self.b0 = self.b1 = start
        if a > self.b0:  # drop rows that will not be asked for again
            self.buf = self._rows(self.buf, a - self.b0, None)
            self.b0 = a
        pieces = [self.buf]
        while self.b1 < b:
            end = min(self.height, (max(b, self.b1 + 1) + self.align - 1) // self.align * self.align)
            pieces.append(self.read(self.b1, end, self.x0, self.x1))
            self.b1 = end
        if len(pieces) > 1:
            self.buf = np.concatenate(pieces, axis=self.row_axis)
        return self._rows(self.buf, a - self.b0, b - self.b0)


def _array_reader(image: Any, axes: str) -> tuple[int, int, _Reader]:
    shape = tuple(int(s) for s in image.shape)
    if len(shape) != 3 or shape[2] not in (3, 4) or shape[0] < 1 or shape[1] < 1:
        raise ConvertError(f"expected an RGB(A) image of shape (H, W, 3|4), got shape {shape}; "
                           "convert it to RGB first")
    dtype = getattr(image, "dtype", None)
    if dtype is not None and np.dtype(dtype) != np.uint8:
        raise ConvertError(f"expected uint8 pixels, got {np.dtype(dtype)}; convert the image to 8-bit RGB first")

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        block = np.asarray(image[y0:y1, x0:x1])[..., :3]
        return np.ascontiguousarray(block.transpose(2, 0, 1) if axes == "cyx" else block, dtype=np.uint8)

    return shape[0], shape[1], read


def _ngff_metadata(
    shapes: list[tuple[int, int]], *, mpp: float | None, version: str, axes: str, name: str
) -> dict[str, Any]:
    unit = {"unit": "micrometer"} if mpp is not None else {}
    axes_md = [{"name": "c", "type": "channel"} if a == "c" else {"name": a, "type": "space", **unit} for a in axes]
    base = float(mpp) if mpp is not None else 1.0
    datasets = []
    for k in range(len(shapes)):
        s = base * 2.0**k
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0 if a == "c" else s for a in axes]}]})
    ms: dict[str, Any] = {
        "name": name, "axes": axes_md, "datasets": datasets, "type": "mean",
        "metadata": {"description": "2x2 mean pooling per level", "method": "hishrst_runtime.slides.convert"},
    }
    window = {"min": 0, "max": 255, "start": 0, "end": 255}
    channels = [{"color": c, "label": lab, "active": True, "coefficient": 1.0, "family": "linear", "inverted": False,
                 "window": dict(window)} for c, lab in (("FF0000", "red"), ("00FF00", "green"), ("0000FF", "blue"))]
    omero: dict[str, Any] = {"channels": channels, "rdefs": {"model": "color"}}
    if version == "0.4":
        ms["version"] = "0.4"
        omero["version"] = "0.4"
        return {"multiscales": [ms], "omero": omero}
    return {"ome": {"version": "0.5", "multiscales": [ms], "omero": omero}}


def write_ome_zarr(
    image: Any,
    out_path: str | os.PathLike[str],
    *,
    mpp: float | None,
    chunk: int = DEFAULT_CHUNK,
    n_levels: int | None = None,
    version: Literal["0.4", "0.5"] = "0.5",
    axes: Literal["yxc", "cyx"] = "cyx",
    name: str = "image",
    overwrite: bool = False,
    progress: bool = False,
    source_align_rows: int | None = None,
    extra_attrs: dict[str, Any] | None = None,
) -> Path:
    """Write an RGB uint8 image as an OME-Zarr multiscale pyramid; returns ``out_path``.

    ``image`` is an ``(H, W, 3|4)`` uint8 numpy array or any object with ``.shape`` and
    ``[y0:y1, x0:x1]`` slicing (alpha is dropped). ``mpp`` is the level-0 pixel size in µm / pixel
    (``None`` writes unit-less scales — a store without pixel size, for tests). ``chunk`` is the
    chunk side in pixels; ``n_levels`` the number of levels (default: halve until the smaller side
    is ≤ 1024 pixels). ``version`` "0.5" writes zarr v3, "0.4" zarr v2; ``axes`` "cyx" is the
    NGFF-conformant order, "yxc" (channel last) is written for readers that accept it.
    ``source_align_rows`` is the source's natural row block (e.g. its TIFF tile height) so each
    source row block is read once. Memory is bounded by a few ``chunk × 8192``-pixel bands.
    Metadata is written last: an interrupted write leaves a store without ``multiscales``.
    """
    import zarr

    if version not in ("0.4", "0.5"):
        raise ValueError(f"version must be '0.4' or '0.5', got {version!r}")
    if axes not in ("yxc", "cyx"):
        raise ValueError(f"axes must be 'yxc' or 'cyx', got {axes!r}")
    if not (isinstance(chunk, (int, np.integer)) and 16 <= chunk <= 16384):
        raise ValueError(f"chunk must be an integer number of pixels in [16, 16384], got {chunk!r}")
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of µm/pixel, got {mpp!r}")
    from tqdm import tqdm

    height, width, read = _array_reader(image, axes)
    out = Path(out_path)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out}: already exists; remove it or pass overwrite=True")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    shapes = pyramid_shapes(height, width, n_levels=n_levels)
    zarr_format = 3 if version == "0.5" else 2
    root = zarr.open_group(str(out), mode="w-", zarr_format=zarr_format)
    arrays = []
    for k, (h, w) in enumerate(shapes):
        shp = (3, h, w) if axes == "cyx" else (h, w, 3)
        chk = (3, min(chunk, h), min(chunk, w)) if axes == "cyx" else (min(chunk, h), min(chunk, w), 3)
        kw: dict[str, Any] = {"dimension_names": list(axes)} if zarr_format == 3 else {
            "chunk_key_encoding": {"name": "v2", "separator": "/"}}
        arrays.append(root.create_array(str(k), shape=shp, chunks=chk, dtype="uint8", fill_value=255, **kw))

    band = max(chunk, _BAND_PX // chunk * chunk)
    row_axis = 1 if axes == "cyx" else 0
    total = sum(h * w for h, w in shapes)
    bar = tqdm(total=total, unit="px", unit_scale=True, desc=f"writing {out.name}", disable=not progress, leave=False)
    with bar:
        for k, (h, w) in enumerate(shapes):
            if k == 0:
                src_read, sh, sw, factor, align = read, height, width, 1, source_align_rows or chunk
            else:
                prev = arrays[k - 1]
                sh, sw = shapes[k - 1]
                factor, align = 2, min(chunk, sh)
                src_read = _zarr_reader(prev, axes)
            dst = arrays[k]
            for bx0 in range(0, w, band):
                bx1 = min(bx0 + band, w)
                cache = _RowCache(src_read, bx0 * factor, min(bx1 * factor, sw), sh, align, row_axis=row_axis)
                for y0 in range(0, h, chunk):
                    y1 = min(y0 + chunk, h)
                    block = cache.rows(y0 * factor, min(y1 * factor, sh))
                    if factor == 2:
                        block = _pool2(block, row_axis)
                    if axes == "cyx":
                        dst[:, y0:y1, bx0:bx1] = block
                    else:
                        dst[y0:y1, bx0:bx1, :] = block
                    bar.update((y1 - y0) * (bx1 - bx0))
    attrs = _ngff_metadata(shapes, mpp=mpp, version=version, axes=axes, name=name)
    if extra_attrs:
        attrs.update(extra_attrs)
    root.attrs.update(attrs)
    return out


def _zarr_reader(arr: Any, axes: str) -> _Reader:
    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if axes == "cyx":
            return np.asarray(arr[:, y0:y1, x0:x1])
        return np.asarray(arr[y0:y1, x0:x1, :])

    return read


# --------------------------------------------------------------------------------------------
# TIFF / SVS / OME-TIFF sources
# --------------------------------------------------------------------------------------------


def _ome_mpp(ome_xml: str) -> float | None:
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] != "Pixels":
            continue
        sizes = []
        for ax in ("X", "Y"):
            v = el.get(f"PhysicalSize{ax}")
            if v is None:
                continue
            f = _OME_UNIT_TO_UM.get(el.get(f"PhysicalSize{ax}Unit", "µm"))
            if f is None:
                continue
            try:
                sizes.append(float(v) * f)
            except ValueError:
                continue
        return float(np.mean(sizes)) if sizes and all(s > 0 for s in sizes) else None
    return None


def _tag_value(page: Any, name: str) -> Any:
    tag = page.tags.get(name)
    return None if tag is None else tag.value


def tiff_pixel_size(tif: Any) -> tuple[float | None, str]:
    """Pixel size (µm / pixel) of the first image of an open ``tifffile.TiffFile`` and its origin.

    Returns ``(None, "none")`` when the file has no usable pixel size.
    """
    page = tif.pages[0]
    desc = page.description or ""
    if desc.startswith("Aperio") or getattr(tif, "is_svs", False):
        m = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", desc)
        if m:
            try:
                v = float(m.group(1))
                if v > 0:
                    return v, "Aperio MPP"
            except ValueError:
                pass
    if getattr(tif, "is_ome", False) and tif.ome_metadata:
        v = _ome_mpp(tif.ome_metadata)
        if v is not None:
            return v, "OME PhysicalSizeX/Y"
    xres, yres = _tag_value(page, "XResolution"), _tag_value(page, "YResolution")
    unit = _tag_value(page, "ResolutionUnit")
    per_um = {2: 25400.0, 3: 10000.0}.get(int(unit) if unit is not None else 2)
    if xres is not None and per_um is not None:
        vals = []
        for r in (xres, yres if yres is not None else xres):
            num, den = (r if isinstance(r, tuple) else (r, 1))
            if num and den:
                vals.append(per_um / (num / den))
        if vals:
            v = float(np.mean(vals))
            if _PLAUSIBLE_MPP[0] <= v <= _PLAUSIBLE_MPP[1]:
                return v, "TIFF resolution tags"
    return None, "none"


class _TiffLevel0:
    """Lazy ``(H, W, 3|4)`` view of a tifffile series' level 0, whatever its axis order."""

    def __init__(self, src: Path, tif: Any) -> None:
        import zarr

        series = tif.series[0]
        lvl = series.levels[0] if getattr(series, "levels", None) else series
        self.axes = str(lvl.axes).upper()
        shape = tuple(int(s) for s in lvl.shape)
        self.dtype = np.dtype(lvl.dtype)
        ch_axes = [a for a in self.axes if a in "SC"]
        if "Y" not in self.axes or "X" not in self.axes:
            raise ConvertError(f"{src}: the first image has axes {self.axes!r}, not a 2-D image; "
                               "export one RGB plane of the slide first")
        nch = shape[self.axes.index(ch_axes[0])] if len(ch_axes) == 1 else 1
        extra = [(a, s) for a, s in zip(self.axes, shape) if a not in "YXSC" and s != 1]
        if len(ch_axes) > 1 or extra or nch not in (3, 4):
            raise ConvertError(f"{src}: not an RGB image (axes {self.axes!r}, shape {shape}); "
                               "only brightfield RGB(A) slides can be converted — convert it to 8-bit RGB first")
        if self.dtype != np.uint8:
            raise ConvertError(f"{src}: pixels are {self.dtype}, expected 8-bit RGB; convert it to 8-bit RGB first")
        self.shape = (shape[self.axes.index("Y")], shape[self.axes.index("X")], nch)
        page = lvl.keyframe if hasattr(lvl, "keyframe") else tif.pages[0]
        self.align_rows = int(page.tilelength) if page.is_tiled else int(page.rowsperstrip or self.shape[0])
        self.array: Any = None
        if page.compression == 1 and getattr(page, "is_contiguous", False) and not page.is_tiled:
            try:  # uncompressed contiguous data: memory-map instead of decoding whole strips
                import tifffile

                self.array = tifffile.memmap(str(src), page=page.index, mode="r")
                self.align_rows = 256
            except (ValueError, OSError):
                self.array = None
        if self.array is None:
            self.array = zarr.open(series.aszarr(level=0), mode="r")
            if self.align_rows > 4096:  # giant strips: read them in smaller pieces
                self.align_rows = 4096
        if isinstance(self.array, np.ndarray) and self.array.shape != shape:  # memmap is not squeezed
            self.array = self.array.reshape(shape)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        ys, xs = key
        idx = tuple(ys if a == "Y" else xs if a == "X" else slice(None) if a in "SC" else 0 for a in self.axes)
        data = np.asarray(self.array[idx])
        kept = [a for a in self.axes if a in "YXSC"]
        order = [kept.index("Y"), kept.index("X"), kept.index("S" if "S" in kept else "C")]
        return data.transpose(order)


def convert_slide(
    src: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    mpp: float | None = None,
    chunk: int = DEFAULT_CHUNK,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert an SVS / TIFF / OME-TIFF slide to an OME-Zarr 0.5 pyramid (``cyx``); returns the store path.

    ``mpp`` (µm / pixel) overrides or supplies the source's pixel size. Streaming, bounded memory;
    written to ``.<name>.partial-<pid>`` beside ``out_path`` and renamed when complete, so an
    interrupted conversion leaves nothing that looks like a finished store. Raises
    :class:`ConvertError` for an unreadable or non-RGB source, a missing pixel size, or an existing
    output without ``overwrite=True``.
    """
    import tifffile

    src, out = Path(src), Path(out_path)
    if not src.is_file():
        raise ConvertError(f"{src}: no such file; check the path of the slide to convert")
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise ConvertError(f"{src}: --mpp must be a positive number of µm per pixel, got {mpp!r}")
    if out.exists() and not overwrite:
        raise ConvertError(f"{out}: output already exists; pass --overwrite (overwrite=True) to replace it")
    if out.resolve() == src.resolve():
        raise ConvertError(f"{out}: the output would replace the input; choose another output path")
    try:
        tif = tifffile.TiffFile(str(src))
    except (tifffile.TiffFileError, OSError, ValueError) as e:
        raise ConvertError(f"{src}: not a readable SVS / TIFF / OME-TIFF file ({e}); "
                           "convert it to a (pyramidal) TIFF first") from e
    with tif:
        if not tif.series:
            raise ConvertError(f"{src}: the file contains no image; check that it is a slide")
        source = _TiffLevel0(src, tif)
        file_mpp, origin = tiff_pixel_size(tif)
        if mpp is not None:
            use_mpp, origin = float(mpp), "--mpp"
        elif file_mpp is not None:
            use_mpp = file_mpp
        else:
            raise ConvertError(f"{src}: the file has no pixel size (no Aperio MPP, OME PhysicalSizeX or "
                               f"TIFF resolution in cm/inch); {_MPP_HINT}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            write_ome_zarr(source, tmp, mpp=use_mpp, chunk=chunk, version="0.5", axes="cyx", name=src.stem,
                           progress=progress, source_align_rows=source.align_rows,
                           extra_attrs={"hishrst": {"source": src.name, "mpp_source": origin}})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if out.exists():  # overwrite=True: swap in the new store, then drop the old one
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        tmp.rename(out)
    return out

