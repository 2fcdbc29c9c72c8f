"""Baselines scored beside every HisHRST result, on the same spots.

A reviewer's first questions about a spatial-expression predictor are whether it beats (a) predicting
each gene's training mean everywhere, (b) a linear model on the same frozen embeddings — the
HEST-Benchmark protocol: PCA of the embeddings to 256 components, then ridge regression — and
(c), within one section, a model that only looks at where a spot is (its nearest training spots).

* :class:`RidgeBaseline` — PCA (fitted on training spots) to ``min(256, n - 1, d)`` components, then
  ridge with the penalty α chosen by 5-fold cross-validation **on training spots only** (grid
  :data:`ALPHA_GRID` times the mean squared singular value, so the grid is scale-free). Fitted by
  ``hishrst fit`` and stored as ``baseline_ridge.npz`` (plain arrays, no pickle) in the run directory;
  ``evaluate --on`` applies it to the embeddings of sections the run never saw.
* :func:`knn_positions` — the mean of the ``k`` nearest training spots (same section, µm or pixels —
  any unit, as long as both sides share it). Only meaningful where training and scored spots share a
  slide (the recovery task), so it is not reported for unseen sections.
* :func:`baseline_warnings` — the one rule for warnings: a model whose mean per-gene MSE is above the
  training mean's, or whose mean PCC is below the ridge's, is flagged, saying which and by how much.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["N_COMPONENTS", "ALPHA_GRID", "RIDGE_FILE", "RidgeBaseline", "fit_ridge", "knn_positions",
           "baseline_warnings"]

#: PCA components before the ridge (HEST-Benchmark).
N_COMPONENTS = 256
#: Ridge penalties tried, in units of the mean squared singular value of the training PCA scores.
ALPHA_GRID = tuple(float(a) for a in np.logspace(-4, 2, 13))
#: File name of the fitted ridge baseline inside a run directory.
RIDGE_FILE = "baseline_ridge.npz"
_FOLDS = 5


@dataclass(frozen=True)
class RidgeBaseline:
    """PCA + ridge on frozen embeddings: ``predict(F) = ((F - mean) @ components.T) @ coef + intercept``."""

    mean: np.ndarray  # [D] embedding mean over training spots
    components: np.ndarray  # [K, D] PCA axes
    coef: np.ndarray  # [K, G]
    intercept: np.ndarray  # [G]
    alpha: float  # chosen penalty (absolute)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted log-expression ``[N, G]`` for embeddings ``[N, D]``."""
        z = (np.asarray(features, np.float64) - self.mean) @ self.components.T
        return (z @ self.coef + self.intercept).astype(np.float32)

    def save(self, path: Path) -> Path:
        """Write the arrays to ``path`` (``.npz``, no pickled objects)."""
        with open(path, "wb") as f:
            np.savez(f, mean=self.mean, components=self.components, coef=self.coef, intercept=self.intercept,
                     alpha=np.float64(self.alpha))
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> RidgeBaseline:
        """Read a baseline written by :meth:`save` (``allow_pickle=False``)."""
        with np.load(path, allow_pickle=False) as z:
            return cls(mean=z["mean"], components=z["components"], coef=z["coef"], intercept=z["intercept"],
                       alpha=float(z["alpha"]))


def _solve(z: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> list[np.ndarray]:
    """Ridge coefficients (centred ``z``, ``y``) for every α, from one SVD."""
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    uty = u.T @ y
    return [vt.T @ ((s / (s**2 + a))[:, None] * uty) for a in alphas]


def _choose_alpha(z: np.ndarray, y: np.ndarray, alphas: np.ndarray, seed: int) -> float:
    """The α of ``alphas`` with the lowest mean squared error over :data:`_FOLDS` folds of the rows."""
    n = len(z)
    folds = np.random.default_rng(seed).permutation(n) % min(_FOLDS, n)
    err = np.zeros(len(alphas))
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        zm, ym = z[tr].mean(0), y[tr].mean(0)
        for i, w in enumerate(_solve(z[tr] - zm, y[tr] - ym, alphas)):
            err[i] += float((((z[te] - zm) @ w + ym - y[te]) ** 2).sum())
    return float(alphas[int(np.argmin(err))])


def fit_ridge(features: np.ndarray, targets: np.ndarray, *, n_components: int = N_COMPONENTS,
              seed: int = 0) -> RidgeBaseline:
    """Fit the HEST-Benchmark baseline on training spots only: embeddings ``[N, D]`` → targets ``[N, G]``.

    PCA to ``min(n_components, N - 1, D)`` components, then ridge with α chosen by 5-fold cross-validation
    over :data:`ALPHA_GRID` on these rows (nothing from scored spots is seen).
    """
    f = np.asarray(features, np.float64)
    y = np.asarray(targets, np.float64)
    if len(f) < 3:
        raise ValueError(f"the ridge baseline needs at least 3 training spots, got {len(f)}")
    mean = f.mean(0)
    _, s, vt = np.linalg.svd(f - mean, full_matrices=False)
    k = max(1, min(n_components, len(f) - 1, f.shape[1], int((s > s[0] * 1e-9).sum()) if s.size else 1))
    comps = vt[:k]
    z = (f - mean) @ comps.T
    scale = float((s[:k] ** 2).mean()) or 1.0
    alpha = _choose_alpha(z, y, np.asarray(ALPHA_GRID) * scale, seed)
    ym = y.mean(0)
    coef = _solve(z, y - ym, np.array([alpha]))[0]  # z is centred by construction
    return RidgeBaseline(mean=mean, components=comps, coef=coef, intercept=ym, alpha=alpha)


def knn_positions(train_xy: np.ndarray, train_y: np.ndarray, query_xy: np.ndarray, *, k: int = 6) -> np.ndarray:
    """Position-only baseline: each query spot gets the mean target of its ``k`` nearest training spots."""
    from scipy.spatial import cKDTree

    train_xy = np.asarray(train_xy, np.float64)
    k = max(1, min(k, len(train_xy)))
    _, idx = cKDTree(train_xy).query(np.asarray(query_xy, np.float64), k=k)
    idx = idx.reshape(len(query_xy), k)
    return np.asarray(train_y, np.float64)[idx].mean(1).astype(np.float32)


def baseline_warnings(summary: dict[str, Any]) -> list[str]:
    """Warnings for a scored summary (``model``, ``baseline_train_mean``, ``baseline_ridge`` sections as
    written by evaluate): MSE above the training mean's, PCC below the ridge's, each with the margin."""
    out: list[str] = []
    model = summary.get("model", {})
    mean = summary.get("baseline_train_mean")
    ridge = summary.get("baseline_ridge")
    if mean and np.isfinite(model.get("mse_mean", np.nan)) and model["mse_mean"] > mean["mse_mean"]:
        d = model["mse_mean"] - mean["mse_mean"]
        out.append(f"the model's mean MSE {model['mse_mean']:.4f} is WORSE than predicting each gene's training mean "
                   f"({mean['mse_mean']:.4f}; +{d:.4f}, {100 * d / max(mean['mse_mean'], 1e-12):.1f} %)")
    if ridge and np.isfinite(model.get("pcc_mean", np.nan)) and model["pcc_mean"] < ridge["pcc_mean"]:
        d = ridge["pcc_mean"] - model["pcc_mean"]
        out.append(f"the model's mean PCC {model['pcc_mean']:.4f} is BELOW a ridge on the same embeddings "
                   f"({ridge['pcc_mean']:.4f}; -{d:.4f})")
    return out
