"""The inputs of an export's parity checks: random tiles and head feeds, and real tiles cut from the run's training
section (when it can be read) with the head feeds of their encoder features and positions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.grouping import group_points, pad_groups
from hishrst_runtime.core.patches import cut_patches, patch_side_px
from hishrst_train.runconfig import RunConfig

__all__ = ["N_RANDOM", "N_REAL", "parity_inputs", "real_inputs"]

#: Real tiles (from the training section) and random tiles used by the encoder parity check.
N_REAL = 64
N_RANDOM = 16



def real_inputs(config: RunConfig, encoder: Any, *, data: str | Path | None, n: int = N_REAL
                 ) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """Up to ``n`` real tiles and their level-0 pixel centres from the run's training section. Returns
    ``((tiles uint8 [n, S, S, 3], centres_px [n, 2]) | None, status)``; ``status`` says where the tiles came from
    or why none could be read (the section moved: pass ``data``)."""
    from hishrst_train.data import open_fullres_image
    from hishrst_train.tasks import load_section

    source = str(data) if data is not None else str(config.data)
    try:
        adata = load_section(source, image=config.image, mpp=config.mpp_override)
        img = open_fullres_image(adata.uns["hishrst"]["fullres_image"])
    except (OSError, ValueError, KeyError) as e:
        return None, f"unavailable: cannot read the training section {source!r} ({type(e).__name__}: {e})"
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    first = group_points(xy, max_size=config.grouping["max_size"])
    idx = np.concatenate(first)[:n]
    side = patch_side_px(config.patch["size_um"], config.patch["train_mpp"])
    tiles = cut_patches(img, xy[idx], side=side, out_size=encoder.input_size)
    return (tiles, xy[idx]), f"{len(idx)} spots of {source}"


def parity_inputs(config: RunConfig, encoder: Any, *, rng: np.random.Generator, data: str | Path | None
                   ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]], str]:
    """Encoder tile sets and head feeds (``random`` and, when readable, ``real``) for the parity checks."""
    import torch

    s = int(encoder.input_size)
    d = int(encoder.feature_dim)
    tiles = {"random": rng.integers(0, 256, (N_RANDOM, s, s, 3), dtype=np.uint8)}
    rf = rng.standard_normal((3, 50, d)).astype(np.float32)
    rp = (rng.random((3, 50, 2)) * 6000).astype(np.float32)
    rm = np.ones((3, 50), np.float32)
    rm[1, 37:] = 0
    feeds = {"random": {"features": rf, "positions": rp, "mask": rm}}
    real, status = real_inputs(config, encoder, data=data)
    if real is not None:
        tiles["real"] = real[0]
        with torch.no_grad():
            feats = encoder(torch.from_numpy(real[0])).numpy()
        groups = group_points(real[1], max_size=config.grouping["max_size"])
        index, mask = pad_groups(groups)
        safe = np.where(index < 0, 0, index)
        pos = (real[1] * config.patch["train_mpp"]).astype(np.float32)  # level-0 px → µm
        feeds["real"] = {"features": feats[safe], "positions": pos[safe], "mask": mask}
    return tiles, feeds, status
