"""Readers and writers: Space Ranger ``outs``, 10x HDF5 matrices, h5ad + image, full-resolution images.

Conventions follow scanpy/squidpy: ``X`` holds raw UMI counts (CSR, float32), ``var_names`` are gene
symbols (made unique) with ``var['gene_ids']``, ``obs`` holds ``in_tissue``, ``array_row``,
``array_col``, ``obsm['spatial']`` is the full-resolution pixel position ``(x, y)`` =
``(pxl_col_in_fullres, pxl_row_in_fullres)`` and ``uns['spatial'][library_id]`` holds the hires/lowres
images (RGB uint8 HWC), the scale factors and metadata. hishrst adds
``uns['hishrst'] = {"fullres_image": str | None, "mpp": float, "image": "full"|"hires"|"lowres", ...}``
where ``mpp`` is the full-resolution pixel size in µm/px.

Every problem with user data raises :class:`DataError` (a ``ValueError``) whose message names the
file, says what is wrong and how to fix it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from hishrst_runtime.core.geometry import mpp_from_spot_diameter
from hishrst_runtime.core.errors import InputError

__all__ = ["DataError", "FullresImage", "image_mpp", "open_fullres_image", "read_10x_h5", "read_h5ad_with_image",
           "read_visium", "write_10x_h5"]

log = logging.getLogger("hishrst")

_POS_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
_TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".ndpi", ".scn")
_IMAGE_SUFFIXES = _TIFF_SUFFIXES + (".png", ".jpg", ".jpeg")


class DataError(InputError):
    """User data that cannot be read as given; the message names the file, the problem and the fix."""


def _error(path: str | Path, what: str, fix: str) -> DataError:
    return DataError(f"{path}: {what}. Fix: {fix}")


# ---------------------------------------------------------------------------------------------------
# 10x HDF5
# ---------------------------------------------------------------------------------------------------


def _decode(a: np.ndarray) -> np.ndarray:
    return np.array([x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in a], dtype=object)


def _read_10x_h5(path: Path, *, gex_only: bool = True) -> tuple[Any, dict[str, Any]]:
    import anndata as ad

    if not path.is_file():
        raise _error(path, "the 10x feature-barcode matrix file does not exist",
                     "point to Space Ranger's outs/ folder, which contains filtered_feature_bc_matrix.h5")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise _error(path, f"not a readable HDF5 file ({e})", "re-copy filtered_feature_bc_matrix.h5 from Space Ranger's outs/") from e
    with f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        if "matrix" in f:
            g = f["matrix"]
            feats = g.get("features")
            if feats is None:
                raise _error(path, "group 'matrix' has no 'features' subgroup", "write the file with Space Ranger ≥ 3 or write_10x_h5")
            ids, names = feats.get("id"), feats.get("name")
            ftypes = _decode(feats["feature_type"][()]) if "feature_type" in feats else None
            genome = _decode(feats["genome"][()]) if "genome" in feats else None
        elif len(f.keys()) == 1:  # Cell Ranger 2 layout: one group per genome
            g = f[next(iter(f.keys()))]
            ids, names, ftypes, genome = g.get("genes"), g.get("gene_names"), None, None
        else:
            raise _error(path, f"no 'matrix' group (found {sorted(f.keys())})", "pass a 10x feature-barcode matrix .h5 file")
        missing = [k for k in ("barcodes", "data", "indices", "indptr", "shape") if k not in g]
        if missing or ids is None or names is None:
            raise _error(path, f"the matrix is missing datasets {missing or ['features/id or name']}",
                         "re-export the matrix from Space Ranger; the file is truncated or not a 10x matrix")
        shape = tuple(int(v) for v in g["shape"][()])
        barcodes = _decode(g["barcodes"][()])
        ids, names = _decode(ids[()]), _decode(names[()])
        data, indices, indptr = g["data"][()], g["indices"][()], g["indptr"][()]
    if len(shape) != 2:
        raise _error(path, f"matrix/shape must have 2 entries (genes, barcodes), got {shape}", "re-export the matrix")
    n_genes, n_bc = shape
    if len(ids) != n_genes or len(names) != n_genes:
        raise _error(path, f"gene count mismatch: matrix/shape says {n_genes} genes but features lists {len(ids)} ids and {len(names)} names",
                     "the matrix and its feature list come from different runs; re-export filtered_feature_bc_matrix.h5")
    if len(barcodes) != n_bc or len(indptr) != n_bc + 1:
        raise _error(path, f"barcode count mismatch: matrix/shape says {n_bc} barcodes, barcodes has {len(barcodes)}, indptr {len(indptr)}",
                     "re-export filtered_feature_bc_matrix.h5")
    if indptr[-1] != len(data) or len(indices) != len(data) or (len(indices) and int(indices.max()) >= n_genes):
        raise _error(path, "the sparse matrix arrays (data/indices/indptr) are inconsistent", "re-export filtered_feature_bc_matrix.h5")
    # CSC (genes × barcodes) has exactly the arrays of CSR (barcodes × genes).
    X = sp.csr_matrix((data.astype(np.float32), indices.astype(np.int64), indptr.astype(np.int64)), shape=(n_bc, n_genes))
    X.sort_indices()
    var = pd.DataFrame({"gene_ids": ids.astype(str)}, index=pd.Index(names.astype(str)))
    for col, vals in (("feature_types", ftypes), ("genome", genome)):
        if vals is not None:
            var[col] = vals.astype(str)
    with warnings.catch_warnings():  # duplicate symbols are made unique below, as scanpy does
        warnings.filterwarnings("ignore", message="Variable names are not unique")
        adata = ad.AnnData(X=X, obs=pd.DataFrame(index=pd.Index(barcodes.astype(str))), var=var)
        if gex_only and "feature_types" in var:
            adata = adata[:, var["feature_types"].to_numpy() == "Gene Expression"].copy()
        adata.var_names_make_unique()
    return adata, attrs


def read_10x_h5(path: str | Path, *, gex_only: bool = True) -> Any:
    """Read a 10x HDF5 feature-barcode matrix into AnnData (``X`` counts, CSR float32, barcodes × genes).

    Supports the Space Ranger/Cell Ranger ≥ 3 layout (``matrix/features``) and the legacy per-genome
    layout. ``gex_only`` keeps ``Gene Expression`` features only. Gene names are made unique.
    """
    return _read_10x_h5(Path(path), gex_only=gex_only)[0]


def write_10x_h5(
    adata: Any, path: str | Path, *, library_id: str | None = None, genome: str = "unknown",
    chemistry_description: str = "Spatial 3' v1", software_version: str = "hishrst",
) -> Path:
    """Write AnnData counts as a 10x HDF5 feature-barcode matrix (CSC genes × barcodes, int32 data).

    ``X`` must hold non-negative integer counts. ``var['gene_ids']`` (else the gene names),
    ``var['feature_types']`` (else ``Gene Expression``) and ``var['genome']`` (else ``genome``) are
    written as features; ``read_10x_h5`` of the result reproduces ``X``, names, ids and types exactly.
    """
    path = Path(path)
    n_var = adata.n_vars
    var = adata.var
    ids = var["gene_ids"].astype(str).to_numpy() if "gene_ids" in var else np.asarray(adata.var_names, dtype=str)
    ftypes = var["feature_types"].astype(str).to_numpy() if "feature_types" in var else np.full(n_var, "Gene Expression")
    genomes = var["genome"].astype(str).to_numpy() if "genome" in var else np.full(n_var, genome)
    _write_10x_arrays(
        path, adata.X, barcodes=adata.obs_names, names=adata.var_names, ids=ids, feature_types=ftypes, genomes=genomes,
        library_id=library_id or path.parent.name, chemistry_description=chemistry_description, software_version=software_version,
    )
    return path


def _write_10x_arrays(
    path: Path, X: Any, *, barcodes: Any, names: Any, ids: Any, feature_types: Any, genomes: Any,
    library_id: str, chemistry_description: str, software_version: str,
) -> None:
    """Write a barcodes × genes count matrix as a 10x HDF5 file (the arrays behind :func:`write_10x_h5`)."""
    X = sp.csr_matrix(X) if not sp.issparse(X) else sp.csr_matrix(X, copy=True)
    X.sort_indices()
    X.eliminate_zeros()
    data = np.asarray(X.data)
    if data.size and (np.any(data < 0) or np.any(np.round(data) != data)):
        raise _error(path, "X does not hold raw counts (negative or non-integer values)",
                     "write the raw UMI counts (e.g. adata.layers['counts']), not normalised values")
    n_obs, n_var = X.shape

    def b(a: Any) -> np.ndarray:
        arr = np.asarray([str(x).encode("utf-8") for x in a])
        return arr if arr.size else np.zeros(0, dtype="S1")

    kw = {"compression": "gzip", "compression_opts": 4}
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs.update({"filetype": "matrix", "version": 2, "library_ids": np.array([library_id.encode()]),
                        "original_gem_groups": np.array([1], dtype=np.int64),
                        "chemistry_description": chemistry_description, "software_version": software_version})
        g = f.create_group("matrix")
        for key, arr in (("barcodes", b(barcodes)), ("data", data.astype(np.int32)),
                         ("indices", X.indices.astype(np.int64)), ("indptr", X.indptr.astype(np.int64))):
            g.create_dataset(key, data=arr, **kw)
        g.create_dataset("shape", data=np.array([n_var, n_obs], dtype=np.int32))
        ft = g.create_group("features")
        ft.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        for key, vals in (("feature_type", feature_types), ("genome", genomes), ("id", ids), ("name", names)):
            ft.create_dataset(key, data=b(vals), **kw)


# ---------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------


class FullresImage:
    """A lazily read ``(H, W, 3)`` RGB uint8 view of an image (level 0 of a pyramid).

    ``img[y0:y1, x0:x1]`` reads only that region and returns an ``(h, w, 3)`` uint8 numpy array, so it
    works with :func:`hishrst_runtime.core.patches.cut_patch`. Greyscale is expanded to RGB, alpha dropped,
    planar (``CYX``) layouts transposed, 16-bit scaled to 8-bit. Decoded TIFF tiles are kept in a
    thread-safe LRU cache of ``cache_mb`` MiB, so neighbouring patches do not decode a tile twice.
    """

    def __init__(self, array: Any, *, axes: str, path: str, closer: Any = None, cache_mb: float = 256.0) -> None:
        self._a, self._axes, self.path, self._closer = array, axes, path, closer
        if "Y" not in axes or "X" not in axes:
            raise _error(path, f"image axes {axes!r} have no Y/X plane", "convert the image to an RGB TIFF or PNG")
        shp = dict(zip(axes, array.shape))
        self.shape = (int(shp["Y"]), int(shp["X"]), 3)
        self.dtype, self.ndim = np.dtype(np.uint8), 3
        chunks = getattr(array, "chunks", None) if axes[:2] == "YX" else None
        self._chunks = (int(chunks[0]), int(chunks[1])) if chunks is not None else None
        tile_bytes = int(np.prod(chunks)) * array.dtype.itemsize if chunks is not None else 1
        self._cache_max = max(4, int(cache_mb * 2**20) // max(tile_bytes, 1))
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        ys, xs = (key + (slice(None), slice(None)))[:2]
        if not isinstance(ys, slice) or not isinstance(xs, slice) or len(key) > 2:
            raise TypeError("FullresImage supports slice indexing [y0:y1, x0:x1] only")
        a = self._read(ys, xs)
        other = [ax for ax in self._axes if ax not in "YX"]
        a = a.transpose([self._axes.index("Y"), self._axes.index("X")] + [self._axes.index(ax) for ax in other])
        a = _to_uint8(a.reshape(a.shape[0], a.shape[1], -1))
        if a.shape[2] == 1:
            a = np.repeat(a, 3, axis=2)
        return np.ascontiguousarray(a[..., :3])

    def _read(self, ys: slice, xs: slice) -> np.ndarray:
        """The region in the array's own axis order, assembled from cached tiles where possible."""
        (y0, y1, sy), (x0, x1, sx) = ys.indices(self.shape[0]), xs.indices(self.shape[1])
        if self._chunks is None or sy != 1 or sx != 1 or y1 <= y0 or x1 <= x0:
            return np.asarray(self._a[tuple(ys if ax == "Y" else xs if ax == "X" else slice(None) for ax in self._axes)])
        ch, cw = self._chunks
        tys, txs = range(y0 // ch, (y1 - 1) // ch + 1), range(x0 // cw, (x1 - 1) // cw + 1)
        if len(tys) * len(txs) > self._cache_max // 2:  # a big region: read it directly
            return np.asarray(self._a[y0:y1, x0:x1])
        out = np.empty((y1 - y0, x1 - x0, *self._a.shape[2:]), self._a.dtype)
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

    TIFF (incl. pyramidal, tiled, JPEG/zlib, SVS/OME) is read through tifffile's zarr store (level 0
    only, tile by tile, ``cache_mb`` MiB of decoded tiles cached); PNG/JPEG are decoded with Pillow
    into memory.
    """
    path = Path(path)
    if not path.is_file():
        raise _error(path, "the full-resolution image does not exist", "pass the path of the H&E image used by Space Ranger")
    if path.suffix.lower() in _TIFF_SUFFIXES or _is_tiff(path):
        import tifffile
        import zarr

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                axes = series.levels[0].axes if hasattr(series, "levels") else series.axes
            store = tifffile.imread(path, aszarr=True, series=0, level=0)
            arr: Any = zarr.open(store, mode="r")
        except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError) as e:
            raise _error(path, f"cannot read the TIFF image ({e})", "check the file is a complete, valid TIFF (re-export it)") from e
        if hasattr(arr, "keys"):  # a group: pick level 0
            arr = arr["0"]
        axes = axes.replace("Q", "").replace("I", "") if len(axes) != len(arr.shape) else axes
        if len(axes) != len(arr.shape):
            raise _error(path, f"unexpected TIFF layout (axes {axes!r}, shape {arr.shape})", "convert to an RGB TIFF")
        return FullresImage(arr, axes=axes, path=str(path), closer=store, cache_mb=cache_mb)
    return FullresImage(_pil_read(path, decode=True), axes="YXS", path=str(path))


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

    Looks at, in order: an ImageDescription JSON ``{"mpp": ...}``, OME-XML ``PhysicalSizeX``, an
    Aperio ``MPP = ...`` description, and the TIFF XResolution/ResolutionUnit tags (centimetre or
    inch). Values outside 0.01–100 µm/px (e.g. a 72-dpi default) are ignored.
    """
    path = Path(path)
    if not (path.suffix.lower() in _TIFF_SUFFIXES or _is_tiff(path)):
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page: Any = tif.pages.first
            desc = page.description or ""
            ome = tif.ome_metadata if tif.is_ome else None
            unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 1
            xres = page.tags["XResolution"].value if "XResolution" in page.tags else None
    except (tifffile.TiffFileError, OSError, ValueError) as e:
        raise _error(path, f"cannot read the TIFF image ({e})", "check the file is a complete, valid TIFF") from e
    candidates: list[float] = []
    try:
        meta = json.loads(desc)
        if isinstance(meta, dict):
            for key in ("mpp", "mpp_x", "microns_per_pixel"):
                if key in meta:
                    candidates.append(float(meta[key]))
    except (ValueError, TypeError):
        pass
    if ome:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', ome)
        u = re.search(r'PhysicalSizeXUnit="([^"]+)"', ome)
        if m:
            scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(u.group(1) if u else "µm", 1.0)
            candidates.append(float(m.group(1)) * scale)
    m = re.search(r"\bMPP\s*=\s*([0-9.]+)", desc)
    if m:
        candidates.append(float(m.group(1)))
    if xres is not None and unit in (2, 3):
        num, den = (xres if isinstance(xres, tuple) else (xres, 1))
        px_per_unit = float(num) / float(den) if den else 0.0
        if px_per_unit > 0:
            candidates.append((1e4 if unit == 3 else 25400.0) / px_per_unit)
    for c in candidates:
        if np.isfinite(c) and 0.01 <= c <= 100:
            return float(c)
    return None


