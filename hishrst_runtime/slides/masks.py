"""Tissue masks from files, and tissue masks as GeoJSON for QuPath (torch-free; numpy, Pillow, scipy).

:func:`read_tissue_mask` reads a user's tissue mask as a boolean ``(h, w)`` array at the resolution the
caller asks for (normally the overview's, so it replaces :func:`~hishrst_runtime.slides.tissue.detect_tissue`):

* **GeoJSON** (``.geojson`` / ``.json``): a ``FeatureCollection``, a ``Feature``, a list of features
  (older QuPath exports) or a bare geometry; ``Polygon`` / ``MultiPolygon`` (and ``GeometryCollection``
  s of them) with holes; coordinates ``(x, y)`` in **level-0 pixels** of the slide, as QuPath exports
  them. Other geometries (points, lines) are ignored. A mask pixel is tissue when its centre lies in a
  polygon and not in one of its holes (exact scanline fill, even-odd rule within each polygon; polygons
  are OR-ed, so overlapping annotations never cancel).
* **Raster** (PNG, TIFF, JPEG, … anything Pillow or tifffile reads): nonzero is tissue (for images with
  alpha the colour channels are used), **stretched** over the whole slide whatever its size: the image is
  resized to the requested shape by area averaging and a pixel is tissue when at least half of it is.
  One size limit holds for every raster mask, whatever its format — the ``mask`` limit of
  :mod:`hishrst_runtime.core.limits` (``HISHRST_MAX_MASK_PIXELS``), checked on the header before anything
  is decoded (Pillow's own decompression-bomb limit is not applied on top of it).

:func:`mask_to_geojson` turns a boolean mask into a QuPath-readable ``FeatureCollection`` — one
``Polygon`` feature (class "Tissue") per 4-connected tissue region, with its holes — by tracing the
pixel boundaries exactly (every ring follows pixel edges; collinear vertices are dropped), scaled to
level-0 pixels. :func:`write_mask_geojson` writes it atomically (:func:`~hishrst_runtime.core.files.atomic_write`).
Rings are traced with tissue on the right in image coordinates (y down); QuPath does not depend on the
winding order.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from hishrst_runtime.core.errors import HishrstError
from hishrst_runtime.core.files import atomic_write
from hishrst_runtime.core.limits import RasterTooLargeError, check_raster_size
from hishrst_runtime.slides.errors import MaskError
from hishrst_runtime.slides.tiffslide import is_tiff_file

__all__ = ["MaskError", "MaskTooLargeError", "GEOJSON_SUFFIXES", "GENERATOR", "read_tissue_mask", "mask_to_geojson",
           "write_mask_geojson", "written_by_hishrst"]

GEOJSON_SUFFIXES = (".geojson", ".json")


class MaskTooLargeError(MaskError, RasterTooLargeError):
    """A raster mask whose header declares more pixels than the mask limit (``HISHRST_MAX_MASK_PIXELS``)."""


_TISSUE_CLASS = {"name": "Tissue", "color": [80, 200, 120]}
#: ``properties`` of every FeatureCollection :func:`write_mask_geojson` writes (a GeoJSON foreign member
#: QuPath ignores): how hishrst recognises its own files, and never replaces anyone else's.
GENERATOR = {"generator": "hishrst"}


def _shape2(value: Sequence[int], name: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be (height, width) in pixels, got {value!r}") from e
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive (height, width) in pixels, got {value!r}")
    return h, w


def read_tissue_mask(path: str | os.PathLike[str], *, level0_shape_yx: Sequence[int],
                     out_shape_yx: Sequence[int]) -> np.ndarray:
    """The tissue mask in ``path`` as a boolean ``out_shape_yx`` array covering the whole slide.

    ``level0_shape_yx`` is the slide's level-0 (H, W) in pixels (GeoJSON coordinates are level-0
    pixels); ``out_shape_yx`` the (h, w) of the result, e.g. the overview's ``thumb.shape[:2]``. See the
    module docstring for the formats. Raises :class:`MaskError` naming the file for a missing,
    unreadable or empty mask (no polygon, or no tissue pixel at all).
    """
    p = Path(path)
    h0, w0 = _shape2(level0_shape_yx, "level0_shape_yx")
    oh, ow = _shape2(out_shape_yx, "out_shape_yx")
    if not p.is_file():
        raise MaskError(f"{p}: no such tissue-mask file; pass a GeoJSON (QuPath export) or a PNG / TIFF mask")
    if p.name.lower().endswith(GEOJSON_SUFFIXES):
        mask = _rasterise(_polygons(_load_json(p), p), (oh / h0, ow / w0), (oh, ow))
    else:
        mask = _stretch(_load_raster(p), (oh, ow))
    if not mask.any():
        raise MaskError(f"{p}: the tissue mask marks no tissue at {ow} x {oh} overview pixels over a {w0} x {h0} px "
                        "slide; check that its coordinates are level-0 pixels of this slide (or that it is not empty)")
    return mask


# ------------------------------------------------------------------------------------------- GeoJSON in


def _load_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise MaskError(f"{p}: not a readable GeoJSON file ({type(e).__name__}: {e}); export the annotations "
                        "again (QuPath: File > Export objects as GeoJSON)") from e


def _geometries(obj: Any) -> Iterator[dict[str, Any]]:
    if isinstance(obj, list):
        for item in obj:
            yield from _geometries(item)
    elif isinstance(obj, dict):
        kind = obj.get("type")
        if kind == "FeatureCollection":
            yield from _geometries(obj.get("features") or [])
        elif kind == "Feature":
            yield from _geometries(obj.get("geometry"))
        elif kind == "GeometryCollection":
            yield from _geometries(obj.get("geometries") or [])
        elif kind in ("Polygon", "MultiPolygon"):
            yield obj


def _polygons(obj: Any, p: Path) -> list[list[np.ndarray]]:
    """[[exterior, hole, …], …] as float64 ``[n, 2]`` (x, y) level-0 pixel rings."""
    out: list[list[np.ndarray]] = []
    try:
        for geom in _geometries(obj):
            polys = [geom["coordinates"]] if geom["type"] == "Polygon" else list(geom["coordinates"])
            for rings in polys:
                arrs = [np.asarray(r, dtype=np.float64)[:, :2] for r in rings]
                if arrs and all(a.ndim == 2 and len(a) >= 3 and np.isfinite(a).all() for a in arrs):
                    out.append(arrs)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise MaskError(f"{p}: malformed GeoJSON polygon ({type(e).__name__}: {e}); export the annotations again") from e
    if not out:
        raise MaskError(f"{p}: the GeoJSON holds no Polygon or MultiPolygon; draw the tissue as area annotations "
                        "and export them (QuPath: File > Export objects as GeoJSON)")
    return out


def _even_odd(rings: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Pixels of ``shape`` whose centre ``(c + 0.5, r + 0.5)`` is inside ``rings`` (mask-pixel (x, y)) by the
    even-odd rule — inside the exterior and outside its holes. Scanline crossings, vectorised over edges."""
    h, w = shape
    crossings = np.zeros((h, w + 1), dtype=np.int32)
    for ring in rings:
        a, b = ring, np.roll(ring, -1, axis=0)
        keep = a[:, 1] != b[:, 1]  # horizontal edges cross no scanline
        a, b = a[keep], b[keep]
        ylo, yhi = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
        r0 = np.clip(np.ceil(ylo - 0.5), 0, h).astype(np.int64)  # rows whose centre lies in [ylo, yhi)
        r1 = np.clip(np.ceil(yhi - 0.5), 0, h).astype(np.int64)
        n = np.maximum(r1 - r0, 0)
        if not n.any():
            continue
        e = np.repeat(np.arange(len(a)), n)
        rows = r0[e] + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
        yc = rows + 0.5
        x = a[e, 0] + (yc - a[e, 1]) * (b[e, 0] - a[e, 0]) / (b[e, 1] - a[e, 1])
        cols = np.clip(np.ceil(x - 0.5), 0, w).astype(np.int64)
        np.add.at(crossings, (rows, cols), 1)
    return (np.cumsum(crossings[:, :w], axis=1) & 1).astype(bool)


