"""What a fit writes besides the checkpoint: held-out predictions (recovery) with the baselines' predictions
beside them, ``split.json``, ``baseline.json`` and the ridge baseline (``baseline_ridge.npz``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from hishrst_runtime.core.files import atomic_write
from hishrst_runtime.core.grouping import group_points
from hishrst_train.baselines import RIDGE_FILE, RidgeBaseline, fit_ridge, knn_positions
from hishrst_train.data.sections import Section
from hishrst_train.evaluate import BASELINE_LAYERS
from hishrst_train.targets import Targets

__all__ = ["gene_var", "obs_keys", "section_obs", "write_recovery", "write_split", "write_baseline", "write_ridge"]


def gene_var(genes: list[str]) -> pd.DataFrame:
    return pd.DataFrame(index=pd.Index(genes, name="gene"))


def obs_keys(secs: list[Section]) -> np.ndarray:
    """Row names over all sections: barcodes (one section) or ``<section>:<barcode>``."""
    if len(secs) == 1:
        return np.asarray(secs[0].adata.obs_names.astype(str))
    return np.concatenate([[f"{s.name}:{b}" for b in s.adata.obs_names] for s in secs])


def section_obs(sec: Section, rows: np.ndarray, keys: np.ndarray) -> pd.DataFrame:
    obs = pd.DataFrame(index=pd.Index(keys, name=None))
    if sec.array_rc is not None:
        obs["array_row"], obs["array_col"] = sec.array_rc[rows, 0], sec.array_rc[rows, 1]
    if "layer" in sec.adata.obs:
        obs["layer"] = sec.adata.obs["layer"].astype(str).to_numpy()[rows]
    obs["section"] = sec.name
    return obs


def write_recovery(work: Path, model: Any, secs: list[Section], t: Targets, feats: np.ndarray, pos: np.ndarray | None,
                   *, max_group: int, ridge: RidgeBaseline | None = None,
                   predictions: np.ndarray | None = None) -> dict[str, Any]:
    """Predict each section's held-out spots (grouped among themselves) → ``predictions.h5ad``, with the
    baselines beside the model: ``layers['baseline_ridge']`` (``ridge`` on the held-out spots' features) and
    ``layers['baseline_knn']`` (mean of the 6 nearest training spots of the same section, distances in µm).
    ``predictions`` (``[N, genes]`` for every spot; a sub-spot head's disk aggregates) replace the spot head's."""
    from hishrst_train.train import predict

    keys, parts = obs_keys(secs), []
    for i, s in enumerate(secs):
        lo = t.offsets[i]
        train = t.train_mask[lo : t.offsets[i + 1]]
        rows = np.flatnonzero(~train)
        idx = rows + lo
        if predictions is not None:
            pred = np.asarray(predictions[idx], np.float32)
        else:
            pred = predict(model, feats, pos, groups=[idx[g] for g in group_points(s.xy[rows], max_size=max_group)])[idx]
        res = ad.AnnData(X=pred, obs=section_obs(s, rows, keys[idx]), var=gene_var(t.genes))
        res.layers["truth"] = t.expr[idx]
        if ridge is not None:
            res.layers[BASELINE_LAYERS["ridge"]] = ridge.predict(feats[idx])
        if train.any():
            um = np.asarray(s.xy, np.float64) * s.mpp
            res.layers[BASELINE_LAYERS["knn"]] = knn_positions(um[train], t.expr[lo + np.flatnonzero(train)], um[rows])
        res.obsm["spatial"] = s.xy[rows]
        parts.append(res)
    res = ad.concat(parts, merge="same") if len(parts) > 1 else parts[0]
    res.write_h5ad(work / "predictions.h5ad")
    return {"n_heldout": int(res.n_obs)}


def write_split(work: Path, secs: list[Section], t: Targets, train_idx: np.ndarray, seed: int) -> None:
    keys = obs_keys(secs)
    val = np.setdiff1d(np.flatnonzero(t.train_mask), train_idx)
    split = {"seed": seed, "train": keys[train_idx].tolist(), "validation": keys[val].tolist(),
             "heldout": keys[~t.train_mask].tolist(),
             "sections": {s.name: int(t.offsets[i + 1] - t.offsets[i]) for i, s in enumerate(secs)}}
    atomic_write(work / "split.json", json.dumps(split).encode())


def write_baseline(work: Path, t: Targets) -> None:
    """``baseline.json``: each gene's mean over the training spots (the training-mean baseline of evaluate)."""
    mean = t.expr[t.train_mask].mean(0) if t.train_mask.any() else np.zeros(len(t.genes))
    atomic_write(work / "baseline.json", json.dumps({"genes": t.genes, "train_mean": mean.astype(float).tolist()}).encode())


def write_ridge(work: Path, feats: np.ndarray, t: Targets, *, seed: int) -> RidgeBaseline:
    """Fit the PCA + ridge baseline on the training spots only (``t.train_mask``: held-out spots never enter
    it) and write it to ``RIDGE_FILE``; returns it."""
    rows = np.flatnonzero(t.train_mask)
    ridge = fit_ridge(feats[rows], t.expr[rows], seed=seed)
    ridge.save(work / RIDGE_FILE)
    return ridge