def _image_hw(path: Path) -> tuple[int, int]:
    """(height, width) of an image without decoding it."""
    if path.suffix.lower() in _TIFF_SUFFIXES or _is_tiff(path):
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


# ---------------------------------------------------------------------------------------------------
# Space Ranger outs
# ---------------------------------------------------------------------------------------------------


def _read_positions(spatial: Path) -> tuple[pd.DataFrame, Path]:
    for name in ("tissue_positions.csv", "tissue_positions_list.csv"):
        p = spatial / name
        if p.is_file():
            break
    else:
        raise _error(spatial, "no tissue_positions.csv (Space Ranger ≥ 2.0) or tissue_positions_list.csv found",
                     "copy the whole spatial/ folder of Space Ranger's outs/")
    with open(p, encoding="utf-8") as fh:
        first = fh.readline()
    header = 0 if first.split(",")[0].strip().strip('"') == "barcode" else None
    try:
        df = pd.read_csv(p, header=header)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise _error(p, f"cannot parse the positions file ({e})", "restore the file from Space Ranger's outs/spatial/") from e
    if df.shape[1] != 6:
        raise _error(p, f"expected 6 columns {_POS_COLUMNS}, found {df.shape[1]}", "restore the file from Space Ranger's outs/spatial/")
    df.columns = _POS_COLUMNS
    df["barcode"] = df["barcode"].astype(str)
    return df.set_index("barcode"), p


