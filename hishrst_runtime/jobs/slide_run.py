"""Predicting one prepared slide into its crash-safe output store (one step of ``run_slides``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.bundle.manifest import Bundle
from hishrst_runtime.core.files import remove_tree
from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.timing import StageTimer
from hishrst_runtime.inference.engines import Engines
from hishrst_runtime.inference.pipeline import PredictStats, PreparedSlide, predict_slide
from hishrst_runtime.jobs.formats import write_tissue_geojson
from hishrst_runtime.jobs.options import RunOptions
from hishrst_runtime.jobs.results import Pending, SlideResult
from hishrst_runtime.output.names import SlideOutputs
from hishrst_runtime.output.store import OutputStore, SpatialImages

__all__ = ["SlideContext", "StoreInCreation", "created", "run_prepared", "predict_into", "MAX_CHUNK_ROWS", "OUTPUT_BUFFER_BYTES",
           "EXPLICIT_BUFFER_BYTES", "LOCK_REFRESH_S"]

log = logging.getLogger(__name__)

#: Output X chunks hold at most this many rows (and at most ~4 MiB): progress is durable per chunk.
MAX_CHUNK_ROWS = 1024
#: Bound of the output store's row buffers (bytes).
OUTPUT_BUFFER_BYTES = 64 << 20
#: Bound of the row buffers for explicit points (bytes). Their rows keep the file's order, which need not
#: follow the neighbour-group order they are computed in: buffering their whole X (when it fits) writes
#: every X chunk once, instead of writing and re-reading partial chunks whenever the buffers are full.
EXPLICIT_BUFFER_BYTES = 1 << 30
#: Seconds between refreshes of a held slide lock (its heartbeat for jobs on other hosts).
LOCK_REFRESH_S = 60.0


@dataclass(frozen=True)
class SlideContext:
    """What every slide of one run shares: bundle, engines, options and the effective encoder batch;
    ``defer_finish``: :func:`run_prepared` returns a :class:`~hishrst_runtime.jobs.results.Pending` (finalize and
    QC left to the caller) instead of finishing the slide itself."""

    bundle: Bundle
    engines: Engines
    options: RunOptions
    batch_size: int
    defer_finish: bool = False


def _identity(prep: PreparedSlide, bundle: Bundle) -> dict[str, Any]:
    """Everything that determines the rows' values and names: compared on ``--resume``."""
    slide = prep.slide
    level = slide.levels[prep.level_index]
    return {
        "bundle_hash": bundle.sha256, "mpp": float(slide.mpp0), "mpp_source": str(slide.mpp_source),
        "level": int(prep.level_index), "level_mpp": float(level.mpp), "patch_um": bundle.patch_um,
        "points": "grid" if prep.pitch_um is not None else "explicit", "pitch_um": prep.pitch_um, "grid": prep.grid,
        "min_tissue": prep.min_tissue, "output_meaning": bundle.spec.output.meaning,
        "tissue_mask": prep.tissue_mask.astype(np.uint8), "tissue_mask_scalef": float(prep.thumbnail_scale),
        "obs_names_sha256": _names_hash(prep.obs_names),  # None (dropped) for numbered rows
        **prep.info,  # e.g. the --tissue-mask file
    }


def _names_hash(names: list[str] | None) -> str | None:
    """SHA-256 of the explicit points' names in order (so ``--resume`` refuses changed ids), or None."""
    if names is None:
        return None
    return hashlib.sha256(json.dumps([str(n) for n in names]).encode("utf-8")).hexdigest()


def _buffer_bytes(prep: PreparedSlide, n_genes: int) -> int:
    """The output's row-buffer bound: :data:`OUTPUT_BUFFER_BYTES` for grid points (their rows arrive in
    order), enough for the whole X of explicit points up to :data:`EXPLICIT_BUFFER_BYTES` (warned above)."""
    if prep.pitch_um is not None:
        return OUTPUT_BUFFER_BYTES
    need = (len(prep.points_px) + MAX_CHUNK_ROWS) * n_genes * 4
    if need > EXPLICIT_BUFFER_BYTES:
        log.warning("%s: %d points x %d genes (%.1f GiB) exceed the %.1f GiB output buffer: points whose order in "
                    "the file does not follow their position make output chunks be rewritten (slower); order "
                    "the points by position (e.g. by y, then x) to avoid it", prep.name, len(prep.points_px),
                    n_genes, need / 2**30, EXPLICIT_BUFFER_BYTES / 2**30)
    return max(OUTPUT_BUFFER_BYTES, min(need, EXPLICIT_BUFFER_BYTES))


