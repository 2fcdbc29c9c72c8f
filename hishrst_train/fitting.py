"""Training one head kind over opened sections: features (or token tiles) of every spot, then the head.

:func:`train_spot_head` — CLS features of ``patch_um`` patches and the HisHRST spot head
(:mod:`hishrst_train.train`); :func:`train_subspot_head` — token tiles and the sub-spot head
(:mod:`hishrst_train.subspot_fit`). Both return a :class:`FitResult`, so the task code
(:mod:`hishrst_train.tasks`) writes predictions, baselines and the run config the same way for either.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.tokens import TokenGeometry
from hishrst_train.targets import FitError

__all__ = ["AGGREGATION", "FitResult", "spot_positions", "section_features", "spot_features", "train_spot_head",
           "train_subspot_head"]

#: How a sub-spot run turns token predictions into a spot's (recorded in its config and bundle manifest).
AGGREGATION = "count-space disk mean: log1p(sum_t w_t * expm1(y_t)), w = token area share of the 55 um disk"


@dataclass
class FitResult:
    """A trained head and what the task writes next to it: the CLS features of every spot (the ridge
    baseline's input), the loss history, spot-level predictions of every spot (sub-spot runs; None: the task
    predicts with the spot head in neighbour groups), timings (s), the training settings and, for sub-spot
    runs, the token geometry."""

    features: np.ndarray
    model: Any
    history: list[float]
    hist: dict[str, list[float]]
    predictions: np.ndarray | None
    seconds_features: float
    seconds_train: float
    train_config: Any
    geometry: TokenGeometry | None = None


def spot_positions(xy_px: np.ndarray, *, mpp: float, mode: str, array_rc: np.ndarray | None = None) -> np.ndarray:
    """Model positions: µm (``continuous``, ``relative``, ``none``) or (array_col, array_row) (``grid``)."""
    if mode != "grid":
        return np.asarray(xy_px, dtype=np.float64) * mpp
    if array_rc is None:
        raise FitError("--position grid needs Visium array coordinates (obs array_row / array_col), which this "
                       "section lacks; use --position relative")
    return np.stack([array_rc[:, 1], array_rc[:, 0]], axis=1).astype(np.float64)


def section_features(sec: Any, centres: np.ndarray, *, encoder: Any, patch_um: float, batch_size: int,
                     cache_dir: str | Path | None, progress: bool) -> np.ndarray:
    """Encoder features ``[N, D]`` of ``patch_um``-µm patches at ``centres`` (full-resolution px) of ``sec``;
    cached per section image under ``cache_dir``."""
    from hishrst_train.features import extract_features

    return extract_features(sec.img, centres, encoder=encoder, mpp=sec.mpp, patch_um=patch_um, batch_size=batch_size,
                            cache_dir=cache_dir, progress=progress, image_key=sec.img_path)


def spot_features(sec: Any, centres: np.ndarray, enc: Any, o: Any) -> np.ndarray:
    """:func:`section_features` with the fit options ``o``; zeros for the position-only ablation."""
    f = section_features(sec, centres, encoder=enc, patch_um=o.patch_um, batch_size=o.batch_size,
                         cache_dir=o.cache_dir, progress=o.progress)
    return f if o.image_features else np.zeros_like(f)


def train_spot_head(secs: list[Any], t: Any, enc: Any, o: Any, groups: list[np.ndarray],
                    val_groups: list[np.ndarray] | None) -> tuple[FitResult, np.ndarray]:
    """Features of every spot, then the spot head; returns the result and the model positions of every spot."""
    from hishrst_train.model import HisHRSTConfig
    from hishrst_train.train import TrainConfig, train_model

    t0 = time.perf_counter()
    feats = np.concatenate([spot_features(s, s.xy, enc, o) for s in secs])
    t_feat = time.perf_counter() - t0
    pos = np.concatenate([spot_positions(s.xy, mpp=s.mpp, mode=o.position_mode, array_rc=s.array_rc) for s in secs])
    mcfg = HisHRSTConfig(feature_dim=enc.feature_dim, n_genes=len(t.genes), position_mode=o.position_mode)
    tcfg = TrainConfig(epochs=o.epochs, seed=o.seed, lr=o.lr)
    t1 = time.perf_counter()
    hist: dict[str, list[float]] = {}
    model, history = train_model(feats, pos, t.expr, groups=groups, val_groups=val_groups, model_config=mcfg,
                                 train_config=tcfg, history_out=hist, progress=o.progress, device=o.device)
    return FitResult(features=feats, model=model, history=history, hist=hist, predictions=None,
                     seconds_features=t_feat, seconds_train=time.perf_counter() - t1, train_config=tcfg), pos


def train_subspot_head(secs: list[Any], t: Any, enc: Any, o: Any, train_idx: np.ndarray,
                       val_groups: list[np.ndarray] | None) -> FitResult:
    """Token tiles around every spot, then the sub-spot head (:func:`~hishrst_train.subspot_fit.fit_subspot_model`)."""
    from hishrst_train.subspot_fit import fit_subspot_model
    from hishrst_train.train import TrainConfig

    tcfg = TrainConfig(epochs=o.epochs, seed=o.seed, lr=o.lr)
    val = np.concatenate(val_groups) if val_groups else None
    return fit_subspot_model(secs, t.expr, encoder=enc, train_rows=train_idx, val_rows=val, pitch_um=o.token_pitch_um,
                             train_config=tcfg, batch_size=o.batch_size, cache_dir=o.cache_dir, progress=o.progress,
                             device=o.device)
