"""``hishrst-run`` / ``hishrst run``: predict dense expression over whole slides.

Torch-free: this module and everything it imports use numpy, zarr, Pillow and ONNX Runtime /
TensorRT only.

Per slide ``S.ome.zarr`` (or ``S.zarr``) the output is ``OUT/S.zarr``, an AnnData zarr store written
crash-safely by :class:`hishrst_runtime.output.OutputStore` (built in ``OUT/S.zarr.partial`` and renamed
when complete), guarded by the lock file ``OUT/S.zarr.lock`` so several jobs can share ``OUT``.
A complete output is skipped unless ``--overwrite``; an incomplete one is finished by ``--resume``.
Outputs never resolve to, inside or above an input slide, the bundle, the points or the tissue-mask file
(refused before anything is written), and an ``S.h5ad`` / ``S.tissue.geojson`` hishrst did not write is never
replaced. A complete slide is skipped; what it lacks (its ``.h5ad`` copy, its SpatialData store) is finished
under its lock, and left alone while another job holds it. One slide's failure (including a lock file that
cannot be created, or a URL the slide reader cannot open) is reported in its :class:`SlideResult` and the
others go on. Each slide is a :class:`~hishrst_runtime.jobs.inputs.SlideInput` (its own points, mask and output
name), handed to slide preparation as it is. ``--format`` and the tissue GeoJSON:
:mod:`hishrst_runtime.jobs.formats`; explicit points from files: :mod:`hishrst_runtime.inference.points`.
A held lock is refreshed by a heartbeat thread (its lease: ``--stale-after``). ``--claim`` (work stealing):
the slides are walked sorted by path, each free and incomplete one taken, and the walk repeated over the
slides locked by others while a walk took any, so a killed worker's slide (its lock stale) is finished
(``--claim`` implies ``--resume``). :func:`run_slide` runs one slide (for Ray, Dask and other task mappers).
The engine is kept busy across slides (:mod:`hishrst_runtime.jobs.overlap`): the next slide is prepared in the
background and its first work units read ahead while the current one streams, and each slide is finished
(finalize, QC thumbnail, other formats, lock release) on a thread while the next one streams.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.backends.registry import ENGINES
from hishrst_runtime.bundle.manifest import Bundle, BundleError, load_bundle
from hishrst_runtime.core.errors import OutputStateError
from hishrst_runtime.core.vocab import DEFAULT_POSITION_MODE, UM_POSITION_MODES
from hishrst_runtime.inference.bins import PreparedBins, prepare_bins
from hishrst_runtime.inference.engines import Engines, default_engine_threads, load_engines
from hishrst_runtime.inference.pipeline import DEFAULT_CACHE_BYTES, PreparedSlide, ReadAhead, prepare_slide
from hishrst_runtime.inference.points import QueryPoints
from hishrst_runtime.jobs.admission import Admission
from hishrst_runtime.jobs.bin_run import check_bundle_options, run_prepared_bins
from hishrst_runtime.jobs.formats import finish_formats, is_done, require_formats
from hishrst_runtime.jobs.inputs import SlideInput
from hishrst_runtime.jobs.interrupts import Interrupted
from hishrst_runtime.jobs.locks import LockHeartbeat, SlideLock, lock_path
from hishrst_runtime.jobs.options import DEFAULT_WORKERS, RunOptions
from hishrst_runtime.jobs.overlap import Finisher, read_ahead_when_prepared
from hishrst_runtime.jobs.paths import (
    SlideArg,
    as_slide_arg,
    check_output_location,
    output_collisions,
    slide_output_path,
    slide_problem,
)
from hishrst_runtime.jobs.results import Pending, SlideResult
from hishrst_runtime.jobs.slide_run import SlideContext, run_prepared

__all__ = ["run_slides", "run_slide", "slide_output_path", "output_collisions", "DEFAULT_WORKERS", "RunOptions",
           "SlideResult", "RUNNABLE_POSITION_MODES", "Points", "SlideInput"]

#: Explicit points of one slide: a ``[N, 2]`` level-0 pixel (x, y) array, or points read from a file.
Points = np.ndarray | QueryPoints
#: Slides prepared ahead of the one streaming, on as many threads (opened, tissue detected, query grid laid out;
#: only the next one reads tiles ahead). Two: a big slide after a short one is prepared in time.
PREFETCH_SLIDES = 2


#: Position modes whose positions exist on any slide (absolute µm at run time); ``grid`` (Visium array
#: coordinates) does not.
RUNNABLE_POSITION_MODES: tuple[str, ...] = UM_POSITION_MODES


def _load_run_bundle(bundle_dir: Path) -> Bundle:
    """The bundle, refused when its position mode cannot run on whole slides (only ``grid``)."""
    bundle = load_bundle(bundle_dir)
    mode = bundle.spec.position.mode
    if mode not in RUNNABLE_POSITION_MODES:
        raise BundleError(f"{bundle_dir / 'manifest.json'}: the bundle encodes {mode} (array) positions, which only "
                          f"exist on Visium slides; re-train with --position {DEFAULT_POSITION_MODE} (the default, "
                          "which transfers to other slides) to run on whole slides")
    return bundle


def _inputs(slides: Sequence[SlideArg | SlideInput], points_px: dict[str, Points] | None,
            mask: Path | None) -> list[SlideInput]:
    """``slides`` as records: ``points_px`` (``{slide: points}``, the older form) fills in their points and
    ``mask`` (``--tissue-mask``) is the default mask of every slide without its own."""
    given = {str(as_slide_arg(k)): v for k, v in (points_px or {}).items()}
    items = [s if isinstance(s, SlideInput) else SlideInput(s) for s in slides]
    return [i.with_defaults(points=given.get(str(i.slide)), mask=mask) for i in items]


def _make_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise OutputStateError(f"{out_dir}: exists and is not a directory; choose another --out") from e
    except OSError as e:
        raise OutputStateError(f"{out_dir}: cannot create the output folder ({e.strerror or e}); "
                               "check its permissions or choose another --out") from e


def _context(bundle: Bundle, engines: Engines, options: RunOptions, echo: Callable[[str], Any]) -> SlideContext:
    """Say which engine runs, and cap the encoder batch at a TensorRT profile's ``max_batch``."""
    threads = options.engine_threads or default_engine_threads(options.workers)
    echo(f"engine: {engines.provider}" + (" (auto-selected)" if options.provider == "auto" else "")
         + (f", {threads} intra-op thread(s)" if engines.provider == "cpu" else "")
         + f", {options.workers} reader thread(s)")
    batch_size, max_batch = options.batch_size, bundle.spec.max_batch
    entry = ENGINES.get(engines.provider)  # the no-op engine of benchmarks has none
    if entry is not None and entry.batch_bounded and batch_size > max_batch:
        echo(f"batch size {batch_size} > the TensorRT profile's {max_batch}; using {max_batch}")
        batch_size = max_batch
    return SlideContext(bundle=bundle, engines=engines, options=options, batch_size=batch_size)


