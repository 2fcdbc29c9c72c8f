"""Checks of an incomplete store (``OUT.zarr.partial``) before it is finished: its claimed X chunks are what
was written (:func:`verify_claims`), and it was made by the same run that wants to finish it
(:func:`check_same_run`)."""

from __future__ import annotations

import hashlib
import logging
import reprlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.output.encoding import SKIP, XChunks, to_uns, values_equal
from hishrst_runtime.output.errors import NOT_WRITABLE_ERRNOS, OutputMismatchError, not_writable
from hishrst_runtime.output.progress import ChunkClaim, ProgressRecords

__all__ = ["open_group", "unreadable", "check_same_run", "verify_claims"]

log = logging.getLogger(__name__)


def _claim_problem(x: XChunks, c: ChunkClaim) -> str | None:
    """Why chunk ``c``'s claimed rows cannot be trusted, or None. A record with a checksum needs the file with
    exactly those bytes; an older record without one needs a file that decodes to a whole chunk."""
    path = x.path(c.k)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return "its file is missing"
    if c.digest is not None:
        return None if hashlib.sha256(raw).digest() == c.digest else "its checksum does not match"
    try:
        x.read(c.k, c.hi - c.lo)
    except (ValueError, RuntimeError, TypeError) as e:  # a wrong size, or the codec refused the bytes
        return f"it does not decode ({e})"
    return None


def verify_claims(progress: ProgressRecords, x: XChunks, work: Path) -> tuple[np.ndarray, list[int], int]:
    """(done mask bool [n_obs], chunks unclaimed, chunks trusted without a checksum) of the partial ``work``.

    Every claimed X chunk is checked (:func:`_claim_problem`); a chunk that fails is unclaimed (its
    record deleted, a warning logged) so its rows are computed again. Records written before checksums
    (hishrst < this release) are trusted when their file exists and decodes, with one warning.
    """
    done = np.zeros(progress.n_obs, dtype=bool)
    bad: list[int] = []
    legacy = 0
    for c in progress.claims():
        problem = _claim_problem(x, c)
        if problem is not None:
            log.warning("%s: X chunk %s claims %d rows but %s; they are computed again", work, x.path(c.k).name,
                        int(c.filled.sum()), problem)
            progress.unclaim(c.k)
            bad.append(c.k)
            continue
        legacy += c.digest is None
        done[c.lo:c.hi] = c.filled
    if legacy:
        log.warning("%s: %d X chunk(s) were written before chunk checksums; they are kept unverified (they "
                    "exist and decode); use --overwrite instead of --resume to recompute them", work, legacy)
    return done, bad, legacy


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
