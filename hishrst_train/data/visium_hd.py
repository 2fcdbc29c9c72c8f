"""Space Ranger 3 Visium HD binned outputs (``outs/binned_outputs/square_XXXum/``) as AnnData.

A bin size folder holds ``filtered_feature_bc_matrix.h5`` (10x HDF5, the in-tissue bins),
``spatial/tissue_positions.parquet`` (barcode, in_tissue, array_row, array_col, pxl_row_in_fullres,
pxl_col_in_fullres: full-resolution pixels of each bin's centre), ``spatial/scalefactors_json.json``
(``spot_diameter_fullres`` = bin side in px, ``bin_size_um``, ``microns_per_pixel``, image scale factors)
and the hires / lowres PNGs. Bins follow the Visium conventions of :mod:`hishrst_train.data` (``X`` raw
counts, ``obsm['spatial']`` (x, y) px, ``obs`` ``in_tissue`` / ``array_row`` / ``array_col`` — here the
bin lattice indices); ``uns['hishrst']`` adds ``platform`` and ``bin_size_um``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.extras import MissingExtraError
from hishrst_runtime.core.vocab import Platform
from hishrst_train.data.errors import DataError, _error, check_section_mpp

__all__ = ["BINNED_OUTPUTS", "DEFAULT_HD_BIN_UM", "HD_PLATFORM", "check_hd_bin_size", "find_square_dir", "hd_outs_dir",
           "is_visium_hd", "read_visium_hd", "square_dir_name",
           "square_size_um"]

#: Folder of the binned outputs inside Space Ranger 3's ``outs/``.
BINNED_OUTPUTS = "binned_outputs"
#: Bin side read unless another is asked for (µm): 16 µm bins hold enough UMIs to train on.
DEFAULT_HD_BIN_UM = 16.0
#: The platform name recorded in ``uns['hishrst']['platform']``.
HD_PLATFORM: Platform = "visium-hd"
_SQUARE = re.compile(r"^square_(\d{3})um$")
_COUNT_FILE = "filtered_feature_bc_matrix.h5"
_POSITIONS = "tissue_positions.parquet"
_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")


def square_size_um(path: str | Path) -> float | None:
    """The bin side (µm) of a ``square_XXXum`` folder's name; ``None`` for any other name."""
    m = _SQUARE.match(Path(path).name)
    return float(m.group(1)) if m else None


def _binned_dir(path: Path) -> Path | None:
    """The ``binned_outputs`` folder that ``path`` (it, ``outs/`` or the folder above ``outs/``) names."""
    for cand in (path, path / BINNED_OUTPUTS, path / "outs" / BINNED_OUTPUTS):
        if cand.name == BINNED_OUTPUTS and cand.is_dir():
            return cand
    return None


def is_visium_hd(path: str | Path) -> bool:
    """Whether ``path`` is a Visium HD output: a ``square_XXXum`` folder, ``binned_outputs/``, or an ``outs``
    folder (or the folder above it) holding ``binned_outputs/``."""
    p = Path(path)
    return p.is_dir() and (square_size_um(p) is not None or _binned_dir(p) is not None)


