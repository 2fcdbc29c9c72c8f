"""Expression preprocessing: highly variable genes (train spots only) and per-spot log-normalisation.

Leakage rule of the recovery task: held-out spots must never influence gene selection, so
:func:`select_hvgs` computes Seurat v3 HVGs on the raw counts of the training spots only when a
``train_mask`` is given. Normalisation (:func:`normalize_log1p`) is per spot — each spot's counts are
scaled by its own total — so it cannot leak either.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["log_expression", "normalize_log1p", "preprocess", "select_hvgs"]

log = logging.getLogger("hishrst")


def _train_rows(n_obs: int, train_mask: Any) -> np.ndarray:
    """Row indices of the training spots from a boolean mask or an index array."""
    m = np.asarray(train_mask)
    if m.dtype == bool:
        if m.shape != (n_obs,):
            raise ValueError(f"train_mask must be a boolean array of length n_obs={n_obs}, got shape {m.shape}")
        rows = np.flatnonzero(m)
    elif np.issubdtype(m.dtype, np.integer):
        rows = np.unique(m)
        if rows.size and (rows[0] < 0 or rows[-1] >= n_obs):
            raise ValueError(f"train_mask indices must lie in [0, {n_obs}), got {rows[0]}..{rows[-1]}")
    else:
        raise ValueError(f"train_mask must be a boolean mask or integer indices, got dtype {m.dtype}")
    if rows.size < 2:
        raise ValueError(f"gene selection needs at least 2 training spots, got {rows.size}")
    return rows


def _counts(adata: Any, layer: str | None) -> Any:
    X = adata.layers[layer] if layer is not None else adata.X
    sample = X.data[:1000] if sp.issparse(X) else np.asarray(X).ravel()[:1000]
    if sample.size and (np.any(sample < 0) or np.any(np.round(sample) != sample)):
        raise ValueError(
            "seurat_v3 gene selection needs raw counts but X holds non-integer values; pass layer='counts' "
            "(or keep the raw UMI counts in X)"
        )
    return X


def select_hvgs(
    adata: Any,
    *,
    n_top: int = 1000,
    train_mask: np.ndarray | Sequence[int] | None = None,
    layer: str | None = None,
    batch: np.ndarray | Sequence[Any] | None = None,
    counts: str = "raw",
) -> list[str]:
    """Names of the ``n_top`` Seurat v3 highly variable genes, in the order of ``adata.var_names``.

    Computed with scanpy (``flavor="seurat_v3"``, needs scikit-misc) on raw counts (``X`` or
    ``layers[layer]``) of the training spots only when ``train_mask`` (boolean mask or row indices) is
    given. ``batch`` (one label per spot, e.g. the section) ranks genes per batch (scanpy's
    ``batch_key``), so one section's depth cannot dominate. ``counts="log"``: the matrix holds
    log1p-normalised values (``--counts log``), ranked with scanpy's ``seurat`` flavour instead. With ``n_top`` ≥ the number of genes, all
    genes are returned and a warning says so.
    """
    if n_top < 1:
        raise ValueError(f"n_top must be a positive number of genes, got {n_top}")
    genes = [str(g) for g in adata.var_names]
    if len(genes) <= n_top:
        msg = f"only {len(genes)} genes available (≤ n_top={n_top}); using all genes without HVG selection"
        log.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
        return genes
    import anndata as ad
    import scanpy as sc

    X = _counts(adata, layer) if counts == "raw" else (adata.layers[layer] if layer is not None else adata.X)
    rows = _train_rows(adata.n_obs, train_mask) if train_mask is not None else np.arange(adata.n_obs)
    sub = ad.AnnData(X=X[rows].astype(np.float32) if sp.issparse(X) else np.asarray(X)[rows].astype(np.float32))
    sub.var_names = adata.var_names.astype(str)
    batch_key = None
    if batch is not None:
        labels = np.asarray(batch)
        if labels.shape != (adata.n_obs,):
            raise ValueError(f"batch must hold one label per spot ({adata.n_obs}), got shape {labels.shape}")
        if len(np.unique(labels[rows])) > 1:
            sub.obs["batch"] = pd.Categorical(labels[rows].astype(str))
            batch_key = "batch"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        df = sc.pp.highly_variable_genes(sub, flavor="seurat_v3" if counts == "raw" else "seurat",
                                         n_top_genes=int(n_top), inplace=False, batch_key=batch_key)
    hv = np.asarray(df["highly_variable"], dtype=bool)
    if hv.size != len(genes):  # scanpy returns one row per gene, in var order
        raise RuntimeError(f"scanpy returned {hv.size} rows for {len(genes)} genes")
    return [g for g, keep in zip(genes, hv) if keep]


def normalize_log1p(adata_or_X: Any, *, target_sum: float = 1e4) -> Any:
    """``log1p(counts / spot_total * target_sum)`` as float32 (scanpy's normalize_total + log1p).

    Accepts a dense or sparse spots × genes matrix (returns the same kind) or an AnnData (returns a new
    AnnData with normalised ``X`` and the raw counts in ``layers['counts']``). Spots with no counts
    stay zero. Each spot is scaled by its own total, so no information crosses spots.
    """
    if not (np.isfinite(target_sum) and target_sum > 0):
        raise ValueError(f"target_sum must be a positive number of counts, got {target_sum!r}")
    if hasattr(adata_or_X, "obs_names") and hasattr(adata_or_X, "X"):
        out = adata_or_X.copy()
        out.layers["counts"] = adata_or_X.X.copy()
        out.X = _norm_matrix(adata_or_X.X, target_sum)
        return out
    return _norm_matrix(adata_or_X, target_sum)


def log_expression(adata: Any, genes: Sequence[str], *, target_sum: float = 1e4) -> np.ndarray:
    """The model's target for ``genes``: counts of those genes only, normalised per spot to ``target_sum``,
    then ``log1p`` — dense float32 ``[spots, genes]``. Training, ``evaluate``, the demo and the benchmarks
    all score against this, so a model's output and its measured truth are on one scale (normalising over
    all genes and then taking the subset would shift every spot by its share of the other genes).

    A section read with ``--counts log`` (``uns['hishrst']['counts'] == 'log'``) already holds normalised
    log1p values: they are returned as they are."""
    meta = getattr(adata, "uns", {}).get("hishrst") or {}
    if meta.get("counts") == "log":
        X = adata[:, list(genes)].X
        return np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float32)
    e = normalize_log1p(adata[:, list(genes)].X, target_sum=target_sum)
    return np.asarray(e.toarray() if hasattr(e, "toarray") else e, dtype=np.float32)


def _norm_matrix(X: Any, target_sum: float) -> Any:
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float32, copy=True)
        totals = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        X.data = np.log1p(X.data * np.repeat(scale, np.diff(X.indptr))).astype(np.float32)
        return X
    A = np.asarray(X, dtype=np.float64)
    if A.ndim != 2:
        raise ValueError(f"expected a 2-D spots × genes matrix, got shape {A.shape}")
    totals = A.sum(axis=1, keepdims=True)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p(A * scale).astype(np.float32)


def preprocess(
    adata: Any,
    *,
    n_top: int = 1000,
    train_mask: np.ndarray | Sequence[int] | None = None,
    target_sum: float = 1e4,
) -> Any:
    """Select HVGs (train spots only if ``train_mask``) and log-normalise; returns a new AnnData.

    Spot totals are taken over the selected genes (the convention of the training pipeline:
    ``normalize_log1p(adata[:, genes].X)``). Genes keep ``adata.var_names`` order; raw counts of the
    selected genes go to ``layers['counts']`` and the settings to ``uns['hishrst_preprocess']``.
    """
    genes = select_hvgs(adata, n_top=n_top, train_mask=train_mask)
    out = normalize_log1p(adata[:, genes].copy(), target_sum=target_sum)
    out.uns["hishrst_preprocess"] = {
        "hvg_flavor": "seurat_v3",
        "n_top_genes": int(n_top),
        "n_genes": len(genes),
        "train_only": train_mask is not None,
        "target_sum": float(target_sum),
        "log1p": True,
    }
    return out
