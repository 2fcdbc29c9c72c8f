"""Work units and the three stage functions :func:`~hishrst_runtime.inference.pipeline.predict_slide` composes.

A *work unit* is a run of consecutive neighbour groups holding at least ``batch_size`` points
(:func:`work_units`, a fixed function of the groups, so a resumed run forms exactly the units,
encoder batches and head batches of an uninterrupted one). Per unit:

1. :func:`read_tiles` cuts the unit's patches from the chosen level through a bounded LRU cache of
   decoded whole chunks: each patch is copied from the cached chunks into its slot of the unit's uint8
   batch and, unless its side already is the encoder's input size, resampled to it (Pillow, as in
   training); the patch side is ``round(patch_um / level_mpp)`` pixels, i.e. the trained physical size.
2. :func:`encode_tiles` runs the encoder in batches of ``batch_size`` tiles.
3. :func:`head_rows` runs the head over the unit's groups (padded to the bundle's
   ``max_group_size``) and returns the output rows and their values; a NaN or infinite value fails the
   slide (:class:`NonFiniteOutputError`) before anything of the unit is written.

Benchmarks call these same functions, so what they time is what ``hishrst-run`` runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from hishrst_runtime.backends.base import named_output
from hishrst_runtime.bundle.manifest import Bundle
from hishrst_runtime.bundle.spec import BundleError
from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.grouping import local_groups, safe_index
from hishrst_runtime.core.patches import patch_origins, patch_side_px, resize_image, tile_batch_shape
from hishrst_runtime.core.timing import StageTimer
from hishrst_runtime.core.vocab import LEGACY_TILE_LAYOUT
from hishrst_runtime.inference.prepare import PreparedSlide
from hishrst_runtime.slides.cache import DEFAULT_CACHE_BYTES, ChunkCache

__all__ = ["NonFiniteOutputError", "UnitPlan", "plan_units", "work_units", "unit_rows",
           "read_tiles", "encode_tiles", "head_rows", "check_finite"]

class NonFiniteOutputError(BundleError):
    """The bundle's head returned NaN or infinite values; the slide fails and those rows are not written."""


def work_units(groups: list[np.ndarray], batch_size: int) -> list[list[int]]:
    """Consecutive group indices whose point counts add up to at least ``batch_size`` (the last may be short).

    A fixed function of the groups: a resumed run forms exactly the units of an uninterrupted one.
    """
    units: list[list[int]] = []
    unit: list[int] = []
    n = 0
    for gi, g in enumerate(groups):
        unit.append(gi)
        n += len(g)
        if n >= batch_size:
            units.append(unit)
            unit, n = [], 0
    if unit:
        units.append(unit)
    return units


@dataclass(frozen=True)
class UnitPlan:
    """What every unit of one slide shares: the level, patch geometry, batches and the chunk cache.

    ``side``: patch side in level pixels; ``size``: encoder input side (pixels); ``downsample``:
    level-0 pixels per level pixel; ``mpp0``: µm per level-0 pixel; ``pad_to``: head group size;
    ``max_groups``: most groups per head call; ``batch_size``: encoder batch (tiles); ``layout``: the encoder's
    tile layout (``NHWC`` or ``NCHW``, the bundle's).
    """

    prep: PreparedSlide
    bundle: Bundle
    level: Any
    cache: ChunkCache
    side: int
    size: int
    downsample: float
    mpp0: float
    pad_to: int
    max_groups: int
    batch_size: int
    timer: StageTimer
    layout: str = LEGACY_TILE_LAYOUT


def plan_units(prep: PreparedSlide, bundle: Bundle, *, batch_size: int = 64, head_batch: int | None = None,
               cache_bytes: int = DEFAULT_CACHE_BYTES, timer: StageTimer | None = None) -> UnitPlan:
    """The :class:`UnitPlan` of ``prep``: ``batch_size`` encoder tiles, ``head_batch`` groups per head call
    (default: the bundle's ``max_batch``), a chunk cache bounded by ``cache_bytes`` (bytes)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"--batch-size must be an integer >= 1 tiles, got {batch_size!r}")
    timer = timer or StageTimer()
    level = prep.slide.levels[prep.level_index]
    return UnitPlan(
        prep=prep, bundle=bundle, level=level, cache=ChunkCache(level, max_bytes=cache_bytes, timer=timer),
        side=patch_side_px(bundle.patch_um, float(level.mpp)), size=bundle.spec.encoder.input_size,
        downsample=float(level.downsample), mpp0=float(prep.slide.mpp0),
        pad_to=max([bundle.max_group_size, *(len(g) for g in prep.groups)]),
        max_groups=max(1, int(head_batch or bundle.manifest.get("max_batch", 64))), batch_size=batch_size, timer=timer,
        layout=bundle.spec.encoder.layout,
    )


def unit_rows(prep: PreparedSlide, unit: list[int]) -> np.ndarray:
    """The point indices (int64) of a unit's groups, in order."""
    return np.concatenate([prep.groups[g] for g in unit])


