"""Explicit query points from a file (``hishrst-run --points FILE``), torch-free.

Three formats, each read into :class:`QueryPoints` (level-0 pixel (x, y) in the file's row order, and
the point names when the file has them):

- **CSV** (any other file): a header row with columns ``x`` and ``y`` (level-0 pixels; names are
  matched case-insensitively) and an optional ``id`` column, used as the output's obs names.
- **AnnData** ``.h5ad``: ``obsm['spatial']`` (level-0 pixel (x, y), as Space Ranger and scanpy store it);
  obs names from the file's obs index. Read with h5py, lazily.
- **Space Ranger** ``outs`` folder (or its ``spatial`` folder): ``spatial/tissue_positions.csv`` (with a
  header) or ``spatial/tissue_positions_list.csv`` (without), columns ``barcode, in_tissue, array_row,
  array_col, pxl_row_in_fullres, pxl_col_in_fullres``; only in-tissue spots (``in_tissue == 1``), named
  by barcode, with x = ``pxl_col_in_fullres`` and y = ``pxl_row_in_fullres``.

Every problem is an :class:`~hishrst_runtime.core.errors.InputError` naming the file, what is wrong and
the fix. Points are named in messages by their id, else by the file's line number for CSV tables (the
header is line 1), else by their 0-based row (an ``.h5ad``'s obs order, an array).
:func:`check_points_inside` refuses points whose centres lie outside the slide.
"""

from __future__ import annotations

import csv
import logging
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.spaceranger import POSITION_FILES, find_spot_table, read_spot_table

__all__ = ["QueryPoints", "read_points", "check_points_inside", "MANY_POINTS"]

_FIX_CSV = "write a header row `x,y` (level-0 pixels; optional `id`), one point a row"
_SHOWN = 3  # offending rows named in a message
#: More points than this in one file are warned about (memory and time); the one definition of the limit.
MANY_POINTS = 2_000_000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueryPoints:
    """Explicit query points: ``xy_px`` float64 ``[N, 2]`` level-0 pixel (x, y) in the file's order,
    ``names`` (``N`` unique obs names, or ``None``: the output numbers them ``p0, p1, ...``), ``source``
    (the file, for messages) and ``lines`` (each point's line in a CSV file, header = line 1, as a list or
    a ``range``; or None)."""

    xy_px: np.ndarray
    names: list[str] | None
    source: str
    lines: Sequence[int] | None = None

    def __len__(self) -> int:
        return int(self.xy_px.shape[0])

    def label(self, i: int) -> str:
        """Point ``i`` as messages name it: its id, its CSV line, or its 0-based row."""
        if self.names is not None:
            return repr(self.names[i])
        return _where([i], self.lines)


def read_points(path: str | Path) -> QueryPoints:
    """The query points of a CSV file, an ``.h5ad`` or a Space Ranger ``outs`` folder (see the module
    docstring), in the file's order; raises :class:`InputError` naming the file and the fix."""
    p = Path(path)
    if p.is_dir():
        return _read_spaceranger(p)
    if not p.is_file():
        raise InputError(f"{p}: no such points file; pass a CSV with header `x,y`, an .h5ad with "
                         "obsm['spatial'] or a Space Ranger outs folder")
    if p.suffix.lower() == ".h5ad":
        return _finish(p, *_read_h5ad(p))
    xy, names, lines = _read_csv(p)
    return _finish(p, xy, names, lines=lines)


def _where(idx: Sequence[int], lines: Sequence[int] | None) -> str:
    """``line 3, 7`` (CSV line numbers, header = line 1) or ``row 0, 4 (0-based)`` for points ``idx``."""
    if lines is not None:
        return "line " + ", ".join(str(lines[int(i)]) for i in idx)
    return "row " + ", ".join(str(int(i)) for i in idx) + " (0-based)"


