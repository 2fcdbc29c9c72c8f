"""One slide of a run and what it brings with it: :class:`SlideInput`.

A run is a list of records, one per slide: the slide (a local path, or a URL string), its query points (a
points file, points already read, or none: the grid over tissue), its tissue mask (a file, or none: tissue
detection) and its output name (``S`` or ``p1/S``, relative to ``--out``, without ``.zarr``; none: the
slide's own name without its format ending). Folder scans and slide sheets (``--slides-from``,
:mod:`hishrst_runtime.jobs.slide_lists`) make them; ``--points`` and ``--tissue-mask`` on the command line
are the defaults of every record that has none (:meth:`SlideInput.with_defaults`); the runner hands each
record to slide preparation as it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.jobs.paths import SlideArg, as_slide_arg, default_output_name, is_remote, resolved
from hishrst_runtime.output.names import SlideOutputs

__all__ = ["SlideInput", "check_output_name"]


def check_output_name(name: str, where: str) -> str:
    """``name`` as an output name relative to ``--out`` (``S`` or ``p1/S``, ``/``-separated), or
    :class:`InputError` naming ``where``: empty, absolute, or with ``..`` / ``.`` parts."""
    text = str(name).strip().replace("\\", "/")
    parts = PurePosixPath(text).parts
    if not text or text.startswith("/") or any(p in ("..", ".") for p in text.split("/")) or not parts:
        raise InputError(f"{where}: the output name {name!r} must be a relative name such as S or p1/S "
                         "(no leading /, no . or .. parts); fix the name")
    return "/".join(parts)


@dataclass(frozen=True)
class SlideInput:
    """One slide and its own inputs.

    ``slide``: a local :class:`~pathlib.Path` or a URL string (a ``file://`` URL or other text becomes a path); ``points``: a points file
    (CSV / .h5ad / Space Ranger outs: :func:`~hishrst_runtime.inference.points.read_points`), points already
    read (:class:`~hishrst_runtime.inference.points.QueryPoints`), an ``[N, 2]`` array of level-0 pixel
    (x, y), or None (the query grid over tissue); ``mask``: a tissue-mask file (GeoJSON in level-0 pixels,
    PNG / TIFF), or None; ``name``: the output name relative to ``--out`` without ``.zarr`` (None:
    :func:`~hishrst_runtime.jobs.paths.default_output_name` of the slide).
    """

    slide: SlideArg
    points: Any = None
    mask: Path | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        slide = as_slide_arg(self.slide)
        object.__setattr__(self, "slide", slide if is_remote(slide) else Path(slide))
        if isinstance(self.points, (str, os.PathLike)):
            object.__setattr__(self, "points", Path(self.points))
        if self.mask is not None:
            object.__setattr__(self, "mask", Path(self.mask))
        if self.name is not None:
            object.__setattr__(self, "name", check_output_name(self.name, str(self.slide)))

    @property
    def output_name(self) -> str:
        """``S`` or ``p1/S``: the output's name relative to ``--out``, without ``.zarr``."""
        return self.name or default_output_name(self.slide)

    def outputs(self, out_dir: str | os.PathLike[str]) -> SlideOutputs:
        """The names of this slide's output files in ``out_dir``."""
        return SlideOutputs.named(out_dir, self.output_name)

    @property
    def key(self) -> str:
        """What identifies the slide: its URL, or its resolved local path (repeats of a slide are dropped)."""
        return str(self.slide) if is_remote(self.slide) else str(resolved(self.slide))

    @property
    def points_file(self) -> Path | None:
        """The points file, when the points are one (not points already read)."""
        return self.points if isinstance(self.points, Path) else None

    def with_defaults(self, *, points: Any = None, mask: Path | None = None) -> SlideInput:
        """This record with ``points`` / ``mask`` where it has none of its own."""
        changes: dict[str, Any] = {}
        if self.points is None and points is not None:
            changes["points"] = points
        if self.mask is None and mask is not None:
            changes["mask"] = Path(mask)
        return replace(self, **changes) if changes else self