def find_square_dir(path: str | Path, *, bin_size_um: float | None = None) -> Path:
    """The ``square_XXXum`` folder of ``bin_size_um`` (µm; default :data:`DEFAULT_HD_BIN_UM`, or the size of a
    ``square_XXXum`` folder given directly); a :class:`DataError` names the bin sizes present when it is missing."""
    p = Path(path)
    own = square_size_um(p)
    if own is not None and p.is_dir():
        if bin_size_um is not None and float(bin_size_um) != own:
            raise _error(p, f"holds {own:g} µm bins, but {float(bin_size_um):g} µm bins were asked for",
                         f"pass the {square_dir_name(float(bin_size_um))} folder or its binned_outputs/")
        return p
    binned = _binned_dir(p)
    if binned is None:
        raise _error(p, f"not a Visium HD output (no {BINNED_OUTPUTS}/ folder)",
                     f"pass Space Ranger 3's outs/, outs/{BINNED_OUTPUTS}/ or one of its square_XXXum folders")
    size = DEFAULT_HD_BIN_UM if bin_size_um is None else float(bin_size_um)
    if not (np.isfinite(size) and size > 0 and size == round(size)):
        raise _error(p, f"bin size {bin_size_um!r} µm is not a whole positive number of µm", "pass 8 or 16")
    square = binned / square_dir_name(size)
    if not square.is_dir():
        present = sorted(q.name for q in binned.iterdir() if q.is_dir() and square_size_um(q) is not None)
        raise _error(binned, f"has no {size:g} µm bins ({square.name}/ is missing; present: {present or 'none'})",
                     "choose a bin size that Space Ranger wrote (e.g. @16um / bin_size_um=16)")
    return square


def square_dir_name(size_um: float) -> str:
    """``square_008um`` for 8 µm: Space Ranger 3's folder of one bin size."""
    return f"square_{int(round(float(size_um))):03d}um"


def hd_outs_dir(square: Path) -> Path:
    """The ``outs`` folder above a ``square_XXXum`` folder (``square/../..``)."""
    return square.parent.parent


def _read_positions(path: Path) -> Any:
    """The bin table as a frame indexed by barcode; a missing parquet engine names the package to install."""
    import pandas as pd

    if not path.is_file():
        raise _error(path, "the bin positions file is missing", "copy the whole spatial/ folder of the bin size")
    try:
        df = pd.read_parquet(path)
    except ImportError as e:
        raise MissingExtraError(f"{path}: reading Visium HD bin positions needs a parquet engine, which is not "
                                f"installed ({e}); pip install pyarrow") from e
    except (OSError, ValueError) as e:
        raise _error(path, f"not a readable parquet file ({e})", "restore it from Space Ranger's binned_outputs/") from e
    missing = [c for c in _COLUMNS if c not in df.columns]
    if missing:
        raise _error(path, f"columns {missing} are missing (found {list(df.columns)})",
                     f"pass Space Ranger 3's tissue_positions.parquet with columns {', '.join(_COLUMNS)}")
    return df.set_index(df["barcode"].astype(str))


