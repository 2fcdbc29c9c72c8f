"""Which directories hishrst may replace: the one ownership rule behind every ``--overwrite``.

Every directory a hishrst command creates as its output (a ``fit`` run, a ``cv`` folder, a ``synth``
data set, an exported bundle, a ``convert``ed OME-Zarr store, ``hishrst-run`` outputs) carries a small
marker file, :data:`OWNER_FILE`, naming the command that wrote it. ``--overwrite`` replaces a directory
only when that marker is there *and* names the same kind of output; anything else — a folder of user
files, a folder that happens to hold a ``config.json``, an input — is never deleted, with or without
``--overwrite``. An empty directory may always be written into.

Outputs written before the marker existed are recognised by the ``legacy`` check a caller passes (e.g.
a zarr root attribute hishrst always wrote); nothing else is guessed from file names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from hishrst_runtime.core.errors import OutputStateError
from hishrst_runtime.core.files import atomic_write, read_json

__all__ = ["OWNER_FILE", "OWNER_ATTR", "OutputKind", "ForeignOutputError", "mark_owned", "owner_of", "check_replaceable",
           "overlaps"]

#: The marker file in the root of every output directory hishrst writes (zarr stores: :data:`OWNER_ATTR`).
OWNER_FILE = ".hishrst-output.json"
#: The root attribute that marks a zarr store hishrst wrote (a file in a store would upset zarr's listing).
OWNER_ATTR = "hishrst_output"

OutputKind = Literal["fit-run", "cv", "synth", "demo", "bundle", "ome-zarr", "run-output", "features"]


class ForeignOutputError(OutputStateError, FileExistsError):
    """The output path holds something hishrst did not write (or an input); it is never replaced."""


def _zarr_attrs_file(directory: Path) -> tuple[Path, bool] | None:
    """The file holding a zarr store's root attributes (``zarr.json`` v3: nested under ``attributes``;
    ``.zattrs`` v2: the whole file), or None when ``directory`` is not a zarr store."""
    if (directory / "zarr.json").is_file():
        return directory / "zarr.json", True
    if (directory / ".zgroup").is_file() or (directory / ".zattrs").is_file():
        return directory / ".zattrs", False
    return None


def mark_owned(directory: Path, kind: OutputKind, **extra: object) -> Path:
    """Record that hishrst wrote ``directory`` as ``kind``: :data:`OWNER_FILE` in it, or — for a zarr store,
    where a foreign file would upset zarr's listing — the root attribute :data:`OWNER_ATTR`. Returns the
    file written."""
    from hishrst_runtime.core.version import __version__

    directory = Path(directory)
    body = {"written_by": "hishrst", "kind": kind, "hishrst_version": __version__, **extra}
    found = _zarr_attrs_file(directory)
    if found is None:
        path = directory / OWNER_FILE
        atomic_write(path, json.dumps(body, indent=1).encode())
        return path
    path, nested = found
    meta = read_json(path) or {}
    attrs = meta.setdefault("attributes", {}) if nested else meta
    attrs[OWNER_ATTR] = body
    atomic_write(path, json.dumps(meta, indent=1).encode())
    return path


def owner_of(directory: Path) -> str | None:
    """The ``kind`` recorded by :func:`mark_owned` in ``directory``, or None when there is no valid marker."""
    directory = Path(directory)
    meta = read_json(directory / OWNER_FILE)
    found = _zarr_attrs_file(directory)
    if not isinstance(meta, dict) and found is not None:
        attrs = read_json(found[0])
        attrs = attrs.get("attributes") if found[1] and isinstance(attrs, dict) else attrs
        meta = attrs.get(OWNER_ATTR) if isinstance(attrs, dict) else None
    if isinstance(meta, dict) and meta.get("written_by") == "hishrst" and isinstance(meta.get("kind"), str):
        return meta["kind"]
    return None


def overlaps(a: Path, b: Path) -> bool:
    """Whether the resolved paths ``a`` and ``b`` are the same or one lies inside the other."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def check_replaceable(out: Path, *, kind: OutputKind, overwrite: bool, what: str, option: str = "--out",
                      inputs: Iterable[Path | str | None] = (),
                      legacy: Callable[[Path], bool] | None = None) -> bool:
    """Decide, before anything is written, whether ``out`` may be written; returns True when it holds an
    existing output of ``kind`` that ``overwrite`` will replace, False when it is missing or empty.

    Raises :class:`ForeignOutputError` when ``out`` overlaps one of ``inputs``, is a file, or is a
    non-empty directory without hishrst's marker for ``kind`` (or the ``legacy`` check); raises
    :class:`OutputStateError` when it is an output of ``kind`` and ``overwrite`` is False. ``what``
    names the output in messages (``"a trained run"``), ``option`` the option that chose ``out``.
    """
    out = Path(out)
    for item in inputs:
        if item is not None and not str(item).startswith(("http://", "https://", "s3://")) and overlaps(out, Path(item)):
            raise ForeignOutputError(f"{out}: {option} would overlap the input {item}; choose a {option} outside "
                                     "the inputs (nothing was written)")
    if not os.path.lexists(out):
        return False
    if out.is_symlink() or not out.is_dir():
        raise ForeignOutputError(f"{out}: exists and is not a directory hishrst wrote; it is never replaced — "
                                 f"choose another {option} or remove it yourself")
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise ForeignOutputError(f"{out}: cannot be listed ({e.strerror}); choose another {option}") from e
    if empty:
        return False
    found = owner_of(out)
    if found != kind and not (found is None and legacy is not None and legacy(out)):
        said = f"hishrst wrote it as {found!r}, not {kind!r}" if found else "it has no hishrst marker"
        raise ForeignOutputError(f"{out}: exists and is not {what} written by hishrst ({said}); it is never "
                                 f"replaced, even with --overwrite — choose another {option} or delete it yourself")
    if not overwrite:
        raise OutputStateError(f"{out}: already holds {what}; pass --overwrite to replace it (the old one is kept "
                               f"until the new one is complete), or choose another {option}")
    return True
