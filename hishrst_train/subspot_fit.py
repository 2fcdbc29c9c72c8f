"""``hishrst fit --head subspot``: token tiles of every section, the sub-spot head, spot-level predictions.

A tile of ``geometry.tile_um`` µm (14 × 8 µm = 112 µm for UNI's geometry at the default 8 µm pitch) is cut
around every spot (or Visium HD bin, whose tokens are weighted by the bin's square instead of the spot's
disk: the head is then trained on the bins directly) of every section and encoded once; its tokens (float16, cached per section) train the
head (:mod:`hishrst_train.subspot_train`) and its CLS feature feeds the ridge baseline, so baselines are
fitted on the same encoder's embeddings as for a spot run. The held-out spots of a recovery run are
predicted as the disk aggregate of their tokens, so ``evaluate`` and ``cv`` score a sub-spot run exactly
like a spot run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.tokens import DEFAULT_TOKEN_PITCH_UM, TokenGeometry

__all__ = ["token_geometry_for", "section_tokens", "section_weights", "fit_subspot_model"]


def token_geometry_for(encoder: Any, *, pitch_um: float = DEFAULT_TOKEN_PITCH_UM) -> TokenGeometry:
    """The token geometry of ``encoder`` (an :class:`~hishrst_train.encoders.module.EncoderModule`) at
    ``pitch_um`` µm per token; an :class:`InputError` for encoders without a square token grid."""
    try:
        return encoder.spec.token_geometry(pitch_um=pitch_um)
    except (AttributeError, ValueError) as e:
        raise InputError(f"encoder {getattr(encoder.spec, 'name', encoder)!r} has no patch-token grid ({e}); "
                         "--head subspot needs a ViT encoder") from e


def section_tokens(sec: Any, centres: np.ndarray, *, encoder: Any, geometry: TokenGeometry, batch_size: int,
                   cache_dir: str | Path | None) -> Any:
    """:func:`hishrst_train.tokens.extract_tokens` of tiles around ``centres`` (full-resolution px) of ``sec``."""
    from hishrst_train.tokens import extract_tokens

    return extract_tokens(sec.img, centres, encoder=encoder, mpp=sec.mpp, geometry=geometry, batch_size=batch_size,
                          cache_dir=cache_dir, image_key=sec.img_path)


def section_weights(config: Any, secs: list[Any]) -> np.ndarray:
    """Token weights of each section's measurements, ``[sections, T]``: a Visium spot's 55 µm disk, or a
    Visium HD section's square bins (trained on the bins directly)."""
    from hishrst_train.subspot_train import spot_weights

    return np.stack([spot_weights(config, bin_size_um=s.bin_size_um if getattr(s, "platform", "visium") == "visium-hd"
                                  else None) for s in secs])


def fit_subspot_model(secs: list[Any], targets: np.ndarray, *, encoder: Any, train_rows: np.ndarray,
                      val_rows: np.ndarray | None, pitch_um: float, train_config: Any, batch_size: int,
                      cache_dir: str | Path | None, progress: bool, device: str) -> Any:
    """Tokens of every spot of ``secs`` (rows in section order, as ``targets``), then the head; returns a
    :class:`~hishrst_train.fitting.FitResult` with spot-level predictions of every spot."""
    from hishrst_train.fitting import FitResult
    from hishrst_train.subspot import SubspotConfig
    from hishrst_train.subspot_train import TokenRows, predict_spots, train_subspot

    geometry = token_geometry_for(encoder, pitch_um=pitch_um)
    t0 = time.perf_counter()
    parts = [section_tokens(s, s.xy, encoder=encoder, geometry=geometry, batch_size=batch_size, cache_dir=cache_dir)
             for s in secs]
    seconds_features = time.perf_counter() - t0
    rows = TokenRows([p.tokens for p in parts])
    config = SubspotConfig(width=int(rows.shape[-1]), n_genes=int(targets.shape[1]), geometry=geometry.to_dict())
    hist: dict[str, list[float]] = {}
    t1 = time.perf_counter()
    weights = section_weights(config, secs)
    model, history = train_subspot(rows, targets, config=config, train_rows=train_rows, val_rows=val_rows,
                                   train_config=train_config, weights=weights, history_out=hist,
                                   progress=progress, device=device)
    seconds_train = time.perf_counter() - t1
    return FitResult(features=np.concatenate([np.asarray(p.cls, np.float32) for p in parts]), model=model,
                     history=history, hist=hist, predictions=predict_spots(model, rows, weights=weights),
                     seconds_features=seconds_features, seconds_train=seconds_train, train_config=train_config,
                     geometry=geometry)
