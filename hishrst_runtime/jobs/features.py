"""``hishrst features``: per-slide encoder embeddings written as TRIDENT-style HDF5 files.

Each slide is prepared exactly as ``hishrst-run`` prepares it (:func:`~hishrst_runtime.inference.prepare.
prepare_slide`: the level, tissue, the query grid or explicit points, the neighbour groups that form the work
units) and run through the same reader and encoder stages (:func:`~hishrst_runtime.inference.pipeline.
encode_slide`; the head is never run). The features go to ``OUT/<slide>.h5``
(:mod:`hishrst_runtime.output.features_h5`), built as ``OUT/<slide>.h5.partial`` and renamed when complete,
under the lock ``OUT/<slide>.h5.lock``.

Resume design: an incomplete slide (its ``.h5.partial`` left by a killed run) is *recomputed whole* with
``--resume`` — the encoder is deterministic, so the file is the one an uninterrupted run writes, and HDF5
files written when a process is killed may be unreadable, so no partial rows are trusted. Without
``--resume`` (or ``--overwrite``) such a slide fails, naming the flag. A complete file is skipped unless
``--overwrite`` (the old file stays until the new one is complete); a file hishrst did not write (no owner
mark) is never replaced; outputs never resolve to, inside or above an input.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.backends.registry import ENGINES
from hishrst_runtime.bundle.manifest import Bundle, load_bundle
from hishrst_runtime.core.errors import InputError, OutputStateError
from hishrst_runtime.core.owned import overlaps
from hishrst_runtime.core.patches import patch_side_px
from hishrst_runtime.inference.engines import default_engine_threads, load_engines
from hishrst_runtime.inference.pipeline import PreparedSlide, encode_slide, prepare_slide
from hishrst_runtime.jobs.inputs import SlideInput
from hishrst_runtime.jobs.locks import LockHeartbeat, SlideLock
from hishrst_runtime.jobs.options import RunOptions
from hishrst_runtime.jobs.paths import (SlideArg, check_output_location, is_remote, local_part, output_collisions,
                                        slide_problem)
from hishrst_runtime.jobs.results import SlideResult
from hishrst_runtime.output.features_h5 import (FEATURES_SUFFIX, FeaturesFile, features_status, magnification,
                                                partial_path)

__all__ = ["extract_features", "features_path"]


def features_path(item: SlideInput, out_dir: Path) -> Path:
    """``OUT/<slide>.h5`` (``OUT/p1/<slide>.h5`` for output name ``p1/<slide>``)."""
    return Path(out_dir) / f"{item.output_name}{FEATURES_SUFFIX}"


def _check_inputs(items: Sequence[SlideInput], out_dir: Path, bundle_dir: Path) -> None:
    """Raise :class:`OutputStateError` when a features file (or its partial / lock) would touch an input."""
    check_output_location(items, out_dir, bundle_dir)  # the folder itself, as for hishrst-run
    for out, same in output_collisions(items, out_dir).items():
        raise InputError(f"{out.with_suffix(FEATURES_SUFFIX)}: several slides would write this file "
                         f"({', '.join(map(str, same))}); rename them or give each a name in a --slides-from sheet")
    inputs = [Path(bundle_dir)] + [p for i in items for p in (i.points_file, i.mask) if p is not None]
    inputs += [Path(local_part(i.slide)) for i in items if not is_remote(i.slide)]
    for item in items:
        h5 = features_path(item, out_dir)
        for target in (h5, partial_path(h5), h5.with_name(h5.name + ".lock")):
            hit = next((src for src in inputs if overlaps(target, src)), None)
            if hit is not None:
                raise OutputStateError(f"{target}: the features file of {item.slide} would overlap the input "
                                       f"{hit}; choose another --out (nothing was written)")


def _refused(item: SlideInput, h5: Path, opts: RunOptions, res: SlideResult) -> SlideResult | None:
    """The result of a slide that is not run (name too long, foreign file, complete, stopped run), else None."""
    problem = slide_problem(item.slide, h5)
    if problem is not None:
        return res.with_(status="failed", reason=problem)
    state = features_status(h5)
    if state == "foreign":
        return res.with_(status="failed", reason=f"{h5}: exists and was not written by hishrst features (no "
                         "hishrst_output attribute); it is left as it is: move it away or choose another --out")
    if state == "complete" and not opts.overwrite:
        return res.with_(status="skipped", reason="already complete (use --overwrite to recompute)")
    if partial_path(h5).exists() and not (opts.resume or opts.overwrite):
        return res.with_(status="failed", reason=f"{partial_path(h5)}: incomplete features of a stopped run; rerun "
                         "with --resume to finish it (the slide is recomputed) or --overwrite")
    return None


def _prepare(item: SlideInput, bundle: Bundle, o: RunOptions) -> PreparedSlide:
    """The slide prepared exactly as ``hishrst-run`` prepares it."""
    explicit = {"points_px": item.points} if isinstance(item.points, np.ndarray) else {"points": item.points}
    return prepare_slide(item.slide, bundle, mpp=o.mpp, pitch_um=float(o.pitch_um or 0), grid=o.grid,
                         min_tissue=o.min_tissue, allow_missing_chunks=o.allow_missing_chunks,
                         tissue_mask=item.mask, mask_mode=o.mask_mode, points_outside=o.points_outside, **explicit)


def _attrs(prep: PreparedSlide, bundle: Bundle) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(root attributes, TRIDENT ``coords`` attributes, patch side in level-0 px) of a slide's features file."""
    from hishrst_runtime.core.version import __version__

    mpp0, enc = float(prep.slide.mpp0), bundle.spec.encoder
    level = prep.slide.levels[prep.level_index]
    side0 = patch_side_px(bundle.patch_um, mpp0)
    root = {"encoder": enc.name, "feature_dim": int(enc.feature_dim), "patch_size_um": float(bundle.patch_um),
            "patch_size_level0": int(side0), "patch_size_px": int(enc.input_size), "mpp": mpp0,
            "level": int(prep.level_index), "level_mpp": float(level.mpp), "bundle_sha256": bundle.sha256,
            "hishrst_version": __version__, "slide": prep.location, "test_encoder": bool(enc.test_encoder),
            "points": "grid" if prep.pitch_um is not None else "explicit", "coords": "top-left level-0 px, int64"}
    if prep.pitch_um is not None:
        root.update(pitch_um=float(prep.pitch_um), grid=str(prep.grid), min_tissue=float(prep.min_tissue or 0))
    coords = {"patch_size": int(enc.input_size), "patch_size_level0": int(side0),
              "level0_magnification": magnification(mpp0), "target_magnification": magnification(bundle.train_mpp),
              "overlap": 0, "name": prep.name}
    return root, coords, side0