def _rasterise(polys: list[list[np.ndarray]], scale_yx: tuple[float, float], shape: tuple[int, int]) -> np.ndarray:
    """Fill each polygon (minus its holes) into a boolean ``shape`` mask; ``scale_yx`` = mask px per level-0 px.
    Each polygon is filled in its bounding box and OR-ed in, so overlapping polygons never cancel."""
    h, w = shape
    mask = np.zeros(shape, dtype=bool)
    sy, sx = scale_yx
    for rings in polys:
        xy = [np.stack([r[:, 0] * sx, r[:, 1] * sy], axis=1) for r in rings]
        lo, hi = xy[0].min(axis=0), xy[0].max(axis=0)
        x0, y0 = max(int(np.floor(lo[0])), 0), max(int(np.floor(lo[1])), 0)
        x1, y1 = min(int(np.ceil(hi[0])) + 1, w), min(int(np.ceil(hi[1])) + 1, h)
        if x1 <= x0 or y1 <= y0:
            continue
        mask[y0:y1, x0:x1] |= _even_odd([v - (x0, y0) for v in xy], (y1 - y0, x1 - x0))
    return mask


# -------------------------------------------------------------------------------------------- raster in


def _load_raster(p: Path) -> np.ndarray:
    """The mask image as a boolean 2-D array (nonzero colour = tissue); its declared size is checked against
    the one mask limit (:func:`~hishrst_runtime.core.limits.check_raster_size`) before anything is decoded."""
    try:
        arr = _read_tiff(p) if is_tiff_file(p) else _read_pillow(p)  # by content, whatever the name
    except HishrstError:  # the size limit, or a bad $HISHRST_MAX_MASK_PIXELS: already one clear line
        raise
    except Exception as e:  # noqa: BLE001 - Pillow / tifffile raise many types for unreadable images
        raise MaskError(f"{p}: not a readable mask image ({type(e).__name__}: {e}); pass a PNG or TIFF mask "
                        "(nonzero = tissue) or a GeoJSON") from e
    if arr.ndim == 3:
        arr = arr[..., :3] if arr.shape[-1] == 4 else arr[..., :1] if arr.shape[-1] == 2 else arr
        return (arr != 0).any(axis=-1)
    if arr.ndim != 2 or arr.size == 0:
        raise MaskError(f"{p}: a mask must be a 2-D image (got shape {arr.shape}); save a single-plane PNG or TIFF")
    return arr != 0


