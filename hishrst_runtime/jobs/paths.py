"""Where a job writes, and what it must never write over.

Per slide ``S.ome.zarr`` (or ``S.zarr``) the output is ``OUT/S.zarr`` (built in ``OUT/S.zarr.partial``,
guarded by ``OUT/S.zarr.lock``, optionally with ``OUT/S.h5ad``). :func:`check_output_location` refuses
any of these that resolves to, inside or above an input slide or the bundle, before anything is
touched (also ``OUT/S.sdata.zarr`` and ``OUT/S.tissue.geojson``), and the same for the ``--points`` and
``--tissue-mask`` files. Slide arguments that are URLs
(``http(s)://``, ``s3://``, ...) stay strings: they are never turned into local paths (``Path("s3://b/x")``
is ``s3:/b/x``); they go to the slide reader, and their output is named after the URL's last path segment.
A ``file://`` URL is a local path (:func:`as_slide_arg`).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from hishrst_runtime.core.errors import OutputStateError
from hishrst_runtime.jobs.formats import tissue_geojson_path
from hishrst_runtime.output.spatialdata_store import spatialdata_path
from hishrst_runtime.output.layout import written_by_hishrst
from hishrst_runtime.output.store import STATUS_ATTR, partial_path
from hishrst_runtime.slides.sources import file_url_path
from hishrst_runtime.slides.sources import is_url as slide_is_url

__all__ = ["SlideArg", "SLIDE_SUFFIXES", "is_url", "as_slide_arg", "slide_name", "slide_output_path",
           "resolved", "slide_problem", "OUTPUT_NAME_RESERVE", "output_collisions", "check_output_location",
           "foreign_output"]

#: A slide as given: a local path, or a URL string (kept as it is).
SlideArg = str | Path


#: Slide name endings dropped from output names, longest first (``S.ome.tiff`` -> ``S.zarr``).
SLIDE_SUFFIXES: tuple[str, ...] = (".ome.zarr", ".ome.tiff", ".ome.tif", ".zarr", ".tiff", ".tif", ".svs", ".ndpi",
                                   ".scn")


def is_url(slide: SlideArg) -> bool:
    """Whether a slide argument is a URL string (``scheme://...``) other than ``file://`` (a local path:
    :func:`as_slide_arg`)."""
    return isinstance(slide, str) and slide_is_url(slide)


def as_slide_arg(slide: str | os.PathLike[str]) -> SlideArg:
    """A slide argument as the runner keeps it: a ``file://`` URL becomes the local :class:`~pathlib.Path` it
    names (:func:`hishrst_runtime.slides.sources.file_url_path`), so it is checked and named as a path;
    anything else is returned as it is."""
    local = file_url_path(slide) if isinstance(slide, str) else None
    return Path(local) if local else slide


def slide_name(slide: SlideArg) -> str:
    """The slide's file name: a path's last part, a URL's last path segment (query and fragment dropped)."""
    text = urlsplit(slide).path if is_url(slide) else str(slide)
    return text.rstrip("/").rsplit("/", 1)[-1]


def slide_output_path(slide: SlideArg, out_dir: Path) -> Path:
    """``OUT_DIR/<slide name without .ome.zarr / .zarr / .svs / .tif(f) / .ndpi / .scn>.zarr``; the image
    element ``E`` of a SpatialData store ``S.zarr::E`` gives ``OUT_DIR/S_E.zarr``."""
    name = slide_name(slide) or "slide"
    head, sep, element = name.rpartition("::")
    if sep and head:
        name = head
    for suffix in SLIDE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return Path(out_dir) / (f"{name}_{element}.zarr" if sep and head else f"{name}.zarr")


