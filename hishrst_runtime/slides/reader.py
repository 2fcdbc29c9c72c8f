"""Open a whole slide lazily (torch-free): OME-Zarr (local or remote), SpatialData, or any registered format.

:func:`open_slide` takes any slide argument (how each is addressed: :mod:`hishrst_runtime.slides.sources`)
and returns one :class:`~hishrst_runtime.slides.slide.Slide` interface: a local file or directory of a
registered format goes to that format's opener (:mod:`hishrst_runtime.slides.formats`: TIFF-family files
read directly, vendor formats through OpenSlide, DICOM folders through wsidicom), a URL through fsspec
(:mod:`hishrst_runtime.slides.remote`); everything else is an OME-Zarr image, described here.

An OME-Zarr slide is an NGFF *multiscale image*: a zarr group whose metadata lists one array per pyramid
level (where that metadata lives per version: :mod:`hishrst_runtime.slides.ngff`). A
bioformats2raw store, whose image group is ``0``, is accepted too, and so is a SpatialData image element.

* Axes are found by **name**: ``y``, ``x`` and an optional ``c`` in any order (``cyx`` and ``yxc``
  are the usual ones); leading ``t`` / ``z`` axes of size 1 are tolerated.
* Pixels must be uint8 RGB or RGBA (alpha is dropped).
* The pixel size (µm / pixel) comes from each level's ``scale`` transformation (times the optional
  multiscale-wide one) on the ``y`` / ``x`` axes, converted to micrometres from the axis ``unit``
  (:mod:`hishrst_runtime.core.units`). A missing or unknown unit counts as no pixel size;
  ``open_slide(path, mpp=...)`` then supplies it (and always overrides the stored one). Zero or
  negative scales, and level-0 pixel sizes outside the plausible range, are errors naming the store
  (decided by :func:`~hishrst_runtime.core.units.resolve_mpp`, as for every reader).

Nothing is ever loaded whole: :class:`~hishrst_runtime.slides.level.Level` reads boxes and whole
chunks of lazy zarr arrays. Arrays are opened once per :class:`~hishrst_runtime.slides.slide.Slide`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.limits import LIMITS
from hishrst_runtime.core.units import UNIT_TO_UM, MppCandidate, resolve_mpp, unit_to_um
from hishrst_runtime.slides.chunks import DirectChunkReader
from hishrst_runtime.slides.errors import SlideError, SlidePixelSizeError, check_slide_size
from hishrst_runtime.slides.formats import format_for_name, load_opener
from hishrst_runtime.slides.level import Level, LevelImage, direct_ok, iter_chunk_regions
from hishrst_runtime.slides.ngff import find_multiscales, parse_axes, scale_of, space_scale
from hishrst_runtime.slides.slide import Slide, SlideKind
from hishrst_runtime.slides.sources import SlideSource, parse_source, spatialdata_image_group

__all__ = ["SlideError", "Level", "LevelImage", "Slide", "open_slide", "iter_chunk_regions", "UNIT_TO_UM",
           "MAX_LEVEL_PIXELS", "SlidePixelSizeError", "parse_source", "REMOTE_SCHEMES", "OTHER_SCHEMES"]

#: The default level-0 area limit (pixels); kept for older imports — the limit itself (and its
#: ``HISHRST_MAX_SLIDE_PIXELS`` override) is :mod:`hishrst_runtime.core.limits`.
MAX_LEVEL_PIXELS = int(LIMITS["slide"].default)

#: URL schemes :func:`open_slide` opens (through fsspec; ``pip install "hishrst[remote]"``).
REMOTE_SCHEMES = frozenset({"http", "https", "s3"})
#: Object stores that also open when their fsspec package is installed (not part of the extra), and
#: fsspec's caching prefixes (``simplecache::s3://…``). Any other scheme (ftp://, sftp://…) is refused.
OTHER_SCHEMES = frozenset({"gs", "gcs", "az", "abfs", "abfss", "simplecache", "filecache", "blockcache"})

_REWRITE = "Re-write the store (e.g. `hishrst convert`)."


def _fail(path: str, what: str, fix: str) -> SlideError:
    return SlideError(f"{path}: {what}. {fix}")


def _open_root(spath: str) -> Any:
    import zarr  # imported here so that `import hishrst_runtime.slides.reader` stays cheap

    if "://" in spath:  # a chained fsspec URL (simplecache::s3://…)
        _check_scheme(spath, spath)
    else:
        p = Path(spath)
        if not p.exists():
            raise _fail(spath, "no such file or directory", "Check the path of the slide (an OME-Zarr store, "
                        "a TIFF / SVS file, or STORE::ELEMENT for a SpatialData image).")
    try:
        from zarr.storage import LocalStore

        from hishrst_runtime.slides.remote import AbsentAwareStore

        store = AbsentAwareStore(LocalStore(spath, read_only=True)) if "://" not in spath else spath
        return zarr.open_group(store, mode="r")
    except Exception as e:  # noqa: BLE001 - zarr raises several types for "not a group"
        raise _fail(spath, f"not a zarr store ({type(e).__name__}: {e})",
                    "Pass the .zarr directory of an OME-Zarr image, "
                    "or convert the slide with `hishrst convert`.") from e


def _datasets(group: Any, multiscales: list[Any], spath: str) -> tuple[dict[str, Any], list[tuple[str, Any, dict]]]:
    """(the first multiscale, [(dataset path, array, dataset metadata)]) of an image group."""
    if not multiscales or not isinstance(multiscales[0], dict):
        raise _fail(spath, "the 'multiscales' metadata is empty", _REWRITE)
    ms = multiscales[0]
    datasets = ms.get("datasets") or []
    if not datasets:
        raise _fail(spath, "the multiscale image lists no datasets (pyramid levels)", _REWRITE)
    arrays = []
    for ds in datasets:
        dpath = str(ds.get("path", "")) if isinstance(ds, dict) else ""
        try:
            arr = group[dpath]
        except Exception as e:  # noqa: BLE001 - zarr raises several types for a missing or unreadable array
            raise _fail(spath, f"pyramid level {dpath!r} listed in the metadata cannot be opened ({e})",
                        "The store is incomplete; re-write it (e.g. `hishrst convert`).") from e
        if not hasattr(arr, "shape"):
            raise _fail(spath, f"pyramid level {dpath!r} is a group, not an array", "Re-write the store.")
        arrays.append((dpath, arr, ds))
    return ms, arrays


def _check_image(arrays: list[tuple[str, Any, dict]], names: list[str], spath: str) -> int:
    """Validate axes, sizes, dtype and channels; returns the number of channels."""
    shape0 = arrays[0][1].shape
    if "y" not in names or "x" not in names:
        raise _fail(spath, f"the image has no 'y'/'x' axes (axes: {names})", "Only 2-D RGB slides are supported.")
    for n, size in zip(names, shape0):
        if n not in ("y", "x", "c") and size != 1:
            raise _fail(spath, f"axis {n!r} has size {size}; only a single 2-D RGB plane is supported",
                        "Export one plane (t = z = 1) of the image.")
    for dpath, arr, _ in arrays:
        h, w = int(arr.shape[names.index("y")]), int(arr.shape[names.index("x")])
        if h < 1 or w < 1:
            raise _fail(spath, f"pyramid level {dpath!r} is empty ({h} x {w} pixels)", _REWRITE)
    for dpath, arr, _ in arrays:
        check_slide_size(int(arr.shape[names.index("y")]), int(arr.shape[names.index("x")]),
                         where=f"{spath} (pyramid level {dpath!r})",
                         fix="more than any glass slide: the metadata is damaged; re-write the store (e.g. `hishrst convert`)")
    n_channels = int(shape0[names.index("c")]) if "c" in names else 1
    dtype = np.dtype(arrays[0][1].dtype)
    if dtype != np.uint8:
        raise _fail(spath, f"pixels are {dtype}, expected uint8 RGB",
                    "Convert the image to 8-bit RGB (e.g. `hishrst convert` from the original SVS/TIFF).")
    if n_channels not in (3, 4):
        raise _fail(spath, f"the image has {n_channels} channel(s), expected 3 (RGB) or 4 (RGBA)",
                    "Only brightfield RGB slides (H&E) are supported; convert the slide to RGB.")
    return n_channels


def _scales_yx(ms: dict[str, Any], arrays: list[tuple[str, Any, dict]], names: list[str],
               spath: str) -> list[tuple[float, float]] | None:
    """Per-level (y, x) scales (dataset × multiscale-wide), None when any level has none; zero or
    negative scales are errors naming the level and axis."""
    ndim = len(names)
    iy, ix = names.index("y"), names.index("x")
    global_scale = scale_of(ms.get("coordinateTransformations")) or [1.0] * ndim
    if len(global_scale) != ndim:
        global_scale = [1.0] * ndim
    out: list[tuple[float, float]] = []
    for dpath, _, ds in arrays:
        s = scale_of(ds.get("coordinateTransformations"))
        if s is None or len(s) != ndim:
            return None
        yx = (s[iy] * global_scale[iy], s[ix] * global_scale[ix])
        for axis, v in zip("yx", yx):
            if not (np.isfinite(v) and v > 0):
                what = "zero" if v == 0 else "negative" if v < 0 else "not finite"
                raise _fail(spath, f"the scale of pyramid level {dpath!r} on the {axis} axis is {v!r} ({what}); "
                            "scales must be positive pixel sizes",
                            "Fix the store's coordinateTransformations or re-write it (e.g. `hishrst convert`).")
        out.append(yx)
    return out


def _level0_mpp(scales: list[tuple[float, float]] | None, units: tuple[str | None, str | None], spath: str,
                mpp: float | None, mpp_range: tuple[float, float] | None) -> tuple[tuple[float, float], str]:
    """((y, x) µm / pixel of level 0, source) from ``mpp`` or the metadata (:func:`resolve_mpp`: the scales are
    the store's one record, so an implausible value is an error)."""
    factors = [unit_to_um(u) for u in units]
    value = None
    if mpp is None and scales is not None and factors[0] is not None and factors[1] is not None:
        value = (scales[0][0] * factors[0], scales[0][1] * factors[1])
    unit_txt = f"unit {units[0]!r}" if units[0] else "no unit"
    known = ", ".join(k for k in UNIT_TO_UM if k.isascii() and k.endswith("er"))
    yx, origin = resolve_mpp(
        spath, override=mpp, bounds=mpp_range, strict=True, error=SlidePixelSizeError,
        candidates=[MppCandidate(value, f"the store's metadata pixel size (scale × unit {units[0]!r})")],
        missing=f"the store has no usable pixel size (y/x axes have {unit_txt}; known units: {known})")
    return yx, "override" if origin == "override" else "metadata"


def _zarr_slide(root: Any, src: SlideSource, mpp: float | None, mpp_range: tuple[float, float] | None,
                allow_missing_chunks: bool = False) -> Slide:
    """The multiscale image in ``root`` (or its SpatialData element / bioformats2raw child) as a Slide."""
    spath = src.text
    sdata = spatialdata_image_group(root, src.element, spath)
    kind: SlideKind = "spatialdata" if sdata is not None else "remote-ome-zarr" if src.kind == "remote" else "ome-zarr"
    group, multiscales = find_multiscales(root if sdata is None else sdata, spath)
    ms, arrays = _datasets(group, multiscales, spath)
    names, units = parse_axes(ms, len(arrays[0][1].shape), spath)
    n_channels = _check_image(arrays, names, spath)
    iy, ix = names.index("y"), names.index("x")
    to_space = space_scale(ms, names, spath) if sdata is not None else None
    if to_space is not None:  # the element's transformation to its coordinate system: level 0 is that space
        ms = {k: v for k, v in ms.items() if k != "coordinateTransformations"}
    scales = _scales_yx(ms, arrays, names, spath)
    if scales is None:  # fall back to shape ratios for the relative level sizes
        shape0 = arrays[0][1].shape
        rel = [(shape0[iy] / a.shape[iy], shape0[ix] / a.shape[ix]) for _, a, _ in arrays]
    else:
        rel = [(s[0] / scales[0][0], s[1] / scales[0][1]) for s in scales]
    sy, sx = to_space or (1.0, 1.0)
    mpp0_yx, source = _level0_mpp(scales, (units[iy], units[ix]), spath, mpp, mpp_range)
    if source == "override":  # --mpp is the pixel size of level 0, the coordinate system's pixels
        mpp0_yx = (mpp0_yx[0] * sy, mpp0_yx[1] * sx)
    levels = []
    for i, ((dpath, arr, _), (ry, rx)) in enumerate(zip(arrays, rel)):
        chunks = tuple(int(c) for c in arr.chunks)
        myx = (mpp0_yx[0] * ry, mpp0_yx[1] * rx)
        levels.append(Level(
            index=i, mpp=0.5 * (myx[0] + myx[1]), mpp_yx=myx, downsample=0.5 * (ry * sy + rx * sx),
            shape=(int(arr.shape[iy]), int(arr.shape[ix])), chunks=(chunks[iy], chunks[ix]), path=dpath, _array=arr,
            _axes=tuple(names), _n_channels=n_channels, store=spath,
            _direct=DirectChunkReader.for_array(arr) if direct_ok(names, arr.chunks) else None,
        ))
    levels = _sorted_levels(levels, (sy, sx))
    base = None
    if to_space is not None:
        h0, w0 = arrays[0][1].shape[iy], arrays[0][1].shape[ix]
        base = ((max(1, round(h0 * sy)), max(1, round(w0 * sx))), 0.5 * (mpp0_yx[0] / sy + mpp0_yx[1] / sx))
    return Slide(spath, levels, mpp_source=source, kind=kind, allow_missing_chunks=allow_missing_chunks, base=base)


def _sorted_levels(levels: list[Level], to_space: tuple[float, float]) -> list[Level]:
    """``levels`` finest first, their indices and downsamples (relative to level 0's space) renumbered."""
    order = sorted(range(len(levels)), key=lambda i: levels[i].mpp)
    if order != list(range(len(levels))):
        levels = [levels[i] for i in order]
        for i, lv in enumerate(levels):
            lv.index = i
            lv.downsample = lv.mpp / levels[0].mpp * 0.5 * (to_space[0] + to_space[1])
    return levels


def _check_scheme(spath: str, location: str) -> None:
    """Refuse a URL whose scheme (or any scheme of a chained URL) hishrst does not open, before any network."""
    schemes = [part.split("://", 1)[0].lower() for part in location.split("::") if "://" in part]
    schemes += [part.lower() for part in location.split("::")[:-1] if "://" not in part]
    bad = [sc for sc in schemes if sc not in REMOTE_SCHEMES | OTHER_SCHEMES]
    if bad:
        raise SlideError(f"{spath}: unsupported URL scheme {bad[0]!r}; slides are read from local paths, file://, "
                         f"http(s):// and s3:// URLs (and gs://, az:// with their fsspec package); download the "
                         "slide or serve it over HTTP(S)")


def open_slide(path: str | os.PathLike[str], *, mpp: float | None = None,
               mpp_range: tuple[float, float] | None = None, max_concurrency: int | None = None,
               storage_options: dict[str, Any] | None = None, allow_missing_chunks: bool = False) -> Slide:
    """Open a whole-slide image lazily: OME-Zarr (NGFF 0.4 / 0.5; local, ``http(s)://`` or ``s3://``), a
    SpatialData image element (``STORE::ELEMENT``), or a local file / directory of a registered format
    (:mod:`hishrst_runtime.slides.formats`: a TIFF-family file read directly, a DICOM folder, another vendor
    format through OpenSlide; addressing: :mod:`hishrst_runtime.slides.sources`). ``mpp``, ``mpp_range``
    and ``allow_missing_chunks`` reach every opener.

    ``mpp`` (µm per level-0 pixel) overrides the stored pixel size, or supplies it when the slide
    has none; the other levels keep their relative scales. Pixel sizes outside ``mpp_range`` (µm /
    pixel; default ``$HISHRST_MPP_RANGE`` or 0.05–50, see :mod:`hishrst_runtime.core.units`) are
    refused. For URLs, ``max_concurrency`` bounds the requests in flight (default
    :data:`~hishrst_runtime.slides.remote.DEFAULT_MAX_CONCURRENCY`) and ``storage_options`` go to fsspec.
    Raises :class:`SlideError` (naming the slide, the problem and the fix) for anything that is not a
    usable RGB(A) uint8 image, and :class:`~hishrst_runtime.slides.errors.SlideExtraMissing` (naming the
    extra to install) when the source needs an optional package. Chunks or tiles with no data, or that do
    not decode, follow the rule of :mod:`hishrst_runtime.slides.integrity`; ``allow_missing_chunks`` reads
    those outside the background as the fill value and lists them in ``Slide.filled_chunks``. A SpatialData
    element's ``Scale`` to its coordinate system is honoured: level 0 is that space.
    """
    spath = os.fspath(path)
    src = parse_source(spath)
    if src.format is not None:  # a registered format's opener (TIFF-family, OpenSlide, DICOM, …)
        opener = load_opener(src.format)
        return opener(src.location, mpp=mpp, mpp_range=mpp_range, allow_missing_chunks=allow_missing_chunks)
    if src.kind == "remote":
        _check_scheme(spath, src.location)
        from hishrst_runtime.slides.remote import DEFAULT_MAX_CONCURRENCY, open_remote_root

        fmt = format_for_name(src.location)
        if fmt is not None and fmt.opener is not None:
            raise _fail(spath, f"{fmt.name} slides are read from local disk only (URLs must be OME-Zarr stores)",
                        "Download the file, or convert it with `hishrst convert` and serve the OME-Zarr store.")

        root = open_remote_root(src.location, max_concurrency=max_concurrency or DEFAULT_MAX_CONCURRENCY,
                                storage_options=storage_options)
    else:
        root = _open_root(src.location)
    return _zarr_slide(root, src, mpp, mpp_range, allow_missing_chunks)
