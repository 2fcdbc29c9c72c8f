"""The two HisHRST tasks, end to end: read a section, select genes, extract features, train, predict.

* ``recovery``: a seeded random 50 % of the spots is used for training (gene selection included); the
  model predicts the held-out half, grouped among themselves exactly as the training spots were.
* ``generation``: train on all spots, then predict a grid ``densify`` times denser whose positions
  come from an array→pixel affine fitted on the measured spots.

A run directory holds ``model.safetensors`` + ``config.json`` (the checkpoint; a versioned
:class:`~hishrst_train.runconfig.RunConfig`), ``split.json``, ``predictions.h5ad`` (held-out spots: X =
prediction, ``layers['truth']`` = measured) for recovery or ``dense.h5ad`` for generation, and
``history.json``. It is built aside and swapped in when the fit succeeds
(:mod:`hishrst_train.rundir`); an existing run is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from hishrst_runtime import __version__
from hishrst_runtime.core.geometry import apply_affine, dense_array_grid, fit_affine
from hishrst_runtime.core.grouping import GROUPING_METHOD, group_points
from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.files import atomic_write
from hishrst_runtime.core.patches import DEFAULT_PATCH_UM, PAD_VALUE, RESIZE_FILTER
from hishrst_train.model import HisHRSTConfig
from hishrst_train.runconfig import PositionMode, RunConfig, Task
from hishrst_train.rundir import building_run, check_run_out

__all__ = ["load_section", "fit_run", "spot_positions", "TARGET_SUM", "FitError"]

log = logging.getLogger("hishrst")
TARGET_SUM = 1e4


class FitError(InputError):
    """Fit inputs or options that cannot work (the message names the file or option and the fix)."""


class MissingImageError(FitError, FileNotFoundError):
    """The section has no full-resolution image to cut patches from."""


def load_section(data: str | Path, *, image: str | Path | None = None, mpp: float | None = None) -> ad.AnnData:
    """Read a Space Ranger ``outs`` directory, or an ``.h5ad`` plus its full-resolution image.

    ``image``: the full-resolution H&E image — required with an ``.h5ad``; with an ``outs`` folder it is
    used instead of the image found next to it (the spot pixel coordinates are checked against its
    size). ``mpp`` (µm per full-resolution pixel) overrides the recorded pixel size.
    """
    from hishrst_train import data as io

    data = Path(data)
    if data.suffix == ".h5ad":
        if image is None:
            raise FitError(f"{data}: an .h5ad needs its full-resolution image; pass --image PATH")
        return io.read_h5ad_with_image(data, image, mpp=mpp)
    adata = io.read_visium(data, fullres_image=image)
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


@dataclass(frozen=True)
class _Section:
    """A training section opened for fitting: spots, pixel size (µm/px) and the lazily read image."""

    adata: ad.AnnData
    mpp: float
    img_path: str
    img: Any
    xy: np.ndarray  # [N, 2] full-resolution px
    array_rc: np.ndarray  # [N, 2] Visium (array_row, array_col)


def _open_section(data: str | Path, *, image: str | Path | None, mpp: float | None) -> _Section:
    from hishrst_train.data import open_fullres_image

    adata = load_section(data, image=image, mpp=mpp)
    meta = adata.uns["hishrst"]
    img_path = meta.get("fullres_image")
    if not img_path:
        raise MissingImageError(f"{data}: no full-resolution image found; pass --image PATH")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    array_rc = np.stack([adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy()], axis=1)
    return _Section(adata=adata, mpp=float(meta["mpp"]), img_path=str(img_path), img=open_fullres_image(img_path),
                    xy=xy, array_rc=array_rc)


def _targets(adata: ad.AnnData, *, task: Task, seed: int, n_genes: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Train mask, selected genes (from training spots only) and log-normalised expression [N, genes]."""
    from hishrst_train.preprocess import normalize_log1p, select_hvgs

    train_mask = _split(adata.n_obs, seed) if task == "recovery" else np.ones(adata.n_obs, dtype=bool)
    genes = select_hvgs(adata, n_top=n_genes, train_mask=train_mask if task == "recovery" else None)
    expr = normalize_log1p(adata[:, genes].X, target_sum=TARGET_SUM)
    expr = np.asarray(expr.toarray() if hasattr(expr, "toarray") else expr, dtype=np.float32)
    return train_mask, list(genes), expr


def _train_groups(xy: np.ndarray, train_mask: np.ndarray, *, seed: int, val_frac: float, max_group: int
                  ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray] | None]:
    """Training spots (validation removed), their neighbour groups and the validation groups."""
    train_idx = np.flatnonzero(train_mask)
    val_groups = None
    if val_frac > 0:
        perm = np.random.default_rng(seed + 1).permutation(train_idx)
        n_val = int(round(len(train_idx) * val_frac))
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        val_groups = [val_idx[g] for g in group_points(xy[val_idx], max_size=max_group)] if n_val else None
    groups = [train_idx[g] for g in group_points(xy[train_idx], max_size=max_group)]
    return train_idx, groups, val_groups


