"""The streaming whole-slide pipeline: tiles → encoder → head over neighbour groups → output rows.

For one slide:

1. :func:`~hishrst_runtime.inference.prepare.prepare_slide` opens the store, picks the level, finds
   tissue and lays out and groups the query points.
2. :func:`predict_slide` cuts the groups into *work units*
   (:func:`~hishrst_runtime.inference.stages.work_units`) and composes the stage functions of
   :mod:`hishrst_runtime.inference.stages` over them: reader threads run ``read_tiles``, the calling
   thread runs ``encode_tiles``, one more thread runs ``head_rows`` and hands the rows to ``write``,
   one unit at a time in unit order, while the encoder goes on with the next unit.

Peak memory is bounded independently of the slide's size: the chunk cache (``cache_bytes``), at most
``max(2, 2 * workers)`` units of tiles in flight, and the per-point arrays (points, groups, done mask). The next
slide is prepared in the background while the current one runs (:func:`hishrst_runtime.jobs.runner.run_slides`), and
once the current one has read all its units, the next one's first units are read ahead (:class:`ReadAhead`, at
most :data:`READ_AHEAD_BYTES` of tiles), so the engine goes on from one slide to the next without waiting for tiles.
"""

from __future__ import annotations

import dataclasses
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
    "READ_AHEAD_BYTES",
    "ReadAhead",
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


#: Bytes of tiles :class:`ReadAhead` holds for the next slide (at most ``max(2, 2 * workers)`` units, at least one):
#: three units of 256 UNI tiles (224 px).
READ_AHEAD_BYTES = 128 << 20