def run_slides(
    slides: Sequence[SlideArg | SlideInput],
    *,
    bundle_dir: Path,
    out_dir: Path,
    options: RunOptions | None = None,
    points_px: dict[str, Points] | None = None,
    engines: Engines | None = None,
    echo: Callable[[str], Any] = print,
    **settings: Any,
) -> list[SlideResult]:
    """Run the pipeline over ``slides``; returns one :class:`SlideResult` per slide, in order (a sub-spot bundle:
    the bins of its token lattice over tissue, ``options.resolution``, instead of query points).

    ``slides``: paths, URLs or :class:`SlideInput` records (each with its own points, tissue mask and output
    name). ``options`` (or the same fields as keyword ``settings``, e.g. ``pitch_um=40, provider="cpu"``):
    see :class:`RunOptions`; ``options.tissue_mask`` is the mask of every slide without its own.
    ``points_px``: ``{str(slide): [N, 2] level-0 pixel (x, y)}`` explicit points instead of the grid (all
    kept, in order), or ``{str(slide): QueryPoints}`` (points read by
    :func:`~hishrst_runtime.inference.points.read_points`: named, those outside the slide dropped or refused
    by ``options.points_outside``) for slides without points of their own. ``engines``: already loaded
    engines to use instead of loading the bundle's for ``options.provider`` (e.g.
    :func:`~hishrst_runtime.inference.engines.noop_engines`). Bad options, bundle and engine problems, a
    missing package a ``--format`` needs, and outputs that would touch an input (a slide, the bundle, a
    points or tissue-mask file) raise before anything is written; ``file://`` slide URLs are local paths. A
    slide's own problem is reported in its result (``status="failed"``, ``reason``) and the others go on.
    """
    opts = RunOptions.from_settings(options, settings)
    require_formats(opts.formats)  # before any slide, not after the first one is predicted
    items = _inputs(slides, points_px, opts.tissue_mask)
    if opts.claim:  # every worker walks the same order, so they meet only where one is still working
        items = sorted(items, key=lambda i: str(i.slide))
    bundle = _load_run_bundle(Path(bundle_dir))
    if bundle.spec.test_encoder:
        from hishrst_runtime.jobs.report import TEST_ENCODER_WARNING

        echo(f"warning: {TEST_ENCODER_WARNING}")
    check_bundle_options(bundle, opts, [i.points for i in items])
    check_output_location(items, Path(out_dir), Path(bundle_dir))
    if engines is None:
        threads = opts.engine_threads or default_engine_threads(opts.workers)
        engines = load_engines(bundle, opts.provider, cache_dir=opts.cache_dir, threads=threads,
                               batch_size=opts.batch_size)
    try:
        ctx = _context(bundle, engines, opts, echo)
        _make_out_dir(Path(out_dir))
        with _Runner(items, Path(out_dir), ctx) as runner:
            return runner.run_all()
    finally:
        for eng in (engines.encoder, engines.head):
            with contextlib.suppress(Exception):
                eng.close()


