"""Cutting spot patches at a physical size (torch-free, shared by training and the runtime).

A patch is a square of ``patch_um`` micrometres centred on a spot. On an image with ``mpp``
micrometres per pixel it spans ``round(patch_um / mpp)`` pixels; it is cut in RGB order, padded with
white (255, the colour of glass) where it runs over the image edge, and resized to the encoder's
input size with Pillow's bilinear filter (antialiased when shrinking). Training and the runtime call
the same functions, so a spot's pixels reach the encoder identically in both.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_PATCH_UM",
    "PAD_VALUE",
    "RESIZE_FILTER",
    "patch_side_px",
    "patch_origin",
    "patch_origins",
    "cut_patch",
    "resize_patch",
    "resize_image",
    "cut_patches",
    "tile_batch_shape",
    "to_tile_layout",
    "shape_tile_layout",
]

#: The paper cut 112-pixel patches on DLPFC, whose full-resolution images have 55 µm spots of
#: ~96.4 px (0.5705 µm/px): 112 px ≈ 63.9 µm. We default to 64 µm.
DEFAULT_PATCH_UM = 64.0
PAD_VALUE = 255
RESIZE_FILTER = "bilinear"


def tile_batch_shape(n: int, size: int, layout: str = "NHWC") -> tuple[int, int, int, int]:
    """Shape of a batch of ``n`` RGB tiles of ``size`` px in the encoder's ``layout``
    (:data:`~hishrst_runtime.core.vocab.TileLayout`): ``(n, size, size, 3)`` or ``(n, 3, size, size)``."""
    return (int(n), 3, int(size), int(size)) if layout == "NCHW" else (int(n), int(size), int(size), 3)


def to_tile_layout(tiles: np.ndarray, layout: str) -> np.ndarray:
    """NHWC uint8 ``tiles`` ``[B, S, S, 3]`` in the encoder's ``layout`` (a contiguous copy for ``NCHW``, else
    ``tiles`` itself): how anything that cut tiles in NHWC (parity checks, calibration) feeds an encoder graph."""
    return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2)) if layout == "NCHW" else tiles


def shape_tile_layout(shape: Sequence[Any]) -> str:
    """The layout of a graph's tiles input of ``shape`` (``[batch, 3, S, S]``: ``NCHW``; else ``NHWC``)."""
    dims = list(shape)
    return "NCHW" if len(dims) == 4 and dims[1] == 3 and dims[3] != 3 else "NHWC"


def patch_side_px(patch_um: float, mpp: float) -> int:
    """Side in pixels of a ``patch_um`` patch on an image of ``mpp`` µm/pixel (at least 1)."""
    if not (np.isfinite(patch_um) and patch_um > 0):
        raise ValueError(f"patch size must be a positive number of µm, got {patch_um!r}")
    if not (np.isfinite(mpp) and mpp > 0):
        raise ValueError(f"pixel size must be a positive number of µm/pixel, got {mpp!r}")
    return max(1, int(np.floor(patch_um / mpp + 0.5)))


def patch_origin(center_xy: Sequence[float] | np.ndarray, side: int) -> tuple[int, int]:
    """Top-left pixel (x0, y0) of a ``side``-pixel patch centred on ``center_xy`` (pixels)."""
    x0, y0 = patch_origins(np.asarray(center_xy, dtype=np.float64).reshape(1, 2), side)[0]
    return int(x0), int(y0)


def patch_origins(centers_xy: np.ndarray, side: int) -> np.ndarray:
    """Top-left pixels ``[N, 2]`` int64 (x0, y0) of ``side``-pixel patches centred on ``centers_xy`` ``[N, 2]`` (pixels)."""
    return np.floor(np.asarray(centers_xy, dtype=np.float64) - side / 2.0 + 0.5).astype(np.int64)


def cut_patch(image: Any, center_xy: Sequence[float] | np.ndarray, side: int, *, fill: int = PAD_VALUE) -> np.ndarray:
    """Cut a ``side × side`` RGB uint8 patch centred on ``center_xy`` = (x, y) in pixels of ``image``.

    ``image`` is anything with ``.shape == (H, W, 3)`` whose ``[y0:y1, x0:x1]`` slice returns an
    ``(h, w, 3)`` array — a numpy array, a tifffile/zarr array, or a lazy level adapter. Parts outside
    the image are filled with ``fill``.
    """
    h, w = int(image.shape[0]), int(image.shape[1])
    x0, y0 = patch_origin(center_xy, side)
    x1, y1 = x0 + side, y0 + side
    out = np.full((side, side, 3), fill, dtype=np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        region = np.asarray(image[sy0:sy1, sx0:sx1])
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = region[..., :3]
    return out


def resize_image(patch: Image.Image, size: int) -> Image.Image:
    """Resize a Pillow RGB patch to ``size × size`` pixels (bilinear, antialiased when shrinking).

    The one resampling step of training and the runtime (:func:`resize_patch` is this on arrays).
    """
    if patch.size == (size, size):
        return patch
    return patch.resize((size, size), Image.BILINEAR)


def resize_patch(patch: np.ndarray, size: int) -> np.ndarray:
    """Resize an RGB uint8 patch to ``size × size`` pixels (Pillow bilinear, antialiased)."""
    if patch.shape[0] == size and patch.shape[1] == size:
        return np.ascontiguousarray(patch)
    return np.asarray(resize_image(Image.fromarray(patch), size))


def cut_patches(
    image: Any,
    centers_xy: np.ndarray,
    *,
    side: int,
    out_size: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Cut and resize one patch per centre; returns ``[N, out_size, out_size, 3]`` uint8 (NHWC)."""
    centers_xy = np.asarray(centers_xy, dtype=np.float64)
    if out is None:
        out = np.empty((len(centers_xy), out_size, out_size, 3), dtype=np.uint8)
    for i, c in enumerate(centers_xy):
        out[i] = resize_patch(cut_patch(image, c, side), out_size)
    return out