def _find_fullres(outs: Path) -> Path | None:
    """The full-resolution image next to an outs folder (``image.tif`` first), if exactly one is found."""
    for c in (outs.parent / "image.tif", outs / "image.tif"):
        if c.is_file():
            return c
    cands = sorted(
        q for d in (outs, outs.parent) for q in d.iterdir()
        if q.is_file() and q.suffix.lower() in _IMAGE_SUFFIXES and not q.name.startswith("tissue_")
    )
    if len(cands) == 1:
        return cands[0]
    if len(cands) > 1:
        log.warning("several candidate full-resolution images next to %s (%s); pass fullres_image=", outs, [c.name for c in cands])
    return None


def read_visium(
    path: str | Path, *, library_id: str | None = None, image: Literal["hires", "lowres", "full"] = "full",
    fullres_image: str | Path | None = None, count_file: str = "filtered_feature_bc_matrix.h5", load_images: bool = True,
) -> Any:
    """Read a Space Ranger ``outs`` folder into AnnData (scanpy/squidpy conventions, see module docs).

    ``image`` names the image hishrst cuts patches from: ``"full"`` (default) records the
    full-resolution image — ``fullres_image`` if given, else ``image.tif`` (or the single image file)
    next to ``outs/`` — in ``uns['hishrst']['fullres_image']`` (``None``, with a warning, if none is
    found); ``"hires"``/``"lowres"`` use Space Ranger's downscaled PNG (``fullres_image`` is then
    ``None`` and ``uns['hishrst']['image_scalef']`` maps full-resolution pixels to it). The spot pixel
    coordinates are checked against the chosen image's size. ``mpp`` (µm per full-resolution pixel)
    comes from the full-resolution image's metadata if present, else ``55 / spot_diameter_fullres``.
    ``spatial/ground_truth_layers.csv`` (``barcode,layer``), if present, becomes ``obs['layer']``.
    """
    if image not in ("hires", "lowres", "full"):
        raise ValueError(f"image must be 'hires', 'lowres' or 'full', got {image!r}")
    outs = Path(path)
    if outs.is_dir() and not (outs / count_file).exists() and (outs / "outs" / count_file).exists():
        outs = outs / "outs"
    if not outs.is_dir():
        raise _error(outs, "is not a directory", "pass Space Ranger's outs/ folder")
    if not (outs / count_file).is_file():
        raise _error(outs / count_file, "the filtered feature-barcode matrix is missing",
                     f"pass Space Ranger's outs/ folder, which contains {count_file} and spatial/")
    adata, attrs = _read_10x_h5(outs / count_file)
    spatial = outs / "spatial"
    pos, pos_path = _read_positions(spatial)
    missing = adata.obs_names.difference(pos.index)
    if len(missing):
        raise _error(pos_path, f"{len(missing)} of {adata.n_obs} matrix barcodes are missing from the positions file "
                     f"(e.g. {list(missing[:3])})", "use the spatial/ folder from the same Space Ranger run as the matrix")
    p = pos.loc[adata.obs_names]
    for col in ("in_tissue", "array_row", "array_col"):
        adata.obs[col] = p[col].to_numpy(np.int64)
    adata.obsm["spatial"] = p[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)

    sf_path = spatial / "scalefactors_json.json"
    if not sf_path.is_file():
        raise _error(sf_path, "the scale factors file is missing", "copy the whole spatial/ folder of Space Ranger's outs/")
    try:
        scalefactors = json.loads(sf_path.read_text())
        spot_d = float(scalefactors["spot_diameter_fullres"])
    except (ValueError, KeyError, TypeError) as e:
        raise _error(sf_path, f"unreadable or without spot_diameter_fullres ({e})", "restore it from Space Ranger's outs/spatial/") from e
    if library_id is None:
        lib = attrs.get("library_ids")
        library_id = (lib[0].decode() if isinstance(lib[0], bytes) else str(lib[0])) if lib is not None and len(lib) else outs.parent.name
    images: dict[str, np.ndarray] = {}
    for res in ("hires", "lowres"):
        ip = spatial / f"tissue_{res}_image.png"
        if ip.is_file() and (load_images or res == image):
            images[res] = np.asarray(open_fullres_image(ip)[:, :])
    tol = spot_d / 2.0
    meta: dict[str, Any] = {"image": image}
    mpp = mpp_spot = mpp_from_spot_diameter(spot_d)
    full = Path(fullres_image) if fullres_image is not None else (_find_fullres(outs) if image == "full" else None)
    if image == "full":
        if full is None:
            log.warning("%s: no full-resolution image found next to outs/; pass fullres_image=PATH", outs)
        else:
            if not full.is_file():
                raise _error(full, "the full-resolution image does not exist", "pass the path of the H&E image Space Ranger used")
            _check_bounds(adata.obsm["spatial"], _image_hw(full), full, tol_px=tol, what="full-resolution pixels")
            m = image_mpp(full)
            if m is not None:
                if abs(m / mpp_spot - 1) > 0.1:
                    log.warning("%s records %.4f µm/px but spot_diameter_fullres implies %.4f; using the image's value", full, m, mpp_spot)
                mpp = m
        meta["fullres_image"] = str(full) if full is not None else None
    else:
        key = f"tissue_{image}_scalef"
        ip = spatial / f"tissue_{image}_image.png"
        if image not in images or key not in scalefactors:
            raise _error(ip, f"the {image} image or its scale factor is missing", "use image='full' or copy Space Ranger's spatial/ folder")
        scalef = float(scalefactors[key])
        _check_bounds(adata.obsm["spatial"] * scalef, images[image].shape[:2], ip, tol_px=tol * scalef + 1, what=f"{image} pixels")
        meta.update(fullres_image=None, image_path=str(ip), image_scalef=scalef)
    meta["mpp"] = float(mpp)
    adata.uns["spatial"] = {library_id: {
        "images": images if load_images else {k: v for k, v in images.items() if k == image},
        "scalefactors": scalefactors,
        "metadata": {k: attrs[k] for k in ("chemistry_description", "software_version") if k in attrs}
        | {"source_image_path": str(full) if full is not None else None},
    }}
    adata.uns["hishrst"] = meta
    gt = spatial / "ground_truth_layers.csv"
    if gt.is_file():
        layers = pd.read_csv(gt)
        if {"barcode", "layer"} <= set(layers.columns):
            m = layers.set_index(layers["barcode"].astype(str))["layer"]
            adata.obs["layer"] = pd.Categorical(m.reindex(adata.obs_names).to_numpy())
        else:
            log.warning("%s: expected columns barcode,layer; ignored", gt)
    return adata