def run_slide(slide: SlideArg | SlideInput, *, bundle: str | os.PathLike[str], out: str | os.PathLike[str],
              **options: Any) -> SlideResult:
    """Run one slide into the folder ``out`` (``out/<slide>.zarr``, with its lock, QC thumbnail and formats) with
    the bundle ``bundle``; returns its :class:`SlideResult` (``status`` ``ok``, ``skipped`` or ``failed`` with a
    one-line ``reason``: a slide's own problem is returned, not raised).

    The public entry point for task mappers (Ray, Dask, concurrent.futures; see ``docs/COHORTS.md``): every call
    loads the engines, takes the slide's lock (a slide another task holds is ``skipped``), and finishes a
    partial output left by a killed task exactly (``resume=True`` is the default here). ``options``: the fields
    of :class:`RunOptions` (``provider="cuda"``, ``pitch_um=50``, ``batch_size=256``, ...; ``progress``
    defaults to False), and ``echo`` (default: the log at INFO). Bad options and bundle problems raise.
    """
    echo = options.pop("echo", None) or (lambda line: logging.getLogger(__name__).info("%s", line))
    options = {"progress": False, "resume": not options.get("overwrite", False), **options}
    results = run_slides([slide], bundle_dir=Path(bundle), out_dir=Path(out), echo=echo, **options)
    return results[0]