def _gene_var(genes: list[str]) -> pd.DataFrame:
    return pd.DataFrame(index=pd.Index(genes, name="gene"))


def _write_recovery(work: Path, model: Any, sec: _Section, feats: np.ndarray, pos: np.ndarray, expr: np.ndarray,
                    genes: list[str], train_mask: np.ndarray, *, max_group: int) -> dict[str, Any]:
    """Predict the held-out spots (grouped among themselves) → ``predictions.h5ad``."""
    from hishrst_train.train import predict

    obs = sec.adata.obs[["array_row", "array_col"]].copy()
    if "layer" in sec.adata.obs:
        obs["layer"] = sec.adata.obs["layer"].astype(str).values
    test_idx = np.flatnonzero(~train_mask)
    test_groups = [test_idx[g] for g in group_points(sec.xy[test_idx], max_size=max_group)]
    pred = predict(model, feats, pos, groups=test_groups)[test_idx]
    res = ad.AnnData(X=pred, obs=obs.iloc[test_idx].copy(), var=_gene_var(genes))
    res.layers["truth"] = expr[test_idx]
    res.obsm["spatial"] = sec.xy[test_idx]
    res.write_h5ad(work / "predictions.h5ad")
    return {"n_heldout": int(len(test_idx))}


def _write_generation(work: Path, model: Any, sec: _Section, genes: list[str], *, densify: float,
                      position_mode: PositionMode, max_group: int, features: Any) -> dict[str, Any]:
    """Predict a grid ``densify`` times denser than the spots (array→pixel affine) → ``dense.h5ad``."""
    from hishrst_train.train import predict

    dense_rc = dense_array_grid(sec.array_rc[:, 0], sec.array_rc[:, 1], factor=densify)
    affine = fit_affine(sec.array_rc.astype(np.float64), sec.xy)
    dense_xy = apply_affine(affine, dense_rc)
    dense_feats = features(dense_xy)
    if position_mode == "grid":
        log.warning("grid position mode truncates fractional array coordinates (the reference behaviour)")
    dense_pos = spot_positions(dense_xy, mpp=sec.mpp, mode=position_mode, array_rc=dense_rc)
    pred = predict(model, dense_feats, dense_pos, groups=group_points(dense_xy, max_size=max_group))
    dobs = pd.DataFrame({"array_row": dense_rc[:, 0], "array_col": dense_rc[:, 1]},
                        index=[f"d{i}" for i in range(len(dense_rc))])
    res = ad.AnnData(X=pred, obs=dobs, var=_gene_var(genes))
    res.obsm["spatial"] = dense_xy
    res.uns["array_to_pixel_affine"] = affine
    res.write_h5ad(work / "dense.h5ad")
    return {"n_dense": int(len(dense_rc)), "densify": float(densify)}


def _write_split(work: Path, adata: ad.AnnData, train_mask: np.ndarray, train_idx: np.ndarray, seed: int) -> None:
    names = adata.obs_names
    split = {"seed": seed, "train": names[train_idx].tolist(),
             "validation": names[np.setdiff1d(np.flatnonzero(train_mask), train_idx)].tolist(),
             "heldout": names[~train_mask].tolist()}
    atomic_write(work / "split.json", json.dumps(split).encode())


