"""What a finished slide leaves besides its AnnData store: ``--format`` and the tissue GeoJSON.

Per slide output ``OUT/S.zarr``:

- ``--format anndata`` (default): ``OUT/S.zarr`` only.
- ``--format both``: also ``OUT/S.sdata.zarr``, a SpatialData store built from the complete AnnData store
  (:func:`hishrst_runtime.output.write_spatialdata`, with the slide's low-resolution levels as the image).
- ``--format spatialdata``: ``OUT/S.sdata.zarr`` only: the AnnData store is the crash-safe work product it
  is built from, and is removed once the SpatialData store is complete. A slide whose SpatialData store is
  complete counts as done (skipped without ``--overwrite``).

A slide found complete whose SpatialData store is missing or stale (a run killed in between) gets it
built without recomputing anything. ``OUT/S.tissue.geojson`` (:func:`write_tissue_geojson`) is the
tissue mask the run used, as QuPath-readable polygons in level-0 pixels; an existing one that hishrst did
not write (:func:`foreign_tissue_geojson`) is never replaced.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.files import remove_tree
from hishrst_runtime.output.errors import OutputExistsError
from hishrst_runtime.output.spatialdata_store import spatialdata_path, spatialdata_status, write_spatialdata
from hishrst_runtime.output.store import OutputStore

__all__ = ["tissue_geojson_path", "foreign_tissue_geojson", "write_tissue_geojson", "is_done", "formats_pending",
           "finish_formats", "spatialdata_path"]


def tissue_geojson_path(out: Path) -> Path:
    """``OUT/S.zarr`` -> ``OUT/S.tissue.geojson``."""
    name = out.name[: -len(".zarr")] if out.name.endswith(".zarr") else out.name
    return out.with_name(f"{name}.tissue.geojson")


def foreign_tissue_geojson(out: Path, given: Path | None = None) -> str | None:
    """The one-line reason ``OUT/S.tissue.geojson`` must not be written: it exists and hishrst did not write
    it (no ``"generator": "hishrst"`` property), else None (also when it is the mask file ``given``)."""
    from hishrst_runtime.slides.masks import written_by_hishrst

    path = tissue_geojson_path(out)
    if given is not None and Path(given).resolve() == path.resolve():
        return None
    if not os.path.lexists(path) or (path.is_file() and written_by_hishrst(path)):
        return None
    return (f"{path}: exists and was not written by hishrst-run (no \"generator\": \"hishrst\" property); it is "
            "left as it is: move it away or choose another --out")


def write_tissue_geojson(out: Path, mask: np.ndarray, *, shape0: tuple[int, int],
                         given: Path | None = None) -> Path | None:
    """Write the boolean overview ``mask`` over a level-0 ``shape0`` = (H, W) pixel slide as
    ``OUT/S.tissue.geojson`` (level-0 pixel polygons, atomically); returns the path, or None when the
    path is the mask file ``given`` by the user (never overwritten). Raises :class:`OutputExistsError`
    when the file exists but hishrst did not write it (:func:`foreign_tissue_geojson`)."""
    from hishrst_runtime.slides.masks import write_mask_geojson

    path = tissue_geojson_path(out)
    if given is not None and Path(given).resolve() == path.resolve():
        return None
    foreign = foreign_tissue_geojson(out, given)
    if foreign is not None:
        raise OutputExistsError(foreign)
    h, w = mask.shape[:2]
    return write_mask_geojson(mask, path, scale_px=(shape0[0] / h, shape0[1] / w))


def is_done(out: Path, output_format: str) -> bool:
    """Whether the slide of output ``out`` needs no computing: its AnnData store is complete, or (format
    ``spatialdata``) its SpatialData store is."""
    if output_format == "spatialdata" and spatialdata_status(spatialdata_path(out)) == "complete":
        return True
    return OutputStore.status(out) == "complete"


def formats_pending(out: Path, output_format: str) -> bool:
    """Whether :func:`finish_formats` (without ``replace``) would write or remove anything for ``out``."""
    if output_format == "anndata" or OutputStore.status(out) != "complete":
        return False
    return output_format == "spatialdata" or spatialdata_status(spatialdata_path(out), source=out) != "complete"


def finish_formats(out: Path, output_format: str, *, levels: Any = None, replace: bool = False) -> list[str]:
    """Build what ``output_format`` asks for from the complete AnnData store ``out`` (see the module
    docstring); ``levels``: the open slide's pyramid for the SpatialData image (None: the store's
    overview); ``replace``: rebuild a complete SpatialData store. Returns notes on what was done."""
    if output_format == "anndata":
        return []
    sdata = spatialdata_path(out)
    notes = []
    if OutputStore.status(out) == "complete":
        state = spatialdata_status(sdata, source=out)
        if state != "complete" or replace:
            write_spatialdata(out, sdata, levels=levels, replace=state != "missing")
            notes.append(f"wrote {sdata.name}")
        if output_format == "spatialdata":
            remove_tree(out)
            notes.append(f"removed {out.name} (--format spatialdata)")
    return notes
