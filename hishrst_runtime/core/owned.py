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

__all__ = ["OWNER_FILE", "OutputKind", "ForeignOutputError", "mark_owned", "owner_of", "check_replaceable",
           "overlaps"]

#: The marker file in the root of every output directory hishrst writes.
OWNER_FILE = ".hishrst-output.json"

OutputKind = Literal["fit-run", "cv", "synth", "bundle", "ome-zarr", "run-output"]


class ForeignOutputError(OutputStateError, FileExistsError):
    """The output path holds something hishrst did not write (or an input); it is never replaced."""


def mark_owned(directory: Path, kind: OutputKind, **extra: object) -> Path:
    """Write :data:`OWNER_FILE` into ``directory`` recording that hishrst wrote it as ``kind``."""
    from hishrst_runtime.core.version import __version__

    path = Path(directory) / OWNER_FILE
    body = {"written_by": "hishrst", "kind": kind, "hishrst_version": __version__, **extra}
    atomic_write(path, json.dumps(body, indent=1).encode())
    return path


def owner_of(directory: Path) -> str | None:
    """The ``kind`` recorded in ``directory``'s marker, or None when there is no valid marker."""
    meta = read_json(Path(directory) / OWNER_FILE)
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
        said = f"hishrst wrote it as {found!r}, not {kind!r}" if found else f"it has no {OWNER_FILE} marker"
        raise ForeignOutputError(f"{out}: exists and is not {what} written by hishrst ({said}); it is never "
                                 f"replaced, even with --overwrite — choose another {option} or delete it yourself")
    if not overwrite:
        raise OutputStateError(f"{out}: already holds {what}; pass --overwrite to replace it (the old one is kept "
                               f"until the new one is complete), or choose another {option}")
    return True