def read_h5ad_with_image(h5ad_path: str | Path, image_path: str | Path, *, mpp: float | None = None) -> Any:
    """Read an ``.h5ad`` whose ``obsm['spatial']`` holds full-resolution pixel (x, y) of ``image_path``.

    ``mpp`` (µm/px) defaults to the image's recorded pixel size, else ``55 / spot_diameter_fullres``
    from ``uns['spatial']``. Sets ``uns['hishrst'] = {"fullres_image": ..., "mpp": ..., "image": "full"}``.
    """
    import anndata as ad

    h5ad_path, image_path = Path(h5ad_path), Path(image_path)
    if not h5ad_path.is_file():
        raise _error(h5ad_path, "the .h5ad file does not exist", "check the path")
    try:
        adata = ad.read_h5ad(h5ad_path)
    except (OSError, KeyError, ValueError) as e:
        raise _error(h5ad_path, f"cannot read the .h5ad ({e})", "write it with anndata's write_h5ad") from e
    if "spatial" not in adata.obsm:
        raise _error(h5ad_path, "obsm['spatial'] (spot pixel coordinates) is missing",
                     "store full-resolution pixel (x, y) of each spot in adata.obsm['spatial']")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise _error(h5ad_path, f"obsm['spatial'] must be finite [n_obs, 2] pixel (x, y), got shape {xy.shape}", "fix the coordinates")
    if not image_path.is_file():
        raise _error(image_path, "the full-resolution image does not exist", "pass the H&E image the coordinates refer to")
    spot_d = None
    for lib in (adata.uns.get("spatial") or {}).values():
        if isinstance(lib, dict) and "spot_diameter_fullres" in lib.get("scalefactors", {}):
            spot_d = float(lib["scalefactors"]["spot_diameter_fullres"])
            break
    if mpp is None:
        mpp = image_mpp(image_path)
    if mpp is None and spot_d is not None:
        mpp = mpp_from_spot_diameter(spot_d)
    if mpp is None or not (np.isfinite(mpp) and mpp > 0):
        raise _error(image_path, "the pixel size (µm/px) is unknown: the image records none and the .h5ad has no spot_diameter_fullres",
                     "pass mpp= (e.g. 0.5 for a 20× scan)")
    tol = (spot_d / 2.0) if spot_d else 27.5 / float(mpp)
    _check_bounds(xy, _image_hw(image_path), image_path, tol_px=tol, what="obsm['spatial']")
    adata.obsm["spatial"] = xy
    adata.uns["hishrst"] = {"fullres_image": str(image_path), "mpp": float(mpp), "image": "full"}
    return adata
