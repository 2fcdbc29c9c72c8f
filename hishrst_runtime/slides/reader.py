"""Lazy OME-Zarr (NGFF 0.4 / 0.5) whole-slide reader (torch-free).

A slide is an NGFF *multiscale image*: a zarr group whose metadata lists one array per pyramid
level (``multiscales`` in ``.zattrs`` for NGFF 0.4 / zarr v2, ``attributes.ome.multiscales`` in
``zarr.json`` for NGFF 0.5 / zarr v3). A bioformats2raw store, whose image group is ``0``, is
accepted too.

* Axes are found by **name**: ``y``, ``x`` and an optional ``c`` in any order (``cyx`` and ``yxc``
  are the usual ones); leading ``t`` / ``z`` axes of size 1 are tolerated.
* Pixels must be uint8 RGB or RGBA (alpha is dropped).
* The pixel size (µm / pixel) comes from each level's ``scale`` transformation (times the optional
  multiscale-wide one) on the ``y`` / ``x`` axes, converted to micrometres from the axis ``unit``.
  A missing or unknown unit counts as no pixel size; ``open_slide(path, mpp=...)`` then supplies it
  (and always overrides the stored one).

Nothing is ever loaded whole: :meth:`Level.read_region` reads a box of a lazy zarr array, and
:func:`iter_chunk_regions` tiles a level into chunk-aligned boxes for streaming. Arrays are opened
once per :class:`Slide`; reads are safe to issue from several threads (zarr-python 3 dispatches
them to its own event loop and keeps no per-read state on the array).

Coordinates are ``(x, y)``; a region ``(x0, y0, x1, y1)`` is half-open and in the pixels of the
level it is read from (level-0 pixels × ``1 / downsample``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from hishrst_runtime.slides.chunks import DirectChunkReader
from hishrst_runtime.core.errors import InputError

__all__ = [
    "SlideError",
    "Level",
    "LevelImage",
    "Slide",
    "open_slide",
    "iter_chunk_regions",
    "UNIT_TO_UM",
]

#: NGFF (UDUNITS-2) length units we convert to micrometres; anything else counts as "no unit".
UNIT_TO_UM: dict[str, float] = {
    "nanometer": 1e-3,
    "micrometer": 1.0,
    "micron": 1.0,
    "um": 1.0,
    "µm": 1.0,
    "millimeter": 1e3,
    "centimeter": 1e4,
    "meter": 1e6,
}

_MPP_HINT = "pass the pixel size with --mpp (µm per level-0 pixel, e.g. --mpp 0.5 for a 20x scan)"


def _direct_ok(axes: Sequence[str], chunks: Sequence[int]) -> bool:
    """Whether :meth:`Level.read_chunk` can use direct chunk reads: a ``c, y, x`` or ``y, x, c`` order
    (leading singleton ``t`` / ``z`` allowed) whose singleton axes are chunked by 1."""
    kept = [a for a in axes if a in ("y", "x", "c")]
    return kept in (["c", "y", "x"], ["y", "x", "c"]) and all(
        int(c) == 1 for a, c in zip(axes, chunks) if a not in ("y", "x", "c"))


class SlideError(InputError):
    """A slide store that cannot be used; the message names the store, the problem and the fix."""


# --------------------------------------------------------------------------------------------
# Levels
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Level:
    """One pyramid level of a slide.

    ``mpp`` is in µm / pixel (the mean of the y and x pixel sizes, ``mpp_yx`` holds both),
    ``downsample`` is relative to level 0 (from the scales), ``shape`` = (H, W) and ``chunks`` =
    (ch, cw) are in this level's pixels. A Level can be passed to
    :func:`hishrst_runtime.core.patches.cut_patch` directly (it reads ``shape[0:2]`` and slices
    ``level[y0:y1, x0:x1]``); :attr:`image` is the same view with ``shape == (H, W, 3)``.
    """

    index: int
    mpp: float
    mpp_yx: tuple[float, float]
    downsample: float
    shape: tuple[int, int]
    chunks: tuple[int, int]
    path: str
    _array: Any = field(repr=False)
    _axes: tuple[str, ...] = field(repr=False)
    _n_channels: int = field(repr=False)
    _direct: Any = field(default=None, repr=False)

    def read_region(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Read the half-open box ``[y0:y1, x0:x1]`` (this level's pixels) as uint8 RGB ``(h, w, 3)``.

        The box is **clipped** to the level bounds, so the result can be smaller than requested
        (empty, ``(0, 0, 3)``, for a box entirely outside). Use ``cut_patch`` for white padding.
        """
        if self._array is None:
            raise ValueError("the slide is closed; open it again with open_slide()")
        h, w = self.shape
        cx0, cy0 = min(max(int(x0), 0), w), min(max(int(y0), 0), h)
        cx1, cy1 = min(max(int(x1), cx0), w), min(max(int(y1), cy0), h)
        if cx1 <= cx0 or cy1 <= cy0:
            return np.zeros((max(cy1 - cy0, 0), max(cx1 - cx0, 0), 3), dtype=np.uint8)
        index: list[Any] = []
        for name in self._axes:
            if name == "y":
                index.append(slice(cy0, cy1))
            elif name == "x":
                index.append(slice(cx0, cx1))
            elif name == "c":
                index.append(slice(0, 3))
            else:  # singleton t / z
                index.append(0)
        data = np.asarray(self._array[tuple(index)])
        kept = [a for a in self._axes if a in ("y", "x", "c")]
        if "c" in kept:
            data = np.moveaxis(data, kept.index("c"), -1)
            if kept.index("y") > kept.index("x"):  # (x, y, c) -> (y, x, c)
                data = data.swapaxes(0, 1)
        else:  # pragma: no cover - rejected at open (needs 3 or 4 channels)
            data = np.repeat(data[..., None], 3, axis=-1)
        return np.ascontiguousarray(data, dtype=np.uint8)

    def read_chunk(self, cy: int, cx: int) -> Image.Image:
        """Chunk ``(cy, cx)`` of this level (chunk-grid row and column) as a Pillow RGB image.

        The image covers level pixels ``[cy*ch : (cy+1)*ch, cx*cw : (cx+1)*cw]`` clipped to the
        level, so edge chunks are smaller. This is the streaming pipeline's read primitive: for a
        simple local store the chunk file is decompressed directly
        (:class:`hishrst_runtime.slides.chunks.DirectChunkReader`), and planar ``c, y, x`` data becomes
        an RGB image without a strided numpy transpose.
        """
        if self._array is None:
            raise ValueError("the slide is closed; open it again with open_slide()")
        ch, cw = self.chunks
        h, w = self.shape
        y0, x0 = int(cy) * ch, int(cx) * cw
        if not (0 <= y0 < h and 0 <= x0 < w):
            raise IndexError(f"chunk ({cy}, {cx}) is outside the level's {math.ceil(h / ch)} x {math.ceil(w / cw)} chunks")
        bh, bw = min(ch, h - y0), min(cw, w - x0)
        kept = [a for a in self._axes if a in ("y", "x", "c")]
        if kept not in (["c", "y", "x"], ["y", "x", "c"]):  # unusual axis orders
            return Image.fromarray(self.read_region(x0, y0, x0 + bw, y0 + bh))
        if self._direct is not None:  # both orders have a c axis; it may be chunked by fewer than 3
            cc = self._direct.chunk_shape[self._axes.index("c")]
            parts = []
            for k in range(math.ceil(3 / cc)):
                coords = tuple(cy if a == "y" else cx if a == "x" else k if a == "c" else 0 for a in self._axes)
                block = self._direct.read(coords)
                parts.append(block.reshape([n for a, n in zip(self._axes, block.shape) if a in ("y", "x", "c")]))
            data = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=kept.index("c"))
            sel = tuple(slice(0, bh) if a == "y" else slice(0, bw) if a == "x" else slice(0, 3) for a in kept)
            data = data[sel]
        else:
            index = tuple(slice(y0, y0 + bh) if a == "y" else slice(x0, x0 + bw) if a == "x"
                          else slice(0, 3) if a == "c" else 0 for a in self._axes)
            data = np.asarray(self._array[index])
        if kept == ["c", "y", "x"]:
            planes = [np.ascontiguousarray(data[i], dtype=np.uint8) for i in range(3)]
            return Image.merge("RGB", [Image.frombuffer("L", (bw, bh), p, "raw", "L", 0, 1) for p in planes])
        return Image.fromarray(np.ascontiguousarray(data, dtype=np.uint8))  # y, x, c

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        """``level[y0:y1, x0:x1]`` → uint8 RGB ``(h, w, 3)`` (step-less slices, clipped to bounds)."""
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, slice) for k in key)):
            raise TypeError("a Level is indexed as level[y0:y1, x0:x1]")
        ys, xs = key
        if (ys.step not in (None, 1)) or (xs.step not in (None, 1)):
            raise TypeError("a Level does not support strided slices")
        h, w = self.shape
        y0, y1, _ = ys.indices(h)
        x0, x1, _ = xs.indices(w)
        return self.read_region(x0, y0, x1, y1)

    @property
    def image(self) -> "LevelImage":
        """This level as an array-like with ``shape == (H, W, 3)`` and ``[y-slice, x-slice]`` reads."""
        return LevelImage(self)

    def iter_regions(self, region_size_px: int | None = None) -> Iterator[tuple[int, int, int, int]]:
        """Chunk-aligned boxes covering the level; see :func:`iter_chunk_regions`."""
        return iter_chunk_regions(self, region_size_px)


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


