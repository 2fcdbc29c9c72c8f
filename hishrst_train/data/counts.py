"""What a training section's expression matrix must hold, checked when the section is read.

``--counts raw`` (the default): ``X`` holds raw UMI counts — finite, non-negative whole numbers (Space
Ranger's matrix, HEST's ``st/<id>.h5ad``); hishrst normalises them (log1p of counts per 10k).
``--counts log``: ``X`` already holds log1p of counts normalised per spot to 10,000 (scanpy's
``normalize_total(target_sum=1e4)`` then ``log1p``) — finite and non-negative, not necessarily whole
numbers; it is used as the model's target as is (no second normalisation).

A matrix with NaN / inf, negative values, fractions (``raw``), or nothing but zeros is refused with one
line naming the file, how many values are bad and the fix. :func:`count_fingerprint` identifies a
section by its content, so the same section given twice (a copy, ``outs`` and its parent) is refused.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from hishrst_train.data.errors import DataError

__all__ = ["COUNTS_MODES", "CountsMode", "CountsError", "check_counts_mode", "check_counts", "count_fingerprint"]

log = logging.getLogger("hishrst")

CountsMode = Literal["raw", "log"]
#: The values of ``--counts``.
COUNTS_MODES: tuple[str, ...] = ("raw", "log")
_LOG_TARGET_SUM = 1e4


class CountsError(DataError):
    """A section's expression matrix is not what ``--counts`` says (NaN, negative, fractional or all zero)."""


def check_counts_mode(mode: Any) -> CountsMode:
    """``mode`` if it is ``raw`` or ``log``, else a :class:`CountsError` naming ``--counts``."""
    if mode not in COUNTS_MODES:
        raise CountsError(f"--counts {mode!r}: choose raw (UMI counts) or log (log1p of counts per 10k)")
    return mode  # type: ignore[no-any-return]


def _values(X: Any) -> np.ndarray:
    """The stored values of ``X`` (a sparse matrix's explicit entries; implicit zeros are valid anyway)."""
    if sp.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X).ravel()


def _bad(values: np.ndarray, mode: CountsMode) -> list[str]:
    """Descriptions of the bad values in ``values`` for ``mode`` (empty when all are valid)."""
    v = values.astype(np.float64, copy=False)
    finite = np.isfinite(v)
    problems = []
    if n := int((~finite).sum()):
        problems.append(f"{n} NaN/inf")
    if n := int((v[finite] < 0).sum()):
        problems.append(f"{n} negative")
    if mode == "raw":
        vf = v[finite]
        if n := int((vf != np.round(vf)).sum()):
            problems.append(f"{n} non-integer")
    return problems


def check_counts(adata: Any, *, source: str | Path, mode: CountsMode = "raw") -> None:
    """Refuse ``adata.X`` unless it holds valid ``mode`` values (see the module docstring); ``source``
    (the section's file) is named in the error. Warns when ``log`` data do not look normalised to 10k."""
    mode = check_counts_mode(mode)
    X = adata.X
    if X is None or adata.n_vars == 0 or adata.n_obs == 0:
        raise CountsError(f"{source}: the expression matrix is empty ({adata.n_obs} spots × {adata.n_vars} genes); "
                          "pass the section's full spots × genes matrix")
    values = _values(X)
    if problems := _bad(values, mode):
        total = int(np.prod(X.shape))
        if mode == "raw":
            need = "raw counts: finite, non-negative whole numbers"
            fix = ("pass the raw UMI counts (Space Ranger's filtered_feature_bc_matrix.h5 / HEST's st/<id>.h5ad), "
                   "or --counts log if X holds log1p-normalised values")
        else:
            need = "finite, non-negative values"
            fix = "pass finite, non-negative log1p-normalised values (or the raw counts with --counts raw)"
        raise CountsError(f"{source}: the expression matrix has {' and '.join(problems)} values (of {total}); "
                          f"--counts {mode} needs {need}. Fix: {fix}")
    if not np.any(values):
        raise CountsError(f"{source}: every count is zero ({adata.n_obs} spots × {adata.n_vars} genes); nothing can "
                          "be learned — pass the section's measured expression matrix")
    if mode == "log":
        _warn_unnormalised(X, source)


def _warn_unnormalised(X: Any, source: str | Path) -> None:
    """Log a warning when ``expm1`` of the spots' values does not sum to ≈ 10k (log data on another scale)."""
    E = X.expm1() if sp.issparse(X) else np.expm1(np.asarray(X, dtype=np.float64))
    totals = np.asarray(E.sum(axis=1), dtype=np.float64).ravel()
    totals = totals[totals > 0]
    median = float(np.median(totals)) if totals.size else 0.0
    if not 0.5 * _LOG_TARGET_SUM <= median <= 1.5 * _LOG_TARGET_SUM:
        log.warning("%s: --counts log expects log1p of counts per 10k, but expm1 of the values sums to a median of "
                    "%.4g per spot; predictions will be on the scale of the data given", source, median)


def count_fingerprint(adata: Any) -> str:
    """SHA-256 of a section's content: spot and gene names, spot coordinates and the expression matrix."""
    h = hashlib.sha256()
    for names in (adata.obs_names, adata.var_names):
        h.update("\x00".join(map(str, names)).encode())
        h.update(b"\x01")
    if "spatial" in adata.obsm:
        h.update(np.ascontiguousarray(adata.obsm["spatial"], dtype=np.float64).tobytes())
    X = adata.X
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        X.sort_indices()
        for a in (X.indptr, X.indices, X.data):
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    else:
        h.update(np.ascontiguousarray(X, dtype=np.float64).tobytes())
    return h.hexdigest()