def _scalefactors(path: Path) -> dict[str, Any]:
    try:
        sf = json.loads(path.read_text())
        float(sf["spot_diameter_fullres"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _error(path, f"missing, unreadable or without spot_diameter_fullres ({e})",
                     "restore scalefactors_json.json from Space Ranger's binned_outputs/") from e
    return sf


def _bin_mpp(sf: dict[str, Any], size_um: float, *, override: float | None, image_value: float | None,
             where: Path) -> float:
    """µm/px: ``--mpp``, else ``microns_per_pixel``, else the image's own, else bin side µm / bin side px."""
    if override is not None:
        return check_section_mpp(override, where=where, source="--mpp")
    if sf.get("microns_per_pixel") is not None:
        return check_section_mpp(sf["microns_per_pixel"], where=where, source="microns_per_pixel")
    if image_value is not None:
        return check_section_mpp(image_value, where=where, source="the image's pixel size")
    return check_section_mpp(size_um / float(sf["spot_diameter_fullres"]), where=where,
                             source=f"bin_size_um / spot_diameter_fullres ({size_um:g} µm bins)")


def read_visium_hd(path: str | Path, *, bin_size_um: float | None = None, fullres_image: str | Path | None = None,
                   mpp: float | None = None, library_id: str | None = None, load_images: bool = True) -> Any:
    """Read one bin size of a Space Ranger 3 Visium HD output into AnnData (in-tissue bins of the filtered matrix).

    ``path``: ``outs/`` (or the folder above it), ``outs/binned_outputs/`` or a ``square_XXXum`` folder.
    ``bin_size_um``: 8 or 16 (µm; default 16, or the size of a ``square_XXXum`` folder given directly).
    ``obs``: ``in_tissue``, ``array_row``, ``array_col`` (bin lattice), ``layer`` when
    ``spatial/ground_truth_layers.csv`` exists; ``obsm['spatial']``: bin centres (x, y) in full-resolution px;
    ``uns['spatial'][library_id]``: hires / lowres images and scale factors (squidpy layout);
    ``uns['hishrst']``: ``platform`` (``visium-hd``), ``bin_size_um``, ``mpp`` (µm/px: ``mpp`` if given, else
    ``microns_per_pixel``), ``fullres_image`` (``fullres_image`` or ``image.tif`` next to ``outs/``), ``image``.
    """
    from hishrst_train.data.image import _check_bounds, _image_hw, image_mpp, open_fullres_image
    from hishrst_train.data.tenx import _read_10x_h5
    from hishrst_train.data.visium import _attach_layers, _find_fullres

    square = find_square_dir(path, bin_size_um=bin_size_um)
    size = float(square_size_um(square) or DEFAULT_HD_BIN_UM)
    adata, attrs = _read_10x_h5(square / _COUNT_FILE)
    spatial = square / "spatial"
    pos = _read_positions(spatial / _POSITIONS)
    missing = adata.obs_names.difference(pos.index)
    if len(missing):
        raise _error(spatial / _POSITIONS, f"{len(missing)} of {adata.n_obs} matrix barcodes are missing from the "
                     f"bin positions (e.g. {list(missing[:3])})", "use the spatial/ folder of the same bin size and run")
    p = pos.loc[adata.obs_names]
    for col in ("in_tissue", "array_row", "array_col"):
        adata.obs[col] = p[col].to_numpy(np.int64)
    adata.obsm["spatial"] = p[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    sf = _scalefactors(spatial / "scalefactors_json.json")
    outs = hd_outs_dir(square)
    full = Path(fullres_image) if fullres_image is not None else _find_fullres(outs)
    if full is not None and not full.is_file():
        raise _error(full, "the full-resolution image does not exist", "pass the H&E image Space Ranger used")
    if full is not None:
        _check_bounds(adata.obsm["spatial"], _image_hw(full), full, tol_px=float(sf["spot_diameter_fullres"]),
                      what="bin centres, full-resolution pixels")
    mpp_um = _bin_mpp(sf, size, override=mpp, image_value=image_mpp(full) if full is not None else None,
                      where=spatial / "scalefactors_json.json")
    images = {res: np.asarray(open_fullres_image(ip)[:, :]) for res in ("hires", "lowres") if load_images
              and (ip := spatial / f"tissue_{res}_image.png").is_file()}
    lib = attrs.get("library_ids")
    library_id = library_id or ((lib[0].decode() if isinstance(lib[0], bytes) else str(lib[0]))
                                if lib is not None and len(lib) else outs.parent.name)
    adata.uns["spatial"] = {library_id: {"images": images, "scalefactors": sf, "metadata": {
        k: attrs[k] for k in ("chemistry_description", "software_version") if k in attrs}}}
    adata.uns["hishrst"] = {"platform": HD_PLATFORM, "bin_size_um": size, "mpp": mpp_um, "image": "full",
                            "fullres_image": str(full) if full is not None else None}
    _attach_layers(adata, spatial / "ground_truth_layers.csv")
    return adata


def check_hd_bin_size(text: str, *, where: str | Path) -> float:
    """``8um`` / ``16um`` (a :data:`~hishrst_runtime.core.vocab.RESOLUTIONS` value) → µm; else a :class:`DataError`."""
    from hishrst_runtime.core.vocab import RESOLUTIONS

    if text not in RESOLUTIONS:
        raise DataError(f"{where}: bin size @{text} is not one of {['@' + r for r in RESOLUTIONS]}; write e.g. outs@16um")
    return float(text[:-2])