class ReadAhead:
    """The first work units' tiles of a prepared slide, read on ``workers`` threads of their own once
    :meth:`start` is called (while the previous slide's engine works through its last units).

    Holds at most ``max_bytes`` of tiles (at least one unit) and, while reading, a chunk cache of at most
    ``cache_bytes``. The tiles are those :func:`read_tiles` cuts for the unit (a pure function of the slide and
    the unit), so a slide computes the same values with or without them; units :func:`run_units` does not
    take (e.g. already done on ``--resume``) are dropped. :meth:`close` cancels what is not read yet."""

    def __init__(self, prep: PreparedSlide, bundle: Bundle, *, batch_size: int, workers: int,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, max_bytes: int = READ_AHEAD_BYTES) -> None:
        self.prep, self.bundle, self.batch_size, self.workers = prep, bundle, batch_size, max(1, workers)
        self.cache_bytes, self.max_bytes = cache_bytes, max_bytes
        self._lock = threading.Lock()
        self._reads: dict[tuple[int, ...], Future] = {}
        self._cache: Any = None
        self.started = self.closed = False

    def start(self) -> None:
        """Start reading (once; a no-op after :meth:`close`). Never raises: a unit that cannot be read raises
        when :func:`run_units` takes it, as if it were read then."""
        with self._lock:
            if self.started or self.closed:
                return
            self.started = True
            try:
                plan = plan_units(self.prep, self.bundle, batch_size=self.batch_size, cache_bytes=self.cache_bytes)
                unit_bytes = self.batch_size * plan.size * plan.size * 3
                n = min(max(2, 2 * self.workers), max(1, self.max_bytes // max(1, unit_bytes)))
                units = work_units(self.prep.groups, self.batch_size)[:n]
            except Exception:  # noqa: BLE001 - the slide's own run meets (and reports) the same problem
                return
            self._cache = plan.cache
            pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="hishrst-ahead")
            for u in units:
                self._reads[tuple(u)] = pool.submit(read_tiles, plan, u)
            pool.shutdown(wait=False)  # its threads end with the last read; the plan (and its cache) goes then

    def share_cache(self, plan: UnitPlan) -> UnitPlan:
        """``plan`` with the chunk cache the read-ahead filled (same level and bound), so the chunks it decoded
        are not decoded again for the slide's next units; ``plan`` itself when nothing was read ahead."""
        with self._lock:
            cache = self._cache
        if cache is None or cache.level is not plan.level or cache.max_bytes != plan.cache.max_bytes:
            return plan
        cache.timer = plan.timer  # its reads from now on count for the slide
        return dataclasses.replace(plan, cache=cache)

    def take(self, unit: list[int]) -> Future | None:
        """The read of ``unit`` (a future of its tiles), or None when it was not read ahead."""
        with self._lock:
            return self._reads.pop(tuple(unit), None)

    @property
    def pending(self) -> int:
        """Units read ahead and not taken."""
        return len(self._reads)

    def close(self) -> None:
        """Drop the tiles not taken and cancel the reads not started."""
        with self._lock:
            self.closed = True
            for f in self._reads.values():
                f.cancel()
            self._reads.clear()
            self._cache = None


def run_units(plan: UnitPlan, encode: Callable[[np.ndarray], np.ndarray], finish: UnitFinisher,
              units: list[list[int]], workers: int, *, ahead: ReadAhead | None = None,
              on_read_all: Callable[[], None] | None = None) -> None:
    """Reader threads cut tiles (:func:`read_tiles`), this thread runs ``encode(tiles)``, one more thread runs
    ``finish`` (head + write) for the previous unit, so the encoder never waits for the head or the output store;
    ``workers`` 0: everything in this thread, unit after unit. ``ahead``: units already read (taken instead of
    read again); ``on_read_all()``: called (in this thread) once the last unit's read is under way."""
    if workers <= 0:
        for u in units:
            fut = ahead.take(u) if ahead is not None else None
            finish(u, encode(read_tiles(plan, u) if fut is None else fut.result()))
        if on_read_all is not None:
            on_read_all()
        return
    _run_threaded(plan, encode, finish, units, workers, ahead, on_read_all)


def _run_threaded(plan: UnitPlan, encode: Callable[[np.ndarray], np.ndarray], finish: UnitFinisher,
                  units: list[list[int]], workers: int, ahead: ReadAhead | None,
                  on_read_all: Callable[[], None] | None) -> None:
    depth = max(2, 2 * workers)  # units of tiles in flight: bounds memory
    pending: deque[tuple[list[int], Future]] = deque()
    finishing: deque[Future] = deque()
    it: Iterator[list[int]] = iter(units)
    told = [on_read_all is None]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hishrst-read") as pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="hishrst-head") as post:

        def read(u: list[int] | None) -> None:
            if u is not None:
                fut = ahead.take(u) if ahead is not None else None
                pending.append((u, fut if fut is not None else pool.submit(read_tiles, plan, u)))
            elif not told[0]:  # every read is under way: the next slide may read ahead
                told[0] = True
                on_read_all()  # type: ignore[misc]

        try:
            for u in it:
                read(u)
                if len(pending) >= depth:
                    break
            else:
                read(None)
            while pending:
                t0 = time.perf_counter()
                unit, fut = pending.popleft()
                tiles = fut.result()
                plan.timer.add("wait_for_tiles", time.perf_counter() - t0)
                read(next(it, None))
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
    ahead: ReadAhead | None = None,
    on_read_all: Callable[[], None] | None = None,
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
    ``head=None`` writes the encoder features instead (:func:`encode_slide`). ``ahead`` / ``on_read_all``: as
    :func:`run_units` (``ahead`` is closed on return).
    """
    plan = plan_units(prep, bundle, batch_size=batch_size, head_batch=head_batch, cache_bytes=cache_bytes, timer=timer)
    plan = plan if ahead is None else ahead.share_cache(plan)
    all_units = work_units(prep.groups, batch_size)
    units = [u for u in all_units if done is None or not done[unit_rows(prep, u)].all()]
    if head is None:  # features mode: the rows of the unit, in the order its tiles were cut
        finish = UnitFinisher(plan, lambda u, f: (unit_rows(prep, u), f), write, done, progress)
    else:
        finish = UnitFinisher(plan, lambda u, f: head_rows(plan, head, u, f), write, done, progress)
    t_start = time.perf_counter()
    try:
        run_units(plan, lambda tiles: encode_tiles(plan, encoder, tiles), finish, units, workers, ahead=ahead,
                  on_read_all=on_read_all)
    finally:
        if ahead is not None:
            ahead.close()
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
