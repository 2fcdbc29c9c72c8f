"""Where an output store lives on disk and how it moves: ``OUT.zarr`` (complete) and ``OUT.zarr.partial``.

* ``OUT.zarr`` exists only when complete: a store is built in ``OUT.zarr.partial`` (whose skeleton is
  assembled in a hidden temporary sibling and renamed, so a ``.partial`` always has a full skeleton),
  marked ``hishrst_status: "complete"`` in its root attributes and then published by one rename, or —
  when it replaces an earlier complete output — by :func:`hishrst_runtime.core.files.swap_in`, so
  ``OUT.zarr`` is at every instant the complete old or the complete new store.
* An ``OUT.zarr`` without ``hishrst_status: "complete"`` was not published by hishrst: it is never
  replaced (only the legacy ``overwrite=True`` of :meth:`OutputStore.create` deletes it).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from hishrst_runtime.core.files import atomic_write, fsync_path, read_json, remove_tree, swap_in
from hishrst_runtime.output.errors import IncompleteOutputError, OutputExistsError
from hishrst_runtime.output.names import PARTIAL_SUFFIX, SlideOutputs

__all__ = ["FORMAT_VERSION", "STATUS_ATTR", "PARTIAL_SUFFIX", "PROGRESS_DIR", "OutputStatus", "partial_path",
           "read_root_attrs", "update_root_attrs", "output_status", "written_by_hishrst", "prepare_location", "publish"]

OutputStatus = Literal["missing", "incomplete", "complete"]

#: Root attribute ``hishrst_format_version`` of new stores. 1: the first layout; 2: ``uns['spatial']
#: [library_id]['images']`` always holds ``'hires'`` beside ``'lowres'``. Readers accept both (nothing
#: but the images differs), and ``--resume`` finishes a version-1 partial as version 1.
FORMAT_VERSION = 2
STATUS_ATTR = "hishrst_status"
PROGRESS_DIR = ".hishrst_progress"
#: debris a killed create / replace / finalize may leave beside ``OUT.zarr`` ("{}" is its escaped name):
#: the skeleton being assembled, directories being deleted, an old output being swapped out
DEBRIS_PATTERNS = ("{}.partial.tmp-*", "{}.trash-*", "{}.partial.trash-*",
                   ".{}.partial.tmp-*", ".{}.trash-*", ".{}.partial.trash-*", ".{}.old-*")


def partial_path(path: str | os.PathLike[str]) -> Path:
    """Where the output for ``path`` is built until it is finalized (``OUT.zarr.partial``)."""
    return SlideOutputs.of(path).partial


def read_root_attrs(store: Path) -> dict[str, Any] | None:
    """The root ``.zattrs`` of ``store`` as a dict, or None when missing or unreadable."""
    attrs = read_json(store / ".zattrs")
    return attrs if isinstance(attrs, dict) else None


def written_by_hishrst(store: str | os.PathLike[str]) -> bool:
    """Whether the directory ``store`` is one hishrst wrote, complete or not (an AnnData output, its
    ``.partial``, a SpatialData store): its root attributes (zarr v2 ``.zattrs`` or v3 ``zarr.json``)
    hold :data:`STATUS_ATTR`. Reads one small JSON file; never opens the store."""
    path = Path(store)
    attrs = read_root_attrs(path)
    if attrs is None:
        meta = read_json(path / "zarr.json")
        attrs = meta.get("attributes") if isinstance(meta, dict) else None
    return isinstance(attrs, dict) and STATUS_ATTR in attrs


def update_root_attrs(store: Path, updates: Mapping[str, Any], *, fsync: bool) -> None:
    """Merge ``updates`` into the root attributes of ``store`` (atomic replace of ``.zattrs``)."""
    attrs = read_root_attrs(store)
    if attrs is None:
        raise IncompleteOutputError(f"{store}: root attributes (.zattrs) are unreadable; rerun with --overwrite")
    attrs.update(updates)
    atomic_write(store / ".zattrs", json.dumps(attrs, indent=2).encode(), fsync=fsync)


def output_status(path: str | os.PathLike[str]) -> OutputStatus:
    """``"complete"`` if ``OUT.zarr`` exists and is marked complete, ``"incomplete"`` if a partial
    (or an unmarked ``OUT.zarr``) exists, else ``"missing"``."""
    final = Path(path)
    if final.exists():
        attrs = read_root_attrs(final)
        return "complete" if attrs is not None and attrs.get(STATUS_ATTR) == "complete" else "incomplete"
    return "incomplete" if partial_path(final).exists() else "missing"


def _foreign(final: Path) -> OutputExistsError:
    return OutputExistsError(f"{final}: exists but is not a complete output written by hishrst; it is left as "
                             "it is: move it away or choose another --out")


def prepare_location(final: Path, *, overwrite: bool, replace: bool) -> None:
    """Make way for a new ``final.partial`` (the caller holds the slide's lock).

    ``replace``: a complete ``final`` stays until :func:`publish`; an incomplete partial is discarded.
    ``overwrite`` (legacy): both are deleted now. Otherwise an existing one raises
    :class:`OutputExistsError` with the flag that fits. Debris of killed earlier runs is removed.
    """
    work = partial_path(final)
    state = output_status(final)
    if replace:
        if final.exists() and state != "complete":
            raise _foreign(final)
        remove_tree(work)
    elif final.exists() or work.exists():
        if not overwrite:
            if final.exists() and state != "complete":
                raise _foreign(final)
            hint = "--overwrite to replace it" if state == "complete" else "--resume to finish it or --overwrite"
            raise OutputExistsError(f"{final if final.exists() else work}: an {state} output already exists; "
                                    f"use {hint}")
        remove_tree(final)
        remove_tree(work)
    final.parent.mkdir(parents=True, exist_ok=True)
    name = glob.escape(final.name)
    for pattern in DEBRIS_PATTERNS:
        for junk in final.parent.glob(pattern.format(name)):
            shutil.rmtree(junk, ignore_errors=True)


def publish(work: Path, final: Path, *, replace: bool, fsync: bool) -> None:
    """Move the finished, complete-marked ``work`` to ``final``; an existing ``final`` is swapped out
    only if ``replace`` and it is a complete hishrst output (else :class:`OutputExistsError`)."""
    if final.exists():
        if not replace:
            raise OutputExistsError(f"{final}: appeared while this run was writing {work}; "
                                    "another job wrote the same slide (use a SlideLock)")
        if output_status(final) != "complete":
            raise _foreign(final)
    swap_in(work, final)
    if fsync:
        fsync_path(final.parent, directory=True)
