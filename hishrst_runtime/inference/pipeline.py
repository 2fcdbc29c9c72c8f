"""The streaming whole-slide pipeline: tiles → encoder → head over neighbour groups → output rows.

For one slide:

1. :func:`~hishrst_runtime.inference.prepare.prepare_slide` opens the store, picks the level, finds
   tissue and lays out and groups the query points.
2. :func:`predict_slide` cuts the groups into *work units*
   (:func:`~hishrst_runtime.inference.stages.work_units`) and composes the stage functions of
   :mod:`hishrst_runtime.inference.stages` over them: reader threads run ``read_tiles``, the calling
   thread runs ``encode_tiles``, one more thread runs ``head_rows`` and hands the rows to ``write``,
   one unit at a time in unit order, while the encoder goes on with the next unit.

Peak memory is bounded independently of the slide's size: the chunk cache (``cache_bytes``), one
unit box per reader thread (at most ``MAX_UNIT_REGION_PX`` pixels), at most ``max(2, 2 * workers)``
units of tiles in flight, and the per-point arrays (points, groups, done mask). The next slide is
prepared in the background while the current one runs (:func:`hishrst_runtime.jobs.runner.run_slides`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from hishrst_runtime.bundle.manifest import Bundle
from hishrst_runtime.core.timing import StageTimer
from hishrst_runtime.inference.prepare import DEFAULT_PITCH_UM, PreparedSlide, prepare_slide
from hishrst_runtime.inference.stages import (
    UnitPlan,
    encode_tiles,
    head_rows,
    plan_units,
    read_tiles,
    unit_rows,
    work_units,
)
from hishrst_runtime.slides.cache import DEFAULT_CACHE_BYTES

__all__ = [
    "DEFAULT_PITCH_UM",
    "DEFAULT_CACHE_BYTES",
    "PreparedSlide",
    "PredictStats",
    "UnitFinisher",
    "prepare_slide",
    "run_units",
    "work_units",
    "predict_slide",
    "encode_slide",
]


@dataclass(frozen=True)
class PredictStats:
    """What :func:`predict_slide` did: points and units computed, wall ``seconds``, chunk-cache counters,
    the level used (index, µm / pixel), the patch side (level pixels), per-stage seconds and the tiles the
    encoder ran on (``encoder_passes``; a sub-spot run's rows are bins, several per tile)."""

    points_computed: int
    units: int
    units_computed: int
    seconds: float
    chunk_cache: dict[str, int]
    level: int
    level_mpp: float
    patch_side_px: int
    stages: dict[str, float]
    encoder_passes: int = 0


class UnitFinisher:
    """Rows + write + progress for one unit at a time, in unit order; after the first failure it does nothing.
    ``compute(unit, encoded) -> (rows, values)``: the head over the unit (or the features as they are, for
    :func:`encode_slide`; the bins of its tiles for a sub-spot run)."""

    def __init__(self, plan: UnitPlan, compute: Callable[[list[int], np.ndarray], tuple[np.ndarray, np.ndarray]],
                 write: Callable[[np.ndarray, np.ndarray], None], done: np.ndarray | None,
                 progress: Callable[[int], None] | None) -> None:
        self.plan, self.compute, self.write, self.done, self.progress = plan, compute, write, done, progress
        self.failed = threading.Event()
        self.n_done = 0

    def __call__(self, unit: list[int], encoded: np.ndarray) -> None:
        if self.failed.is_set():
            return
        try:
            rows, values = self.compute(unit, encoded)
            t0 = time.perf_counter()
            self.write(rows, values)
            self.plan.timer.add("write", time.perf_counter() - t0)
            self.n_done += len(rows)
            if self.progress:  # rows new to the output (a resumed unit may rewrite rows already on disk)
                self.progress(len(rows) if self.done is None else int((~self.done[rows]).sum()))
        except BaseException:
            self.failed.set()
            raise


def run_units(plan: UnitPlan, encode: Callable[[np.ndarray], np.ndarray], finish: UnitFinisher,
              units: list[list[int]], workers: int) -> None:
    """Reader threads cut tiles (:func:`read_tiles`), this thread runs ``encode(tiles)``, one more thread runs
    ``finish`` (head + write) for the previous unit, so the encoder never waits for the head or the output store;
    ``workers`` 0: everything in this thread, unit after unit."""
    if workers <= 0:
        for u in units:
            finish(u, encode(read_tiles(plan, u)))
        return
    depth = max(2, 2 * workers)  # units of tiles in flight: bounds memory
    pending: deque[tuple[list[int], Future]] = deque()
    finishing: deque[Future] = deque()
    it: Iterator[list[int]] = iter(units)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hishrst-read") as pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="hishrst-head") as post:
        try:
            for u in it:
                pending.append((u, pool.submit(read_tiles, plan, u)))
                if len(pending) >= depth:
                    break
            while pending:
                t0 = time.perf_counter()
                unit, fut = pending.popleft()
                tiles = fut.result()
                plan.timer.add("wait_for_tiles", time.perf_counter() - t0)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(read_tiles, plan, nxt)))
                feats = encode(tiles)
                while finishing and (len(finishing) >= 2 or finishing[0].done()):
                    finishing.popleft().result()  # raises a head / write error here, in order
                finishing.append(post.submit(finish, unit, feats))
            while finishing:
                finishing.popleft().result()
        finally:
            for f in (*(f for _, f in pending), *finishing):  # on an error: drop queued work instead of finishing it
                f.cancel()