class _Runner(Admission):
    """The slide loop of one run: skip / lock / prepare (the next slide in the background, its first units read
    ahead) / predict, each slide finished (finalize, QC, formats, lock release) on a thread while the next streams."""

    #: Read the next slide's first units ahead and finish slides on a thread (False: the slide loop of before,
    #: for comparisons in tests and benchmarks).
    overlap = True

    def __init__(self, items: list[SlideInput], out_dir: Path, ctx: SlideContext) -> None:
        self.items, self.ctx = items, dataclasses.replace(ctx, defer_finish=self.overlap)
        self.slides = [i.slide for i in items]
        self.opts = ctx.options
        self.outputs = [i.outputs(out_dir) for i in items]
        self.outs = [o.store for o in self.outputs]
        self.collided = set(output_collisions(items, out_dir))
        self.prefetch = ThreadPoolExecutor(max_workers=PREFETCH_SLIDES, thread_name_prefix="hishrst-prefetch")
        self.finisher = Finisher()
        self.futures: dict[int, Future] = {}
        self.locked: set[int] = set()  # slides skipped because another live job holds their lock
        self.ran = 0  # slides this run took the lock of and predicted

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        for j in list(self.futures):
            self._drop(j)
        self.prefetch.shutdown(wait=True, cancel_futures=True)
        self.finisher.shutdown()

    def run_all(self) -> list[SlideResult]:
        """Every slide's result, in order. A SIGTERM / SIGINT (:class:`Interrupted`, or a plain
        ``KeyboardInterrupt``) raises :class:`Interrupted` carrying the results so far, the slide in flight
        ``interrupted`` (a slide being finished on the finishing thread is finished first)."""
        from tqdm.auto import tqdm

        results: dict[int, SlideResult] = {}
        current: list[int] = []  # the slide in flight, if any
        try:
            with tqdm(total=len(self.slides), desc="slides", unit="slide", disable=not self.opts.progress,
                      position=0) as overall:
                for i in self._order():
                    current[:] = [i]
                    known = i in results
                    res = self._one(i)
                    if res is not None:  # None: being finished (collected below)
                        results[i] = res
                    current.clear()
                    overall.update(0 if known else 1)
            self.finisher.collect(results)
        except KeyboardInterrupt as e:
            stop = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
            if current:
                i = current[0]
                results[i] = SlideResult(
                    slide=str(self.slides[i]), output=self.outs[i], status="interrupted",
                    reason=f"interrupted by {stop.name}; rerun with --resume to finish it (the rows already "
                           "written are kept)")
            self.finisher.collect(results)  # a slide that streamed every row is finished, not interrupted
            stop.results = [results[i] for i in sorted(results)]
            raise stop from (None if stop is e else e)
        return [results[i] for i in sorted(results)]

    def _order(self) -> Any:
        """The slides to visit: each once; with ``--claim`` the walk is repeated over the slides locked by other
        jobs as long as the previous walk ran any (a job that died meanwhile left its lock stale)."""
        pending = list(range(len(self.slides)))
        while pending:
            ran, self.locked = self.ran, set()
            yield from pending
            if not self.opts.claim or self.ran == ran:
                return
            pending = sorted(self.locked)

    def _prepare(self, item: SlideInput) -> PreparedSlide:
        o = self.opts
        if self.ctx.bundle.spec.subspot:  # bins on the token lattice (check_bundle_options refused points)
            return prepare_bins(item.slide, self.ctx.bundle, resolution=o.resolution, mpp=o.mpp, tissue_mask=item.mask,
                                allow_missing_chunks=o.allow_missing_chunks, mask_mode=o.mask_mode)
        explicit = {"points_px": item.points} if isinstance(item.points, np.ndarray) else {"points": item.points}
        return prepare_slide(item.slide, self.ctx.bundle, mpp=o.mpp, pitch_um=float(o.pitch_um or 0), grid=o.grid,
                             min_tissue=o.min_tissue, allow_missing_chunks=o.allow_missing_chunks,
                             tissue_mask=item.mask, mask_mode=o.mask_mode, points_outside=o.points_outside,
                             **explicit)

    def _prepare_ahead(self, item: SlideInput) -> PreparedSlide:
        """:meth:`_prepare`, with a :class:`ReadAhead` of its first units (started by :meth:`_read_ahead_next`)."""
        prep = self._prepare(item)
        if not self.overlap:
            return prep
        prep.ahead = ReadAhead(prep, self.ctx.bundle, batch_size=self.ctx.batch_size, workers=self.opts.workers,
                               cache_bytes=int(self.opts.cache_bytes or DEFAULT_CACHE_BYTES))
        return prep

    def _read_ahead_next(self) -> None:
        """The slide streaming now has every read under way: the next slide reads its first units."""
        if self.futures:
            read_ahead_when_prepared([self.futures[min(self.futures)]])

    def _drop(self, i: int) -> None:
        """Forget slide i's prefetch; close its slide once (and if) it is ready."""
        fut = self.futures.pop(i, None)
        if fut is not None and not fut.cancel():
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or f.result().close())

    def _needs_work(self, j: int) -> bool:
        out = self.outs[j]
        if self.opts.claim and lock_path(out).exists():  # most likely another worker's: do not prepare it
            return False
        return out not in self.collided and slide_problem(self.slides[j], out) is None and (
            self.opts.overwrite or not is_done(out, self.opts.formats))

    def _prefetch_after(self, i: int) -> None:
        """Prepare (in the background, on the prefetch threads) the next :data:`PREFETCH_SLIDES` slides after i that
        will need work: a big slide after a short one is then prepared while the slide before the short one streams."""
        ahead: list[int] = []
        for j in range(i + 1, len(self.slides)):
            if len(ahead) == PREFETCH_SLIDES:
                break
            if j in self.futures or self._needs_work(j):
                ahead.append(j)
        for j in ahead:
            if j not in self.futures:
                self.futures[j] = self.prefetch.submit(self._prepare_ahead, self.items[j])

    def _one(self, i: int) -> SlideResult | None:
        """Slide i's result, or None when it streamed and is being finished (:attr:`finisher`, holding its lock)."""
        out = self.outs[i]
        res = SlideResult(slide=str(self.slides[i]), output=out, status="failed")
        lock = SlideLock(out, lease_s=self.opts.stale_after)
        refused = self._refused(i, res, lock)
        if refused is not None:
            return refused
        with contextlib.ExitStack() as held:
            held.callback(lock.release)
            beat = held.enter_context(LockHeartbeat(lock))  # other jobs, on any host, see this lock refreshed
            return self._run_locked(i, res, out, beat, held)

    def _run_locked(self, i: int, res: SlideResult, out: Path, beat: LockHeartbeat,
                    held: contextlib.ExitStack) -> SlideResult | None:
        """Prepare (or take the prefetched) slide i and stream it; its finishing goes to the finishing thread
        with ``held`` (its heartbeat and lock), and None is returned, unless it failed or was not deferred."""
        t0, prep = time.perf_counter(), None
        self.ran += 1
        try:
            fut = self.futures.pop(i, None) or self.prefetch.submit(self._prepare, self.items[i])
            self._prefetch_after(i)  # the next slides are prepared while this one is (on the other thread) and runs
            prep = fut.result()
            prep.on_read_all = self._read_ahead_next
            run = run_prepared_bins if isinstance(prep, PreparedBins) else run_prepared
            done = run(prep, out, self.ctx, beat)
        except (KeyboardInterrupt, SystemExit):
            self._closed(prep, res)
            raise
        except Exception as e:  # noqa: BLE001 - one slide's failure must not stop the others
            return self._complete(i, res, prep, t0, error=e)
        if isinstance(done, Pending):
            self.finisher.submit(i, functools.partial(self._complete, i, res, prep, t0, done.finish, held.pop_all()))
            return None
        return self._complete(i, res, prep, t0, lambda: done)

    def _complete(self, i: int, res: SlideResult, prep: Any, t0: float, finish: Callable[[], SlideResult] | None = None,
                  held: contextlib.ExitStack | None = None, error: Exception | None = None) -> SlideResult:
        """Slide i's result: ``finish()`` (finalize and QC) and its other ``--format`` outputs, or the slide's
        ``error``; then its slide is closed and ``held`` (its heartbeat and lock, when handed over) released."""
        try:
            if error is None and finish is not None:
                res = finish().with_(slide=res.slide)
                levels = getattr(getattr(prep, "slide", None), "levels", None)
                finish_formats(self.outputs[i], self.opts.formats, levels=levels, replace=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - one slide's failure must not stop the others
            error = e
        finally:
            res = self._closed(prep, res)
            if held is not None:
                held.close()
        if error is not None:
            res = res.with_(status="failed", reason=f"{type(error).__name__}: {error}")
            if os.environ.get("HISHRST_DEBUG"):
                traceback.print_exception(error)
        return res.with_(seconds=round(time.perf_counter() - t0, 2))

    @staticmethod
    def _closed(prep: Any, res: SlideResult) -> SlideResult:
        """Close ``prep`` (if any), noting its slide chunks read as fill in ``res``."""
        if prep is None:
            return res
        filled = getattr(getattr(prep, "slide", None), "filled_chunks", None) or ()
        prep.close()
        return res.with_(filled_chunks=tuple(str(c) for c in filled))
