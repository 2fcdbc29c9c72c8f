"""Where ``hishrst fit`` writes: checks on ``--out`` and build-aside-then-swap of the run directory.

A run directory is built in a hidden temporary sibling (``.<name>.partial-…``) and renamed into place
only when the fit succeeded, so a failed or interrupted fit leaves no (empty or partial) run behind and
an existing run is replaced — only with ``overwrite`` — after the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from hishrst_runtime.core.errors import OutputStateError
from hishrst_runtime.core.files import remove_tree, swap_in, temp_sibling

__all__ = ["RunOutputError", "check_run_out", "building_run"]

#: Files that mark a directory as a ``hishrst fit`` run (any one of them).
RUN_MARKERS = ("config.json", "model.safetensors")


class RunOutputError(OutputStateError, FileExistsError):
    """``--out`` of ``hishrst fit`` exists, is not a run, is not writable or overlaps an input."""


def _overlaps(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are the same path or one lies inside the other (both resolved)."""
    return a == b or a in b.parents or b in a.parents


def check_run_out(out: Path, *, overwrite: bool, inputs: Iterable[Path | str | None] = ()) -> None:
    """Refuse an ``out`` that would lose data; raises :class:`RunOutputError` before anything is written.

    ``out`` may be missing or an empty directory; an existing run is replaced only with ``overwrite``; a
    file, or a non-empty directory that is not a run, is never replaced. ``out`` must not be, contain
    or lie inside any of ``inputs`` (the training section, the image).
    """
    out = Path(out)
    real = out.resolve()
    for item in inputs:
        if item is not None and _overlaps(real, Path(item).resolve()):
            raise RunOutputError(f"{out}: the run directory would overlap the input {item}; choose an --out "
                                 "outside the training data")
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise RunOutputError(f"{out}: exists and is not a directory; choose another --out")
    if not any(out.iterdir()):
        return
    if not any((out / m).is_file() for m in RUN_MARKERS):
        raise RunOutputError(f"{out}: exists and is not a hishrst run (no config.json or model.safetensors); "
                             "refusing to replace it even with --overwrite — choose another --out or delete it yourself")
    if not overwrite:
        raise RunOutputError(f"{out}: already holds a trained run; pass --overwrite to replace it (the old run is "
                             "kept until the new fit succeeds), or choose another --out")


@contextlib.contextmanager
def building_run(out: Path) -> Iterator[Path]:
    """Yield a fresh hidden sibling of ``out`` to write the run into; on success it replaces ``out``
    (:func:`~hishrst_runtime.core.files.swap_in`), on any failure it is deleted and ``out`` is untouched."""
    out = Path(out).absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = temp_sibling(out, "partial")
        work.mkdir()
    except PermissionError as e:
        raise RunOutputError(f"{out.parent}: not writable ({e.strerror}); choose another --out or fix its "
                             "permissions") from e
    try:
        yield work
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an empty directory the user made for the run
        swap_in(work, out)
    except BaseException:
        remove_tree(work)
        raise
