"""``hishrst-run`` / ``hishrst run``: predict dense expression over whole slides.

Torch-free: this module and everything it imports use numpy, zarr, Pillow and ONNX Runtime /
TensorRT only.

Per slide ``S.ome.zarr`` (or ``S.zarr``) the output is ``OUT/S.zarr``, an AnnData zarr store written
crash-safely by :class:`hishrst_runtime.output.OutputStore` (built in ``OUT/S.zarr.partial`` and renamed
when complete), guarded by the lock file ``OUT/S.zarr.lock`` so several jobs can share ``OUT``.
A complete output is skipped unless ``--overwrite``; an incomplete one is finished by ``--resume``.
One slide's failure is reported and the others go on; the exit status is 1 when any slide failed.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.errors import OutputStateError
from hishrst_runtime.core.files import remove_tree
from hishrst_runtime.inference.engines import default_engine_threads, load_engines

__all__ = ["run_slides", "slide_output_path", "output_collisions", "DEFAULT_WORKERS"]

#: Reader threads (fetch, decode, cut) by default.
DEFAULT_WORKERS = 2
#: Output X chunks hold at most this many rows (and at most ~4 MiB): progress is durable per chunk.
MAX_CHUNK_ROWS = 1024
#: Bound of the output store's row buffers (bytes).
OUTPUT_BUFFER_BYTES = 64 << 20
#: Seconds between refreshes of a held slide lock (its heartbeat for jobs on other hosts).
LOCK_REFRESH_S = 60.0


def slide_output_path(slide: Path, out_dir: Path) -> Path:
    """``OUT_DIR/<slide name without .zarr / .ome.zarr>.zarr``."""
    name = Path(slide).name.rstrip("/")
    for suffix in (".ome.zarr", ".zarr"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return out_dir / f"{name}.zarr"


def output_collisions(slides: list[Path], out_dir: Path) -> dict[Path, list[Path]]:
    """Outputs that more than one of ``slides`` would write (``{output: [slides]}``; empty when none)."""
    by_out: dict[Path, list[Path]] = {}
    for s in slides:
        by_out.setdefault(slide_output_path(s, out_dir), []).append(s)
    return {o: s for o, s in by_out.items() if len({str(Path(p).resolve()) for p in s}) > 1}


def run_slides(
    slides: list[Path],
    *,
    bundle_dir: Path,
    out_dir: Path,
    pitch_um: float | None = None,
    grid: str = "hex",
    provider: str = "auto",
    batch_size: int = 64,
    workers: int = DEFAULT_WORKERS,
    mpp: float | None = None,
    resume: bool = False,
    overwrite: bool = False,
    h5ad: bool = False,
    min_tissue: float = 0.25,
    points_px: dict[str, np.ndarray] | None = None,
    cache_dir: Path | None = None,
    engine_threads: int | None = None,
    cache_bytes: int | None = None,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
) -> list[dict[str, Any]]:
    """Run the pipeline over ``slides``; returns one result dict per slide (status ok/skipped/failed).

    ``pitch_um``: query-grid pitch in µm (default 50, 4× Visium density); ``mpp``: µm per level-0
    pixel, overriding or supplying the stores'; ``min_tissue``: least tissue fraction under a grid
    point's patch; ``points_px``: ``{str(slide): [N, 2] level-0 pixel (x, y)}`` explicit points
    instead of the grid (all kept, in order); ``cache_bytes``: decoded-chunk cache bound per slide.
    Bundle and engine problems raise (:class:`~hishrst_runtime.bundle.manifest.BundleError`,
    :class:`~hishrst_runtime.backends.BackendError`) before anything is written; a slide's own
    problem is reported in its result (``status="failed"``, ``reason``) and the others go on.
    """
    from tqdm.auto import tqdm

    from hishrst_runtime.jobs.locks import SlideLock
    from hishrst_runtime.bundle.manifest import BundleError, load_bundle
    from hishrst_runtime.output.store import OutputStore, write_h5ad
    from hishrst_runtime.inference.pipeline import DEFAULT_PITCH_UM, prepare_slide
    from hishrst_runtime.slides.cache import DEFAULT_CACHE_BYTES

    pitch = float(pitch_um or DEFAULT_PITCH_UM)
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {batch_size} and {workers}")
    if engine_threads is not None and engine_threads < 1:
        raise ValueError(f"engine_threads must be >= 1, got {engine_threads}")
    if not (np.isfinite(pitch) and pitch > 0) or not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"pitch_um must be > 0 µm and min_tissue in [0, 1], got {pitch} and {min_tissue}")
    bundle = load_bundle(bundle_dir)
    if bundle.manifest["position"]["mode"] != "continuous":
        raise BundleError(f"{bundle_dir / 'manifest.json'}: the bundle encodes grid (array) positions, which only "
                          "exist on Visium slides; re-train with --position-mode continuous to run on whole slides")
    threads = engine_threads or default_engine_threads(workers)
    encoder, head, chosen = load_engines(bundle, provider, cache_dir=cache_dir, threads=threads)
    try:
        echo(f"engine: {chosen}" + (" (auto-selected)" if provider == "auto" else "")
             + (f", {threads} intra-op thread(s)" if chosen == "cpu" else "") + f", {workers} reader thread(s)")
        max_batch = int(bundle.manifest.get("max_batch", 64))
        if chosen in ("tensorrt", "trt-native") and batch_size > max_batch:
            echo(f"batch size {batch_size} > the TensorRT profile's {max_batch}; using {max_batch}")
            batch_size = max_batch
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:
            raise OutputStateError(f"{out_dir}: exists and is not a directory; choose another --out") from e
        ctx = _Context(bundle=bundle, encoder=encoder, head=head, provider=chosen, pitch=pitch, resume=resume,
                       overwrite=overwrite, batch_size=batch_size, workers=workers, progress=progress,
                       cache_bytes=int(cache_bytes or DEFAULT_CACHE_BYTES))

        def prepare(path: Path) -> Any:
            pts = (points_px or {}).get(str(path))
            return prepare_slide(path, bundle, mpp=mpp, pitch_um=pitch, grid=grid,  # type: ignore[arg-type]
                                 min_tissue=min_tissue, points_px=pts)

        outs = [slide_output_path(p, out_dir) for p in slides]
        collided = {o for o in output_collisions(slides, out_dir)}
        results: list[dict[str, Any]] = []
        overall = tqdm(total=len(slides), desc="slides", unit="slide", disable=not progress, position=0)
        prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hishrst-prefetch")
        futures: dict[int, Future] = {}

        def drop(i: int) -> None:
            """Forget slide i's prefetch; close its slide once (and if) it is ready."""
            fut = futures.pop(i, None)
            if fut is not None and not fut.cancel():
                fut.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or f.result().close())

        def skip_complete(i: int, res: dict[str, Any]) -> None:
            drop(i)
            res.update(status="skipped", reason="already complete (use --overwrite to recompute)")
            h5 = outs[i].with_suffix(".h5ad")
            if h5ad and not h5.exists():
                try:
                    write_h5ad(outs[i], h5)
                except (OSError, ValueError, RuntimeError) as e:
                    res["reason"] += f"; writing {h5} failed ({type(e).__name__}: {e})"

        def prefetch_after(i: int) -> None:
            """Prepare (in the background) the next slide after i that will need work."""
            for j in range(i + 1, len(slides)):
                if outs[j] in collided:
                    continue
                if overwrite or OutputStore.status(outs[j]) != "complete":
                    if j not in futures:
                        futures[j] = prefetch.submit(prepare, slides[j])
                    return

        try:
            for i, path in enumerate(slides):
                out = outs[i]
                res: dict[str, Any] = {"slide": str(path), "output": str(out)}
                results.append(res)
                lock = SlideLock(out)
                if out in collided:
                    others = ", ".join(str(s) for s in slides if slide_output_path(s, out_dir) == out)
                    res.update(status="failed", reason=f"{out}: several slides would write this output ({others}); "
                               "rename the slides or run them with different --out")
                elif not overwrite and OutputStore.status(out) == "complete":
                    skip_complete(i, res)
                elif not lock.acquire():
                    drop(i)
                    info = lock.holder()
                    who = info.describe() if info is not None else "another job"
                    res.update(status="skipped", reason=f"locked by {who} ({lock.path}); it is being processed "
                               "elsewhere (delete the lock file if that job is gone)")
                elif not overwrite and OutputStore.status(out) == "complete":  # finished by another job meanwhile
                    lock.release()
                    skip_complete(i, res)
                else:
                    t0 = time.perf_counter()
                    prep = None
                    try:
                        fut = futures.pop(i, None) or prefetch.submit(prepare, path)
                        try:
                            prep = fut.result()
                        finally:
                            prefetch_after(i)  # the next slide is prepared while this one runs
                        res.update(_run_one(prep, out, ctx, lock))
                        if h5ad:
                            write_h5ad(out, out.with_suffix(".h5ad"))
                        res["status"] = "ok"
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as e:  # noqa: BLE001 - one slide's failure must not stop the others
                        res.update(status="failed", reason=f"{type(e).__name__}: {e}")
                        if os.environ.get("HISHRST_DEBUG"):
                            traceback.print_exc()
                    finally:
                        res["seconds"] = round(time.perf_counter() - t0, 2)
                        if prep is not None:
                            prep.close()
                        lock.release()
                overall.update(1)
        finally:
            overall.close()
            for j in list(futures):
                drop(j)
            prefetch.shutdown(wait=True, cancel_futures=True)
    finally:
        for eng in (encoder, head):
            with contextlib.suppress(Exception):
                eng.close()
    return results