def _finish(path: Path, xy: np.ndarray, names: list[str] | None, what: str = "point",
            lines: Sequence[int] | None = None) -> QueryPoints:
    """Check shape, finiteness and unique names; the :class:`QueryPoints` of ``path`` (``lines``: each
    point's line in the file, for messages)."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if len(xy) == 0:
        raise InputError(f"{path}: no {what}s in the file; {_FIX_CSV}")
    bad = np.flatnonzero(~np.isfinite(xy).all(axis=1))
    if bad.size:
        raise InputError(f"{path}: {bad.size} {what}(s) without finite x, y ({_where(bad[:_SHOWN], lines)}); "
                         "fill in or drop those rows")
    if names is not None:
        dup = [n for n, c in Counter(names).items() if c > 1]
        if dup:
            raise InputError(f"{path}: {len(dup)} duplicate id(s) ({', '.join(map(repr, dup[:_SHOWN]))}); "
                             "ids become the output's obs names and must be unique")
    if len(xy) > MANY_POINTS:
        log.warning("%s: %s %ss (more than %s): predicting them takes memory and time in proportion (the "
                    "output holds one row of every gene per point); check that this is the intended file",
                    path, f"{len(xy):,}", what, f"{MANY_POINTS:,}")
    return QueryPoints(xy_px=xy, names=names, source=str(path), lines=lines)


def _number(text: str, path: Path, line: int, column: str) -> float:
    try:
        return float(text)
    except ValueError as e:
        raise InputError(f"{path}: line {line} has {column}={text!r}, not a number; "
                         "coordinates are level-0 pixels such as 1234.5") from e


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """The non-blank rows of a CSV file with their line numbers (1-based, as an editor shows them)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        return [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]


def _csv_header(path: Path, reader: Any) -> list[str]:
    """The first non-blank row of ``reader`` (lower-cased, stripped), checked for ``x`` and ``y``."""
    for r in reader:
        if any(c.strip() for c in r):
            header = [c.strip().lower() for c in r]
            missing = [c for c in ("x", "y") if c not in header]
            if missing:
                raise InputError(f"{path}: missing column(s) {', '.join(missing)} in the header "
                                 f"({', '.join(r) or 'empty'}); {_FIX_CSV}")
            return header
    raise InputError(f"{path}: the points file is empty; {_FIX_CSV}")


def _read_csv(path: Path) -> tuple[np.ndarray, list[str] | None, Sequence[int]]:
    """(xy, ids or None, line numbers) of a CSV with header ``x,y[,id]`` (any column order, case-insensitive).

    Streamed row by row into compact arrays (16 bytes a point, plus the ids when there are any), so ten
    million points do not hold their text in memory; the line numbers are a ``range`` when no line is blank.
    """
    xs, ys, lines, ids = array("d"), array("d"), array("q"), []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = _csv_header(path, reader)
            ix, iy = header.index("x"), header.index("y")
            iid = header.index("id") if "id" in header else None
            for r in reader:
                if len(r) < len(header):
                    if not any(c.strip() for c in r):
                        continue
                    raise InputError(f"{path}: line {reader.line_num} has {len(r)} field(s), the header "
                                     f"{len(header)}; {_FIX_CSV}")
                if not any(c.strip() for c in r):
                    continue
                xs.append(_number(r[ix].strip(), path, reader.line_num, "x"))
                ys.append(_number(r[iy].strip(), path, reader.line_num, "y"))
                lines.append(reader.line_num)
                if iid is not None:
                    ids.append(r[iid].strip())
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: cannot read the points CSV ({e}); {_FIX_CSV}") from e
    xy = np.stack([np.frombuffer(xs, dtype=np.float64), np.frombuffer(ys, dtype=np.float64)], axis=1)
    n = len(lines)
    contiguous = n == 0 or lines[-1] - lines[0] == n - 1
    return xy, (ids if iid is not None else None), (range(lines[0], lines[0] + n) if n and contiguous
                                                    else lines.tolist())