def _encode(prep: PreparedSlide, h5: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    """Write every point's features into ``h5`` (via its partial file); the counters of the run."""
    from tqdm.auto import tqdm

    bundle, opts = ctx["bundle"], ctx["options"]
    if len(prep.points_px) == 0:
        raise InputError(f"{prep.path}: no tissue found under the query grid; lower --min-tissue, check the slide, "
                         "or pass explicit points")
    root, coords, side0 = _attrs(prep, bundle)
    out = FeaturesFile.create(h5, points_px=prep.points_px, feature_dim=bundle.spec.encoder.feature_dim,
                              patch_side_level0=side0, attrs=root, coords_attrs=coords, obs_names=prep.obs_names)
    bar = tqdm(total=len(prep.points_px), desc=prep.name[:30], unit="pt", disable=not opts.progress, leave=False)
    try:
        stats = encode_slide(prep, bundle, encoder=ctx["encoder"], write=out.write_rows, batch_size=ctx["batch"],
                             workers=opts.workers, cache_bytes=int(opts.cache_bytes or 0), progress=bar.update)
        out.finalize({"points_dropped": int(prep.points_dropped)})
    finally:
        bar.close()
        out.close()
    return {"points": len(prep.points_px), "computed": stats.points_computed,
            "tiles_per_s": round(stats.points_computed / max(stats.seconds, 1e-9), 1),
            "timings": {k: round(v, 3) for k, v in stats.stages.items()} | {"prepare": round(prep.seconds, 3)}}


def _one(item: SlideInput, out_dir: Path, ctx: dict[str, Any]) -> SlideResult:
    """One slide's features, under its lock; a slide's own problem is its failed result."""
    opts, t0 = ctx["options"], time.perf_counter()
    h5 = features_path(item, out_dir)
    res = SlideResult(slide=str(item.slide), output=h5, status="failed", engine=ctx["provider"])
    refused = _refused(item, h5, opts, res)
    if refused is not None:
        return refused
    resumed = partial_path(h5).exists()
    lock = SlideLock(h5, lease_s=opts.stale_after)
    try:
        h5.parent.mkdir(parents=True, exist_ok=True)
        if not lock.acquire():
            return res.with_(status="skipped", reason=f"locked by another job ({lock.path}); it is being processed "
                             "elsewhere (delete the lock file if that job is gone)")
    except (OutputStateError, OSError) as e:
        return res.with_(status="failed", reason=f"{type(e).__name__}: {e}")
    prep = None
    try:
        with LockHeartbeat(lock):  # other jobs, on any host, see this lock refreshed
            prep = _prepare(item, ctx["bundle"], opts)
            done = _encode(prep, h5, ctx)
        res = res.with_(status="ok", resumed=resumed, points_dropped=prep.points_dropped, **done)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - one slide's failure must not stop the others
        res = res.with_(status="failed", reason=f"{type(e).__name__}: {e}")
    finally:
        if prep is not None:
            prep.close()
        lock.release()
    return res.with_(seconds=round(time.perf_counter() - t0, 2))


def extract_features(slides: Sequence[SlideArg | SlideInput], *, bundle_dir: Path, out_dir: Path,
                     options: RunOptions | None = None, echo: Callable[[str], Any] = print,
                     **settings: Any) -> list[SlideResult]:
    """Write ``OUT/<slide>.h5`` (encoder features and coordinates) for each of ``slides``; one
    :class:`SlideResult` per slide, in order. ``options`` (or its fields as keyword ``settings``): the
    :class:`RunOptions` of ``hishrst-run`` (grid, points, masks, provider, workers, batch size, resume,
    overwrite; output formats, QC and claims do not apply). Bad options, the bundle, the engine and outputs that
    would touch an input raise before anything is written; a slide's own problem is reported in its result."""
    opts = RunOptions.from_settings(options, settings)
    items = [s if isinstance(s, SlideInput) else SlideInput(s) for s in slides]
    items = [i.with_defaults(mask=opts.tissue_mask) for i in items]
    bundle = load_bundle(Path(bundle_dir))
    _check_inputs(items, Path(out_dir), Path(bundle_dir))
    threads = opts.engine_threads or default_engine_threads(opts.workers)
    engines = load_engines(bundle, opts.provider, cache_dir=opts.cache_dir, threads=threads)
    with contextlib.suppress(Exception):
        engines.head.close()  # the head is never run
    batch = opts.batch_size
    entry = ENGINES.get(engines.provider)
    if entry is not None and entry.batch_bounded:
        batch = min(batch, bundle.spec.max_batch)
    echo(f"engine: {engines.provider}, encoder {bundle.spec.encoder.name} ({bundle.spec.encoder.feature_dim} "
         f"features), {opts.workers} reader thread(s)")
    ctx = {"bundle": bundle, "options": opts, "encoder": engines.encoder, "provider": engines.provider, "batch": batch}
    try:
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise OutputStateError(f"{out_dir}: cannot create the output folder ({e.strerror or e}); check its "
                                   "permissions or choose another --out") from e
        return [_one(item, Path(out_dir), ctx) for item in items]
    finally:
        with contextlib.suppress(Exception):
            engines.encoder.close()