@dataclass(frozen=True)
class _Context:
    """What every slide of one run shares: bundle, engines and options (see :func:`run_slides`)."""

    bundle: Any
    encoder: Any
    head: Any
    provider: str
    pitch: float
    resume: bool
    overwrite: bool
    batch_size: int
    workers: int
    progress: bool
    cache_bytes: int


def _library_id(path: Path) -> str:
    return slide_output_path(path, Path(".")).name[: -len(".zarr")].replace("/", "_") or "slide"


def _run_one(prep: Any, out: Path, ctx: _Context, lock: Any) -> dict[str, Any]:
    """Predict one prepared slide into ``out``; returns the result fields (points, speed, stats)."""
    from tqdm.auto import tqdm

    from hishrst_runtime import __version__
    from hishrst_runtime.output.store import OutputStore, SpatialImages
    from hishrst_runtime.core.timing import StageTimer
    from hishrst_runtime.inference.pipeline import predict_slide

    bundle, slide = ctx.bundle, prep.slide
    n = len(prep.points_px)
    if n == 0:
        raise ValueError(f"{prep.path}: no tissue found under the query grid (tissue detected on "
                         f"{float(prep.tissue_mask.mean()):.1%} of the overview); lower --min-tissue, "
                         "check the slide, or pass explicit points")
    level = slide.levels[prep.level_index]
    # Everything that determines the rows' values: compared on --resume.
    identity = {
        "bundle_hash": bundle.sha256, "mpp": float(slide.mpp0), "mpp_source": str(slide.mpp_source),
        "level": int(prep.level_index), "level_mpp": float(level.mpp), "patch_um": bundle.patch_um,
        "points": "grid" if prep.pitch_um is not None else "explicit", "pitch_um": prep.pitch_um, "grid": prep.grid,
        "min_tissue": prep.min_tissue, "output_meaning": bundle.manifest["output"]["meaning"],
        "tissue_mask": prep.tissue_mask.astype(np.uint8), "tissue_mask_scalef": float(prep.thumbnail_scale),
    }
    spatial = SpatialImages(
        library_id=_library_id(prep.path), lowres=prep.thumbnail, lowres_scalef=prep.thumbnail_scale,
        spot_diameter_fullres=(prep.pitch_um or bundle.patch_um) / float(slide.mpp0),
    )
    if ctx.resume and OutputStore.status(out) == "incomplete":
        store = OutputStore.open_incomplete(out, obs_xy_px=prep.points_px, grid_index=prep.grid_index,
                                            genes=bundle.genes, expected_uns={"hishrst": identity},
                                            max_buffer_bytes=OUTPUT_BUFFER_BYTES)
        resumed = True
    else:
        rows = max(1, min(MAX_CHUNK_ROWS, n, (4 << 20) // (4 * len(bundle.genes))))
        store = OutputStore.create(out, obs_xy_px=prep.points_px, grid_index=prep.grid_index,
                                   tissue_fraction=prep.tissue_fraction, genes=bundle.genes, uns={"hishrst": identity},
                                   spatial=spatial, overwrite=ctx.overwrite, chunk_rows=rows,
                                   max_buffer_bytes=OUTPUT_BUFFER_BYTES)
        resumed = False
    timer = StageTimer()
    done = store.done_mask()
    bar = tqdm(total=n, initial=int(done.sum()), desc=prep.path.name[:30], unit="pt", disable=not ctx.progress,
               leave=False, position=1)
    last_refresh = [time.monotonic()]

    def advance(k: int) -> None:
        bar.update(k)
        if time.monotonic() - last_refresh[0] > LOCK_REFRESH_S:
            lock.refresh()
            last_refresh[0] = time.monotonic()

    try:
        stats = predict_slide(prep, bundle, encoder=ctx.encoder, head=ctx.head, write=store.write_rows, done=done,
                              batch_size=ctx.batch_size, workers=ctx.workers, cache_bytes=ctx.cache_bytes,
                              progress=advance, timer=timer)
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
    tiles_per_s = stats["points_computed"] / max(stats["seconds"], 1e-9)
    timings = {k: round(v, 3) for k, v in timer.seconds.items()} | {"prepare": round(prep.seconds, 3),
                                                                     "predict": round(stats["seconds"], 3)}
    store.finalize({"hishrst_run": {
        "slide": str(prep.path.resolve()), "bundle": str(Path(bundle.root).resolve()), "engine": ctx.provider,
        "hishrst_version": __version__, "resumed": resumed, "points_computed": stats["points_computed"],
        "patch_side_px": int(stats["patch_side_px"]), "tiles_per_s": round(tiles_per_s, 1), "timings": timings,
    }})
    return {"points": n, "computed": stats["points_computed"], "resumed": resumed,
            "tiles_per_s": round(tiles_per_s, 1), "stats": stats}

