"""The slide list of one run: arguments, folders of slides and list files.

:func:`expand_slides` turns what the user named into the slides to run, in order and without repeats:

- a URL (``http(s)://``, ``s3://``, ...) stays a string, as given;
- an OME-Zarr store (a ``*.zarr`` directory, or any directory holding ``zarr.json`` / ``.zgroup`` /
  ``.zattrs``) or a file is one slide;
- any other directory is a *folder of slides*: the OME-Zarr stores (``*.zarr``) and TIFF-family files
  (:data:`TIFF_SUFFIXES`) inside it, sorted by name; with ``recursive=True`` also those in its
  sub-folders (never inside a store). A folder without slides is an error naming it.

:func:`read_slide_list` reads ``--slides-from FILE``: one path or URL a line; blank lines and lines
starting with ``#`` are ignored; relative paths are relative to the current directory (as for
arguments on the command line).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.jobs.paths import SlideArg, is_url

__all__ = ["TIFF_SUFFIXES", "STORE_MARKERS", "is_store", "slides_in_folder", "read_slide_list", "expand_slides"]

log = logging.getLogger(__name__)

#: Whole-slide files a folder of slides is searched for, next to ``*.zarr`` stores.
TIFF_SUFFIXES: tuple[str, ...] = (".svs", ".tif", ".tiff", ".ndpi", ".scn")
#: Files that make a directory a zarr store (v3, v2 group, v2 attributes).
STORE_MARKERS: tuple[str, ...] = ("zarr.json", ".zgroup", ".zattrs")


def is_store(path: Path) -> bool:
    """Whether the directory ``path`` is a zarr store (one slide) rather than a folder of slides."""
    return path.suffix.lower() == ".zarr" or any((path / m).is_file() for m in STORE_MARKERS)


def _is_slide_file(path: Path) -> bool:
    return path.suffix.lower() in TIFF_SUFFIXES and path.is_file() and not path.name.startswith(".")


def _walk(folder: Path, recursive: bool) -> Iterator[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise InputError(f"{folder}: cannot list the folder of slides ({e.strerror or e}); check its "
                         "permissions") from e
    for entry in entries:
        p = Path(entry.path)
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if is_store(p):
                if p.suffix.lower() == ".zarr":
                    yield p
            elif recursive:
                yield from _walk(p, recursive)
        elif _is_slide_file(p):
            yield p


def slides_in_folder(folder: Path, *, recursive: bool = False) -> list[Path]:
    """The slides in ``folder`` (``*.zarr`` stores and :data:`TIFF_SUFFIXES` files), sorted by path;
    ``recursive``: also in sub-folders. Raises :class:`InputError` when there are none."""
    found = list(_walk(Path(folder), recursive))
    if not found:
        what = "*.zarr stores or " + ", ".join(f"*{s}" for s in TIFF_SUFFIXES) + " files"
        hint = "" if recursive else "; add --recursive to search its sub-folders"
        raise InputError(f"{folder}: a folder without slides (looked for {what}){hint}")
    log.info("%s: %d slide(s)%s", folder, len(found), " (recursive)" if recursive else "")
    return found


def read_slide_list(path: str | Path) -> list[str]:
    """The entries of a slide list file (one path or URL a line; ``#`` comment lines and blank lines
    ignored), in order. Raises :class:`InputError` naming the file when it cannot be read or is empty."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: cannot read the slide list ({e}); pass a text file with one slide path or "
                         "URL a line") from e
    entries = [ln.strip() for ln in text.splitlines()]
    entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
        raise InputError(f"{p}: the slide list names no slides (blank and # lines are ignored); add one path "
                         "or URL a line")
    return entries


def _one(arg: str | os.PathLike[str], recursive: bool) -> list[SlideArg]:
    if is_url(arg):
        return [str(arg)]
    p = Path(arg)
    if p.is_dir() and not is_store(p):
        return list(slides_in_folder(p, recursive=recursive))
    return [p]  # a store, a file, or a missing path (reported per slide by the reader)


def expand_slides(args: Iterable[str | os.PathLike[str]], *, slides_from: Iterable[str | Path] = (),
                  recursive: bool = False) -> list[SlideArg]:
    """The slides named by ``args`` and the list files ``slides_from`` (their entries after ``args``):
    folders of slides expanded, URLs kept as strings, later repeats of the same slide (same resolved
    path or URL) dropped. Raises :class:`InputError` for a folder without slides or an unreadable list."""
    named: list[str | os.PathLike[str]] = list(args)
    for f in slides_from:
        named += read_slide_list(f)
    out: list[SlideArg] = []
    seen: set[str] = set()
    for arg in named:
        for s in _one(arg, recursive):
            key = s if isinstance(s, str) else str(s.resolve())
            if key not in seen:
                seen.add(key)
                out.append(s)
    return out