def _check_size(p: Path, height: int, width: int) -> None:
    try:
        check_raster_size(height, width, kind="mask", where=str(p))
    except RasterTooLargeError as e:
        raise MaskTooLargeError(str(e)) from e


def _read_tiff(p: Path) -> np.ndarray:
    """The first series of a TIFF as ``(H, W)`` or ``(H, W, samples)``; the header is checked first."""
    import tifffile

    with tifffile.TiffFile(str(p)) as tif:
        if not tif.series:
            raise MaskError(f"{p}: the TIFF holds no image; save the mask as a single-plane PNG or TIFF")
        series = tif.series[0]
        axes, dims = str(series.axes).upper(), tuple(int(n) for n in series.shape)
        keep = [axes.index(a) for a in "YXS" if a in axes]
        if "Y" not in axes or "X" not in axes or any(n != 1 for i, n in enumerate(dims) if i not in keep):
            raise MaskError(f"{p}: a mask must be a 2-D image (the TIFF has axes {axes!r}, shape {dims}); "
                            "save a single-plane PNG or TIFF")
        _check_size(p, dims[axes.index("Y")], dims[axes.index("X")])
        arr = np.asarray(series.asarray())
    rest = [i for i in range(len(dims)) if i not in keep]
    return arr.transpose(keep + rest).reshape([dims[i] for i in keep])


#: Pillow's global decompression-bomb limit is lifted only while this lock is held, so the mask limit
#: (checked on the header) is the one limit, and the global is always restored.
_PILLOW_LOCK = threading.Lock()


@contextlib.contextmanager
def _hishrst_limit_only() -> Iterator[None]:
    with _PILLOW_LOCK:
        before = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


def _read_pillow(p: Path) -> np.ndarray:
    """An image Pillow reads as ``(H, W)`` or ``(H, W, C)``; the header's size is checked before decoding."""
    with _hishrst_limit_only(), Image.open(p) as im:
        _check_size(p, im.height, im.width)
        im.load()
        return np.asarray(im.convert("RGBA") if im.mode in ("LA", "RGBA", "PA") else im)


