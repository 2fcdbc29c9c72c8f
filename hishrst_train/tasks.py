"""The two HisHRST tasks, end to end: read a section, select genes, extract features, train, predict.

* ``recovery``: a seeded random 50 % of the spots is used for training (gene selection included); the
  model predicts the held-out half, grouped among themselves exactly as the training spots were.
* ``generation``: train on all spots, then predict a grid ``densify`` times denser whose positions
  come from an array→pixel affine fitted on the measured spots.

A run directory holds ``model.safetensors`` + ``config.json`` (the checkpoint), ``split.json``,
``predictions.h5ad`` (held-out spots: X = prediction, ``layers['truth']`` = measured) for recovery or
``dense.h5ad`` for generation, and ``history.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd

from hishrst_runtime import __version__
from hishrst_runtime.core.geometry import apply_affine, dense_array_grid, fit_affine
from hishrst_runtime.core.grouping import GROUPING_METHOD, group_points
from hishrst_runtime.core.patches import DEFAULT_PATCH_UM, PAD_VALUE, RESIZE_FILTER
from hishrst_train.model import HisHRSTConfig

__all__ = ["load_section", "fit_run", "spot_positions", "TARGET_SUM"]

log = logging.getLogger("hishrst")
TARGET_SUM = 1e4
Task = Literal["recovery", "generation"]


def load_section(data: str | Path, *, image: str | Path | None = None, mpp: float | None = None) -> ad.AnnData:
    """Read a Space Ranger ``outs`` directory, or an ``.h5ad`` plus its full-resolution image."""
    from hishrst_train import data as io

    data = Path(data)
    if data.suffix == ".h5ad":
        if image is None:
            raise ValueError(f"{data}: an .h5ad needs its full-resolution image; pass --image PATH")
        return io.read_h5ad_with_image(data, image, mpp=mpp)
    adata = io.read_visium(data)
    if mpp is not None:
        adata.uns["hishrst"]["mpp"] = float(mpp)
    return adata


def spot_positions(xy_px: np.ndarray, *, mpp: float, mode: str, array_rc: np.ndarray | None = None) -> np.ndarray:
    """Model positions: µm (``continuous``) or (array_col, array_row) (``grid``, the reference's input)."""
    if mode == "continuous":
        return np.asarray(xy_px, dtype=np.float64) * mpp
    if array_rc is None:
        raise ValueError("grid position mode needs Visium array coordinates")
    return np.stack([array_rc[:, 1], array_rc[:, 0]], axis=1).astype(np.float64)


def _split(n: int, seed: int) -> np.ndarray:
    """Boolean train mask: a seeded random half of the spots."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: n // 2]] = True
    return mask


def fit_run(
    data: str | Path,
    *,
    out: str | Path,
    task: Task = "recovery",
    encoder: str = "test-vit",
    weights: str | Path | None = None,
    image: str | Path | None = None,
    mpp: float | None = None,
    epochs: int = 100,
    seed: int = 0,
    n_genes: int = 1000,
    patch_um: float = DEFAULT_PATCH_UM,
    position_mode: Literal["continuous", "grid"] = "continuous",
    densify: float = 4.0,
    max_group: int = 50,
    batch_size: int = 64,
    image_features: bool = True,
    val_frac: float = 0.1,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train HisHRST on one section and write a run directory (see the module docstring).

    ``patch_um`` is the patch side in µm; ``densify`` the density factor of the generation grid;
    ``image_features=False`` trains the position-only ablation (features replaced by zeros).
    ``val_frac`` of the training spots (seeded; never held-out spots) is kept aside for early
    stopping: ``epochs`` is then a maximum, and the weights of the best validation epoch are kept.
    Returns a summary dict (also stored in ``config.json``).
    """
    import torch

    from hishrst_train.encoders import encoder_fingerprint, load_encoder
    from hishrst_train.features import extract_features
    from hishrst_train.data import open_fullres_image
    from hishrst_train.preprocess import normalize_log1p, select_hvgs
    from hishrst_train.train import TrainConfig, predict, save_checkpoint, train_model

    if task not in ("recovery", "generation"):
        raise ValueError(f"task must be 'recovery' or 'generation', got {task!r}")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    adata = load_section(data, image=image, mpp=mpp)
    meta = adata.uns["hishrst"]
    mpp_v = float(meta["mpp"])
    img_path = meta.get("fullres_image")
    if not img_path:
        raise FileNotFoundError(f"{data}: no full-resolution image found; pass --image PATH")
    img = open_fullres_image(img_path)
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    array_rc = np.stack([adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy()], axis=1)

    train_mask = _split(adata.n_obs, seed) if task == "recovery" else np.ones(adata.n_obs, dtype=bool)
    genes = select_hvgs(adata, n_top=n_genes, train_mask=train_mask if task == "recovery" else None)
    expr = normalize_log1p(adata[:, genes].X, target_sum=TARGET_SUM)
    expr = np.asarray(expr.toarray() if hasattr(expr, "toarray") else expr, dtype=np.float32)

    enc = load_encoder(encoder, weights=weights)
    feat_kw = dict(encoder=enc, mpp=mpp_v, patch_um=patch_um, batch_size=batch_size, cache_dir=cache_dir, progress=progress)
    t_feat = time.perf_counter()
    feats = extract_features(img, xy, image_key=str(img_path), **feat_kw)
    t_feat = time.perf_counter() - t_feat
    if not image_features:
        feats = np.zeros_like(feats)

    pos = spot_positions(xy, mpp=mpp_v, mode=position_mode, array_rc=array_rc)
    train_idx = np.flatnonzero(train_mask)
    val_groups = None
    if val_frac > 0:
        perm = np.random.default_rng(seed + 1).permutation(train_idx)
        n_val = int(round(len(train_idx) * val_frac))
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        val_groups = [val_idx[g] for g in group_points(xy[val_idx], max_size=max_group)] if n_val else None
    groups = [train_idx[g] for g in group_points(xy[train_idx], max_size=max_group)]
    mcfg = HisHRSTConfig(feature_dim=enc.feature_dim, n_genes=len(genes), position_mode=position_mode)
    tcfg = TrainConfig(epochs=epochs, seed=seed)
    t_train = time.perf_counter()
    hist: dict[str, list[float]] = {}
    model, history = train_model(feats, pos, expr, groups=groups, val_groups=val_groups, model_config=mcfg,
                                 train_config=tcfg, history_out=hist, progress=progress)
    t_train = time.perf_counter() - t_train

    obs = adata.obs[["array_row", "array_col"]].copy()
    if "layer" in adata.obs:
        obs["layer"] = adata.obs["layer"].astype(str).values
    summary: dict[str, Any] = {"task": task, "n_spots": int(adata.n_obs), "n_train": int(len(train_idx)),
                               "n_val": int(train_mask.sum()) - int(len(train_idx))}
    if task == "recovery":
        test_idx = np.flatnonzero(~train_mask)
        test_groups = [test_idx[g] for g in group_points(xy[test_idx], max_size=max_group)]
        pred = predict(model, feats, pos, groups=test_groups)[test_idx]
        res = ad.AnnData(
            X=pred, obs=obs.iloc[test_idx].copy(), var=pd.DataFrame(index=pd.Index(genes, name="gene"))
        )
        res.layers["truth"] = expr[test_idx]
        res.obsm["spatial"] = xy[test_idx]
        _write_h5ad(res, out / "predictions.h5ad")
        summary["n_heldout"] = int(len(test_idx))
    else:
        dense_rc = dense_array_grid(array_rc[:, 0], array_rc[:, 1], factor=densify)
        affine = fit_affine(array_rc.astype(np.float64), xy)
        dense_xy = apply_affine(affine, dense_rc)
        dense_feats = extract_features(img, dense_xy, image_key=str(img_path), **feat_kw)
        if not image_features:
            dense_feats = np.zeros_like(dense_feats)
        if position_mode == "grid":
            log.warning("grid position mode truncates fractional array coordinates (the reference behaviour)")
        dense_pos = spot_positions(dense_xy, mpp=mpp_v, mode=position_mode, array_rc=dense_rc)
        dense_groups = group_points(dense_xy, max_size=max_group)
        pred = predict(model, dense_feats, dense_pos, groups=dense_groups)
        dobs = pd.DataFrame(
            {"array_row": dense_rc[:, 0], "array_col": dense_rc[:, 1]}, index=[f"d{i}" for i in range(len(dense_rc))]
        )
        res = ad.AnnData(X=pred, obs=dobs, var=pd.DataFrame(index=pd.Index(genes, name="gene")))
        res.obsm["spatial"] = dense_xy
        res.uns["array_to_pixel_affine"] = affine
        _write_h5ad(res, out / "dense.h5ad")
        summary.update(n_dense=int(len(dense_rc)), densify=float(densify))

    (out / "split.json").write_text(
        json.dumps({"seed": seed, "train": adata.obs_names[train_idx].tolist(),
                    "validation": adata.obs_names[np.setdiff1d(np.flatnonzero(train_mask), train_idx)].tolist(),
                    "heldout": adata.obs_names[~train_mask].tolist()})
    )
    (out / "history.json").write_text(json.dumps(hist))
    summary.update(
        final_train_mse=history[-1],
        epochs_run=len(history),
        best_epoch=int(hist["best_epoch"][0]),
        best_val_mse=min(hist["val_mse"]) if hist.get("val_mse") else None,
        seconds_features=round(t_feat, 2),
        seconds_train=round(t_train, 2),
        seconds_per_epoch=round(t_train / max(1, len(history)), 4),
        seconds_total=round(time.perf_counter() - t0, 2),
    )
    config = {
        "hishrst_version": __version__,
        "task": task,
        "data": str(Path(data).resolve()),
        "image": str(Path(image).resolve()) if image else None,
        "mpp_override": mpp,
        "genes": list(genes),
        "encoder": {
            "name": encoder,
            "fingerprint": encoder_fingerprint(enc),
            "input_size": enc.input_size,
            "feature_dim": enc.feature_dim,
            "mean": list(enc.spec.mean),
            "std": list(enc.spec.std),
            "gated": bool(enc.spec.gated),
            "license": enc.spec.license,
            "weights": str(weights) if weights else None,
        },
        "patch": {"size_um": float(patch_um), "train_mpp": mpp_v, "resize": RESIZE_FILTER, "pad_value": PAD_VALUE},
        "position": {"mode": position_mode, "units": "um" if position_mode == "continuous" else "array"},
        "grouping": {"method": GROUPING_METHOD, "max_size": int(max_group), "coords": "level0_px"},
        "preprocessing": {"hvg_flavor": "seurat_v3", "n_top_genes": int(n_genes), "target_sum": TARGET_SUM, "log1p": True},
        "image_features": bool(image_features),
        "train": tcfg.__dict__,
        "torch_version": torch.__version__,
        "summary": summary,
    }
    save_checkpoint(out, model, config)
    return summary


def _write_h5ad(adata: ad.AnnData, path: Path) -> None:
    tmp = path.with_suffix(".h5ad.tmp")
    adata.write_h5ad(tmp)
    tmp.replace(path)
