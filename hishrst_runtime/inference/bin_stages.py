"""A sub-spot run over one prepared slide: tiles → encoder tokens → head per tile → kept tokens → bins.

The same reader threads, work units and thread layout as the spot pipeline
(:func:`~hishrst_runtime.inference.pipeline.run_units`): a work unit is ``batch_size`` consecutive tiles of the
:class:`~hishrst_runtime.inference.bins.BinLayout` (a fixed function of the layout, so a resumed run computes
exactly the batches of an uninterrupted one), read by :func:`~hishrst_runtime.inference.stages.read_tiles`
(``tokens.tile_um`` around each tile centre, resized to the encoder's input size), then

1. :func:`encode_tokens` runs the encoder (``batch_size`` tiles a call) and keeps its ``tokens`` output
   ``[n, rows, cols, width]`` — on the GPU when the encoder and head are onnxruntime GPU engines of one device
   (:func:`~hishrst_runtime.backends.device.device_link`), so the tokens never make a host round trip;
2. :func:`head_bins` runs the head over the tokens (``head_batch`` tiles a call) → expression per token, keeps the
   central ``keep × keep`` tokens, pools ``2 × 2`` of them in count space for ``16um``
   (:func:`~hishrst_runtime.core.tokens.pool_bins_log1p`) and returns the unit's rows (its tiles' in-tissue bins,
   consecutive) and their values; NaN or infinite values fail the slide before anything of the unit is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from hishrst_runtime.backends.base import named_output
from hishrst_runtime.backends.device import DeviceTensor, device_link
from hishrst_runtime.bundle.manifest import Bundle
from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.timing import StageTimer
from hishrst_runtime.core.tokens import pool_bins_log1p
from hishrst_runtime.inference.bins import BinLayout, PreparedBins
from hishrst_runtime.inference.pipeline import PredictStats, ReadAhead, UnitFinisher, run_units
from hishrst_runtime.inference.stages import UnitPlan, check_finite, plan_units, work_units
from hishrst_runtime.slides.cache import DEFAULT_CACHE_BYTES

__all__ = ["encode_tokens", "head_bins", "predict_bins", "unit_bin_rows"]


def encode_tokens(plan: UnitPlan, encoder: Any, tiles: np.ndarray, *, on_device: bool = False) -> Any:
    """The encoder's ``tokens`` of ``tiles``, float32 ``[n, rows, cols, width]``, ``plan.batch_size`` tiles a call.

    ``on_device`` (the encoder and head share a GPU, :func:`~hishrst_runtime.backends.device.device_link`): the
    tokens stay on the GPU as a :class:`~hishrst_runtime.backends.device.DeviceTensor` the head takes without a
    host round trip (a unit is one encoder call; a unit of several calls is joined on the host)."""
    t0 = time.perf_counter()
    b = plan.batch_size
    if on_device:
        parts = [encoder.run_device({"tiles": tiles[i:i + b]}, keep=("tokens",), fetch=())["tokens"]
                 for i in range(0, len(tiles), b)]
        tokens = parts[0] if len(parts) == 1 else np.concatenate([p.to_host() for p in parts])
    else:
        tokens = np.concatenate([np.asarray(named_output(encoder, encoder.run({"tiles": tiles[i:i + b]}), "tokens"),
                                            dtype=np.float32) for i in range(0, len(tiles), b)])
    plan.timer.add("encoder", time.perf_counter() - t0)
    grid = plan.bundle.spec.tokens.grid if plan.bundle.spec.tokens is not None else None
    shape = tuple(tokens.shape)
    if len(shape) != 4 or shape[0] != len(tiles) or tuple(shape[1:3]) != grid:
        raise InputError(f"{plan.bundle.root}: the encoder returned tokens of shape {shape} for {len(tiles)} "
                         f"tiles, expected [{len(tiles)}, {grid}, width]; re-export the bundle")
    return tokens


def unit_bin_rows(layout: BinLayout, unit: list[int]) -> np.ndarray:
    """The rows (int64, consecutive) of the bins of a unit's tiles (one group per tile: group ``t`` is tile ``t``)."""
    return layout.tile_rows(unit[0], unit[-1])


