"""HEST-1k samples: ``st/<id>.h5ad`` + ``wsis/<id>.tif`` + ``metadata/<id>.json``.

A HEST-1k download (Jaume et al., 2024) keeps each sample's pieces in sibling folders of one root::

    <root>/st/<id>.h5ad          spots × genes, raw counts; obsm['spatial'] = full-resolution pixel (x, y)
    <root>/wsis/<id>.tif         the whole-slide image those pixels refer to (pyramidal TIFF)
    <root>/metadata/<id>.json    sample metadata; the pixel size in µm/px under ``pixel_size_um_estimated``
                                 (preferred) or ``pixel_size_um_embedded``

A sample is addressed by its ``.h5ad`` path; :func:`hest_paths` finds the siblings. Spots with
``obs['in_tissue'] == 0`` (when the column exists) are dropped, as Space Ranger's filtered matrix does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.slides.formats import get_format
from hishrst_train.data.errors import _error, check_section_mpp
from hishrst_train.data.image import _check_bounds, _image_hw, image_mpp

__all__ = ["HEST_MPP_KEYS", "HestPaths", "hest_paths", "is_hest_sample", "read_hest"]

log = logging.getLogger("hishrst")

#: Metadata keys holding the full-resolution pixel size (µm/px), in order of preference.
HEST_MPP_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")
#: Whole-slide name endings HEST's ``wsis/`` may hold: the runtime's format registry (``tiff`` entry).
_WSI_SUFFIXES = get_format("tiff").suffixes
_SPOT_UM = 55.0  # Visium spot diameter (µm): the bounds-check tolerance is half of it


@dataclass(frozen=True)
class HestPaths:
    """The files of one HEST-1k sample (``wsi`` / ``metadata`` are None when absent)."""

    sample_id: str
    h5ad: Path
    wsi: Path | None
    metadata: Path | None


def is_hest_sample(h5ad: str | Path) -> bool:
    """Whether ``h5ad`` sits in a HEST-1k layout (``<root>/st/<id>.h5ad`` with ``wsis/`` or ``metadata/`` beside ``st/``)."""
    p = Path(h5ad)
    root = p.parent.parent
    return p.parent.name == "st" and ((root / "wsis").is_dir() or (root / "metadata").is_dir())


def hest_paths(h5ad: str | Path) -> HestPaths:
    """The sibling files of the HEST-1k sample whose expression is ``h5ad`` (``<root>/st/<id>.h5ad``)."""
    p = Path(h5ad)
    root, sid = p.parent.parent, p.stem
    wsi = next((root / "wsis" / f"{sid}{s}" for s in _WSI_SUFFIXES if (root / "wsis" / f"{sid}{s}").is_file()), None)
    meta = root / "metadata" / f"{sid}.json"
    return HestPaths(sample_id=sid, h5ad=p, wsi=wsi, metadata=meta if meta.is_file() else None)


def _metadata_mpp(meta: Path | None) -> tuple[float | None, str | None]:
    """The pixel size (µm/px) recorded in a HEST metadata file and the key it came from."""
    if meta is None:
        return None, None
    try:
        d = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _error(meta, f"cannot read the HEST metadata ({e})", "re-download metadata/<id>.json of this sample") from e
    if not isinstance(d, dict):
        raise _error(meta, "the HEST metadata is not a JSON object", "re-download metadata/<id>.json of this sample")
    for key in HEST_MPP_KEYS:
        if d.get(key) is None:
            continue
        v = check_section_mpp(d[key], where=meta, source=key, fix="fix the value (µm per full-resolution pixel) or "
                              "pass --mpp")
        return v, key
    return None, None


def _read_h5ad(path: Path) -> Any:
    from hishrst_train.data.visium import read_spatial_h5ad

    return read_spatial_h5ad(path, read_fix="re-download st/<id>.h5ad of this HEST sample",
                             spatial_fix="use HEST's st/<id>.h5ad, which stores full-resolution pixel (x, y) in "
                                         "obsm['spatial']")


def read_hest(h5ad: str | Path, *, image: str | Path | None = None, mpp: float | None = None) -> Any:
    """Read a HEST-1k sample (addressed by ``<root>/st/<id>.h5ad``) as AnnData with ``uns['hishrst']``.

    ``image`` replaces ``wsis/<id>.tif``; ``mpp`` (µm per full-resolution pixel) overrides the metadata's
    ``pixel_size_um_estimated`` / ``pixel_size_um_embedded`` (then the TIFF's own pixel size is tried).
    Spot coordinates (``obsm['spatial']``, full-resolution px) are checked against the image size.
    """
    paths = hest_paths(h5ad)
    if not paths.h5ad.is_file():
        raise _error(paths.h5ad, "the HEST expression file does not exist", "check the path (<root>/st/<id>.h5ad)")
    wsi = Path(image) if image is not None else paths.wsi
    if wsi is None or not wsi.is_file():
        raise _error(wsi or paths.h5ad.parent.parent / "wsis" / f"{paths.sample_id}.tif",
                     f"the whole-slide image of HEST sample {paths.sample_id!r} is missing",
                     f"download wsis/{paths.sample_id}.tif next to st/ (or write {paths.h5ad}:IMAGE)")
    source = "--mpp"
    if mpp is None:
        mpp, source = _metadata_mpp(paths.metadata)
    if mpp is None:
        mpp, source = image_mpp(wsi), "image"
    if mpp is None:
        raise _error(paths.metadata or wsi, "the pixel size (µm/px) is unknown: no pixel_size_um_estimated / "
                     "pixel_size_um_embedded in the metadata and none in the image", "pass --mpp (e.g. 0.5 for a 20× scan)")
    adata = _read_h5ad(paths.h5ad)
    if "in_tissue" in adata.obs:
        keep = adata.obs["in_tissue"].to_numpy() != 0
        if not keep.all():
            log.info("%s: dropping %d spots outside the tissue", paths.h5ad, int((~keep).sum()))
            adata = adata[keep].copy()
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise _error(paths.h5ad, f"obsm['spatial'] must be finite [n_obs, 2] pixel (x, y), got shape {xy.shape}",
                     "re-download the sample")
    _check_bounds(xy, _image_hw(wsi), wsi, tol_px=_SPOT_UM / 2 / float(mpp), what="obsm['spatial']")
    adata.obsm["spatial"] = xy
    adata.var_names_make_unique()
    adata.uns["hishrst"] = {"fullres_image": str(wsi), "mpp": float(mpp), "image": "full",
                            "hest_id": paths.sample_id, "mpp_source": source}
    return adata