def resolved(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute with its symbolic links resolved, or only made absolute when they cannot be
    (a symbolic-link loop, a name too long): such a path is then reported by whatever reads it, per slide."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):  # Python < 3.13 raises RuntimeError for a loop
        return Path(os.path.abspath(path))


#: Characters hishrst adds to an output's name for the files beside it (the longest: the hidden
#: ``.S.sdata.zarr.partial.trash-<pid>-<8 hex>`` of ``S.zarr``); an output name must leave room for them.
OUTPUT_NAME_RESERVE = 40


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of ``folder`` (or its nearest existing parent) takes."""
    for p in (folder, *folder.parents):
        try:
            return int(os.pathconf(p, "PC_NAME_MAX"))
        except (OSError, ValueError):
            continue
    return 255


def slide_problem(slide: SlideArg, out: Path) -> str | None:
    """Why ``slide`` cannot run into ``out`` before anything is tried, as one line naming the fix, or None:
    a local slide path that is a symbolic-link loop, or an output name too long for the file system
    (with :data:`OUTPUT_NAME_RESERVE` characters to spare)."""
    if not is_url(slide):
        local = _local_part(slide)
        try:
            os.stat(local)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return (f"{local}: a symbolic-link loop (the link points to itself, directly or through other "
                        "links); fix the link or pass the slide's real path")
    size, limit = len(out.name.encode("utf-8")), _name_max(out.parent) - OUTPUT_NAME_RESERVE
    if size > limit:
        return (f"{out.parent}/{out.name[:40]}...: the output name is {size} bytes long; with the suffixes "
                f"hishrst adds it exceeds the file system's limit of {limit + OUTPUT_NAME_RESERVE} bytes per name: "
                f"rename the slide (or link it under a shorter name) so that its output name is at most {limit} bytes")
    return None


def output_collisions(slides: Sequence[SlideArg], out_dir: Path) -> dict[Path, list[SlideArg]]:
    """Outputs that more than one of ``slides`` would write (``{output: [slides]}``; empty when none)."""
    by_out: dict[Path, list[SlideArg]] = {}
    for s in slides:
        by_out.setdefault(slide_output_path(s, out_dir), []).append(s)
    same = lambda s: s if is_url(s) else str(resolved(s))  # noqa: E731
    return {o: s for o, s in by_out.items() if len({same(p) for p in s}) > 1}


def _local_part(slide: SlideArg) -> str:
    """The file or store of a local slide argument (``STORE::ELEMENT`` names an element of ``STORE``)."""
    text = str(slide)
    head, sep, tail = text.rpartition("::")
    return head if sep and head and "/" not in tail else text


def _related(a: Path, b: Path) -> str | None:
    """How resolved path ``a`` relates to ``b``: ``"is"``, ``"is inside"``, ``"contains"``, or None."""
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def _output_files(out: Path) -> tuple[Path, ...]:
    """Every file or store hishrst-run may write for the output ``out`` (``OUT/S.zarr``)."""
    return (out, partial_path(out), out.with_name(out.name + ".lock"), out.with_suffix(".h5ad"),
            spatialdata_path(out), tissue_geojson_path(out))


def check_output_location(slides: Sequence[SlideArg], out_dir: Path, bundle_dir: Path, *,
                          points: Sequence[str | os.PathLike[str]] = (),
                          tissue_mask: str | os.PathLike[str] | None = None) -> None:
    """Raise :class:`OutputStateError` when ``out_dir`` lies in an input, or any slide's output files
    (store, ``.partial``, ``.lock``, ``.h5ad``, ``.sdata.zarr``, ``.tissue.geojson``) resolve to, inside or
    above an input: a slide, the bundle, a ``points`` file (``--points``) or the ``tissue_mask`` file
    (``--tissue-mask``; it may be ``S.tissue.geojson`` itself, which is then never written)."""
    local = [Path(_local_part(s)) for s in slides if not is_url(s)]
    inputs = [(resolved(p), f"input slide {p}") for p in local] + [(resolved(bundle_dir), f"bundle {bundle_dir}")]
    inputs += [(resolved(p), f"points file {p}") for p in points]
    mask = None if tissue_mask is None else resolved(tissue_mask)
    if mask is not None:
        inputs.append((mask, f"tissue-mask file {tissue_mask}"))
    out_root = resolved(out_dir)
    for src, what in inputs:
        how = _related(out_root, src)
        if how in ("is", "is inside"):
            raise OutputStateError(f"{out_dir}: the output folder {how} the {what}; choose an --out outside "
                                   "the inputs (nothing was written)")
    for slide in local:
        out = slide_output_path(slide, Path(out_dir))
        for target in _output_files(out):
            real = resolved(target)
            if target == tissue_geojson_path(out) and real == mask:
                continue  # the mask given is that file: write_tissue_geojson never writes over it
            for src, what in inputs:
                how = _related(real, src)
                if how is not None:
                    raise OutputStateError(f"{target}: the output of {slide} {how} the {what}; hishrst-run "
                                           "never writes over its inputs: choose another --out (nothing was written)")


def foreign_output(out: Path) -> str | None:
    """The one-line reason ``out`` must not be touched when it exists but hishrst did not write it
    (no ``hishrst_status`` root attribute), else None. Never suggests ``--overwrite``."""
    if not os.path.lexists(out):
        return None
    if out.is_dir() and written_by_hishrst(out):
        return None
    return (f"{out}: exists and was not written by hishrst-run (no {STATUS_ATTR} attribute); it is left as it "
            "is: move it away or choose another --out")
