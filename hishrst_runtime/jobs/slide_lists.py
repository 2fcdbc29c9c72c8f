"""The slide list of one run: arguments, folders of slides and list files.

:func:`expand_slides` turns what the user named into the slides to run, in order and without repeats:

- a URL (``http(s)://``, ``s3://``, ...) stays a string, as given; a ``file://`` URL is the local path it names;
- an OME-Zarr store (a ``*.zarr`` directory, or any directory holding ``zarr.json`` / ``.zgroup`` /
  ``.zattrs``) or a file is one slide;
- any other directory is a *folder of slides*: the OME-Zarr stores (``*.zarr``) and TIFF-family files
  (:data:`TIFF_SUFFIXES`) inside it, sorted by name; with ``recursive=True`` also those in its
  sub-folders (never inside a store). Never hishrst's own outputs (stores with the ``hishrst_status`` root
  attribute: ``S.zarr``, ``S.sdata.zarr``, partials) nor the output folder ``--out``, so ``hishrst-run data/
  --out data/`` can be run again. A folder without slides is an error naming it.

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
from hishrst_runtime.jobs.paths import SlideArg, as_slide_arg, is_url, resolved
from hishrst_runtime.output.layout import written_by_hishrst

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


def _entry_kind(entry: os.DirEntry[str]) -> str | None:
    """``"dir"``, ``"file"``, ``"slide"`` (named like a slide but it cannot be looked at: a symbolic-link loop,
    no permission; it fails as that slide, with the reason) or None (skipped, with a warning)."""
    try:
        return "dir" if entry.is_dir() else "file" if entry.is_file() else None
    except OSError as e:
        if entry.name.lower().endswith((".zarr", *TIFF_SUFFIXES)):
            return "slide"
        log.warning("%s: skipped (%s)", entry.path, e.strerror or e)
        return None


def _walk(folder: Path, recursive: bool, out_dir: Path | None, skipped: list[Path],
          seen: set[tuple[int, int]] | None = None) -> Iterator[Path]:
    """The slides below ``folder``; ``seen``: (device, inode) of the folders already walked, so a
    symbolic link back to a parent folder is walked once."""
    seen = set() if seen is None else seen
    try:
        st = folder.stat()
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise InputError(f"{folder}: cannot list the folder of slides ({e.strerror or e}); check its "
                         "permissions and symbolic links") from e
    if (st.st_dev, st.st_ino) in seen:
        log.warning("%s: skipped, a symbolic link to a folder already searched (a loop)", folder)
        return
    seen.add((st.st_dev, st.st_ino))
    for entry in entries:
        p = Path(entry.path)
        kind = None if entry.name.startswith(".") else _entry_kind(entry)
        if kind == "dir":
            if out_dir is not None and resolved(p) == out_dir:  # the output folder (--out) inside this one
                skipped.append(p)
            elif is_store(p):
                if written_by_hishrst(p):  # an output of hishrst-run (S.zarr, S.sdata.zarr, a .partial)
                    skipped.append(p)
                elif p.suffix.lower() == ".zarr":
                    yield p
            elif recursive:
                yield from _walk(p, recursive, out_dir, skipped, seen)
        elif kind == "slide" or (kind == "file" and _is_slide_file(p)):
            yield p


def slides_in_folder(folder: Path, *, recursive: bool = False, out_dir: Path | None = None) -> list[Path]:
    """The slides in ``folder`` (``*.zarr`` stores and :data:`TIFF_SUFFIXES` files), sorted by path;
    ``recursive``: also in sub-folders. Stores hishrst wrote (root attribute ``hishrst_status``: outputs,
    SpatialData stores, partials) and the output folder ``out_dir`` (when inside ``folder``) are skipped.
    Raises :class:`InputError` when there are no slides."""
    skipped: list[Path] = []
    out = None if out_dir is None else resolved(out_dir)
    found = list(_walk(Path(folder), recursive, out, skipped))
    if skipped:
        log.info("%s: skipped %d output(s) of hishrst-run: %s", folder, len(skipped),
                 ", ".join(p.name for p in skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
    if not found:
        what = "*.zarr stores or " + ", ".join(f"*{s}" for s in TIFF_SUFFIXES) + " files"
        hint = "" if recursive else "; add --recursive to search its sub-folders"
        also = f"; skipped {len(skipped)} output(s) of hishrst-run" if skipped else ""
        raise InputError(f"{folder}: a folder without slides (looked for {what}{also}){hint}")
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


def _one(arg: str | os.PathLike[str], recursive: bool, out_dir: Path | None) -> list[SlideArg]:
    arg = as_slide_arg(arg)  # a file:// URL is a local path
    if is_url(arg):
        return [str(arg)]
    p = Path(arg)
    try:
        folder = p.is_dir() and not is_store(p)
    except OSError:  # a name too long, ...: reported per slide by the reader
        folder = False
    if folder:
        return list(slides_in_folder(p, recursive=recursive, out_dir=out_dir))
    return [p]  # a store, a file, or a missing path (reported per slide by the reader)


def expand_slides(args: Iterable[str | os.PathLike[str]], *, slides_from: Iterable[str | Path] = (),
                  recursive: bool = False, out_dir: Path | None = None) -> list[SlideArg]:
    """The slides named by ``args`` and the list files ``slides_from`` (their entries after ``args``):
    folders of slides expanded (without hishrst's own outputs and the output folder ``out_dir``: see
    :func:`slides_in_folder`), URLs kept as strings, ``file://`` URLs made paths, later repeats of the same
    slide (same resolved path or URL) dropped. Raises :class:`InputError` for a folder without slides or
    an unreadable list."""
    named: list[str | os.PathLike[str]] = list(args)
    for f in slides_from:
        named += read_slide_list(f)
    out: list[SlideArg] = []
    seen: set[str] = set()
    for arg in named:
        for s in _one(arg, recursive, out_dir):
            key = s if isinstance(s, str) else str(resolved(s))
            if key not in seen:
                seen.add(key)
                out.append(s)
    return out
