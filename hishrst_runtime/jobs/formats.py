"""What a finished slide leaves: the output formats (``--format``, one registry entry each) and the tissue
GeoJSON.

Every format is built from the slide's crash-safe AnnData store ``OUT/S.zarr`` (the work product), once it
is complete; :data:`OUTPUT_FORMATS` holds one :class:`OutputFormat` per ``--format`` name, so adding a
format is one entry (its path among :class:`~hishrst_runtime.output.names.SlideOutputs`, its is-done check,
its writer and its optional extra):

- ``anndata`` (default): ``OUT/S.zarr`` itself.
- ``spatialdata``: ``OUT/S.sdata.zarr``, a SpatialData store built from the complete AnnData store
  (:func:`hishrst_runtime.output.write_spatialdata`, with the slide's low-resolution levels as the image;
  extra ``spatialdata``).
- ``h5ad``: ``OUT/S.h5ad``, an AnnData copy in one file (never written over a file hishrst did not write).

``--format`` takes a comma-separated set (``anndata,spatialdata,h5ad``; ``both`` is ``anndata,spatialdata``).
Without ``anndata`` the AnnData store is removed once the others are complete, and a slide whose requested
outputs are all complete counts as done (skipped without ``--overwrite``). A slide found complete whose
other outputs are missing or stale (a run killed in between) gets them built without recomputing anything.
``OUT/S.tissue.geojson`` (:func:`write_tissue_geojson`) is the tissue mask the run used, as QuPath-readable
polygons in level-0 pixels; an existing one that hishrst did not write (:func:`foreign_tissue_geojson`) is
never replaced.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.files import remove_tree
from hishrst_runtime.output.errors import OutputExistsError
from hishrst_runtime.output.h5ad import foreign_h5ad, h5ad_written_by_hishrst
from hishrst_runtime.output.names import SlideOutputs
from hishrst_runtime.output.spatialdata_store import require_spatialdata, spatialdata_status, write_spatialdata
from hishrst_runtime.output.store import OutputStore, write_h5ad

__all__ = ["OutputFormat", "OUTPUT_FORMATS", "FORMAT_ALIASES", "DEFAULT_FORMATS", "format_names", "parse_formats",
           "require_formats", "foreign_format_output", "is_done", "formats_pending", "finish_formats",
           "foreign_tissue_geojson", "write_tissue_geojson"]


def _store_complete(outs: SlideOutputs) -> bool:
    return OutputStore.status(outs.store) == "complete"


def _write_spatialdata(outs: SlideOutputs, levels: Any, replace: bool) -> str | None:
    state = spatialdata_status(outs.spatialdata, source=outs.store)
    if state == "complete" and not replace:
        return None
    write_spatialdata(outs.store, outs.spatialdata, levels=levels, replace=state != "missing")
    return f"wrote {outs.spatialdata.name}"


def _h5ad_done(outs: SlideOutputs) -> bool:
    return outs.h5ad.is_file() and h5ad_written_by_hishrst(outs.h5ad)


def _write_h5ad(outs: SlideOutputs, levels: Any, replace: bool) -> str | None:
    if _h5ad_done(outs) and not replace:
        return None
    write_h5ad(outs.store, outs.h5ad)
    return f"wrote {outs.h5ad.name}"


@dataclass(frozen=True)
class OutputFormat:
    """One ``--format`` choice. ``path``: its output among the slide's :class:`SlideOutputs`; ``done``:
    whether that output is complete on its own; ``current``: whether it is complete and made from the
    AnnData store as it is now; ``write(outs, levels, replace)``: build it from the complete AnnData store
    (``levels``: the open slide's pyramid, or None; ``replace``: rebuild a complete one), returning a note or
    None (None for ``anndata``: the store is the work product); ``foreign``: why an existing file at its path
    must be left alone (None: never); ``require``: raises when its package is missing, before any slide;
    ``extra``: the pip extra it needs."""

    name: str
    description: str
    path: Callable[[SlideOutputs], Path]
    done: Callable[[SlideOutputs], bool]
    current: Callable[[SlideOutputs], bool]
    write: Callable[[SlideOutputs, Any, bool], str | None] | None = None
    foreign: Callable[[SlideOutputs], str | None] | None = None
    require: Callable[[], None] | None = None
    extra: str | None = None


#: The output formats, in the order they are written.
OUTPUT_FORMATS: dict[str, OutputFormat] = {f.name: f for f in (
    OutputFormat("anndata", "the AnnData zarr store <slide>.zarr", path=lambda o: o.store, done=_store_complete,
                 current=_store_complete),
    OutputFormat("spatialdata", "a SpatialData store <slide>.sdata.zarr (H&E, spots and table)",
                 path=lambda o: o.spatialdata, done=lambda o: spatialdata_status(o.spatialdata) == "complete",
                 current=lambda o: spatialdata_status(o.spatialdata, source=o.store) == "complete",
                 write=_write_spatialdata, require=require_spatialdata, extra="spatialdata"),
    OutputFormat("h5ad", "an AnnData copy in one file <slide>.h5ad", path=lambda o: o.h5ad, done=_h5ad_done,
                 current=_h5ad_done, write=_write_h5ad, foreign=lambda o: foreign_h5ad(o.h5ad)),
)}
#: Names that stand for several formats.
FORMAT_ALIASES: dict[str, tuple[str, ...]] = {"both": ("anndata", "spatialdata")}
DEFAULT_FORMATS: tuple[str, ...] = ("anndata",)


def format_names() -> tuple[str, ...]:
    """Every ``--format`` name: the registered formats, then the aliases."""
    return (*OUTPUT_FORMATS, *FORMAT_ALIASES)


def parse_formats(value: str | Sequence[str] | None, *, h5ad: bool = False) -> tuple[str, ...]:
    """The formats named by ``value`` (comma-separated text, or names; aliases expanded), plus ``h5ad`` when
    asked (the deprecated ``--h5ad``), in registry order. Raises :class:`InputError` naming ``--format``
    for an unknown or empty set."""
    parts = value.split(",") if isinstance(value, str) else list(value or DEFAULT_FORMATS)
    names: set[str] = {"h5ad"} if h5ad else set()
    for part in (str(p).strip().lower() for p in parts):
        if not part:
            continue
        if part in FORMAT_ALIASES:
            names.update(FORMAT_ALIASES[part])
        elif part in OUTPUT_FORMATS:
            names.add(part)
        else:
            raise InputError(f"--format: unknown format {part!r}; give a comma-separated set of "
                             f"{', '.join(format_names())} (e.g. --format anndata,h5ad)")
    if not names:
        raise InputError(f"--format names no format; give one or more of {', '.join(format_names())}")
    return tuple(n for n in OUTPUT_FORMATS if n in names)


def require_formats(formats: Sequence[str]) -> None:
    """Raise at once when a package one of ``formats`` needs is missing (before the first slide)."""
    for name in formats:
        req = OUTPUT_FORMATS[name].require
        if req is not None:
            req()


def foreign_format_output(outs: SlideOutputs, formats: Sequence[str]) -> str | None:
    """Why an existing file at one of the ``formats``' outputs must be left alone, else None."""
    for name in formats:
        check = OUTPUT_FORMATS[name].foreign
        reason = check(outs) if check is not None else None
        if reason is not None:
            return reason
    return None


def is_done(outs: SlideOutputs | Path, formats: Sequence[str]) -> bool:
    """Whether the slide needs no computing: its AnnData store is complete, or (without ``anndata``) every
    output of ``formats`` is complete."""
    outs = SlideOutputs.of(outs)
    if _store_complete(outs):
        return True
    return "anndata" not in formats and all(OUTPUT_FORMATS[f].done(outs) for f in formats)


def formats_pending(outs: SlideOutputs | Path, formats: Sequence[str]) -> bool:
    """Whether :func:`finish_formats` (without ``replace``) would write or remove anything."""
    outs = SlideOutputs.of(outs)
    if not _store_complete(outs):
        return False
    return "anndata" not in formats or any(not OUTPUT_FORMATS[f].current(outs) for f in formats)


def finish_formats(outs: SlideOutputs | Path, formats: Sequence[str], *, levels: Any = None,
                   replace: bool = False) -> list[str]:
    """Build every output of ``formats`` from the complete AnnData store (see the module docstring), then
    remove that store when ``anndata`` is not among them; ``levels``: the open slide's pyramid for the
    SpatialData image (None: the store's overview); ``replace``: rebuild complete outputs. Returns notes."""
    outs = SlideOutputs.of(outs)
    if not _store_complete(outs):
        return []
    notes = []
    for name in formats:
        write = OUTPUT_FORMATS[name].write
        note = write(outs, levels, replace) if write is not None else None
        if note:
            notes.append(note)
    if "anndata" not in formats:
        remove_tree(outs.store)
        notes.append(f"removed {outs.store.name} (--format {','.join(formats)})")
    return notes


def _is_given(path: Path, given: Path | None) -> bool:
    return given is not None and Path(given).resolve() == path.resolve()


def foreign_tissue_geojson(out: SlideOutputs | Path, given: Path | None = None) -> str | None:
    """The one-line reason ``OUT/S.tissue.geojson`` must not be written: it exists and hishrst did not write
    it (no ``"generator": "hishrst"`` property), else None (also when it is the mask file ``given``)."""
    from hishrst_runtime.slides.masks import written_by_hishrst

    path = SlideOutputs.of(out).tissue_geojson
    if _is_given(path, given):
        return None
    if not os.path.lexists(path) or (path.is_file() and written_by_hishrst(path)):
        return None
    return (f"{path}: exists and was not written by hishrst-run (no \"generator\": \"hishrst\" property); it is "
            "left as it is: move it away or choose another --out")


def write_tissue_geojson(out: SlideOutputs | Path, mask: np.ndarray, *, shape0: tuple[int, int],
                         given: Path | None = None) -> Path | None:
    """Write the boolean overview ``mask`` over a level-0 ``shape0`` = (H, W) pixel slide as
    ``OUT/S.tissue.geojson`` (level-0 pixel polygons, atomically); returns the path, or None when the
    path is the mask file ``given`` by the user (never overwritten). Raises :class:`OutputExistsError`
    when the file exists but hishrst did not write it (:func:`foreign_tissue_geojson`)."""
    from hishrst_runtime.slides.masks import write_mask_geojson

    path = SlideOutputs.of(out).tissue_geojson
    if _is_given(path, given):
        return None
    foreign = foreign_tissue_geojson(out, given)
    if foreign is not None:
        raise OutputExistsError(foreign)
    h, w = mask.shape[:2]
    return write_mask_geojson(mask, path, scale_px=(shape0[0] / h, shape0[1] / w))