class StoreInCreation:
    """A new output store being created on a thread of its own while the slide's first units stream, so the
    engine does not wait for its skeleton between slides (obs, var, uns and images: hundreds of small files,
    ~0.1 s on a local disk and more on network filesystems). A new store has no row done (:meth:`done_mask`
    while it is being created); any other use waits for the store and raises its creation error, so the first
    write of a slide whose store cannot be created fails the slide with that error."""

    def __init__(self, create: Callable[[], OutputStore], n_obs: int) -> None:
        self._n_obs = int(n_obs)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hishrst-store")
        self._future = pool.submit(create)
        pool.shutdown(wait=False)

    def result(self) -> OutputStore:
        """The created store (waits for it)."""
        return self._future.result()

    def done_mask(self) -> np.ndarray:
        """The store's rows written so far: none while it is being created (a new store), else the store's own."""
        fut = self._future
        if fut.done() and fut.exception() is None:
            return fut.result().done_mask()
        return np.zeros(self._n_obs, dtype=bool)

    def write_rows(self, rows: np.ndarray, values: np.ndarray) -> None:
        """:meth:`OutputStore.write_rows` once the store exists (bound before the first unit is computed)."""
        self.result().write_rows(rows, values)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._future.result(), name)


def created(store: OutputStore | StoreInCreation) -> OutputStore:
    """The store itself (waiting for a :class:`StoreInCreation`)."""
    return store.result() if isinstance(store, StoreInCreation) else store


