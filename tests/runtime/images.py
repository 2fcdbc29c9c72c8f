"""Synthetic slide images shared by the runtime's tests: a pink disc of tissue on white glass."""

from __future__ import annotations

import numpy as np


def _inside(side: int) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    return (xx - side / 2) ** 2 + (yy - side / 2) ** 2 < (side / 3) ** 2


def disc_image(side: int = 640) -> np.ndarray:
    """The disc with per-pixel noise (σ 20) drawn for the tissue pixels only (seed 0)."""
    inside = _inside(side)
    img = np.full((side, side, 3), 245, np.uint8)
    rng = np.random.default_rng(0)
    img[inside] = np.clip(rng.normal((200, 110, 170), 20, (int(inside.sum()), 3)), 0, 255).astype(np.uint8)
    return img


def textured_disc(side: int = 480, seed: int = 0) -> np.ndarray:
    """The disc with per-pixel noise (σ 25) drawn over the whole frame: every query point gets its own values."""
    rng = np.random.default_rng(seed)
    inside = _inside(side)
    img = np.full((side, side, 3), 245, np.uint8)
    img[inside] = np.clip(rng.normal((200, 110, 170), 25, size=(side, side, 3))[inside], 0, 255).astype(np.uint8)
    return img
