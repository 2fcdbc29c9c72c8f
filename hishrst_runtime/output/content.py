"""What goes into a new output store: query points, genes, ``uns`` and slide images, validated once, and
the store's skeleton (AnnData's layout, as :func:`anndata.io.write_elem` writes it, minus ``raw``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.files import fsync_path, temp_sibling
from hishrst_runtime.output import encoding
from hishrst_runtime.output.encoding import to_uns
from hishrst_runtime.output.layout import FORMAT_VERSION, PROGRESS_DIR, STATUS_ATTR

__all__ = ["SpatialImages", "StoreContent", "build_content", "write_skeleton", "default_obs_names",
           "DEFAULT_CHUNK_BYTES", "HIRES_MAX_SIDE"]

DEFAULT_CHUNK_BYTES = 4 << 20
#: Longest side (pixels) of the ``'hires'`` image derived from the lowres one (Space Ranger's hires size).
HIRES_MAX_SIDE = 2000


def default_obs_names(rows: Sequence[int] | np.ndarray) -> list[str]:
    """The names of numbered rows (``p0, p1, ...``), for the given 0-based row numbers."""
    return [f"p{int(i)}" for i in rows]


@dataclass(frozen=True)
class SpatialImages:
    """Slide thumbnail(s) and scale factors for ``uns['spatial'][library_id]`` (10x Visium layout).

    ``lowres_scalef`` / ``hires_scalef``: image pixels per level-0 pixel. ``spot_diameter_fullres``:
    the query-point diameter in level-0 pixels (what scanpy uses as spot size). Without ``hires`` the
    store still gets a ``'hires'`` image (format version 2): the lowres one, at most
    :data:`HIRES_MAX_SIDE` pixels on its longer side, so ``squidpy.pl.spatial_scatter`` works with defaults.
    """

    library_id: str
    lowres: np.ndarray
    lowres_scalef: float
    spot_diameter_fullres: float
    hires: np.ndarray | None = None
    hires_scalef: float | None = None

    def __post_init__(self) -> None:
        for name, img in (("lowres", self.lowres), ("hires", self.hires)):
            if img is not None and not (isinstance(img, np.ndarray) and img.dtype == np.uint8
                                        and img.ndim == 3 and img.shape[2] in (3, 4)):
                raise ValueError(f"SpatialImages.{name} must be a uint8 HxWx3 (RGB) or HxWx4 array, got "
                                 f"{getattr(img, 'dtype', type(img))} {getattr(img, 'shape', '')}")
        if (self.hires is None) != (self.hires_scalef is None):
            raise ValueError("SpatialImages: give hires and hires_scalef together, or neither")
        for name in ("lowres_scalef", "spot_diameter_fullres", "hires_scalef"):
            v = getattr(self, name)
            if v is not None and not (np.isfinite(v) and v > 0):
                raise ValueError(f"SpatialImages.{name} must be a positive number, got {v!r}")
        if not self.library_id or "/" in self.library_id:
            raise ValueError(f"SpatialImages.library_id must be a non-empty name without '/', got {self.library_id!r}")

    def hires_image(self) -> tuple[np.ndarray, float]:
        """(image, image pixels per level-0 pixel) stored as ``'hires'``: the given hires, else the lowres
        image itself — resized with Pillow to at most :data:`HIRES_MAX_SIDE` pixels when larger."""
        if self.hires is not None and self.hires_scalef is not None:
            return self.hires, float(self.hires_scalef)
        img, h, w = self.lowres, self.lowres.shape[0], self.lowres.shape[1]
        if max(h, w) <= HIRES_MAX_SIDE:
            return img, float(self.lowres_scalef)
        from PIL import Image

        f = HIRES_MAX_SIDE / max(h, w)
        ow, oh = max(1, round(w * f)), max(1, round(h * f))
        small = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((ow, oh), Image.BILINEAR))
        return small, float(self.lowres_scalef) * ow / w

    def to_uns(self) -> dict[str, Any]:
        """``{library_id: {images, scalefactors, metadata}}`` with both ``'lowres'`` and ``'hires'`` images
        (squidpy's and scanpy's default key is ``'hires'``; see :meth:`hires_image`)."""
        hires, hires_scalef = self.hires_image()
        scalefactors = {
            "tissue_lowres_scalef": float(self.lowres_scalef),
            "tissue_hires_scalef": hires_scalef,
            "spot_diameter_fullres": float(self.spot_diameter_fullres),
        }
        images = {"lowres": self.lowres, "hires": hires}
        return {self.library_id: {"images": images, "scalefactors": scalefactors, "metadata": {}}}


@dataclass(frozen=True)
class StoreContent:
    """The validated skeleton of a store: ``xy`` float64 [N, 2] level-0 px, ``grid`` int64 [N, 2],
    ``tissue_fraction`` float32 [N], ``genes`` (G names), ``uns`` (as stored), ``chunk_rows`` (X rows per chunk),
    ``obs_names`` (N unique row names; ``None``: ``p0, p1, ...``), ``extra_obs`` (more obs columns, N each),
    ``x_dtype`` (X's element type, a key of :data:`~hishrst_runtime.output.encoding.X_DTYPES`)."""

    xy: np.ndarray
    grid: np.ndarray
    tissue_fraction: np.ndarray
    genes: list[str]
    uns: dict[str, Any]
    chunk_rows: int
    obs_names: list[str] | None = None
    extra_obs: dict[str, np.ndarray] | None = None
    x_dtype: str = encoding.DEFAULT_X_DTYPE

    @property
    def n_obs(self) -> int:
        """Number of query points (rows of X)."""
        return int(self.xy.shape[0])


def _check_points(obs_xy_px: Any, grid_index: Any, tissue_fraction: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xy = np.asarray(obs_xy_px, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise ValueError(f"obs_xy_px must be a finite [N, 2] array of level-0 (x, y) pixels, got shape {xy.shape}")
    grid = np.asarray(grid_index)
    if grid.shape != xy.shape or (grid.size and grid.dtype.kind not in "iu"):
        raise ValueError(f"grid_index must be an integer [N, 2] array matching obs_xy_px {xy.shape}, "
                         f"got {grid.dtype} {grid.shape}")
    tf = np.asarray(tissue_fraction, dtype=np.float32)
    if tf.shape != (xy.shape[0],):
        raise ValueError(f"tissue_fraction must have shape ({xy.shape[0]},), got {tf.shape}")
    return xy, grid.astype(np.int64), tf


def _auto_chunk_rows(n_obs: int, n_vars: int) -> int:
    return int(max(1, min(max(n_obs, 1), DEFAULT_CHUNK_BYTES // (4 * max(n_vars, 1)))))


def build_content(
    *, obs_xy_px: Any, grid_index: Any, tissue_fraction: Any, genes: Sequence[str], uns: Mapping[str, Any],
    spatial: SpatialImages | None, chunk_rows: int | None, obs_names: Sequence[str] | None = None,
    extra_obs: Mapping[str, Any] | None = None, x_dtype: str = encoding.DEFAULT_X_DTYPE,
) -> StoreContent:
    """Validate a new store's content (see :meth:`OutputStore.create`); raises ValueError naming the argument."""
    xy, grid, tf = _check_points(obs_xy_px, grid_index, tissue_fraction)
    gene_list = [str(g) for g in genes]
    if not gene_list or len(set(gene_list)) != len(gene_list):
        raise ValueError(f"genes must be a non-empty list of unique names (got {len(gene_list)}, "
                         f"{len(gene_list) - len(set(gene_list))} duplicates)")
    rows = _auto_chunk_rows(xy.shape[0], len(gene_list)) if chunk_rows is None else int(chunk_rows)
    if rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    uns_dict = to_uns(dict(uns), "uns")
    if spatial is not None:
        if "spatial" in uns_dict:
            raise ValueError("give the slide images either as spatial= or as uns['spatial'], not both")
        uns_dict["spatial"] = spatial.to_uns()
    names = None if obs_names is None else [str(n) for n in obs_names]
    if names is not None and (len(names) != xy.shape[0] or len(set(names)) != len(names)):
        raise ValueError(f"obs_names must be {xy.shape[0]} unique names, one per point (got {len(names)}, "
                         f"{len(names) - len(set(names))} duplicates)")
    extra = {str(k): np.asarray(v) for k, v in (extra_obs or {}).items()}
    bad = [k for k, v in extra.items() if v.shape != (xy.shape[0],) or v.dtype.kind not in "biuf"
           or k in ("grid_row", "grid_col", "tissue_fraction")]
    if bad:
        raise ValueError(f"extra_obs columns {bad} must be new numeric or boolean columns of {xy.shape[0]} values")
    if x_dtype not in encoding.X_DTYPES:
        raise ValueError(f"x_dtype must be one of {', '.join(encoding.X_DTYPES)}, got {x_dtype!r}")
    return StoreContent(xy, grid, tf, gene_list, uns_dict, rows, names, extra or None, x_dtype)


def write_skeleton(work: Path, content: StoreContent, *, fsync: bool) -> None:
    """Create the new store ``work`` (``OUT.zarr.partial``) holding ``content`` and an empty X, marked
    incomplete: assembled in a hidden temporary sibling and renamed, so ``work`` is whole or absent."""
    tmp = temp_sibling(work, "tmp")
    try:
        encoding.write_group(tmp, {"encoding-type": "anndata", "encoding-version": "0.1.0",
                                   STATUS_ATTR: "incomplete", "hishrst_format_version": FORMAT_VERSION})
        names = content.obs_names or default_obs_names(range(content.n_obs))
        index = np.array(names, dtype=object)
        encoding.write_dataframe(tmp / "obs", index, {"grid_row": content.grid[:, 0], "grid_col": content.grid[:, 1],
                                                      "tissue_fraction": content.tissue_fraction,
                                                      **(content.extra_obs or {})})
        encoding.write_dataframe(tmp / "var", np.array(content.genes, dtype=object), {})
        for name in ("layers", "obsm", "obsp", "uns", "varm", "varp"):
            encoding.write_group(tmp / name, encoding.DICT_ATTRS)
        encoding.write_array(tmp / "obsm" / "spatial", content.xy, encoding.ARRAY_ATTRS)
        for key, value in content.uns.items():
            encoding.write_uns(tmp / "uns", key, value)
        encoding.write_x_metadata(tmp / "X", content.n_obs, len(content.genes), content.chunk_rows, content.x_dtype)
        (tmp / PROGRESS_DIR).mkdir()
        os.rename(tmp, work)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fsync:
        fsync_path(work.parent, directory=True)