# --------------------------------------------------------------------------------------------
# Slide
# --------------------------------------------------------------------------------------------


class Slide:
    """An opened OME-Zarr whole-slide image (see :func:`open_slide`).

    ``levels`` are sorted finest first; ``mpp0`` is the level-0 pixel size in µm / pixel and
    ``shape0`` its (H, W) in pixels. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str, levels: list[Level], *, mpp_source: str) -> None:
        self.path = path
        self.levels = levels
        #: Where the pixel size came from: ``"metadata"`` or ``"override"`` (``mpp=``).
        self.mpp_source = mpp_source

    @property
    def mpp0(self) -> float:
        """Level-0 pixel size in µm / pixel."""
        return self.levels[0].mpp

    @property
    def shape0(self) -> tuple[int, int]:
        """Level-0 (H, W) in pixels."""
        return self.levels[0].shape

    def __repr__(self) -> str:
        return f"Slide({self.path!r}, shape0={self.shape0}, mpp0={self.mpp0:.4g}, levels={len(self.levels)})"

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the array handles (local zarr stores hold no open files between reads)."""
        for lv in self.levels:
            lv._array = None

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

    def thumbnail(self, *, max_side: int = 1024) -> np.ndarray:
        """A uint8 RGB ``(h, w, 3)`` overview whose longer side is ``max_side`` pixels (or less).

        Read from the coarsest level whose longer side is still ≥ ``max_side`` (level 0, not
        upsampled, when even it is smaller) and resized with Pillow. A single huge level is decimated
        chunk row by chunk row, so level 0 is never loaded whole. Its pixel size in µm / pixel is
        :meth:`thumbnail_mpp` of its shape.
        """
        if max_side < 1:
            raise ValueError(f"max_side must be >= 1 pixel, got {max_side!r}")
        big = [lv for lv in self.levels if max(lv.shape) >= max_side]
        lv = big[-1] if big else self.levels[0]  # level 0 is small then
        h, w = lv.shape
        scale = min(1.0, max_side / max(h, w))
        oh, ow = max(1, round(h * scale)), max(1, round(w * scale))
        step = max(1, int(max(h, w) // (2 * max_side)))  # cheap pre-decimation of very large levels
        if step == 1:
            img = lv.read_region(0, 0, w, h)
        else:
            rows = []
            ch = max(lv.chunks[0], step)
            ch -= ch % step
            for y0 in range(0, h, ch):
                strip = lv.read_region(0, y0, w, min(y0 + ch, h))
                rows.append(strip[::step, ::step])
            img = np.concatenate(rows, axis=0)
        if img.shape[:2] != (oh, ow):
            img = np.asarray(Image.fromarray(img).resize((ow, oh), Image.BILINEAR))
        return np.ascontiguousarray(img)

    def thumbnail_mpp(self, thumb_shape: Sequence[int]) -> float:
        """Pixel size (µm / pixel) of an overview of shape ``(h, w, ...)`` covering the whole slide."""
        h0, w0 = self.shape0
        return self.mpp0 * 0.5 * (h0 / thumb_shape[0] + w0 / thumb_shape[1])


# --------------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------------


def _fail(path: str, what: str, fix: str) -> SlideError:
    return SlideError(f"{path}: {what}. {fix}")


def _find_multiscales(root: Any, path: str) -> tuple[Any, list[dict[str, Any]], str]:
    """Return (image group, multiscales list, NGFF version) from the root group or its child "0"."""
    candidates = [root]
    try:
        child = root.get("0")
    except (KeyError, OSError, ValueError):  # an unreadable child just means "no bioformats2raw image"
        child = None
    if child is not None and hasattr(child, "attrs") and not hasattr(child, "shape"):
        candidates.append(child)
    for group in candidates:
        attrs = dict(group.attrs)
        ome = attrs.get("ome")
        if isinstance(ome, dict) and isinstance(ome.get("multiscales"), list):
            return group, ome["multiscales"], str(ome.get("version", "0.5"))
        if isinstance(attrs.get("multiscales"), list):
            ms = attrs["multiscales"]
            version = str(ms[0].get("version", "0.4")) if ms and isinstance(ms[0], dict) else "0.4"
            return group, ms, version
    raise _fail(
        path,
        "this zarr store is not an OME-Zarr image (no 'multiscales' metadata in the group or in its '0' child)",
        "Convert the slide with `hishrst convert SLIDE.svs OUT.zarr`, or point to the image group of the store.",
    )


def _scale_of(transforms: Any) -> list[float] | None:
    if not isinstance(transforms, list):
        return None
    for t in transforms:
        if isinstance(t, dict) and t.get("type") == "scale" and isinstance(t.get("scale"), list):
            return [float(v) for v in t["scale"]]
    return None


def _axes_of(ms: dict[str, Any], ndim: int, path: str) -> tuple[list[str], list[str | None]]:
    axes = ms.get("axes")
    if axes is None:  # NGFF <= 0.2: always 5D tczyx
        names = list("tczyx")[-ndim:]
        return names, [None] * ndim
    names, units = [], []
    for a in axes:
        if isinstance(a, dict):
            names.append(str(a.get("name", "")).lower())
            unit = a.get("unit")
            units.append(str(unit).lower() if unit is not None else None)
        else:  # NGFF 0.3: list of names
            names.append(str(a).lower())
            units.append(None)
    if len(names) != ndim:
        raise _fail(path, f"the multiscales metadata lists {len(names)} axes {names} "
                    f"but the arrays have {ndim} dimensions",
                    "Re-write the store with consistent metadata (e.g. `hishrst convert`).")
    return names, units


def open_slide(path: str | os.PathLike[str], *, mpp: float | None = None) -> Slide:
    """Open an OME-Zarr (NGFF 0.4 or 0.5) whole-slide image lazily.

    ``mpp`` (µm per level-0 pixel) overrides the stored pixel size, or supplies it when the store
    has none; the other levels keep their relative scales. Raises :class:`SlideError` (naming the
    store, the problem and the fix) for anything that is not a usable RGB(A) uint8 multiscale image.
    """
    import zarr  # imported here so that `import hishrst_runtime.slides.reader` stays cheap

    spath = os.fspath(path)
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise _fail(spath, f"--mpp must be a positive number of µm per pixel, got {mpp!r}", "Pass e.g. --mpp 0.5.")
    is_url = "://" in spath
    if not is_url:
        p = Path(spath)
        if not p.exists():
            raise _fail(spath, "no such file or directory", "Check the path of the OME-Zarr store.")
        if not p.is_dir():
            is_tiff = p.suffix.lower() in {".svs", ".tif", ".tiff", ".ndpi", ".scn"}
            hint = f" Convert it first with `hishrst convert {p.name} {p.stem}.zarr`." if is_tiff else ""
            raise _fail(spath, "not a zarr store (it is a file, OME-Zarr stores are directories)",
                        "Pass the .zarr directory of an OME-Zarr image." + hint)
    try:
        root = zarr.open_group(spath, mode="r")
    except Exception as e:  # noqa: BLE001 - zarr raises several types for "not a group"
        raise _fail(spath, f"not a zarr store ({type(e).__name__}: {e})",
                    "Pass the .zarr directory of an OME-Zarr image, "
                    "or convert the slide with `hishrst convert`.") from e

    group, multiscales, version = _find_multiscales(root, spath)
    if not multiscales or not isinstance(multiscales[0], dict):
        raise _fail(spath, "the 'multiscales' metadata is empty", "Re-write the store (e.g. `hishrst convert`).")
    ms = multiscales[0]
    datasets = ms.get("datasets") or []
    if not datasets:
        raise _fail(spath, "the multiscale image lists no datasets (pyramid levels)",
                    "Re-write the store (e.g. `hishrst convert`).")

    arrays = []
    for ds in datasets:
        dpath = str(ds.get("path", ""))
        try:
            arr = group[dpath]
        except Exception as e:  # noqa: BLE001
            raise _fail(spath, f"pyramid level {dpath!r} listed in the metadata cannot be opened ({e})",
                        "The store is incomplete; re-write it (e.g. `hishrst convert`).") from e
        if not hasattr(arr, "shape"):
            raise _fail(spath, f"pyramid level {dpath!r} is a group, not an array", "Re-write the store.")
        arrays.append((dpath, arr, ds))

    ndim = len(arrays[0][1].shape)
    names, units = _axes_of(ms, ndim, spath)
    shape0 = arrays[0][1].shape
    if "y" not in names or "x" not in names:
        raise _fail(spath, f"the image has no 'y'/'x' axes (axes: {names})", "Only 2-D RGB slides are supported.")
    for n, size in zip(names, shape0):
        if n not in ("y", "x", "c") and size != 1:
            raise _fail(spath, f"axis {n!r} has size {size}; only a single 2-D RGB plane is supported",
                        "Export one plane (t = z = 1) of the image.")
    n_channels = shape0[names.index("c")] if "c" in names else 1
    dtype = np.dtype(arrays[0][1].dtype)
    if dtype != np.uint8:
        raise _fail(spath, f"pixels are {dtype}, expected uint8 RGB",
                    "Convert the image to 8-bit RGB (e.g. `hishrst convert` from the original SVS/TIFF).")
    if n_channels not in (3, 4):
        raise _fail(spath, f"the image has {n_channels} channel(s), expected 3 (RGB) or 4 (RGBA)",
                    "Only brightfield RGB slides (H&E) are supported; convert the slide to RGB.")

    # Pixel sizes: per-dataset scale × optional multiscale-wide scale, on the y / x axes.
    global_scale = _scale_of(ms.get("coordinateTransformations")) or [1.0] * ndim
    iy, ix = names.index("y"), names.index("x")
    factors = [UNIT_TO_UM.get(units[i] or "", None) for i in (iy, ix)]
    scales_yx: list[tuple[float, float] | None] = []
    for _, arr, ds in arrays:
        s = _scale_of(ds.get("coordinateTransformations"))
        if s is None or len(s) != ndim:
            scales_yx.append(None)
        else:
            scales_yx.append((s[iy] * global_scale[iy], s[ix] * global_scale[ix]))
    has_scales = all(s is not None and s[0] > 0 and s[1] > 0 for s in scales_yx)
    if not has_scales:  # fall back to shape ratios for the relative level sizes
        rel = [(shape0[iy] / a.shape[iy], shape0[ix] / a.shape[ix]) for _, a, _ in arrays]
    else:
        rel = [(s[0] / scales_yx[0][0], s[1] / scales_yx[0][1]) for s in scales_yx]  # type: ignore[index]

    if mpp is not None:
        mpp0_yx = (float(mpp), float(mpp))
        source = "override"
    elif has_scales and factors[0] is not None and factors[1] is not None:
        mpp0_yx = (scales_yx[0][0] * factors[0], scales_yx[0][1] * factors[1])  # type: ignore[index]
        source = "metadata"
    else:
        unit_txt = f"unit {units[iy]!r}" if units[iy] else "no unit"
        raise _fail(spath, f"the store has no usable pixel size (y/x axes have {unit_txt}; "
                    f"known units: {', '.join(k for k in UNIT_TO_UM if k.isascii() and k.endswith('er'))})", _MPP_HINT)

    levels = []
    for i, ((dpath, arr, _), (ry, rx)) in enumerate(zip(arrays, rel)):
        h, w = int(arr.shape[iy]), int(arr.shape[ix])
        chunks = tuple(int(c) for c in arr.chunks)
        myx = (mpp0_yx[0] * ry, mpp0_yx[1] * rx)
        levels.append(Level(
            index=i, mpp=0.5 * (myx[0] + myx[1]), mpp_yx=myx, downsample=0.5 * (ry + rx), shape=(h, w),
            chunks=(chunks[iy], chunks[ix]), path=dpath, _array=arr, _axes=tuple(names), _n_channels=int(n_channels),
            _direct=DirectChunkReader.for_array(arr) if _direct_ok(names, arr.chunks) else None,
        ))
    order = sorted(range(len(levels)), key=lambda i: levels[i].mpp)
    if order != list(range(len(levels))):
        levels = [levels[i] for i in order]
        for i, lv in enumerate(levels):
            lv.index = i
            lv.downsample = lv.mpp / levels[0].mpp
    return Slide(spath, levels, mpp_source=source)
