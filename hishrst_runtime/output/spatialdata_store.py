"""A SpatialData store (``OUT/<slide>.sdata.zarr``) built from a complete AnnData output store.

Layout (all elements in one coordinate system, ``"global"``, in level-0 pixels)::

    images/<name>_he      the H&E: a multiscale image of the slide's low-resolution levels (at most
                          ``max_image_side`` px on its finest scale) with a Scale transformation
                          (level-0 pixels per image pixel); without slide levels, the thumbnail of
                          the AnnData store's ``uns['spatial']``
    shapes/<name>_spots   one circle per query point at ``obsm['spatial']`` (level-0 px), radius half
                          the point pitch (``spot_diameter_fullres / 2``), index 0..N-1, Identity
    shapes/<name>_square_008um   instead, for the bins of a sub-spot run (``uns['bins']``): one square per bin
                          (side ``uns['bins']['size_um']``, centred at ``obsm['spatial']``; named by the bin size,
                          as spatialdata-io's Visium HD reader names its ``square_008um`` / ``square_016um`` shapes)
    tables/table          the AnnData output (X, obs, var, obsm, uns) annotating the shapes:
                          ``obs['region']`` = the shapes' name, ``obs['instance_id']`` = 0..N-1 (row order)

so ``spatialdata.read_zarr`` and ``spatialdata-plot`` show predictions over the H&E with no glue. The
store is written as ``<name>.sdata.zarr.partial``, marked ``hishrst_status: "complete"`` in its root
attributes and swapped in (:func:`hishrst_runtime.core.files.swap_in`): ``<name>.sdata.zarr`` exists only
when whole. A failed write removes its partial; one a kill left is removed by the next write. A store
without the mark is someone else's and is never replaced. ``spatialdata`` is imported only here, lazily.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hishrst_runtime.core.files import atomic_write, fsync_path, read_json, remove_tree, swap_in
from hishrst_runtime.output.errors import IncompleteOutputError, MissingExtraError, OutputExistsError, writing
from hishrst_runtime.output.layout import STATUS_ATTR, output_status, read_root_attrs
from hishrst_runtime.output.names import PARTIAL_SUFFIX, SDATA_SUFFIX, SlideOutputs
from hishrst_runtime.output.overview import (DEFAULT_MAX_IMAGE_SIDE, ImageScale, as_level_sources,
                                             read_pyramid, with_coarser_scale)

__all__ = ["write_spatialdata", "spatialdata_path", "spatialdata_status", "require_spatialdata", "SpatialDataStatus",
           "SDATA_SUFFIX", "SDATA_FORMAT_VERSION", "COORDINATE_SYSTEM", "DEFAULT_MAX_IMAGE_SIDE"]

#: Root attribute ``hishrst_sdata_format_version`` of the SpatialData stores written here.
SDATA_FORMAT_VERSION = 1
#: The one coordinate system of the store; its unit is the level-0 pixel.
COORDINATE_SYSTEM = "global"
INSTALL_HINT = 'pip install "hishrst[spatialdata]"'

#: ``"stale"``: complete, but made from an AnnData output other than ``source`` (see :func:`spatialdata_status`).
SpatialDataStatus = Literal["missing", "incomplete", "stale", "complete"]


def spatialdata_path(adata_store: str | os.PathLike[str]) -> Path:
    """Where the SpatialData store of the AnnData output ``OUT/<slide>.zarr`` goes: ``OUT/<slide>.sdata.zarr``."""
    return SlideOutputs.of(Path(adata_store)).spatialdata


def _root_attrs(store: Path) -> dict[str, Any] | None:
    """Root attributes of a zarr v3 (``zarr.json``) or v2 (``.zattrs``) group, None when unreadable."""
    meta = read_json(store / "zarr.json")
    if isinstance(meta, dict):
        attrs = meta.get("attributes")
        return attrs if isinstance(attrs, dict) else None
    return read_root_attrs(store)


def spatialdata_status(path: str | os.PathLike[str], *,
                       source: str | os.PathLike[str] | None = None) -> SpatialDataStatus:
    """State of the SpatialData store ``path``: ``"missing"`` (neither it nor its partial exists),
    ``"incomplete"`` (a partial, or a store hishrst did not complete), ``"complete"``; with ``source``
    (the AnnData output it should come from), ``"stale"`` when it was made from another completion of it."""
    final = Path(path)
    if not final.exists():
        return "incomplete" if Path(str(final) + PARTIAL_SUFFIX).exists() else "missing"
    attrs = _root_attrs(final)
    if attrs is None or attrs.get(STATUS_ATTR) != "complete":
        return "incomplete"
    if source is not None:
        src_attrs = read_root_attrs(Path(source)) or {}
        made_from = (attrs.get("hishrst") or {}).get("source_completed_at")
        if made_from is None or made_from != src_attrs.get("hishrst_completed_at"):
            return "stale"
    return "complete"


def require_spatialdata() -> None:
    """Raise :class:`MissingExtraError` at once when the ``spatialdata`` package is not installed (found
    with ``importlib.util.find_spec``, without importing it): a run checks this before its first slide."""
    try:
        found = importlib.util.find_spec("spatialdata") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingExtraError("--format spatialdata / both needs the 'spatialdata' package, which is not "
                                f"installed; install it with: {INSTALL_HINT} (or use --format anndata)")


def _import_spatialdata() -> Any:
    try:
        import spatialdata
    except ImportError as e:
        raise MissingExtraError(f"SpatialData output needs the 'spatialdata' package, which is not installed "
                                f"({e}); install it with: {INSTALL_HINT}") from e
    return spatialdata


def _element_prefix(name: str) -> str:
    """``name`` made a valid SpatialData element name (letters, digits, ``_ . -``; starts alphanumeric)."""
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip("._-") or "slide"
    return clean if clean[0].isalnum() else "s" + clean


def _check_paths(src: Path, out: Path, *, replace: bool) -> None:
    """The AnnData output must be complete; an existing ``out`` is replaced only if ours and ``replace``."""
    state = output_status(src)
    if state != "complete":
        raise IncompleteOutputError(f"{src}: the AnnData output is {state}; finish it (hishrst-run --resume) "
                                    "before writing its SpatialData store")
    if out.resolve() == src.resolve():
        raise OutputExistsError(f"{out}: the SpatialData store would replace its own AnnData source; "
                                "choose another path")
    if out.exists() or out.is_symlink():
        if spatialdata_status(out) != "complete":
            raise OutputExistsError(f"{out}: exists but is not a SpatialData store written by hishrst; it is left "
                                    "as it is: move it away or choose another path")
        if not replace:
            raise OutputExistsError(f"{out}: a complete SpatialData store already exists; use --overwrite "
                                    "(replace=True) to rebuild it")


def _radius_px(adata: Any, library_id: str | None, radius_px: float | None) -> float:
    """Circle radius in level-0 pixels: ``radius_px``, else half ``spot_diameter_fullres``, else half
    ``uns['hishrst']['pitch_um'] / uns['hishrst']['mpp']``."""
    if radius_px is not None:
        r = float(radius_px)
    else:
        sf = adata.uns.get("spatial", {}).get(library_id, {}).get("scalefactors", {}) if library_id else {}
        meta = adata.uns.get("hishrst", {})
        if "spot_diameter_fullres" in sf:
            r = float(sf["spot_diameter_fullres"]) / 2.0
        elif meta.get("pitch_um") and meta.get("mpp"):
            r = float(meta["pitch_um"]) / float(meta["mpp"]) / 2.0
        else:
            r = float("nan")
    if not (np.isfinite(r) and r > 0):
        raise ValueError(f"no usable spot radius (got {r!r}): pass radius_px (level-0 pixels)")
    return r


def _thumbnail_scale(adata: Any, library_id: str | None, src: Path) -> ImageScale:
    """The stored overview (``'hires'``, else ``'lowres'``) of ``uns['spatial']`` as one image scale."""
    lib = adata.uns.get("spatial", {}).get(library_id, {}) if library_id else {}
    for key in ("hires", "lowres"):
        img = lib.get("images", {}).get(key)
        scalef = lib.get("scalefactors", {}).get(f"tissue_{key}_scalef")
        if img is not None and scalef:
            return ImageScale(np.ascontiguousarray(np.asarray(img)[..., :3], dtype=np.uint8), 1.0 / float(scalef))
    raise IncompleteOutputError(f"{src}: uns['spatial'] holds no slide image; pass the slide's levels")


def _image_element(scales: list[ImageScale]) -> Any:
    """A multiscale Image2DModel (DataTree ``scale0..``) whose first scale has a Scale transformation to
    level-0 pixels (the others' follow from their shapes). Always a DataTree: a single-scale image is
    written through ome-zarr's ``write_image``, which some spatialdata / ome-zarr pairs get wrong."""
    import xarray as xr

    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    arrays = []
    for s in scales:
        arrays.append(Image2DModel.parse(np.moveaxis(s.image, -1, 0), dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                                         transformations={COORDINATE_SYSTEM: Scale(list(s.yx), axes=("y", "x"))}))
    tree = xr.DataTree.from_dict({f"scale{i}": xr.Dataset({"image": a}) for i, a in enumerate(arrays)})
    Image2DModel.validate(tree)
    return tree


def _bin_squares(adata: Any, prefix: str) -> tuple[str, Any]:
    """(name, shapes) of a bin output: one axis-aligned square polygon per bin, in level-0 pixels."""
    import geopandas as gpd
    import pandas as pd
    import shapely

    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    bins = adata.uns["bins"]
    half = float(bins["size_um"]) / float(bins["mpp"]) / 2.0
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    squares = shapely.box(xy[:, 0] - half, xy[:, 1] - half, xy[:, 0] + half, xy[:, 1] + half)
    frame = gpd.GeoDataFrame(geometry=squares, index=pd.RangeIndex(adata.n_obs))
    name = f"{prefix}_square_{int(round(float(bins['size_um']))):03d}um"
    return name, ShapesModel.parse(frame, transformations={COORDINATE_SYSTEM: Identity()})


def _build(sd: Any, adata: Any, scales: list[ImageScale], prefix: str, radius: float) -> Any:
    """The SpatialData object: image, circles (squares for bins) and the table annotating them."""
    import pandas as pd

    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    n, shapes_name = adata.n_obs, f"{prefix}_spots"
    if "bins" in adata.uns:
        shapes_name, shapes = _bin_squares(adata, prefix)
    else:
        xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        shapes = ShapesModel.parse(xy, geometry=0, radius=np.full(n, radius), index=pd.RangeIndex(n),
                                   transformations={COORDINATE_SYSTEM: Identity()})
    adata.obs["region"] = pd.Categorical([shapes_name] * n)
    adata.obs["instance_id"] = np.arange(n, dtype=np.int64)
    table = TableModel.parse(adata, region=shapes_name, region_key="region", instance_key="instance_id")
    return sd.SpatialData(images={f"{prefix}_he": _image_element(scales)}, shapes={shapes_name: shapes},
                          tables={"table": table})


def _mark_pixel_size(work: Path, element: str, mpp0: float | None) -> None:
    """Give the image element its physical pixel size, the way NGFF readers (hishrst's own included) take it:
    ``micrometer`` units on its y / x axes and each scale's dataset transformations in µm (the level-0 pixels
    of the coordinate system times ``mpp0``, µm per level-0 pixel). The element's transformation to the
    ``global`` coordinate system (level-0 pixels) is left as it is; nothing is changed without ``mpp0``."""
    if not (isinstance(mpp0, (int, float)) and np.isfinite(mpp0) and mpp0 > 0):
        return
    meta_path, root_path = work / "images" / element / "zarr.json", work / "zarr.json"
    meta, root = read_json(meta_path), read_json(root_path)
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    ms = _first_multiscale(attrs)
    if ms is None:
        raise IncompleteOutputError(f"{meta_path}: no multiscales metadata to record the pixel size in")
    _to_um(ms, float(mpp0))
    atomic_write(meta_path, json.dumps(meta, indent=2).encode(), fsync=False)
    consolidated = ((root or {}).get("consolidated_metadata") or {}).get("metadata") or {}
    entry = consolidated.get(f"images/{element}")
    if isinstance(entry, dict):  # zarr readers open the store through its consolidated copy
        entry["attributes"] = attrs
        atomic_write(root_path, json.dumps(root, indent=2).encode(), fsync=False)


def _first_multiscale(attrs: Any) -> dict[str, Any] | None:
    holder = attrs.get("ome", attrs) if isinstance(attrs, dict) else None
    multiscales = holder.get("multiscales") if isinstance(holder, dict) else None
    return multiscales[0] if multiscales and isinstance(multiscales[0], dict) else None


def _to_um(ms: dict[str, Any], mpp0: float) -> None:
    """``ms``'s space axes in micrometres: their unit, and every dataset scale and translation times
    ``mpp0`` (µm per level-0 pixel) times the element's scale to level-0 pixels."""
    names = [a.get("name") if isinstance(a, dict) else a for a in ms.get("axes", [])]
    to_um = [1.0 if n == "c" else mpp0 * (ms_scale or 1.0)
             for n, ms_scale in zip(names, _multiscale_scale(ms, len(names)))]
    ms["axes"] = [{**a, "unit": "micrometer"} if isinstance(a, dict) and a.get("type") == "space" else a
                  for a in ms.get("axes", [])]
    for ds in ms.get("datasets", []):
        for t in ds.get("coordinateTransformations", []):
            key = t.get("type")
            if key in ("scale", "translation") and isinstance(t.get(key), list):
                t[key] = [float(v) * f for v, f in zip(t[key], to_um)]


def _multiscale_scale(ms: dict[str, Any], ndim: int) -> list[float]:
    """The element's scale to its coordinate system (level-0 pixels per image pixel, per axis)."""
    for t in ms.get("coordinateTransformations") or []:
        if isinstance(t, dict) and t.get("type") == "scale" and len(t.get("scale", [])) == ndim:
            return [float(v) for v in t["scale"]]
        for inner in (t.get("transformations") or []) if isinstance(t, dict) else []:
            if isinstance(inner, dict) and inner.get("type") == "scale" and len(inner.get("scale", [])) == ndim:
                return [float(v) for v in inner["scale"]]
    return [1.0] * ndim


def _finish(work: Path, out: Path, marks: dict[str, Any], *, fsync: bool) -> None:
    """Mark ``work`` complete (root attributes), make it durable and swap it in as ``out``."""
    meta_path = work / "zarr.json"
    meta = read_json(meta_path)
    if not isinstance(meta, dict):
        raise IncompleteOutputError(f"{work}: spatialdata wrote no zarr.json; cannot mark the store complete")
    meta.setdefault("attributes", {}).update(marks)
    if fsync:
        for root, _dirs, files in os.walk(work):
            for f in files:
                fsync_path(Path(root) / f)
    atomic_write(meta_path, json.dumps(meta, indent=2).encode(), fsync=fsync)  # the mark goes last
    swap_in(work, out)
    if fsync:
        fsync_path(out.parent, directory=True)


def write_spatialdata(
    adata_store: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
    levels: Sequence[Any] | None = None, level_downsamples: Sequence[float] | None = None,
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE, radius_px: float | None = None, name: str | None = None,
    replace: bool = False, fsync: bool = True,
) -> Path:
    """Build the SpatialData store ``out`` (default :func:`spatialdata_path`) from the complete AnnData
    output ``adata_store``; returns ``out``. See the module docstring for the layout.

    ``levels``: the slide's pyramid (``slide.levels`` of an open :class:`~hishrst_runtime.slides.slide.Slide`,
    or uint8 RGB ``(H, W, 3)`` arrays with ``level_downsamples``, level-0 pixels per pixel); only levels of
    at most ``max_image_side`` pixels are read (see :func:`~hishrst_runtime.output.overview.read_pyramid`).
    Without ``levels`` the image is the store's own ``uns['spatial']`` overview. ``radius_px``: circle
    radius in level-0 pixels (default half the stored spot diameter, i.e. half the pitch). ``name``:
    element-name prefix (default the ``uns['spatial']`` library id). ``replace``: rebuild an existing
    complete store (a store hishrst did not write is never replaced).

    Raises :class:`MissingExtraError` without the ``spatialdata`` package, :class:`IncompleteOutputError`
    for an unfinished source, :class:`OutputExistsError`, :class:`OutputNotWritableError`.
    """
    src = Path(adata_store)
    dst = Path(out) if out is not None else spatialdata_path(src)
    _check_paths(src, dst, replace=replace)
    sd = _import_spatialdata()
    import anndata as ad

    adata = ad.read_zarr(src)
    library_id = next(iter(adata.uns.get("spatial", {}) or {}), None)
    radius = _radius_px(adata, library_id, radius_px)
    if levels is not None:
        scales = read_pyramid(as_level_sources(levels, level_downsamples), max_side=max_image_side)
    else:
        scales = [_thumbnail_scale(adata, library_id, src)]
    scales = with_coarser_scale(scales)
    prefix = _element_prefix(name or library_id or src.name.split(".")[0])
    sdata = _build(sd, adata, scales, prefix, radius)
    mpp0 = (adata.uns.get("hishrst") or {}).get("mpp")
    src_attrs = read_root_attrs(src) or {}
    marks = {STATUS_ATTR: "complete", "hishrst_sdata_format_version": SDATA_FORMAT_VERSION,
             "hishrst": {"source": src.name, "source_completed_at": src_attrs.get("hishrst_completed_at"),
                         "coordinate_system": COORDINATE_SYSTEM, "unit": "level-0 pixel", "mpp": mpp0,
                         "completed_at": time.time()}}
    work = Path(str(dst) + PARTIAL_SUFFIX)
    with writing(dst, "write the SpatialData store"):
        remove_tree(work)  # a partial a killed run left: rebuilt from scratch
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
                sdata.write(work)
            _mark_pixel_size(work, f"{prefix}_he", mpp0)
            _finish(work, dst, marks, fsync=fsync)
        except BaseException:
            remove_tree(work)
            raise
    return dst
