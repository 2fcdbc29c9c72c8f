"""Space Ranger ``outs`` folders and ``.h5ad`` + image sections as AnnData."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from hishrst_runtime.core.geometry import mpp_from_spot_diameter


from hishrst_runtime.core.spaceranger import find_spot_table, read_spot_table
from hishrst_train.data.errors import _error, check_section_mpp

__all__ = ['read_visium', 'read_h5ad_with_image']

log = logging.getLogger("hishrst")

from hishrst_train.data.image import _IMAGE_SUFFIXES, _check_bounds, _image_hw, image_mpp, open_fullres_image
from hishrst_train.data.tenx import _read_10x_h5


# ---------------------------------------------------------------------------------------------------
# Space Ranger outs
# ---------------------------------------------------------------------------------------------------


def _read_positions(spatial: Path) -> tuple[pd.DataFrame, Path]:
    """The spot table as a frame indexed by barcode (the one parser: :mod:`hishrst_runtime.core.spaceranger`)."""
    p = find_spot_table(spatial)
    if p is None:
        raise _error(spatial, "no tissue_positions.csv (Space Ranger ≥ 2.0) or tissue_positions_list.csv found",
                     "copy the whole spatial/ folder of Space Ranger's outs/")
    t = read_spot_table(p)
    df = pd.DataFrame({"in_tissue": t.in_tissue.astype(np.int64), "array_row": t.array_rc[:, 0].astype(np.int64),
                       "array_col": t.array_rc[:, 1].astype(np.int64), "pxl_row_in_fullres": t.xy_px[:, 1],
                       "pxl_col_in_fullres": t.xy_px[:, 0]}, index=pd.Index(t.barcodes.astype(str), name="barcode"))
    return df, p


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
    mpp: float | None = None,
) -> Any:
    """Read a Space Ranger ``outs`` folder into AnnData (scanpy/squidpy conventions, see module docs).

    ``image`` names the image hishrst cuts patches from: ``"full"`` (default) records the
    full-resolution image — ``fullres_image`` if given, else ``image.tif`` (or the single image file)
    next to ``outs/`` — in ``uns['hishrst']['fullres_image']`` (``None``, with a warning, if none is
    found); ``"hires"``/``"lowres"`` use Space Ranger's downscaled PNG (``fullres_image`` is then
    ``None`` and ``uns['hishrst']['image_scalef']`` maps full-resolution pixels to it). The spot pixel
    coordinates are checked against the chosen image's size. ``mpp`` (µm per full-resolution pixel)
    comes from the full-resolution image's metadata if present, else ``55 / spot_diameter_fullres``; an
    ``mpp`` argument (``--mpp``) replaces both. Every pixel size must be plausible (0.05–50 µm/px, see
    :func:`hishrst_runtime.core.units.check_mpp`).
    ``spatial/ground_truth_layers.csv`` (``barcode,layer``), if present, becomes ``obs['layer']``.
    """
    if image not in ("hires", "lowres", "full"):
        raise ValueError(f"image must be 'hires', 'lowres' or 'full', got {image!r}")
    outs = _resolve_outs(Path(path), count_file)
    adata, attrs = _read_10x_h5(outs / count_file)
    spatial = outs / "spatial"
    _attach_positions(adata, spatial)
    sf_path, scalefactors, spot_d = _read_scalefactors(spatial)
    if library_id is None:
        lib = attrs.get("library_ids")
        library_id = (lib[0].decode() if isinstance(lib[0], bytes) else str(lib[0])) if lib is not None and len(lib) else outs.parent.name
    images = {res: np.asarray(open_fullres_image(ip)[:, :]) for res in ("hires", "lowres")
              if (ip := spatial / f"tissue_{res}_image.png").is_file() and (load_images or res == image)}
    full = Path(fullres_image) if fullres_image is not None else (_find_fullres(outs) if image == "full" else None)
    meta, image_mpp_value = _image_meta(adata, outs, spatial, image=image, full=full, images=images,
                                        scalefactors=scalefactors, spot_d=spot_d)
    meta["mpp"] = _section_mpp(mpp, image_mpp_value, outs=outs, full=full, sf_path=sf_path, spot_d=spot_d)
    adata.uns["spatial"] = {library_id: {
        "images": images if load_images else {k: v for k, v in images.items() if k == image},
        "scalefactors": scalefactors,
        "metadata": {k: attrs[k] for k in ("chemistry_description", "software_version") if k in attrs}
        | {"source_image_path": str(full) if full is not None else None},
    }}
    adata.uns["hishrst"] = meta
    _attach_layers(adata, spatial / "ground_truth_layers.csv")
    return adata


def _resolve_outs(outs: Path, count_file: str) -> Path:
    """The ``outs`` folder holding ``count_file`` (the folder above it is accepted too)."""
    if outs.is_dir() and not (outs / count_file).exists() and (outs / "outs" / count_file).exists():
        outs = outs / "outs"
    if not outs.is_dir():
        raise _error(outs, "is not a directory", "pass Space Ranger's outs/ folder")
    if not (outs / count_file).is_file():
        raise _error(outs / count_file, "the filtered feature-barcode matrix is missing",
                     f"pass Space Ranger's outs/ folder, which contains {count_file} and spatial/")
    return outs


def _attach_positions(adata: Any, spatial: Path) -> None:
    """``obs`` in_tissue / array_row / array_col and ``obsm['spatial']`` (full-resolution px) from the positions file."""
    pos, pos_path = _read_positions(spatial)
    missing = adata.obs_names.difference(pos.index)
    if len(missing):
        raise _error(pos_path, f"{len(missing)} of {adata.n_obs} matrix barcodes are missing from the positions file "
                     f"(e.g. {list(missing[:3])})", "use the spatial/ folder from the same Space Ranger run as the matrix")
    p = pos.loc[adata.obs_names]
    for col in ("in_tissue", "array_row", "array_col"):
        adata.obs[col] = p[col].to_numpy(np.int64)
    adata.obsm["spatial"] = p[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)


def _read_scalefactors(spatial: Path) -> tuple[Path, dict[str, Any], float]:
    """``(path, scale factors, spot_diameter_fullres in px)`` of ``spatial/scalefactors_json.json``."""
    sf_path = spatial / "scalefactors_json.json"
    if not sf_path.is_file():
        raise _error(sf_path, "the scale factors file is missing", "copy the whole spatial/ folder of Space Ranger's outs/")
    try:
        scalefactors = json.loads(sf_path.read_text())
        spot_d = float(scalefactors["spot_diameter_fullres"])
    except (ValueError, KeyError, TypeError) as e:
        raise _error(sf_path, f"unreadable or without spot_diameter_fullres ({e})", "restore it from Space Ranger's outs/spatial/") from e
    return sf_path, scalefactors, spot_d


def _image_meta(adata: Any, outs: Path, spatial: Path, *, image: str, full: Path | None, images: dict[str, np.ndarray],
                scalefactors: dict[str, Any], spot_d: float) -> tuple[dict[str, Any], float | None]:
    """``uns['hishrst']`` image fields with the spots checked against the chosen image, and the full-resolution
    image's recorded µm/px (None when it records none or another image is used)."""
    tol = spot_d / 2.0
    meta: dict[str, Any] = {"image": image}
    if image != "full":
        key = f"tissue_{image}_scalef"
        ip = spatial / f"tissue_{image}_image.png"
        if image not in images or key not in scalefactors:
            raise _error(ip, f"the {image} image or its scale factor is missing", "use image='full' or copy Space Ranger's spatial/ folder")
        scalef = float(scalefactors[key])
        _check_bounds(adata.obsm["spatial"] * scalef, images[image].shape[:2], ip, tol_px=tol * scalef + 1, what=f"{image} pixels")
        meta.update(fullres_image=None, image_path=str(ip), image_scalef=scalef)
        return meta, None
    meta["fullres_image"] = str(full) if full is not None else None
    if full is None:
        log.warning("%s: no full-resolution image found next to outs/; pass fullres_image=PATH", outs)
        return meta, None
    if not full.is_file():
        raise _error(full, "the full-resolution image does not exist", "pass the path of the H&E image Space Ranger used")
    _check_bounds(adata.obsm["spatial"], _image_hw(full), full, tol_px=tol, what="full-resolution pixels")
    return meta, image_mpp(full)