def _open_store(prep: PreparedSlide, outs: SlideOutputs, ctx: SlideContext) -> tuple[OutputStore | StoreInCreation, bool]:
    """(store, resumed): the incomplete output reopened for ``--resume``, else a new one (:class:`StoreInCreation`)."""
    bundle, n, out = ctx.bundle, len(prep.points_px), outs.store
    identity = _identity(prep, bundle)
    buffer_bytes = _buffer_bytes(prep, len(bundle.genes))
    opts, state = ctx.options, OutputStore.status(out)
    # --resume finishes a partial; with --overwrite that partial may be the replacement of a complete output.
    replacing = opts.overwrite and state == "complete" and outs.partial.is_dir()
    if opts.resume and (state == "incomplete" or replacing):
        return OutputStore.open_incomplete(out, obs_xy_px=prep.points_px, grid_index=prep.grid_index,
                                           genes=bundle.genes, expected_uns={"hishrst": identity},
                                           max_buffer_bytes=buffer_bytes, replace=replacing), True
    library_id = outs.stem or "slide"
    spatial = SpatialImages(library_id=library_id, lowres=prep.thumbnail, lowres_scalef=prep.thumbnail_scale,
                            spot_diameter_fullres=(prep.pitch_um or bundle.patch_um) / float(prep.slide.mpp0))
    rows = max(1, min(MAX_CHUNK_ROWS, n, (4 << 20) // (4 * len(bundle.genes))))
    return StoreInCreation(lambda: OutputStore.create(
        out, obs_xy_px=prep.points_px, grid_index=prep.grid_index, tissue_fraction=prep.tissue_fraction,
        genes=bundle.genes, uns={"hishrst": identity}, spatial=spatial, chunk_rows=rows, max_buffer_bytes=buffer_bytes,
        replace=opts.overwrite, obs_names=prep.obs_names, x_dtype=opts.dtype,
        extra_obs=None if prep.background is None else {"background": prep.background}), n), False


def predict_into(store: OutputStore | StoreInCreation, prep: PreparedSlide, ctx: SlideContext, lock: Any, resumed: bool, *,
                 predict: Callable[..., PredictStats] = predict_slide, unit: str = "pt"
                 ) -> tuple[PredictStats, StageTimer]:
    """Stream every missing row into ``store`` with ``predict`` (:func:`predict_slide`, or the bins' twin) and
    flush; on failure keep finished rows for ``--resume``. ``unit``: the progress bar's unit."""
    from tqdm.auto import tqdm

    timer = StageTimer()
    done = store.done_mask()
    bar = tqdm(total=len(done), initial=int(done.sum()), desc=prep.name[:30], unit=unit,
               disable=not ctx.options.progress, leave=False, position=1)
    last_refresh = [time.monotonic()]

    def advance(k: int) -> None:
        bar.update(k)
        if time.monotonic() - last_refresh[0] > LOCK_REFRESH_S:
            lock.refresh()
            last_refresh[0] = time.monotonic()

    opts = ctx.options
    try:
        stats = predict(prep, ctx.bundle, encoder=ctx.engines.encoder, head=ctx.engines.head,
                        write=store.write_rows, done=done, batch_size=ctx.batch_size, workers=opts.workers,
                        cache_bytes=int(opts.cache_bytes or 0), progress=advance, timer=timer,
                        ahead=getattr(prep, "ahead", None), on_read_all=getattr(prep, "on_read_all", None))
        t0 = time.perf_counter()
        store.flush()
        timer.add("write", time.perf_counter() - t0)
    except BaseException:
        with contextlib.suppress(Exception):
            store.close()  # keep every finished row for --resume
            if not resumed and not store.done_mask().any():  # nothing computed: leave no output at all
                remove_tree(store.work_path)
        raise
    finally:
        bar.close()
    return stats, timer


def _qc(prep: PreparedSlide, outs: SlideOutputs, ctx: SlideContext) -> dict[str, Any]:
    """Write the QC thumbnail ``OUT/S.qc.png`` from the complete store; its :class:`SlideResult` fields
    (empty when it cannot be written: a warning, never the slide's failure)."""
    from hishrst_runtime.output.qc import choose_gene, render_qc, write_qc_png

    try:
        gene = choose_gene(outs.store, ctx.bundle.genes)
        radius = 0.35 * (prep.pitch_um or ctx.bundle.patch_um) / float(prep.slide.mpp0)  # dots apart
        image = render_qc(prep.thumbnail, prep.tissue_mask, prep.points_px, gene.values,
                          thumbnail_scale=prep.thumbnail_scale, mpp0=float(prep.slide.mpp0), radius_px=radius,
                          title=prep.name, gene=gene.name, rule=gene.rule)
        path = write_qc_png(outs.qc, image, gene=gene.name, rule=gene.rule)
    except (OSError, ValueError) as e:
        log.warning("%s: the QC thumbnail %s could not be written (%s)", prep.name, outs.qc, e)
        return {}
    return {"qc": path, "qc_gene": gene.name, "qc_rule": gene.rule}


def run_prepared(prep: PreparedSlide, out: Path | SlideOutputs, ctx: SlideContext, lock: Any
                 ) -> SlideResult | Pending:
    """Predict one prepared slide into ``out`` (``OUT/S.zarr``, holding ``lock``) and finalize it, then write its
    QC thumbnail (``options.qc``). Its tissue GeoJSON is written when ``options.tissue_geojson``, or when that
    is None and the slide has a tissue-mask file (``prep.mask_file``). Status ``ok``. With ``ctx.defer_finish``
    the finalize and the QC thumbnail are returned as a :class:`Pending` instead (``prep`` must stay open, and
    ``lock`` held, until its ``finish()`` returns)."""
    from hishrst_runtime.core.version import __version__

    outs, mask = SlideOutputs.of(out), prep.mask_file
    n = len(prep.points_px)
    if n == 0:
        raise InputError(f"{prep.path}: no tissue found under the query grid (tissue detected on "
                         f"{float(prep.tissue_mask.mean()):.1%} of the overview); lower --min-tissue, "
                         "check the slide, or pass explicit points")
    log.info("%s: %d query points at level %d, prepared in %.1f s", prep.name, n, prep.level_index, prep.seconds)
    store, resumed = _open_store(prep, outs, ctx)
    geojson = ctx.options.tissue_geojson
    if geojson or (geojson is None and mask is not None):  # before any row: a complete output always has it
        write_tissue_geojson(outs, prep.tissue_mask, shape0=tuple(prep.slide.shape0), given=mask)
    stats, timer = predict_into(store, prep, ctx, lock, resumed)
    store = created(store)
    tiles_per_s = round(stats.points_computed / max(stats.seconds, 1e-9), 1)
    timings = {k: round(v, 3) for k, v in timer.seconds.items()} | {"prepare": round(prep.seconds, 3),
                                                                     "predict": round(stats.seconds, 3)}

    def finish() -> SlideResult:
        store.finalize({"hishrst_run": {
            "slide": prep.location, "bundle": str(Path(ctx.bundle.root).resolve()),
            "engine": ctx.engines.provider, "hishrst_version": __version__, "resumed": resumed,
            "chunks_recomputed": len(store.chunks_recomputed), "points_computed": stats.points_computed,
            "points_dropped": prep.points_dropped, "patch_side_px": int(stats.patch_side_px),
            "tiles_per_s": tiles_per_s, "timings": timings, "test_encoder": ctx.bundle.spec.test_encoder,
        }})
        qc = _qc(prep, outs, ctx) if ctx.options.qc else {}
        return SlideResult(slide=str(prep.path), output=outs.store, status="ok", points=n,
                           computed=stats.points_computed, engine=ctx.engines.provider, tiles_per_s=tiles_per_s,
                           resumed=resumed, timings=timings, stats=stats,
                           chunks_recomputed=len(store.chunks_recomputed), points_dropped=prep.points_dropped,
                           test_encoder=ctx.bundle.spec.test_encoder, **qc)

    return Pending(finish) if ctx.defer_finish else finish()
