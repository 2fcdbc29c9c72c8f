"""The slide list of one run: arguments, folders of slides and slide sheets.

:func:`expand_inputs` turns what the user named into the slides to run (:class:`SlideInput` records), in
order and without repeats:

- a URL (``http(s)://``, ``s3://``, ...) stays a string, as given; a ``file://`` URL is the local path it names;
- a file, or a directory that a registered slide format recognises
  (:func:`hishrst_runtime.slides.formats.format_for_path`: OME-Zarr stores, DICOM folders), is one slide;
- any other directory is a *folder of slides*: the directories a registered format recognises and the files
  named with a registered file ending (:func:`~hishrst_runtime.slides.formats.scan_suffixes`: ``.svs``,
  ``.tif``, ``.bif``, ``.qptiff``, ``.mrxs``, ...) inside it, sorted by name; with ``recursive=True`` also
  those in its sub-folders (never inside a slide). A slide found in sub-folder ``p1`` is named ``p1/S``, so
  its outputs go to ``OUT/p1/`` (``cohort/p1/s.svs`` and ``cohort/p2/s.svs`` do not collide). Never
  hishrst's own outputs (stores with the ``hishrst_status`` root attribute: ``S.zarr``, ``S.sdata.zarr``,
  partials) nor the output folder ``--out``, so ``hishrst-run data/ --out data/`` can be run again. A folder
  without slides is an error naming it.

:func:`read_slide_list` reads ``--slides-from FILE``. A *slide sheet* is a CSV file whose first line is a
header with a ``slide`` column and optionally ``points``, ``mask`` and ``name``: each row is one slide with
its own points file, tissue mask and output name (empty cells: none); relative paths are relative to the
sheet's folder. Without such a header the file is a plain list: one path or URL a line, relative to the
current directory (as for arguments on the command line). In both, blank lines and lines starting with ``#``
are ignored.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.jobs.inputs import SlideInput
from hishrst_runtime.jobs.paths import SlideArg, as_slide_arg, is_remote, resolved
from hishrst_runtime.output.layout import written_by_hishrst
from hishrst_runtime.slides.formats import format_for_path, scan_suffixes, slide_suffixes, strip_slide_suffix

__all__ = ["SHEET_COLUMNS", "is_slide_dir", "slides_in_folder", "read_slide_list", "expand_inputs", "expand_slides"]

log = logging.getLogger(__name__)

#: Columns of a slide sheet (``slide`` required).
SHEET_COLUMNS: tuple[str, ...] = ("slide", "points", "mask", "name")


def is_slide_dir(path: Path) -> bool:
    """Whether the directory ``path`` is one slide (a registered format recognises it: a zarr store, a DICOM
    folder) rather than a folder of slides."""
    fmt = format_for_path(path)
    return fmt is not None and fmt.directory


def _is_slide_file(entry: os.DirEntry[str]) -> bool:
    return entry.name.lower().endswith(scan_suffixes(directory=False))


def _entry_kind(entry: os.DirEntry[str]) -> str | None:
    """``"dir"``, ``"file"``, ``"slide"`` (named like a slide but it cannot be looked at: a symbolic-link loop,
    no permission; it fails as that slide, with the reason) or None (skipped, with a warning)."""
    try:
        return "dir" if entry.is_dir() else "file" if entry.is_file() else None
    except OSError as e:
        if entry.name.lower().endswith(slide_suffixes()):
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
            if (out_dir is not None and resolved(p) == out_dir) or written_by_hishrst(p):
                skipped.append(p)  # the output folder (--out), or an output of hishrst-run (S.zarr, a .partial)
            elif is_slide_dir(p):
                yield p
            elif recursive:
                yield from _walk(p, recursive, out_dir, skipped, seen)
        elif kind == "slide" or (kind == "file" and _is_slide_file(entry)):
            yield p


def _found(folder: Path, recursive: bool, out_dir: Path | None) -> list[Path]:
    skipped: list[Path] = []
    out = None if out_dir is None else resolved(out_dir)
    found = list(_walk(Path(folder), recursive, out, skipped))
    if skipped:
        log.info("%s: skipped %d output(s) of hishrst-run: %s", folder, len(skipped),
                 ", ".join(p.name for p in skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
    if not found:
        what = ("slide directories (*.zarr, DICOM folders) or " + ", ".join(f"*{s}" for s in
                                                                             scan_suffixes(directory=False)) + " files")
        hint = "" if recursive else "; add --recursive to search its sub-folders"
        also = f"; skipped {len(skipped)} output(s) of hishrst-run" if skipped else ""
        raise InputError(f"{folder}: a folder without slides (looked for {what}{also}){hint}")
    log.info("%s: %d slide(s)%s", folder, len(found), " (recursive)" if recursive else "")
    return found


def slides_in_folder(folder: Path, *, recursive: bool = False, out_dir: Path | None = None) -> list[Path]:
    """The slides in ``folder`` (see the module docstring), sorted by path; ``recursive``: also in sub-folders.
    Stores hishrst wrote (root attribute ``hishrst_status``) and the output folder ``out_dir`` (when inside
    ``folder``) are skipped. Raises :class:`InputError` when there are no slides."""
    return _found(folder, recursive, out_dir)


def _folder_inputs(folder: Path, recursive: bool, out_dir: Path | None) -> list[SlideInput]:
    """The slides of a folder, each named by its path relative to ``folder`` (``p1/S``)."""
    out = []
    for p in _found(folder, recursive, out_dir):
        rel = p.relative_to(folder)
        out.append(SlideInput(p, name=(rel.parent / strip_slide_suffix(rel.name)).as_posix()))
    return out


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines that are neither blank nor ``#`` comments."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the slide list ({e}); pass a text file with one slide path or "
                         "URL a line, or a CSV sheet with a header slide[,points][,mask][,name]") from e
    return [(n, ln) for n, ln in enumerate(text.splitlines(), 1) if ln.strip() and not ln.strip().startswith("#")]


def _header(line: str) -> list[str] | None:
    """The sheet columns named by ``line``, or None when it is not a sheet header."""
    cells = [c.strip().lower() for c in next(csv.reader([line]))]
    return cells if "slide" in cells else None


def _sheet_path(value: str, base: Path) -> SlideArg:
    arg = as_slide_arg(value)
    if is_remote(arg):
        return arg
    p = Path(arg)
    return p if p.is_absolute() else base / p


def _sheet_row(path: Path, n: int, row: dict[str, str]) -> SlideInput:
    cell = {k: (row.get(k) or "").strip() for k in SHEET_COLUMNS}
    if not cell["slide"]:
        raise InputError(f"{path}, line {n}: the slide cell is empty; name a slide path or URL on every row")
    base = path.parent
    extra = {}
    for col in ("points", "mask"):
        if cell[col]:
            f = Path(_sheet_path(cell[col], base))
            if not f.exists():
                raise InputError(f"{path}, line {n}: the {col} file {f} does not exist (relative paths are "
                                 "relative to the sheet's folder); fix the path")
            extra[col] = f
    try:
        return SlideInput(_sheet_path(cell["slide"], base), name=cell["name"] or None, **extra)
    except InputError as e:
        raise InputError(f"{path}, line {n}: {e}") from e


def _read_sheet(path: Path, lines: list[tuple[int, str]], columns: list[str]) -> list[SlideInput]:
    unknown = [c for c in columns if c not in SHEET_COLUMNS]
    if unknown or len(set(columns)) != len(columns):
        raise InputError(f"{path}: the sheet header has unknown or repeated column(s) {', '.join(unknown) or columns}; "
                         f"use the columns {', '.join(SHEET_COLUMNS)} (slide required)")
    body = io.StringIO("\n".join(ln for _, ln in lines[1:]))
    reader = csv.DictReader(body, fieldnames=columns, restkey="_extra")
    out = []
    for (n, _), row in zip(lines[1:], reader):
        if row.get("_extra"):
            raise InputError(f"{path}, line {n}: more cells than the header's {len(columns)} columns; quote "
                             "cells that hold commas")
        out.append(_sheet_row(path, n, row))
    return out


def read_slide_list(path: str | Path) -> list[SlideInput]:
    """The slides of ``--slides-from FILE``: a slide sheet (CSV with a header ``slide[,points][,mask][,name]``,
    relative paths from the sheet's folder) or a plain list (one path or URL a line, relative paths from the
    current directory), in order. Raises :class:`InputError` naming the file (and line) when it cannot be
    read, names no slides, or a sheet row is unusable."""
    p = Path(path)
    lines = _lines(p)
    columns = _header(lines[0][1]) if lines else None
    items = _read_sheet(p, lines, columns) if columns else [SlideInput(ln.strip()) for _, ln in lines]
    if not items:
        raise InputError(f"{p}: the slide list names no slides (blank and # lines are ignored); add one path "
                         "or URL a line, or sheet rows under a header slide[,points][,mask][,name]")
    return items


def _expand(item: SlideInput, recursive: bool, out_dir: Path | None) -> list[SlideInput]:
    if is_remote(item.slide):
        return [item]
    p = Path(item.slide)
    try:
        folder = p.is_dir() and not is_slide_dir(p)
    except OSError:  # a name too long, ...: reported per slide by the reader
        folder = False
    if not folder:
        return [item]  # a slide directory, a file, or a missing path (reported per slide by the reader)
    if item.points is not None or item.mask is not None or item.name is not None:
        raise InputError(f"{p}: a folder of slides cannot take one points file, mask or output name; list its "
                         "slides one a row in the sheet")
    return _folder_inputs(p, recursive, out_dir)


def expand_inputs(args: Iterable[str | os.PathLike[str] | SlideInput], *, slides_from: Iterable[str | Path] = (),
                  recursive: bool = False, out_dir: Path | None = None, points: Path | None = None,
                  mask: Path | None = None) -> list[SlideInput]:
    """The slides named by ``args`` and the slide lists / sheets ``slides_from`` (their entries after ``args``):
    folders of slides expanded (without hishrst's own outputs and the output folder ``out_dir``: see
    :func:`slides_in_folder`), URLs kept as strings, ``file://`` URLs made paths, later repeats of the same
    slide (same resolved path or URL) dropped; ``points`` / ``mask`` (``--points`` / ``--tissue-mask``) are
    the defaults of every slide without its own. Raises :class:`InputError` for a folder without slides or
    an unreadable list."""
    named = [a if isinstance(a, SlideInput) else SlideInput(a) for a in args]
    for f in slides_from:
        named += read_slide_list(f)
    out: list[SlideInput] = []
    seen: set[str] = set()
    for item in named:
        for s in _expand(item, recursive, out_dir):
            if s.key not in seen:
                seen.add(s.key)
                out.append(s.with_defaults(points=points, mask=mask))
    return out


def expand_slides(args: Iterable[str | os.PathLike[str]], *, slides_from: Iterable[str | Path] = (),
                  recursive: bool = False, out_dir: Path | None = None) -> list[SlideArg]:
    """The slides of :func:`expand_inputs`, without their records."""
    return [i.slide for i in expand_inputs(args, slides_from=slides_from, recursive=recursive, out_dir=out_dir)]
