"""Evaluation metrics for predicted spatial expression (numpy; scikit-learn/-image for ARI and SSIM).

Per gene: Pearson correlation (PCC) across spots, mean squared error and mean absolute error. A gene
whose prediction (or truth) is constant has no defined PCC: it is *counted* (``n_constant``) and its
PCC is reported as NaN, and summaries give both the mean over defined genes and the mean with
constant genes scored as 0 — never silently dropped.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["per_gene_metrics", "summarise", "gene_map_ssim", "kmeans_ari"]


def per_gene_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Per-gene ``pcc``, ``mse``, ``mae`` and a ``constant`` flag for ``[N, G]`` arrays."""
    pred = np.asarray(pred, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match truth shape {truth.shape}")
    pc = pred - pred.mean(0)
    tc = truth - truth.mean(0)
    denom = np.sqrt((pc**2).sum(0) * (tc**2).sum(0))
    # Constant up to rounding: spread below 1e-9 of the values' magnitude.
    tiny = 1e-9 * np.maximum(1.0, np.maximum(np.abs(pred).max(0), np.abs(truth).max(0)))
    constant = (np.ptp(pred, axis=0) <= tiny) | (np.ptp(truth, axis=0) <= tiny) | (denom <= 1e-12)
    with np.errstate(invalid="ignore", divide="ignore"):
        pcc = np.where(constant, np.nan, (pc * tc).sum(0) / np.where(constant, 1.0, denom))
    return {
        "pcc": pcc,
        "mse": ((pred - truth) ** 2).mean(0),
        "mae": np.abs(pred - truth).mean(0),
        "constant": constant,
    }


def summarise(m: dict[str, np.ndarray]) -> dict[str, Any]:
    pcc = m["pcc"]
    defined = ~np.isnan(pcc)
    return {
        "n_genes": int(len(pcc)),
        "n_constant": int(m["constant"].sum()),
        "pcc_mean": float(np.nanmean(pcc)) if defined.any() else float("nan"),
        "pcc_mean_constant_as_zero": float(np.where(defined, pcc, 0.0).mean()),
        "pcc_median": float(np.nanmedian(pcc)) if defined.any() else float("nan"),
        "mse_mean": float(m["mse"].mean()),
        "mae_mean": float(m["mae"].mean()),
    }


def _raster(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, fill: float) -> np.ndarray:
    img = np.full((rows.max() + 1, cols.max() + 1), fill, dtype=np.float64)
    img[rows, cols] = values
    return img


def gene_map_ssim(pred: np.ndarray, truth: np.ndarray, array_row: np.ndarray, array_col: np.ndarray, *,
                  lattice: str = "visium") -> np.ndarray:
    """SSIM per gene between predicted and measured maps on the Visium array grid.

    Each gene's values are min–max scaled to [0, 1] (by the truth's range, prediction clipped) and
    rasterised at ``(array_row, array_col // 2)`` (the hexagonal lattice folded onto a rectangle;
    ``lattice="square"``: at ``(array_row, array_col)``, for square bins); cells without a spot are 0 in
    both maps.
    """
    from skimage.metrics import structural_similarity

    rows = np.asarray(array_row, dtype=np.int64)
    cols = np.asarray(array_col, dtype=np.int64) // (2 if lattice == "visium" else 1)
    rows, cols = rows - rows.min(), cols - cols.min()
    out = np.empty(pred.shape[1])
    for g in range(pred.shape[1]):
        t = truth[:, g]
        lo, hi = float(t.min()), float(t.max())
        span = hi - lo if hi > lo else 1.0
        a = _raster(np.clip((pred[:, g] - lo) / span, 0, 1), rows, cols, 0.0)
        b = _raster((t - lo) / span, rows, cols, 0.0)
        win = min(7, *a.shape)
        win -= 1 - win % 2  # the largest odd window that fits
        out[g] = structural_similarity(a, b, data_range=1.0, win_size=win) if win >= 3 else np.nan
    return out


def kmeans_ari(expr: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> float:
    """Adjusted Rand index of k-means clusters (k = number of labels, on 30 PCs) against ``labels``."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score

    labels = np.asarray(labels)
    k = len(np.unique(labels))
    x = np.asarray(expr, dtype=np.float64)
    n_comp = min(30, x.shape[1], x.shape[0] - 1)
    if n_comp >= 2:
        x = PCA(n_components=n_comp, random_state=seed).fit_transform(x)
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    return float(adjusted_rand_score(labels, clusters))