def predict_slide(
    prep: PreparedSlide,
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
) -> PredictStats:
    """Run encoder + head over every work unit of ``prep`` not yet ``done``; ``write(rows, values)`` per unit.

    ``rows`` are int64 point indices, ``values`` float32 ``[len(rows), genes]``; ``write`` and
    ``progress`` are called from one thread at a time, in unit order. ``batch_size`` is the
    encoder batch (tiles), ``head_batch`` the most groups per head call (default: the bundle's
    ``max_batch``), ``workers`` the reader threads (0: read in the calling thread), ``cache_bytes`` the
    chunk cache bound (bytes). ``progress(n)`` is called after each unit with its rows that were not
    ``done`` before.

    A unit whose rows are all ``done`` is skipped; any other unit is recomputed whole (rows already
    on disk are rewritten with identical values), so a resumed run computes exactly the batches an
    uninterrupted run does and writes exactly its values. Returns counters and stage timings.
    ``head=None`` writes the encoder features instead (:func:`encode_slide`).
    """
    plan = plan_units(prep, bundle, batch_size=batch_size, head_batch=head_batch, cache_bytes=cache_bytes, timer=timer)
    all_units = work_units(prep.groups, batch_size)
    units = [u for u in all_units if done is None or not done[unit_rows(prep, u)].all()]
    if head is None:  # features mode: the rows of the unit, in the order its tiles were cut
        finish = UnitFinisher(plan, lambda u, f: (unit_rows(prep, u), f), write, done, progress)
    else:
        finish = UnitFinisher(plan, lambda u, f: head_rows(plan, head, u, f), write, done, progress)
    t_start = time.perf_counter()
    run_units(plan, lambda tiles: encode_tiles(plan, encoder, tiles), finish, units, workers)
    cache = plan.cache
    return PredictStats(
        points_computed=int(finish.n_done), units=len(all_units), units_computed=len(units),
        seconds=time.perf_counter() - t_start,
        chunk_cache={"hits": cache.hits, "misses": cache.misses, "peak_bytes": cache.peak_bytes},
        level=prep.level_index, level_mpp=float(plan.level.mpp), patch_side_px=plan.side,
        stages=dict(plan.timer.seconds), encoder_passes=sum(len(unit_rows(prep, u)) for u in units),
    )


def encode_slide(
    prep: PreparedSlide,
    bundle: Bundle,
    *,
    encoder: Any,
    write: Callable[[np.ndarray, np.ndarray], None],
    batch_size: int = 64,
    workers: int = 2,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: Callable[[int], None] | None = None,
    timer: StageTimer | None = None,
) -> PredictStats:
    """The encoder alone over every work unit of ``prep`` (no head): ``write(rows, features)`` per unit.

    ``rows`` are int64 point indices, ``features`` float32 ``[len(rows), feature_dim]``: the same tiles,
    batches and encoder calls as :func:`predict_slide` (the same reader and stage functions), in unit order.
    """
    return predict_slide(prep, bundle, encoder=encoder, head=None, write=write, batch_size=batch_size,
                         workers=workers, cache_bytes=cache_bytes, progress=progress, timer=timer)
