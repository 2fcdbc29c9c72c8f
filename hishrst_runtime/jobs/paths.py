"""Where a job writes, and what it must never write over.

Per slide ``S.ome.zarr`` (or ``S.svs``, ``S.bif``, ... any registered slide format:
:func:`hishrst_runtime.slides.formats.strip_slide_suffix`) the output is ``OUT/S.zarr`` and the files beside
it named by :class:`~hishrst_runtime.output.names.SlideOutputs` (``.partial``, ``.lock``, ``.h5ad``,
``.sdata.zarr``, ``.tissue.geojson``, ``.qc.png``). A slide found in a sub-folder of a folder argument keeps
that sub-folder in its output name (``cohort/p1/S.svs`` -> ``OUT/p1/S.zarr``; see
:mod:`hishrst_runtime.jobs.slide_lists`). :func:`check_output_location` refuses any of these that resolves
to, inside or above an input slide, the bundle, a points file or a tissue-mask file, before anything is
touched. Slide arguments that are URLs (``http(s)://``, ``s3://``, ...:
:func:`hishrst_runtime.slides.sources.is_url`) stay strings: they are never turned into local paths
(``Path("s3://b/x")`` is ``s3:/b/x``); they go to the slide reader, and their output is named after the URL's
last path segment. A ``file://`` URL is a local path (:func:`as_slide_arg`).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from hishrst_runtime.core.errors import OutputStateError
from hishrst_runtime.output.layout import written_by_hishrst
from hishrst_runtime.output.names import SlideOutputs
from hishrst_runtime.output.store import STATUS_ATTR
from hishrst_runtime.slides.formats import strip_slide_suffix
from hishrst_runtime.slides.sources import file_url_path, is_url

if TYPE_CHECKING:
    from hishrst_runtime.jobs.inputs import SlideInput

__all__ = ["SlideArg", "SlideOutputs", "is_remote", "as_slide_arg", "slide_name", "default_output_name",
           "slide_output_path", "resolved", "slide_problem", "OUTPUT_NAME_RESERVE", "output_collisions",
           "check_output_location", "foreign_output", "local_part"]

#: A slide as given: a local path, or a URL string (kept as it is).
SlideArg = str | Path


def is_remote(slide: SlideArg) -> bool:
    """Whether a slide argument is a URL string: :func:`hishrst_runtime.slides.sources.is_url` for strings
    (``file://`` is a local path), False for a :class:`~pathlib.Path`."""
    return isinstance(slide, str) and is_url(slide)


def as_slide_arg(slide: str | os.PathLike[str]) -> SlideArg:
    """A slide argument as the runner keeps it: a ``file://`` URL becomes the local :class:`~pathlib.Path` it
    names (:func:`hishrst_runtime.slides.sources.file_url_path`), so it is checked and named as a path;
    anything else is returned as it is."""
    local = file_url_path(slide) if isinstance(slide, str) else None
    return Path(local) if local else slide


def slide_name(slide: SlideArg) -> str:
    """The slide's file name: a path's last part, a URL's last path segment (query and fragment dropped)."""
    text = urlsplit(slide).path if is_remote(slide) else str(slide)
    return text.rstrip("/").rsplit("/", 1)[-1]


def default_output_name(slide: SlideArg) -> str:
    """The output name of a slide named on its own: its name without any registered slide ending
    (``S.ome.zarr``, ``S.svs``, ``S.bif`` -> ``S``); the image element ``E`` of a SpatialData store
    ``S.zarr::E`` gives ``S_E``."""
    name = slide_name(slide) or "slide"
    head, sep, element = name.rpartition("::")
    if sep and head:
        return f"{strip_slide_suffix(head)}_{element}"
    return strip_slide_suffix(name)


def slide_output_path(slide: SlideArg, out_dir: Path, name: str | None = None) -> Path:
    """``OUT_DIR/<name>.zarr``: ``name`` (e.g. ``p1/S`` for a slide found in sub-folder ``p1``), by default
    :func:`default_output_name` of the slide."""
    return SlideOutputs.named(out_dir, name or default_output_name(slide)).store


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
    if not is_remote(slide):
        local = local_part(slide)
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


def output_collisions(items: Sequence[SlideInput], out_dir: Path) -> dict[Path, list[SlideArg]]:
    """Outputs that more than one slide of ``items`` would write (``{output: [slides]}``; empty when none)."""
    by_out: dict[Path, list[SlideInput]] = {}
    for item in items:
        by_out.setdefault(item.outputs(out_dir).store, []).append(item)
    return {o: [i.slide for i in s] for o, s in by_out.items() if len({i.key for i in s}) > 1}


def local_part(slide: SlideArg) -> str:
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


def _inputs(items: Sequence[SlideInput], bundle_dir: Path) -> list[tuple[Path, str]]:
    """(resolved path, what it is) of every input of a run: slides, the bundle, points and mask files."""
    out = [(resolved(local_part(i.slide)), f"input slide {local_part(i.slide)}") for i in items
           if not is_remote(i.slide)]
    out.append((resolved(bundle_dir), f"bundle {bundle_dir}"))
    files: dict[Path, str] = {}
    for i in items:
        if i.points_file is not None:
            files.setdefault(resolved(i.points_file), f"points file {i.points_file}")
        if i.mask is not None:
            files.setdefault(resolved(i.mask), f"tissue-mask file {i.mask}")
    return out + list(files.items())


def check_output_location(items: Sequence[SlideInput], out_dir: Path, bundle_dir: Path) -> None:
    """Raise :class:`OutputStateError` when ``out_dir`` lies in an input, or any slide's output files
    (:meth:`SlideOutputs.all`) resolve to, inside or above an input: a slide, the bundle, a points file or a
    tissue-mask file (a slide's own mask may be its ``S.tissue.geojson``, which is then never written)."""
    inputs = _inputs(items, bundle_dir)
    out_root = resolved(out_dir)
    for src, what in inputs:
        how = _related(out_root, src)
        if how in ("is", "is inside"):
            raise OutputStateError(f"{out_dir}: the output folder {how} the {what}; choose an --out outside "
                                   "the inputs (nothing was written)")
    for item in items:
        outs = item.outputs(out_dir)
        own_mask = None if item.mask is None else resolved(item.mask)
        for target in outs.all():
            real = resolved(target)
            if target == outs.tissue_geojson and real == own_mask:
                continue  # the mask given is that file: write_tissue_geojson never writes over it
            for src, what in inputs:
                how = _related(real, src)
                if how is not None:
                    raise OutputStateError(f"{target}: the output of {item.slide} {how} the {what}; hishrst-run "
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