def _crop_pool(plan: UnitPlan, layout: BinLayout, expr: np.ndarray) -> np.ndarray:
    """``[b, kb, kb, genes]``: the kept tokens of each tile's expression ``[b, rows, cols, genes]``, pooled to the
    output bins (count space) for resolutions above the token pitch."""
    geom = layout.lattice.geometry
    m, k, g = int(geom.margin), geom.keep, len(plan.bundle.genes)
    if expr.ndim != 4 or tuple(expr.shape[1:]) != (*geom.grid, g):
        raise InputError(f"{plan.bundle.root}: the head returned expression of shape {expr.shape}, expected "
                         f"[tiles, {geom.grid[0]}, {geom.grid[1]}, {g}]; re-export the bundle")
    kept = expr[:, m:m + k, m:m + k]
    if layout.factor == 1:
        return kept
    f, b = layout.factor, len(kept)  # tiles stacked row-wise: f × f blocks never cross a tile (keep % f == 0)
    return pool_bins_log1p(kept.reshape(b * k, k, g), f).reshape(b, k // f, k // f, g)


def head_bins(plan: UnitPlan, layout: BinLayout, head: Any, unit: list[int], tokens: Any
              ) -> tuple[np.ndarray, np.ndarray]:
    """The head over a unit's tiles (``tokens``: a host array, or a device value sliced on the device): (int64 rows,
    float32 ``[rows, genes]`` values of their in-tissue bins)."""
    t0 = time.perf_counter()
    tiles = np.asarray(unit, dtype=np.int64)
    outs = []
    for s in range(0, len(tiles), plan.max_groups):
        part = tokens.slice(s, s + plan.max_groups) if isinstance(tokens, DeviceTensor) else tokens[s:s + plan.max_groups]
        expr = named_output(head, head.run({"tokens": part}), "expression")
        bins = _crop_pool(plan, layout, np.asarray(expr, dtype=np.float32))
        outs.append(bins[layout.in_tissue[tiles[s:s + plan.max_groups]]])
    values = np.ascontiguousarray(np.concatenate(outs), dtype=np.float32)
    plan.timer.add("head", time.perf_counter() - t0)
    rows = unit_bin_rows(layout, unit)
    check_finite(plan, rows, values)
    return rows, values


def predict_bins(
    prep: PreparedBins,
    bundle: Bundle,
    *,
    encoder: Any,
    head: Any,
    write: Callable[[np.ndarray, np.ndarray], None],
    done: np.ndarray | None = None,
    batch_size: int = 64,
    head_batch: int | None = None,
    workers: int = 2,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: Callable[[int], None] | None = None,
    timer: StageTimer | None = None,
    ahead: ReadAhead | None = None,
    on_read_all: Callable[[], None] | None = None,
) -> PredictStats:
    """Encoder + head over every work unit of ``prep`` whose bins are not all ``done``; ``write(rows, values)``
    per unit (rows: int64 bin rows, values: float32 ``[len(rows), genes]``), in unit order from one thread.

    ``batch_size``: tiles per encoder call and per unit; ``head_batch``: tiles per head call (default: the bundle's
    ``max_batch``); ``workers``: reader threads; ``cache_bytes``: chunk-cache bound (bytes); ``progress(n)``: after
    each unit, its bins not ``done`` before. A unit with any bin missing is recomputed whole (bins already on disk
    are rewritten with identical values). Returns counters (``points_computed``: bins written, ``encoder_passes``:
    tiles encoded) and stage timings. ``ahead`` / ``on_read_all``: as :func:`~hishrst_runtime.inference.pipeline.
    run_units` (``ahead`` is closed on return)."""
    layout = prep.bins
    plan = plan_units(prep, bundle, batch_size=batch_size, head_batch=head_batch, cache_bytes=cache_bytes, timer=timer)
    plan = plan if ahead is None else ahead.share_cache(plan)
    all_units = work_units(prep.groups, batch_size)
    units = [u for u in all_units if done is None or not done[unit_bin_rows(layout, u)].all()]
    finish = UnitFinisher(plan, lambda u, tok: head_bins(plan, layout, head, u, tok), write, done, progress)
    on_device = device_link(encoder, head)  # tokens stay on the GPU between encoder and head
    t_start = time.perf_counter()
    try:
        run_units(plan, lambda tiles: encode_tokens(plan, encoder, tiles, on_device=on_device), finish, units, workers,
                  ahead=ahead, on_read_all=on_read_all)
    finally:
        if ahead is not None:
            ahead.close()
    cache = plan.cache
    return PredictStats(
        points_computed=int(finish.n_done), units=len(all_units), units_computed=len(units),
        seconds=time.perf_counter() - t_start,
        chunk_cache={"hits": cache.hits, "misses": cache.misses, "peak_bytes": cache.peak_bytes},
        level=prep.level_index, level_mpp=float(plan.level.mpp), patch_side_px=plan.side,
        stages=dict(plan.timer.seconds), encoder_passes=sum(len(u) for u in units),
    )
