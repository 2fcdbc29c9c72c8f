"""Space Ranger's spot table (``spatial/tissue_positions.csv`` or the older ``tissue_positions_list.csv``): the
one parser, used by training's Visium reader and by ``hishrst-run --points OUTS``.

The table has six columns — barcode, in_tissue, array_row, array_col, pxl_row_in_fullres,
pxl_col_in_fullres — with a header row (Space Ranger ≥ 2.0) or without one (older versions); the header is
recognised by a field named ``barcode``, whatever the file is called, and its columns are taken by name. Pixel coordinates are full-resolution
(level-0) pixels; rows keep the file's order.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hishrst_runtime.core.errors import InputError

__all__ = ["POSITION_FILES", "SPOT_TABLE_COLUMNS", "SpotTable", "find_spot_table", "read_spot_table"]

#: Space Ranger's spot tables inside ``spatial/``, newest first.
POSITION_FILES: tuple[str, ...] = ("tissue_positions.csv", "tissue_positions_list.csv")
#: Columns of a Space Ranger spot table, in file order.
SPOT_TABLE_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
_TRUE = ("1", "1.0", "true")
_FIX = "restore the file from Space Ranger's outs/spatial/"


@dataclass(frozen=True)
class SpotTable:
    """A parsed spot table: per spot (file order) its ``barcode``, ``in_tissue`` flag, Visium ``array_rc``
    (row, col) and ``xy_px`` (x, y) in full-resolution pixels; ``path`` the file and ``lines`` its line numbers."""

    path: Path
    barcodes: np.ndarray
    in_tissue: np.ndarray
    array_rc: np.ndarray
    xy_px: np.ndarray
    lines: np.ndarray


def find_spot_table(folder: Path) -> Path | None:
    """The spot table of a Space Ranger ``outs`` folder (or its ``spatial/`` folder), newest format first."""
    folder = Path(folder)
    for base in (folder / "spatial", folder):
        for name in POSITION_FILES:
            if (base / name).is_file():
                return base / name
    return None


def _rows(path: Path) -> list[tuple[int, list[str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            return [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: cannot read the spot table ({e}); {_FIX}") from e


def _columns(path: Path, rows: list[tuple[int, list[str]]]) -> tuple[list[int], list[tuple[int, list[str]]]]:
    """Column indices of :data:`SPOT_TABLE_COLUMNS` and the data rows (a header is recognised by ``barcode``)."""
    header = [c.strip().strip('"').lower() for c in rows[0][1]] if rows else []
    if "barcode" in header:
        missing = [c for c in SPOT_TABLE_COLUMNS if c not in header]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)}; a Space Ranger spot table has "
                             f"{', '.join(SPOT_TABLE_COLUMNS)}; {_FIX}")
        return [header.index(c) for c in SPOT_TABLE_COLUMNS], rows[1:]
    return list(range(len(SPOT_TABLE_COLUMNS))), rows


def _number(text: str, path: Path, line: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError as e:
        raise InputError(f"{path}: line {line}: {column} {text!r} is not a number; {_FIX}") from e
    if not np.isfinite(value):
        raise InputError(f"{path}: line {line}: {column} {text!r} is not finite; {_FIX}")
    return value


def read_spot_table(path: Path) -> SpotTable:
    """Parse the spot table at ``path`` (see the module docstring); :class:`InputError` names the file, the
    line and the fix for anything malformed."""
    path = Path(path)
    cols, rows = _columns(path, _rows(path))
    n = len(SPOT_TABLE_COLUMNS)
    barcodes, flags, rc, xy, lines = [], [], [], [], []
    for line, r in rows:
        if len(r) < n:
            raise InputError(f"{path}: line {line} has {len(r)} field(s), expected {n} "
                             f"({', '.join(SPOT_TABLE_COLUMNS)}); {_FIX}")
        f = [r[c].strip().strip('"') for c in cols]
        barcodes.append(f[0])
        flags.append(f[1].lower() in _TRUE)
        rc.append((_number(f[2], path, line, "array_row"), _number(f[3], path, line, "array_col")))
        xy.append((_number(f[5], path, line, "pxl_col_in_fullres"), _number(f[4], path, line, "pxl_row_in_fullres")))
        lines.append(line)
    return SpotTable(path=path, barcodes=np.asarray(barcodes, dtype=object), in_tissue=np.asarray(flags, dtype=bool),
                     array_rc=np.asarray(rc, dtype=np.float64).reshape(-1, 2),
                     xy_px=np.asarray(xy, dtype=np.float64).reshape(-1, 2), lines=np.asarray(lines, dtype=np.int64))
