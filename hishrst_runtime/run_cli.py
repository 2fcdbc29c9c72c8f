"""``hishrst-run`` / ``hishrst run``: predict dense expression over whole slides.

Torch-free: this module and everything it imports use numpy, zarr, Pillow and ONNX Runtime /
TensorRT only.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
import numpy as np

__all__ = ["run", "run_slides", "slide_output_path"]


def slide_output_path(slide: Path, out_dir: Path) -> Path:
    """``OUT_DIR/<slide name without .zarr / .ome.zarr>.zarr``."""
    name = slide.name.rstrip("/")
    for suffix in (".ome.zarr", ".zarr"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return out_dir / f"{name}.zarr"


def _load_engines(bundle: Any, provider: str, *, cache_dir: Path | None) -> tuple[Any, Any, str]:
    from hishrst_runtime.backends import load_backend, resolve_provider
    from hishrst_runtime.pipeline import NoopBackend

    if provider == "noop":  # benchmarks: the pipeline's ceiling
        d = int(bundle.encoder["feature_dim"])
        g = len(bundle.genes)
        enc = NoopBackend(lambda f: (len(f["tiles"]), d))
        head = NoopBackend(lambda f: (*f["features"].shape[:2], g))
        return enc, head, "noop"
    has_engine = bundle.file_entry("encoder_trt") is not None and bundle.file_entry("head_trt") is not None
    chosen = resolve_provider(provider, engine_available=has_engine)  # type: ignore[arg-type]
    engines = []
    for key in ("encoder", "head"):
        trt = bundle.file_entry(f"{key}_trt")
        if chosen == "trt-native":
            if trt is None:
                raise click.ClickException(f"{bundle.root}: no TensorRT engine in the bundle; export with --tensorrt")
            engines.append(load_backend(bundle.path(f"{key}_trt"), provider="trt-native",
                                        expected={"gpu": trt.get("gpu"), "tensorrt_version": trt.get("tensorrt_version")}))
        elif chosen == "tensorrt":
            d = int(bundle.encoder["feature_dim"])
            m, n = int(bundle.manifest.get("max_batch", 64)), bundle.max_group_size
            shapes = None if key == "encoder" else {
                name: ((1, 1) + tail, (8, n) + tail, (m, n) + tail)
                for name, tail in (("features", (d,)), ("positions", (2,)), ("mask", ()))
            }
            entry = bundle.file_entry(key) or {}
            engines.append(load_backend(bundle.path(key), provider=chosen, cache_dir=cache_dir, max_batch=m, shapes=shapes,
                                        model_sha256=entry.get("sha256"), fp16=entry.get("precision") == "fp16"))
        else:
            engines.append(load_backend(bundle.path(key), provider=chosen, cache_dir=cache_dir))
    return engines[0], engines[1], chosen


def run_slides(
    slides: list[Path],
    *,
    bundle_dir: Path,
    out_dir: Path,
    pitch_um: float | None = None,
    grid: str = "hex",
    provider: str = "auto",
    batch_size: int = 64,
    workers: int = 2,
    mpp: float | None = None,
    resume: bool = False,
    overwrite: bool = False,
    h5ad: bool = False,
    min_tissue: float = 0.25,
    points_px: dict[str, np.ndarray] | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    echo: Any = click.echo,
) -> list[dict[str, Any]]:
    """Run the pipeline over ``slides``; returns one result dict per slide (status ok/skipped/failed)."""
    from tqdm.auto import tqdm

    from hishrst_runtime.jobs import SlideLock
    from hishrst_runtime.manifest import load_bundle
    from hishrst_runtime.output import OutputStore, SpatialImages, write_h5ad
    from hishrst_runtime.pipeline import DEFAULT_PITCH_UM, StageTimer, predict_slide, prepare_slide

    bundle = load_bundle(bundle_dir)
    if bundle.manifest["position"]["mode"] != "continuous":
        raise click.ClickException(f"{bundle_dir}: bundles in grid position mode cannot run on whole slides")
    encoder, head, chosen = _load_engines(bundle, provider, cache_dir=cache_dir)
    echo(f"engine: {chosen}" + (" (auto-selected)" if provider == "auto" else ""))
    bundle_hash = bundle.sha256
    pitch = float(pitch_um or DEFAULT_PITCH_UM)
    out_dir.mkdir(parents=True, exist_ok=True)

    def prepare(path: Path) -> Any:
        pts = (points_px or {}).get(str(path))
        return prepare_slide(path, bundle, mpp=mpp, pitch_um=pitch, grid=grid, min_tissue=min_tissue, points_px=pts)  # type: ignore[arg-type]

    results: list[dict[str, Any]] = []
    overall = tqdm(total=len(slides), desc="slides", unit="slide", disable=not progress, position=0)
    prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hishrst-prefetch")
    futures: dict[int, Future] = {}

    def schedule(i: int) -> None:
        if i < len(slides) and i not in futures:
            futures[i] = prefetch.submit(prepare, slides[i])

    try:
        for i, path in enumerate(slides):
            out = slide_output_path(path, out_dir)
            res: dict[str, Any] = {"slide": str(path), "output": str(out)}
            lock = SlideLock(out)
            state = OutputStore.status(out)
            if state == "complete" and not overwrite:
                res.update(status="skipped", reason="already complete (use --overwrite to recompute)")
                results.append(res)
                overall.update(1)
                continue
            if not lock.acquire():
                res.update(status="skipped", reason=f"locked by another job ({lock.path})")
                results.append(res)
                overall.update(1)
                continue
            try:
                schedule(i)
                t0 = time.perf_counter()
                prep = futures.pop(i).result()
                schedule(i + 1)  # prefetch the next slide while this one runs
                res.update(_run_one(prep, bundle, out, encoder=encoder, head=head, provider=chosen, pitch=pitch,
                                    bundle_hash=bundle_hash, resume=resume, overwrite=overwrite, batch_size=batch_size,
                                    workers=workers, progress=progress, OutputStore=OutputStore,
                                    SpatialImages=SpatialImages, StageTimer=StageTimer, predict_slide=predict_slide))
                if h5ad:
                    write_h5ad(out, out.with_suffix(".h5ad"))
                res["seconds"] = round(time.perf_counter() - t0, 2)
                res["status"] = "ok"
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - one slide's failure must not stop the others
                res.update(status="failed", reason=f"{type(e).__name__}: {e}")
                if os.environ.get("HISHRST_DEBUG"):
                    traceback.print_exc()
                futures.pop(i, None)
                schedule(i + 1)
            finally:
                lock.release()
            results.append(res)
            overall.update(1)
    finally:
        overall.close()
        prefetch.shutdown(wait=True, cancel_futures=True)
        for eng in (encoder, head):
            eng.close()
    return results


def _run_one(prep: Any, bundle: Any, out: Path, *, encoder: Any, head: Any, provider: str, pitch: float,
             bundle_hash: str, resume: bool, overwrite: bool, batch_size: int, workers: int, progress: bool,
             OutputStore: Any, SpatialImages: Any, StageTimer: Any, predict_slide: Any) -> dict[str, Any]:
    from tqdm.auto import tqdm

    slide = prep.slide
    n = len(prep.points_px)
    if n == 0:
        raise ValueError(f"{prep.path}: no tissue found at the chosen grid (try --min-tissue lower or check the slide)")
    uns = {
        "hishrst": {
            "bundle_hash": bundle_hash, "bundle": str(bundle.root), "mpp": float(slide.mpp0),
            "pitch_um": prep.pitch_um, "level": int(prep.level_index), "slide": str(prep.path),
            "output_meaning": bundle.manifest["output"]["meaning"],
        }
    }
    spatial = SpatialImages(
        library_id=prep.path.name.split(".")[0] or "slide", lowres=prep.thumbnail, lowres_scalef=prep.thumbnail_scale,
        spot_diameter_fullres=(prep.pitch_um or bundle.patch_um) / float(slide.mpp0),
    )
    if resume and OutputStore.status(out) == "incomplete":
        store = OutputStore.open_incomplete(out, obs_xy_px=prep.points_px, grid_index=prep.grid_index,
                                            genes=bundle.genes, expected_uns={"hishrst": uns["hishrst"]})
        resumed = True
    else:
        store = OutputStore.create(out, obs_xy_px=prep.points_px, grid_index=prep.grid_index,
                                   tissue_fraction=prep.tissue_fraction, genes=bundle.genes, uns=uns,
                                   spatial=spatial, overwrite=overwrite)
        resumed = False
    timer = StageTimer()
    done = store.done_mask()
    bar = tqdm(total=n, initial=int(done.sum()), desc=prep.path.name[:30], unit="pt", disable=not progress,
               leave=False, position=1)
    try:
        stats = predict_slide(prep, bundle, encoder=encoder, head=head, write=store.write_rows, done=done,
                              batch_size=batch_size, workers=workers, progress=bar.update, timer=timer)
    finally:
        bar.close()
    t0 = time.perf_counter()
    store.finalize({"timings": {k: round(v, 3) for k, v in stats["stages"].items()} | {"prepare": round(prep.seconds, 3)},
                    "engine": provider, "resumed": resumed})
    stats["stages"]["finalize"] = time.perf_counter() - t0
    return {"points": n, "computed": stats["points_computed"], "resumed": resumed,
            "tiles_per_s": round(stats["points_computed"] / max(stats["seconds"], 1e-9), 1), "stats": stats}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("slides", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Model bundle directory written by `hishrst export`.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory; one <slide>.zarr AnnData store per slide.")
@click.option("--pitch-um", type=float, default=None, help="Query-point spacing in µm [default: 50, 4× Visium density].")
@click.option("--grid", type=click.Choice(["hex", "square"]), default="hex", show_default=True)
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt", "trt-native", "noop"]), default="auto",
              show_default=True, help="Inference engine; `auto` picks the fastest available and says which.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Encoder batch size (tiles).")
@click.option("--workers", type=int, default=2, show_default=True, help="Reader threads (fetch, decode, cut).")
@click.option("--mpp", type=float, default=None, help="µm per level-0 pixel (overrides or supplies the store's).")
@click.option("--min-tissue", type=float, default=0.25, show_default=True, help="Minimum tissue fraction under a patch.")
@click.option("--shard", default=None, help="I/N: process the I-th (0-based) of N shards of the slide list "
              "[default: from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT].")
@click.option("--resume", is_flag=True, help="Finish incomplete outputs instead of refusing them.")
@click.option("--overwrite", is_flag=True, help="Recompute outputs that exist.")
@click.option("--h5ad", is_flag=True, help="Also write <slide>.h5ad next to each store.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def run(slides: tuple[Path, ...], bundle_dir: Path, out_dir: Path, pitch_um: float | None, grid: str, provider: str,
        batch_size: int, workers: int, mpp: float | None, min_tissue: float, shard: str | None, resume: bool,
        overwrite: bool, h5ad: bool, no_progress: bool) -> None:
    """Predict dense gene expression over whole-slide OME-Zarr SLIDES with an exported bundle."""
    from hishrst_runtime.backends import BackendError
    from hishrst_runtime.jobs import parse_shard, shard_from_env, shard_items
    from hishrst_runtime.manifest import BundleError

    if batch_size < 1 or workers < 0:
        raise click.BadParameter("--batch-size must be ≥ 1 and --workers ≥ 0")
    items = list(slides)
    try:
        sh = parse_shard(shard) if shard else shard_from_env()
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--shard") from e
    if sh is not None:
        items = shard_items(items, index=sh[0], count=sh[1])
        click.echo(f"shard {sh[0]}/{sh[1]}: {len(items)} of {len(slides)} slides")
    try:
        results = run_slides(items, bundle_dir=bundle_dir, out_dir=out_dir, pitch_um=pitch_um, grid=grid,
                             provider=provider, batch_size=batch_size, workers=workers, mpp=mpp, resume=resume,
                             overwrite=overwrite, h5ad=h5ad, min_tissue=min_tissue, progress=not no_progress)
    except (BundleError, BackendError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"\n{'slide':<34}{'status':<9}{'points':>9}{'tiles/s':>10}{'seconds':>9}")
    for r in results:
        click.echo(f"{Path(r['slide']).name[:33]:<34}{r['status']:<9}{r.get('points', ''):>9}"
                   f"{r.get('tiles_per_s', ''):>10}{r.get('seconds', ''):>9}")
        if r["status"] != "ok":
            click.echo(f"    {r.get('reason', '')}")
    failed = [r for r in results if r["status"] == "failed"]
    if failed:
        click.echo(f"{len(failed)} of {len(results)} slides failed", err=True)
        sys.exit(1)