def read_tiles(plan: UnitPlan, unit: list[int]) -> np.ndarray:
    """The unit's tiles: uint8 RGB in the encoder's layout (``plan.layout``: ``[n, size, size, 3]`` NHWC or
    ``[n, 3, size, size]`` NCHW), pixel-identical to ``cut_patches`` + resize (transposed for NCHW).

    Each patch is copied from the cached chunks straight into its slot of the batch (:meth:`ChunkCache.copy_box`).
    When the patch side equals the encoder's input size (the level's pixel size gives exactly the trained
    field, e.g. UNI's 224 px at 0.5 µm/px) the resize is the identity (:func:`resize_image` returns the patch
    itself), so nothing else happens to the pixels; otherwise each patch is resized with the training resampler.
    """
    idx = unit_rows(plan.prep, unit)
    side, size, cache, planar = plan.side, plan.size, plan.cache, plan.layout == "NCHW"
    t0 = time.perf_counter()
    origins = patch_origins(plan.prep.points_px[idx] / plan.downsample, side)
    tiles = np.empty(tile_batch_shape(len(idx), size, plan.layout), dtype=np.uint8)
    if side == size:
        for tile, (x0, y0) in zip(tiles, origins.tolist()):
            cache.copy_box(tile, x0, y0, channels_first=planar)
    else:
        patch = np.empty((side, side, 3), dtype=np.uint8)
        for tile, (x0, y0) in zip(tiles, origins.tolist()):
            resized = np.asarray(resize_image(Image.fromarray(cache.copy_box(patch, x0, y0)), size))
            tile[...] = resized.transpose(2, 0, 1) if planar else resized
    plan.timer.add("cut_resample", time.perf_counter() - t0)  # includes chunk reads (also in read_decode)
    return tiles


def encode_tiles(plan: UnitPlan, encoder: Any, tiles: np.ndarray) -> np.ndarray:
    """Encoder features, float32 ``[n, feature_dim]``, computed in batches of ``plan.batch_size`` tiles."""
    t0 = time.perf_counter()
    b = plan.batch_size
    feats = np.concatenate([np.asarray(named_output(encoder, encoder.run({"tiles": tiles[i : i + b]}), "features"),
                                       dtype=np.float32) for i in range(0, len(tiles), b)])
    plan.timer.add("encoder", time.perf_counter() - t0)
    if feats.ndim != 2 or feats.shape[0] != len(tiles):
        raise InputError(f"{plan.bundle.root}: the encoder returned features of shape {feats.shape} for "
                         f"{len(tiles)} tiles; re-export the bundle")
    return feats


def head_rows(plan: UnitPlan, head: Any, unit: list[int], feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The head over the unit's groups: (int64 rows, float32 ``[rows, genes]`` values)."""
    t0 = time.perf_counter()
    groups = [plan.prep.groups[g] for g in unit]
    idx, local, mask = local_groups(groups, size=plan.pad_to)
    safe = safe_index(local)
    pos_um = (plan.prep.points_px[idx] * plan.mpp0).astype(np.float32)
    outs = []
    for s in range(0, len(groups), plan.max_groups):
        sl = slice(s, s + plan.max_groups)
        outs.append(np.asarray(head.run({"features": feats[safe[sl]], "positions": pos_um[safe[sl]],
                                         "mask": mask[sl]})[0], dtype=np.float32))
    out = np.concatenate(outs)
    valid = local >= 0
    plan.timer.add("head", time.perf_counter() - t0)
    rows, values = idx[local[valid]], np.ascontiguousarray(out[valid])
    check_finite(plan, rows, values)
    return rows, values


def check_finite(plan: UnitPlan, rows: np.ndarray, values: np.ndarray) -> None:
    """Raise :class:`NonFiniteOutputError` when any of the head's ``values`` (``[rows, genes]``) is NaN or
    infinite: such rows are never written as if they were predictions."""
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        shown = ", ".join(str(int(r)) for r in rows[bad][:3]) + (", ..." if bad.sum() > 3 else "")
        raise NonFiniteOutputError(
            f"{plan.bundle.root}: the head returned non-finite values (NaN or infinite) for {int(bad.sum())} of "
            f"{len(rows)} rows of a work unit of {plan.prep.name} (points {shown}); nothing of them is written. "
            "The bundle is broken (e.g. trained on data with NaN): check the training data, re-train and re-export")
