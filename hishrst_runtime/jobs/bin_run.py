"""Predicting one slide prepared for a sub-spot bundle into its crash-safe bin store (a step of ``run_slides``).

The sub-spot twin of :func:`~hishrst_runtime.jobs.slide_run.run_prepared`: the same lock, resume, progress,
finalize, tissue GeoJSON and QC thumbnail, with the rows being the bins of
:class:`~hishrst_runtime.inference.bins.BinLayout` (store: :func:`~hishrst_runtime.output.bins_store.
create_bin_store`) and the prediction :func:`~hishrst_runtime.inference.bin_stages.predict_bins`.
:func:`check_bundle_options` refuses, before anything is written, the options that do not fit the bundle's kind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.bundle.manifest import Bundle
from hishrst_runtime.core.errors import InputError
from hishrst_runtime.inference.bin_stages import predict_bins
from hishrst_runtime.inference.bins import PreparedBins
from hishrst_runtime.jobs.formats import write_tissue_geojson
from hishrst_runtime.jobs.options import RunOptions
from hishrst_runtime.jobs.results import Pending, SlideResult
from hishrst_runtime.jobs.slide_run import (MAX_CHUNK_ROWS, OUTPUT_BUFFER_BYTES, SlideContext, StoreInCreation, created,
                                            predict_into)
from hishrst_runtime.output.bins_store import create_bin_store
from hishrst_runtime.output.names import SlideOutputs
from hishrst_runtime.output.store import OutputStore, SpatialImages

__all__ = ["BIN_CHUNK_BYTES", "MAX_BIN_CHUNK_ROWS", "check_bundle_options", "run_prepared_bins", "passes_per_mm2"]

log = logging.getLogger(__name__)

#: Bytes of one X chunk of a bin store (float32 rows), and the most rows one holds: millions of bins with few
#: genes would otherwise make thousands of tiny chunks, each fsync'd with its progress record.
BIN_CHUNK_BYTES = 4 << 20
MAX_BIN_CHUNK_ROWS = 1 << 16


def check_bundle_options(bundle: Bundle, options: RunOptions, points: Sequence[Any]) -> None:
    """Raise :class:`InputError` (naming the option and the fix) when ``options`` do not fit the bundle's head
    kind: ``--resolution`` with a spot bundle; explicit points (``points``: each slide's, None for none) or
    query-grid flags (``options.grid_options``) with a sub-spot bundle, which predicts on a bin lattice."""
    where = bundle.root / "manifest.json"
    if not bundle.spec.subspot:
        if options.resolution is not None:
            raise InputError(f"--resolution {options.resolution}: {where} is a spot bundle (head.kind spot), which "
                             "predicts at query points; drop --resolution (use --pitch-um / --grid for the points), "
                             "or use a sub-spot bundle")
        return
    given = [p for p in points if p is not None]
    if given:
        raise InputError(f"--points: {where} is a sub-spot bundle, which predicts every bin of a lattice over tissue "
                         f"({len(given)} slide(s) have explicit points); drop the points (and any points column of a "
                         "--slides-from sheet), or use a spot bundle to predict at points")
    if options.grid_options:
        raise InputError(f"{', '.join(options.grid_options)}: {where} is a sub-spot bundle, whose bins are set by "
                         "its token lattice and --resolution (8um or 16um), not by a query grid; drop "
                         f"{', '.join(options.grid_options)}")


def passes_per_mm2(prep: PreparedBins) -> float:
    """Encoder passes per mm² of tissue (the tissue taken as the bins written times their area)."""
    layout = prep.bins
    tissue_mm2 = layout.n_obs * (layout.size_um / 1000.0) ** 2
    return layout.n_tiles / tissue_mm2 if tissue_mm2 > 0 else 0.0


def _identity(prep: PreparedBins, bundle: Bundle) -> dict[str, Any]:
    """Everything that determines the bins' rows and values: compared on ``--resume``."""
    slide, layout = prep.slide, prep.bins
    level = slide.levels[prep.level_index]
    return {
        "bundle_hash": bundle.sha256, "mpp": float(slide.mpp0), "mpp_source": str(slide.mpp_source),
        "level": int(prep.level_index), "level_mpp": float(level.mpp), "patch_um": bundle.patch_um,
        "points": "bins", "resolution": layout.resolution, "bins": int(layout.n_obs), "tiles": int(layout.n_tiles),
        "output_meaning": bundle.spec.output.meaning, "tissue_mask": prep.tissue_mask.astype(np.uint8),
        "tissue_mask_scalef": float(prep.thumbnail_scale), **prep.info,
    }


def _open_store(prep: PreparedBins, outs: SlideOutputs, ctx: SlideContext) -> tuple[OutputStore | StoreInCreation, bool]:
    """(store, resumed): the incomplete bin store reopened for ``--resume``, else a new one (created on a thread
    while the first units stream, :class:`~hishrst_runtime.jobs.slide_run.StoreInCreation`)."""
    bundle, layout, opts = ctx.bundle, prep.bins, ctx.options
    identity, bins = _identity(prep, bundle), layout.uns()
    state = OutputStore.status(outs.store)
    replacing = opts.overwrite and state == "complete" and outs.partial.is_dir()
    if opts.resume and (state == "incomplete" or replacing):
        store = OutputStore.open_incomplete(outs.store, genes=bundle.genes, max_buffer_bytes=OUTPUT_BUFFER_BYTES,
                                            expected_uns={"hishrst": identity, "bins": bins}, replace=replacing)
        if store.n_obs != layout.n_obs:
            store.close()
            raise InputError(f"{outs.partial}: the incomplete output holds {store.n_obs} bins, this run lays out "
                             f"{layout.n_obs}; rerun with --overwrite")
        return store, True
    spatial = SpatialImages(library_id=outs.stem or "slide", lowres=prep.thumbnail, lowres_scalef=prep.thumbnail_scale,
                            spot_diameter_fullres=layout.size_px)
    rows = max(1, min(layout.n_obs, MAX_BIN_CHUNK_ROWS, max(MAX_CHUNK_ROWS, BIN_CHUNK_BYTES // (4 * len(bundle.genes)))))
    return StoreInCreation(lambda: create_bin_store(
        outs.store, n_obs=layout.n_obs, blocks=layout.blocks(), size_um=layout.size_um, genes=bundle.genes,
        uns={"hishrst": identity, "bins": bins}, spatial=spatial, chunk_rows=rows, replace=opts.overwrite,
        max_buffer_bytes=OUTPUT_BUFFER_BYTES, x_dtype=opts.dtype), layout.n_obs), False


def _qc(prep: PreparedBins, outs: SlideOutputs, ctx: SlideContext) -> dict[str, Any]:
    """The QC thumbnail of the complete bin store (bins painted as squares); {} with a warning when it fails."""
    from hishrst_runtime.output.qc import bin_raster, choose_gene, render_qc_bins, write_qc_png

    layout = prep.bins
    try:
        gene = choose_gene(outs.store, ctx.bundle.genes)
        cell = max(layout.size_px, 1.0 / prep.thumbnail_scale)  # a bin, or an overview pixel if bins are smaller
        raster = bin_raster((xy for _, xy in layout.blocks()), gene.values, shape0=layout.shape0, cell_px=cell)
        image = render_qc_bins(prep.thumbnail, prep.tissue_mask, raster, thumbnail_scale=prep.thumbnail_scale,
                               mpp0=float(prep.slide.mpp0), title=f"{prep.name} ({layout.resolution} bins)",
                               gene=gene.name, n_bins=layout.n_obs, rule=gene.rule)
        path = write_qc_png(outs.qc, image, gene=gene.name, rule=gene.rule)
    except (OSError, ValueError) as e:
        log.warning("%s: the QC thumbnail %s could not be written (%s)", prep.name, outs.qc, e)
        return {}
    return {"qc": path, "qc_gene": gene.name, "qc_rule": gene.rule}


def run_prepared_bins(prep: PreparedBins, out: Path | SlideOutputs, ctx: SlideContext, lock: Any
                      ) -> SlideResult | Pending:
    """Predict the bins of one prepared slide into ``out`` (``OUT/S.zarr``, holding ``lock``), finalize it and
    write its QC thumbnail and tissue GeoJSON as :func:`~hishrst_runtime.jobs.slide_run.run_prepared` does
    (a :class:`Pending` with ``ctx.defer_finish``)."""
    from hishrst_runtime.core.version import __version__

    outs, layout = SlideOutputs.of(out), prep.bins
    log.info("%s: %d %s bins from %d tiles at level %d, prepared in %.1f s", prep.name, layout.n_obs,
             layout.resolution, layout.n_tiles, prep.level_index, prep.seconds)
    store, resumed = _open_store(prep, outs, ctx)
    geojson = ctx.options.tissue_geojson
    if geojson or (geojson is None and prep.mask_file is not None):
        write_tissue_geojson(outs, prep.tissue_mask, shape0=tuple(prep.slide.shape0), given=prep.mask_file)
    stats, timer = predict_into(store, prep, ctx, lock, resumed, predict=predict_bins, unit="bin")
    store = created(store)
    bins_per_s = round(stats.points_computed / max(stats.seconds, 1e-9), 1)
    timings = {k: round(v, 3) for k, v in timer.seconds.items()} | {"prepare": round(prep.seconds, 3),
                                                                     "predict": round(stats.seconds, 3)}
    density = round(passes_per_mm2(prep), 1)

    def finish() -> SlideResult:
        store.finalize({"hishrst_run": {
            "slide": prep.location, "bundle": str(Path(ctx.bundle.root).resolve()), "engine": ctx.engines.provider,
            "hishrst_version": __version__, "resumed": resumed, "chunks_recomputed": len(store.chunks_recomputed),
            "bins_computed": stats.points_computed, "resolution": layout.resolution, "tiles": layout.n_tiles,
            "encoder_passes": stats.encoder_passes, "encoder_passes_per_mm2": density,
            "patch_side_px": int(stats.patch_side_px), "bins_per_s": bins_per_s, "timings": timings,
            "test_encoder": ctx.bundle.spec.test_encoder,
        }})
        qc = _qc(prep, outs, ctx) if ctx.options.qc else {}
        return SlideResult(slide=str(prep.path), output=outs.store, status="ok", points=layout.n_obs,
                           computed=stats.points_computed, engine=ctx.engines.provider, tiles_per_s=bins_per_s,
                           resumed=resumed, timings=timings, stats=stats,
                           chunks_recomputed=len(store.chunks_recomputed), test_encoder=ctx.bundle.spec.test_encoder,
                           resolution=layout.resolution, encoder_passes=stats.encoder_passes, tiles=layout.n_tiles,
                           **qc)

    return Pending(finish) if ctx.defer_finish else finish()