def _section_mpp(override: float | None, from_image: float | None, *, outs: Path, full: Path | None, sf_path: Path,
                 spot_d: float) -> float:
    """µm/px of the section: ``--mpp``, else the full-resolution image's own value, else 55 µm / spot diameter."""
    mpp_spot = mpp_from_spot_diameter(spot_d)
    if from_image is not None and abs(from_image / mpp_spot - 1) > 0.1:
        log.warning("%s records %.4f µm/px but spot_diameter_fullres implies %.4f; using the image's value", full,
                    from_image, mpp_spot)
    if override is not None:
        return check_section_mpp(override, where=outs, source="--mpp")
    if from_image is not None and from_image != mpp_spot:
        return check_section_mpp(from_image, where=full, source="the image's pixel size")
    return check_section_mpp(mpp_spot, where=sf_path,
                             source=f"the pixel size implied by spot_diameter_fullres={spot_d:g}")


def _attach_layers(adata: Any, gt: Path) -> None:
    """``obs['layer']`` from ``spatial/ground_truth_layers.csv`` (``barcode,layer``), when present."""
    if not gt.is_file():
        return
    layers = pd.read_csv(gt)
    if {"barcode", "layer"} <= set(layers.columns):
        m = layers.set_index(layers["barcode"].astype(str))["layer"]
        adata.obs["layer"] = pd.Categorical(m.reindex(adata.obs_names).to_numpy())
    else:
        log.warning("%s: expected columns barcode,layer; ignored", gt)


