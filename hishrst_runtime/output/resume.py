"""Checks that an incomplete store (``OUT.zarr.partial``) was made by the same run that wants to finish it."""

from __future__ import annotations

import reprlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.output.encoding import SKIP, to_uns, values_equal
from hishrst_runtime.output.errors import NOT_WRITABLE_ERRNOS, OutputMismatchError, not_writable

__all__ = ["open_group", "unreadable", "check_same_run"]


def open_group(work: Path) -> Any:
    """The zarr group of the partial store ``work`` (read-only); an unreadable one raises OutputMismatchError."""
    import zarr

    try:
        return zarr.open_group(work, mode="r", zarr_format=2, use_consolidated=False)
    except (KeyError, OSError, ValueError) as e:
        raise unreadable(work, e) from e


def unreadable(work: Path, e: Exception) -> Exception:
    """The error for a partial store that cannot be opened: not writable, or unreadable (start again)."""
    if isinstance(e, OSError) and e.errno in NOT_WRITABLE_ERRNOS:
        return not_writable(e, work, "open the incomplete output")
    return OutputMismatchError(f"{work}: the incomplete output is unreadable ({e}); use --overwrite")


def _mismatch(work: Path, what: str, detail: str) -> OutputMismatchError:
    return OutputMismatchError(f"{work}: the incomplete output was made with different {what} than this run "
                               f"({detail}); rerun with --overwrite to discard it and start again")


def check_same_run(
    work: Path, root: Any, *, obs_xy_px: np.ndarray | None, grid_index: np.ndarray | None,
    genes: Sequence[str] | None, expected_uns: Mapping[str, Any] | None,
) -> None:
    """Compare what is given with what the store ``root`` holds; any difference raises OutputMismatchError."""
    if genes is not None or expected_uns:
        import anndata as ad  # only here: checking points alone does not pay for importing anndata
    if genes is not None:
        stored = [str(g) for g in ad.io.read_elem(root["var"]).index]
        if stored != [str(g) for g in genes]:
            raise _mismatch(work, "genes", f"{len(stored)} stored vs {len(genes)} now")
    if obs_xy_px is not None:
        stored_xy = np.asarray(root["obsm"]["spatial"][...])
        xy = np.asarray(obs_xy_px, dtype=np.float64)
        if stored_xy.shape != xy.shape or not np.array_equal(stored_xy, xy):
            raise _mismatch(work, "query points", f"{stored_xy.shape[0]} stored vs {xy.shape[0]} now")
    if grid_index is not None:
        obs = root["obs"]
        stored_grid = np.stack([obs["grid_row"][...], obs["grid_col"][...]], axis=1)
        if not values_equal(stored_grid, np.asarray(grid_index)):
            raise _mismatch(work, "grid indices", "grid_row/grid_col differ")
    uns = root["uns"]
    for key, value in (expected_uns or {}).items():
        want = to_uns(value, key)  # normalised exactly as create() stored it (None values dropped)
        have = ad.io.read_elem(uns[key]) if key in uns else SKIP
        if (have is SKIP) != (want is SKIP) or (want is not SKIP and not values_equal(have, want)):
            raise _mismatch(work, f"uns[{key!r}]", f"stored {reprlib.repr(have)} vs {reprlib.repr(value)} now")