def _encoder_record(name: str, enc: Any, weights: str | Path | None) -> dict[str, Any]:
    from hishrst_train.encoders.module import encoder_fingerprint

    return {"name": name, "fingerprint": encoder_fingerprint(enc), "input_size": enc.input_size,
            "feature_dim": enc.feature_dim, "mean": list(enc.spec.mean), "std": list(enc.spec.std),
            "gated": bool(enc.spec.gated), "license": enc.spec.license, "weights": str(weights) if weights else None}


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
    position_mode: PositionMode = "continuous",
    densify: float = 4.0,
    max_group: int = 50,
    batch_size: int = 64,
    image_features: bool = True,
    val_frac: float = 0.1,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train HisHRST on one section and write a run directory (see the module docstring).

    ``patch_um`` is the patch side in µm; ``densify`` the density factor of the generation grid;
    ``image_features=False`` trains the position-only ablation (features replaced by zeros).
    ``val_frac`` of the training spots (seeded; never held-out spots) is kept aside for early
    stopping: ``epochs`` is then a maximum, and the weights of the best validation epoch are kept.
    ``image`` replaces the section's own full-resolution image (required for an ``.h5ad``).
    An existing run at ``out`` is replaced only with ``overwrite`` (and only once the new fit is
    complete); a failed fit leaves nothing behind. Returns a summary dict (also in ``config.json``).
    """
    if task not in ("recovery", "generation"):
        raise FitError(f"task must be 'recovery' or 'generation', got {task!r}")
    t0 = time.perf_counter()
    out = Path(out)
    check_run_out(out, overwrite=overwrite, inputs=(data, image))
    sec = _open_section(data, image=image, mpp=mpp)
    from hishrst_train.train import save_checkpoint

    with building_run(out) as work:
        summary, fields, model = _fit(work, sec, task=task, encoder=encoder, weights=weights, epochs=epochs, seed=seed,
                               n_genes=n_genes, patch_um=patch_um, position_mode=position_mode, densify=densify,
                               max_group=max_group, batch_size=batch_size, image_features=image_features,
                               val_frac=val_frac, cache_dir=cache_dir, progress=progress)
        summary["seconds_total"] = round(time.perf_counter() - t0, 2)
        config = RunConfig(**fields, summary=summary, data=str(Path(data).resolve()),
                           image=str(Path(image).resolve()) if image else None, mpp_override=mpp)
        save_checkpoint(work, model, config)
    return summary


def _fit(work: Path, sec: _Section, *, task: Task, encoder: str, weights: str | Path | None, epochs: int, seed: int,
         n_genes: int, patch_um: float, position_mode: PositionMode, densify: float, max_group: int,
         batch_size: int, image_features: bool, val_frac: float, cache_dir: str | Path | None, progress: bool
         ) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Features, training, predictions, ``split.json`` and ``history.json`` into ``work``; returns the
    summary, the :class:`RunConfig` fields known after training, and the trained model."""
    import torch

    from hishrst_train.encoders.module import load_encoder
    from hishrst_train.features import extract_features
    from hishrst_train.train import TrainConfig, train_model

    train_mask, genes, expr = _targets(sec.adata, task=task, seed=seed, n_genes=n_genes)
    enc = load_encoder(encoder, weights=weights)

    def features(centres: np.ndarray) -> np.ndarray:
        f = extract_features(sec.img, centres, encoder=enc, mpp=sec.mpp, patch_um=patch_um, batch_size=batch_size,
                             cache_dir=cache_dir, progress=progress, image_key=sec.img_path)
        return f if image_features else np.zeros_like(f)

    t_feat = time.perf_counter()
    feats = features(sec.xy)
    t_feat = time.perf_counter() - t_feat
    pos = spot_positions(sec.xy, mpp=sec.mpp, mode=position_mode, array_rc=sec.array_rc)
    train_idx, groups, val_groups = _train_groups(sec.xy, train_mask, seed=seed, val_frac=val_frac, max_group=max_group)
    mcfg = HisHRSTConfig(feature_dim=enc.feature_dim, n_genes=len(genes), position_mode=position_mode)
    tcfg = TrainConfig(epochs=epochs, seed=seed)
    t_train = time.perf_counter()
    hist: dict[str, list[float]] = {}
    model, history = train_model(feats, pos, expr, groups=groups, val_groups=val_groups, model_config=mcfg,
                                 train_config=tcfg, history_out=hist, progress=progress)
    t_train = time.perf_counter() - t_train

    summary: dict[str, Any] = {"task": task, "n_spots": int(sec.adata.n_obs), "n_train": int(len(train_idx)),
                               "n_val": int(train_mask.sum()) - int(len(train_idx))}
    if task == "recovery":
        summary.update(_write_recovery(work, model, sec, feats, pos, expr, genes, train_mask, max_group=max_group))
    else:
        summary.update(_write_generation(work, model, sec, genes, densify=densify, position_mode=position_mode,
                                         max_group=max_group, features=features))
    _write_split(work, sec.adata, train_mask, train_idx, seed)
    atomic_write(work / "history.json", json.dumps(hist).encode())
    summary.update(
        final_train_mse=history[-1], epochs_run=len(history), best_epoch=int(hist["best_epoch"][0]),
        best_val_mse=min(hist["val_mse"]) if hist.get("val_mse") else None, seconds_features=round(t_feat, 2),
        seconds_train=round(t_train, 2), seconds_per_epoch=round(t_train / max(1, len(history)), 4),
    )
    config = {
        "hishrst_version": __version__, "task": task, "genes": genes,
        "encoder": _encoder_record(encoder, enc, weights),
        "patch": {"size_um": float(patch_um), "train_mpp": sec.mpp, "resize": RESIZE_FILTER, "pad_value": PAD_VALUE},
        "position": {"mode": position_mode, "units": "um" if position_mode == "continuous" else "array"},
        "grouping": {"method": GROUPING_METHOD, "max_size": int(max_group), "coords": "level0_px"},
        "preprocessing": {"hvg_flavor": "seurat_v3", "n_top_genes": int(n_genes), "target_sum": TARGET_SUM, "log1p": True},
        "image_features": bool(image_features), "train": tcfg.__dict__, "torch_version": torch.__version__,
        "model": mcfg.to_dict(),
    }
    return summary, config, model