def read_spatial_h5ad(path: Path, *, read_fix: str, spatial_fix: str) -> Any:
    """An ``.h5ad`` that must hold ``obsm['spatial']``; errors name ``path`` and the given fix."""
    import anndata as ad

    try:
        adata = ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as e:
        raise _error(path, f"cannot read the .h5ad ({e})", read_fix) from e
    if "spatial" not in adata.obsm:
        raise _error(path, "obsm['spatial'] (spot pixel coordinates) is missing", spatial_fix)
    return adata


def read_h5ad_with_image(h5ad_path: str | Path, image_path: str | Path, *, mpp: float | None = None) -> Any:
    """Read an ``.h5ad`` whose ``obsm['spatial']`` holds full-resolution pixel (x, y) of ``image_path``.

    ``mpp`` (µm/px) defaults to the image's recorded pixel size, else ``55 / spot_diameter_fullres``
    from ``uns['spatial']``. Sets ``uns['hishrst'] = {"fullres_image": ..., "mpp": ..., "image": "full"}``.
    """

    h5ad_path, image_path = Path(h5ad_path), Path(image_path)
    if not h5ad_path.is_file():
        raise _error(h5ad_path, "the .h5ad file does not exist", "check the path")
    adata = read_spatial_h5ad(h5ad_path, read_fix="write it with anndata's write_h5ad",
                              spatial_fix="store full-resolution pixel (x, y) of each spot in adata.obsm['spatial']")
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
    if mpp is None:
        raise _error(image_path, "the pixel size (µm/px) is unknown: the image records none and the .h5ad has no spot_diameter_fullres",
                     "pass mpp= (e.g. 0.5 for a 20× scan)")
    mpp = check_section_mpp(mpp, where=h5ad_path, source="the pixel size")
    tol = (spot_d / 2.0) if spot_d else 27.5 / float(mpp)
    _check_bounds(xy, _image_hw(image_path), image_path, tol_px=tol, what="obsm['spatial']")
    adata.obsm["spatial"] = xy
    adata.uns["hishrst"] = {"fullres_image": str(image_path), "mpp": float(mpp), "image": "full"}
    return adata