def _decode(values: Sequence[object]) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _read_h5ad(path: Path) -> tuple[np.ndarray, list[str] | None]:
    """(obsm['spatial'][:, :2], obs names) of an ``.h5ad``, read with h5py."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            spatial = f.get("obsm/spatial")
            if not isinstance(spatial, h5py.Dataset):
                raise InputError(f"{path}: no obsm['spatial'] array in the AnnData file; store the level-0 "
                                 "pixel (x, y) of each point in adata.obsm['spatial']")
            xy = np.asarray(spatial[()], dtype=np.float64)
            obs = f.get("obs")
            key = obs.attrs.get("_index") if isinstance(obs, h5py.Group) else None
            names = _decode(obs[key][()]) if key is not None and key in obs else None
    except OSError as e:
        raise InputError(f"{path}: not a readable .h5ad (HDF5) file ({e}); pass an AnnData file written by "
                         "anndata.write_h5ad") from e
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise InputError(f"{path}: obsm['spatial'] has shape {xy.shape}; expected [points, 2] level-0 pixel (x, y)")
    if names is not None and len(names) != len(xy):
        raise InputError(f"{path}: the obs index has {len(names)} names but obsm['spatial'] {len(xy)} rows; "
                         "write the file with anndata (one obs name and one (x, y) per point)")
    return xy[:, :2], names


def _read_spaceranger(folder: Path) -> QueryPoints:
    """In-tissue spots of a Space Ranger ``outs`` (or ``outs/spatial``) folder, in the file's order
    (the one spot-table parser: :mod:`hishrst_runtime.core.spaceranger`)."""
    path = find_spot_table(folder)
    if path is None:
        looked = ", ".join(f"spatial/{n}" for n in POSITION_FILES)
        raise InputError(f"{folder}: a folder, but not a Space Ranger outs folder (looked for {looked}); pass the "
                         "outs folder, a CSV with header `x,y` or an .h5ad with obsm['spatial']")
    table = read_spot_table(path)
    keep = table.in_tissue
    return _finish(path, table.xy_px[keep], [str(b) for b in table.barcodes[keep]], what="in-tissue spot",
                   lines=table.lines[keep].tolist())


def check_points_inside(points: QueryPoints, *, shape0: tuple[int, int], slide: str) -> None:
    """Raise :class:`InputError` naming the first few points whose centre lies outside the slide's level 0
    (``shape0`` = (height, width) pixels; inside means ``0 <= x < width`` and ``0 <= y < height``)."""
    h, w = shape0
    x, y = points.xy_px[:, 0], points.xy_px[:, 1]
    bad = np.flatnonzero((x < 0) | (y < 0) | (x >= w) | (y >= h))
    if not bad.size:
        return
    shown = "; ".join(f"{points.label(int(i))} at ({x[i]:.1f}, {y[i]:.1f})" for i in bad[:_SHOWN])
    raise InputError(f"{points.source}: {bad.size} of {len(points)} point(s) lie outside the slide {slide} "
                     f"({w} x {h} level-0 pixels), e.g. {shown}; check that the points belong to this slide "
                     "and are level-0 pixel (x, y)")


def points_inside(points: QueryPoints, *, shape0: tuple[int, int], slide: str) -> tuple[QueryPoints, int]:
    """(the points whose centre lies on the slide's level 0, how many were left out), for
    ``--points-outside drop``: the kept points keep their names (numbered rows keep their numbers: row ``i``
    of the file stays ``p<i>``) and order. A warning gives the count; :class:`InputError` when none is left."""
    from hishrst_runtime.output.content import default_obs_names

    h, w = shape0
    x, y = points.xy_px[:, 0], points.xy_px[:, 1]
    keep = np.flatnonzero((x >= 0) & (y >= 0) & (x < w) & (y < h))
    dropped = len(points) - keep.size
    if not dropped:
        return points, 0
    if not keep.size:
        check_points_inside(points, shape0=shape0, slide=slide)  # raises, naming the first points
    names = points.names if points.names is not None else default_obs_names(range(len(points)))
    lines = None if points.lines is None else [points.lines[i] for i in keep]
    first = int(np.setdiff1d(np.arange(len(points)), keep)[0])
    log.warning("%s: dropped %d of %d point(s) outside the slide %s (%d x %d level-0 pixels), e.g. %s at "
                "(%.1f, %.1f); pass --points-outside error to refuse them", points.source, dropped, len(points),
                slide, w, h, points.label(first), x[first], y[first])
    return QueryPoints(points.xy_px[keep], [names[i] for i in keep], points.source, lines), dropped