def _stretch(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``mask`` resized to ``shape`` by area averaging; tissue where at least half of a pixel is."""
    if mask.shape == shape:
        return mask.copy()
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((shape[1], shape[0]), Image.BOX)) >= 128


# ------------------------------------------------------------------------------------------ GeoJSON out


def _boundary_edges(m: np.ndarray) -> np.ndarray:
    """Directed pixel-boundary edges ``[n, 4]`` (x0, y0, x1, y1) with tissue on the right (y down)."""
    p = np.pad(m, 1)
    core = p[1:-1, 1:-1]
    parts = []
    for dy, dx, (ax, ay, bx, by) in (
        (-1, 0, (0, 0, 1, 0)),  # top: left → right
        (0, 1, (1, 0, 1, 1)),  # right: down
        (1, 0, (1, 1, 0, 1)),  # bottom: right → left
        (0, -1, (0, 1, 0, 0)),  # left: up
    ):
        nb = p[1 + dy : p.shape[0] - 1 + dy, 1 + dx : p.shape[1] - 1 + dx]
        r, c = np.nonzero(core & ~nb)
        parts.append(np.stack([c + ax, r + ay, c + bx, r + by], axis=1))
    return np.concatenate(parts).astype(np.int64)


def _trace_rings(edges: np.ndarray) -> list[list[tuple[int, int]]]:
    """Link edges into closed rings of corner vertices (collinear ones dropped); at a saddle vertex turn
    right, which keeps diagonal neighbours apart (regions are 4-connected). Pure Python: O(edges)."""
    el = [tuple(e) for e in edges.tolist()]
    out: dict[tuple[int, int], list[int]] = {}
    for i, (x0, y0, _, _) in enumerate(el):
        out.setdefault((x0, y0), []).append(i)
    used = [False] * len(el)
    rings: list[list[tuple[int, int]]] = []
    for start in range(len(el)):
        if used[start]:
            continue
        verts: list[tuple[int, int]] = []
        e, prev = start, None
        while not used[e]:
            used[e] = True
            x0, y0, x1, y1 = el[e]
            d = (x1 - x0, y1 - y0)
            if d != prev:  # a corner: the direction changes here
                verts.append((x0, y0))
                prev = d
            cands = out[(x1, y1)]
            if len(cands) > 1:
                free = [k for k in cands if not used[k]] or cands
                right = [k for k in free if (el[k][2] - el[k][0], el[k][3] - el[k][1]) == (-d[1], d[0])]
                e = (right or free)[0]
            else:
                e = cands[0]
        first = el[start]
        if len(verts) > 1 and (first[2] - first[0], first[3] - first[1]) == prev:
            verts.pop(0)  # the start vertex was in the middle of a straight side
        rings.append(verts)
    return rings


def mask_to_geojson(mask: np.ndarray, *, scale_px: float | Sequence[float]) -> dict[str, Any]:
    """A GeoJSON ``FeatureCollection`` of the tissue in boolean ``mask`` (see the module docstring).

    ``scale_px`` is level-0 pixels per mask pixel: one number, or ``(y, x)`` (e.g.
    ``(H0 / h, W0 / w)`` for an overview of ``(h, w)`` over a level-0 ``(H0, W0)`` slide). Coordinates
    are level-0 pixels ``(x, y)`` of pixel **corners** (a mask pixel ``(r, c)`` covers
    ``[c·sx, (c+1)·sx) × [r·sy, (r+1)·sy)``). An empty mask gives an empty collection.
    """
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be a 2-D boolean array, got shape {m.shape}")
    sy, sx = (float(scale_px), float(scale_px)) if np.isscalar(scale_px) else (float(v) for v in scale_px)  # type: ignore[arg-type]
    labels, _ = ndimage.label(m)  # 4-connected, as the tracing keeps diagonal neighbours apart
    groups: dict[int, list[np.ndarray]] = {}
    for ring in _trace_rings(_boundary_edges(m)) if m.any() else []:
        (x0, y0), (x1, y1) = ring[0], ring[1 % len(ring)]
        # the tissue pixel right of the ring's first edge names its region
        r, c = (y0, x0) if x1 > x0 else (y0 - 1, x0 - 1) if x1 < x0 else (y0, x0 - 1) if y1 > y0 else (y0 - 1, x0)
        groups.setdefault(int(labels[r, c]), []).append(ring)
    features = []
    for lab in sorted(groups):
        rings = groups[lab] if len(groups[lab]) == 1 else sorted(groups[lab], key=lambda v: -abs(_area(v)))
        coords = [[[x * sx, y * sy] for x, y in [*v, v[0]]] for v in rings]  # outer ring first, closed
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coords},
                         "properties": {"objectType": "annotation", "classification": dict(_TISSUE_CLASS)}})
    return {"type": "FeatureCollection", "features": features}


def _area(v: list[tuple[int, int]]) -> float:
    """Signed shoelace area of a ring (mask pixels²; the outer ring of a region has the largest magnitude)."""
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(v, v[1:] + v[:1]))


def write_mask_geojson(mask: np.ndarray, path: str | os.PathLike[str], *, scale_px: float | Sequence[float]) -> Path:
    """Write :func:`mask_to_geojson` of ``mask`` to ``path`` atomically (compact JSON, with the
    :data:`GENERATOR` properties); returns the path."""
    out = Path(path)
    collection = {**mask_to_geojson(mask, scale_px=scale_px), "properties": dict(GENERATOR)}
    atomic_write(out, json.dumps(collection, separators=(",", ":")).encode("utf-8"))
    return out


def written_by_hishrst(path: str | os.PathLike[str]) -> bool:
    """Whether the file ``path`` is a GeoJSON :func:`write_mask_geojson` wrote (its :data:`GENERATOR` mark)."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return False
    props = data.get("properties") if isinstance(data, dict) else None
    return isinstance(props, dict) and props.get("generator") == GENERATOR["generator"]
