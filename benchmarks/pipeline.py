"""Whole-slide pipeline throughput: ``hishrst-run`` end to end on a DLPFC-sized synthetic slide and on a
4×-area slide (the same image tiled 2 × 2, written lazily), each slide size in its own fresh process.

In that process: one untimed ``prepare_slide`` and ``import anndata`` (one-time imports), ``run_slides`` (what ``hishrst-run``
runs) with the real engine, then the process's
peak RSS is taken, then the no-op engine (``--provider noop``: the pipeline's ceiling); tiles/s and
per-stage seconds (``stats["stages"]``) of both. For the first size, the engine alone follows
(encoder + head backends on pre-cut tiles of the same work units, same batch size). It reports
end-to-end / engine-only throughput (target ≥ 90 %) and RSS flatness between the sizes (target: the
4× slide within 20 % of the 1× slide's peak, and ≤ 1.5 GB).

    python -m benchmarks.pipeline            # dlpfc preset, bundle: test-vit, 1000 genes
    python -m benchmarks.pipeline --quick    # small preset, 1-epoch 50-gene bundle
    python -m benchmarks.pipeline --bundle my_bundle/ --provider cuda --batch-size 128

Stage seconds of the reader stages (read_decode, cut_resample) are summed over the reader threads and
can exceed the wall time. "end-to-end" tiles/s = points / the slide's seconds in ``run_slides``
(prepare: open + tissue detection + grid; predict; flush; finalize); "stream" tiles/s = points / the
seconds of ``predict_slide`` alone. Both exclude interpreter start-up and engine loading.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import JsonlWriter, base_parser, mb, peak_rss_bytes, print_table, run_child
from benchmarks._data import prepare_data
from hishrst_runtime.backends.registry import engine_entry

TARGET_RATIO = 0.90
TARGET_RSS_GROWTH = 0.20
TARGET_RSS_MB = 1536.0


# ------------------------------------------------------------------------------ children (torch-free)


def run_pipeline_child(slide: str, bundle: str, out_dir: str, provider: str, batch_size: int, workers: int | None,
                       engine_threads: int | None = None) -> dict:
    """``run_slides`` on one slide (what ``hishrst-run`` calls); returns its timings from the
    :class:`~hishrst_runtime.jobs.results.SlideResult`. ``provider="noop"``: zero-returning engines."""
    from hishrst_runtime.bundle.manifest import load_bundle
    from hishrst_runtime.inference.engines import noop_engines
    from hishrst_runtime.jobs.runner import DEFAULT_WORKERS, run_slides

    workers = DEFAULT_WORKERS if workers is None else workers
    engines = noop_engines(load_bundle(Path(bundle))) if provider == "noop" else None
    said: list[str] = []
    t0 = time.perf_counter()
    (r,) = run_slides([Path(slide)], bundle_dir=Path(bundle), out_dir=Path(out_dir), engines=engines,
                      provider="cpu" if provider == "noop" else provider, batch_size=batch_size, workers=workers,
                      engine_threads=engine_threads, overwrite=True, progress=False, echo=said.append)
    wall = time.perf_counter() - t0
    if r.status != "ok":
        raise RuntimeError(f"hishrst-run failed on {slide}: {r.reason}")
    stats = r.stats
    return {"engine": r.engine, "points": r.points, "points_computed": r.computed,
            "slide_seconds": r.seconds, "stream_seconds": stats.seconds, "stages": stats.stages,
            "prepare_seconds": r.timings.get("prepare"), "chunk_cache": stats.chunk_cache,
            "patch_side_px": stats.patch_side_px, "units": stats.units, "run_slides_wall_s": wall,
            "engine_line": next((s for s in said if s.startswith("engine:")), None)}


def _sample_units(slide: str, bundle: str, batch_size: int, max_tiles: int, **plan_kw: Any) -> tuple[Any, list]:
    """(unit plan, the first work units holding up to ``max_tiles`` tiles) of ``slide`` — the runtime's own."""
    from hishrst_runtime.bundle.manifest import load_bundle
    from hishrst_runtime.inference.pipeline import prepare_slide
    from hishrst_runtime.inference.stages import plan_units, unit_rows, work_units

    b = load_bundle(Path(bundle))
    prep = prepare_slide(Path(slide), b)
    plan = plan_units(prep, b, batch_size=batch_size, **plan_kw)
    units, n = [], 0
    for unit in work_units(prep.groups, batch_size):
        k = len(unit_rows(prep, unit))
        if units and n + k > max_tiles:
            break
        units.append(unit)
        n += k
    return plan, units


def engine_only_child(slide: str, bundle: str, provider: str, batch_size: int, max_tile_mb: float,
                      min_time: float, threads: int | None = None) -> dict:
    """Encoder + head backends alone on pre-cut tiles, unit by unit through the runtime's stage functions
    (``encode_tiles``, ``head_rows``) exactly as ``predict_slide`` calls them.

    ``threads``: ONNX Runtime intra-op threads (``None``: all physical cores)."""
    from hishrst_runtime.bundle.manifest import load_bundle
    from hishrst_runtime.inference.engines import load_engines
    from hishrst_runtime.inference.stages import encode_tiles, head_rows, read_tiles

    b = load_bundle(Path(bundle))
    encoder, head, chosen = load_engines(b, provider, cache_dir=None, threads=threads)
    if engine_entry(chosen).batch_bounded:  # as run_slides: TensorRT profiles stop at the bundle's max_batch
        batch_size = min(batch_size, b.spec.max_batch)
    size = b.spec.encoder.input_size
    plan, units = _sample_units(slide, bundle, batch_size, int(max_tile_mb * 2**20) // (size * size * 3))
    sample = [(u, read_tiles(plan, u)) for u in units]
    n_tiles = sum(len(t) for _, t in sample)
    plan.prep.close()

    def infer(unit: list[int], tiles: np.ndarray) -> None:
        head_rows(plan, head, unit, encode_tiles(plan, encoder, tiles))

    infer(*sample[0])  # warm-up
    done, t0 = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - t0 < min_time:
        for unit, tiles in sample:
            infer(unit, tiles)
            done += len(tiles)
    seconds = time.perf_counter() - t0
    for eng in (encoder, head):
        eng.close()
    return {"engine": chosen, "tiles": done, "sample_tiles": n_tiles, "seconds": seconds, "tiles_per_s": done / seconds,
            "seconds_per_tile": seconds / done, "threads": getattr(encoder, "threads", None)}


def reader_costs_child(slide: str, bundle: str, batch_size: int, max_tiles: int) -> dict:
    """The reader side's CPU cost per tile, single-threaded and uncontended, through the runtime's own
    ``read_tiles`` stage with a timer.

    On the first work units (up to ``max_tiles`` tiles), with a chunk cache that holds them all: the
    first pass decodes every chunk they touch (the cache's ``read_decode`` seconds), the second pass,
    on a warm cache, is the rest of the reader's work (assemble each unit's box, crop, resample with
    Pillow, mosaic → numpy: ``cut_resample``). Returns µs per tile for each phase.
    """
    from hishrst_runtime.core.timing import StageTimer
    from hishrst_runtime.inference.stages import read_tiles

    timer = StageTimer()
    plan, units = _sample_units(slide, bundle, batch_size, max_tiles, cache_bytes=1 << 34, timer=timer)
    n = sum(len(read_tiles(plan, u)) for u in units)  # cold: decodes each chunk once
    decode = timer.seconds.get("read_decode", 0.0)
    timer.seconds["cut_resample"] = 0.0
    for u in units:  # warm: everything but the decoding
        read_tiles(plan, u)
    t = {"decode": decode, "cut_resample": timer.seconds["cut_resample"]}
    plan.prep.close()
    return {"tiles": n, "chunks": plan.cache.misses, "patch_side_px": plan.side, "input_size": plan.size,
            "us_per_tile": {k: 1e6 * v / n for k, v in t.items()}, "us_per_tile_total": 1e6 * sum(t.values()) / n}


def _ort_what_if(spin_what_if: bool) -> None:
    """Experiment knob (``--ort-spin``): change the ONNX Runtime session options every backend of this
    process uses, to measure a runtime setting other than the default."""
    from hishrst_runtime.backends import base, ort_cpu

    orig = base.ort_session_options

    def patched(*, threads: int | None = None, spin: bool = False) -> Any:
        return orig(threads=threads, spin=spin_what_if)

    base.ort_session_options = patched  # type: ignore[assignment]
    ort_cpu.ort_session_options = patched  # type: ignore[attr-defined]


def size_child(slide: str, bundle: str, out_dir: str, provider: str, batch_size: int, workers: int | None,
               engine_only: dict | None = None, ort_threads: int | None = None, ort_spin: bool | None = None) -> dict:
    """One slide size in one fresh process: ``hishrst-run`` with the real engine (peak RSS taken right
    after it), then with the no-op engine, then (if asked) the engine alone on pre-cut tiles — with the
    run's intra-op threads and with all physical cores; the faster is the engine's limit."""
    from hishrst_runtime.inference.engines import default_engine_threads
    from hishrst_runtime.jobs.runner import DEFAULT_WORKERS

    if ort_spin is not None:
        _ort_what_if(ort_spin)
    run_threads = ort_threads or default_engine_threads(DEFAULT_WORKERS if workers is None else workers)

    from hishrst_runtime.backends import available_providers
    from hishrst_runtime.bundle.manifest import load_bundle
    from hishrst_runtime.inference.pipeline import prepare_slide

    # Untimed warm-up: the first prepare_slide / output store of a process import zarr, scipy, anndata, ...
    # (~1-2 s once per process, not per slide); without it the first run would pay that and the no-op not.
    t0 = time.perf_counter()
    prepare_slide(Path(slide), load_bundle(Path(bundle))).close()
    cold_prepare = time.perf_counter() - t0
    import anndata  # noqa: F401 - imported by the output store on its first use

    if provider not in ("cpu", "noop") and (provider != "auto" or available_providers() != ["cpu"]):
        # GPU engines: build / load the TensorRT engine caches (minutes on first use) untimed
        engine_only_child(slide, bundle, provider, batch_size, max_tile_mb=16.0, min_time=0.0)
    real = run_pipeline_child(slide, bundle, out_dir, provider, batch_size, workers, ort_threads)
    real["cold_prepare_seconds"] = cold_prepare
    real["maxrss_bytes"] = peak_rss_bytes()
    real["torch_imported"] = "torch" in sys.modules
    shutil.rmtree(out_dir, ignore_errors=True)
    noop = run_pipeline_child(slide, bundle, out_dir, "noop", batch_size, workers, ort_threads)
    noop["torch_imported"] = "torch" in sys.modules
    shutil.rmtree(out_dir, ignore_errors=True)
    eng = None
    if engine_only:
        from hishrst_runtime.backends.base import default_threads

        first = engine_only_child(slide, bundle, provider, batch_size, threads=run_threads, **engine_only)
        tried = [first]
        if first["threads"] is not None:  # an ONNX Runtime CPU engine: also with all physical cores
            tried += [engine_only_child(slide, bundle, provider, batch_size, threads=t, **engine_only)
                      for t in sorted({default_threads()} - {run_threads})]
        eng = max(tried, key=lambda e: e["tiles_per_s"])
        eng["by_threads"] = {str(e["threads"]): e["tiles_per_s"] for e in tried if e["threads"] is not None}
        eng["reader_costs"] = reader_costs_child(slide, bundle, batch_size, max_tiles=4096)
    return {"real": real, "noop": noop, "engine_only": eng}


# --------------------------------------------------------------------------------------------- main


def _parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = base_parser("pipeline", __doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=None, help="bundle to run (default: a test-vit bundle fitted on the preset)")
    p.add_argument("--provider", default="auto", help="hishrst-run --provider (default auto: the fastest available)")
    p.add_argument("--batch-size", type=int, default=64, help="encoder batch size (hishrst-run default 64)")
    p.add_argument("--workers", type=int, default=None, help="reader threads (default: hishrst-run's, 2)")
    p.add_argument("--sizes", default="1x,4x", help="slide sizes to run: 1x, 4x (default both)")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration (the fastest is reported)")
    p.add_argument("--ort-threads", type=int, default=None, help="hishrst-run --engine-threads: ONNX Runtime "
                   "intra-op threads (default: the runtime's choice, the cores the readers leave free)")
    p.add_argument("--ort-spin", choices=["on", "off"], default=None, help="what-if: 'on' lets ONNX Runtime's "
                   "intra-op threads spin (onnxruntime's own default; the runtime turns it off)")
    return p, p.parse_args(argv)


@dataclasses.dataclass
class _Plan:
    """What every measurement of one invocation shares."""

    args: argparse.Namespace
    preset: str
    slides: dict[str, Path]
    bundle: Path
    sizes: list[str]
    scratch: Path
    what_if: dict[str, Any]
    common: dict[str, Any]


def _setup(p: argparse.ArgumentParser, args: argparse.Namespace) -> _Plan:
    what_if = {"ort_threads": args.ort_threads, "ort_spin": None if args.ort_spin is None else args.ort_spin == "on"}
    data = prepare_data(args, fit_bundle=args.bundle is None)
    bundle = args.bundle.resolve() if args.bundle else data.bundle
    sizes = [s for s in args.sizes.split(",") if s in data.slides]
    if not sizes:
        p.error(f"--sizes: choose from {', '.join(data.slides)}")
    common = {"preset": data.preset, "bundle": str(bundle), "batch_size": args.batch_size, "workers": args.workers,
              "what_if": what_if if (args.ort_threads or args.ort_spin is not None) else None}
    return _Plan(args, data.preset, data.slides, bundle, sizes, data.work / "out-pipeline", what_if, common)


def _measure_size(plan: _Plan, size: str, first: bool) -> dict[str, dict[str, Any]]:
    """``--repeats`` fresh processes on one slide size; the fastest real, no-op and engine-only results."""
    args = plan.args
    best: dict[str, Any] = {}
    for rep in range(max(1, args.repeats)):
        shutil.rmtree(plan.scratch, ignore_errors=True)
        print(f"hishrst-run {plan.slides[size].name}: --provider {args.provider}, then noop"
              f"{', then the engine alone' if first else ''} (fresh process, run {rep + 1}) ...", flush=True)
        r = run_child("benchmarks.pipeline:size_child",
                      {"slide": str(plan.slides[size]), "bundle": str(plan.bundle), "out_dir": str(plan.scratch),
                       "provider": args.provider, "batch_size": args.batch_size, "workers": args.workers,
                       "engine_only": {"max_tile_mb": 256.0, "min_time": 0.2 if args.quick else 10.0} if first else None,
                       **plan.what_if})
        for key, cost in (("real", "slide_seconds"), ("noop", "slide_seconds"), ("engine_only", "seconds_per_tile")):
            if r[key] is not None and (key not in best or r[key][cost] < best[key][cost]):
                best[key] = r[key]
    shutil.rmtree(plan.scratch, ignore_errors=True)
    return best


def _run_record(plan: _Plan, size: str, key: str, r: dict[str, Any]) -> dict[str, Any]:
    """The ``end_to_end`` (``key="real"``) or ``noop`` record of one slide size."""
    args, slide = plan.args, plan.slides[size]
    provider = args.provider if key == "real" else "noop"
    return {**plan.common, "kind": "end_to_end" if key == "real" else "noop", "status": "ok",
            "slide": f"{plan.preset}-{size}", "slide_path": str(slide), "provider": provider,
            "engine": r["engine"], "points": r["points"],
            "tiles_per_s": r["points_computed"] / r["slide_seconds"],
            "stream_tiles_per_s": r["points_computed"] / r["stream_seconds"],
            "slide_seconds": r["slide_seconds"], "stream_seconds": r["stream_seconds"],
            "prepare_seconds": r["prepare_seconds"], "stages": r["stages"],
            "other_seconds": r["slide_seconds"] - r["stream_seconds"] - (r["prepare_seconds"] or 0.0),
            # peak RSS of the fresh process right after the real-engine run (None for the no-op
            # run, which follows it in the same process)
            "peak_rss_mb": mb(r.get("maxrss_bytes")), "torch_imported": r["torch_imported"],
            "chunk_cache": r["chunk_cache"], "patch_side_px": r["patch_side_px"],
            "cold_prepare_seconds": r.get("cold_prepare_seconds"),
            "run_slides_wall_s": r["run_slides_wall_s"], "engine_line": r.get("engine_line"),
            "equivalent_cli": f"hishrst-run {slide} --bundle {plan.bundle} --out OUT --provider "
                              f"{provider} --batch-size {args.batch_size}"
                              + (f" --workers {args.workers}" if args.workers is not None else "")
                              + (f" --engine-threads {args.ort_threads}" if args.ort_threads else "")}


def _engine_record(plan: _Plan, size: str, e: dict[str, Any]) -> dict[str, Any]:
    return {**plan.common, "kind": "engine_only", "status": "ok", "slide": f"{plan.preset}-{size}",
            "provider": plan.args.provider, "engine": e["engine"], "tiles_per_s": e["tiles_per_s"],
            "tiles": e["tiles"], "sample_tiles": e["sample_tiles"], "seconds": e["seconds"],
            "threads": e.get("threads"), "tiles_per_s_by_threads": e.get("by_threads"),
            "reader_costs": e.get("reader_costs")}


def _summary(plan: _Plan, rows: list[dict[str, Any]], eng: dict[str, Any]) -> dict[str, Any]:
    """End-to-end / engine-only ratios, RSS flatness and (CPU engines) the CPU-budget estimate."""
    e2e = {r["slide"]: r for r in rows if r.get("kind") == "end_to_end"}
    summary: dict[str, Any] = {**plan.common, "kind": "summary", "status": "ok", "engine_only_tiles_per_s": eng["tiles_per_s"],
                               "targets": {"ratio_min": TARGET_RATIO, "rss_growth_max": TARGET_RSS_GROWTH,
                                           "rss_max_mb": TARGET_RSS_MB}}
    for name, r in e2e.items():
        tag = name.rsplit("-", 1)[1]
        summary[f"ratio_{tag}"] = r["tiles_per_s"] / eng["tiles_per_s"]
        summary[f"stream_ratio_{tag}"] = r["stream_tiles_per_s"] / eng["tiles_per_s"]
        summary[f"peak_rss_mb_{tag}"] = r["peak_rss_mb"]
    if "peak_rss_mb_1x" in summary and "peak_rss_mb_4x" in summary:
        summary["rss_growth"] = summary["peak_rss_mb_4x"] / summary["peak_rss_mb_1x"] - 1
        summary["rss_flat"] = summary["rss_growth"] <= TARGET_RSS_GROWTH and summary["peak_rss_mb_4x"] <= TARGET_RSS_MB
    summary["ratio_met"] = all(summary[k] >= TARGET_RATIO for k in summary if k.startswith("ratio_"))
    rc = eng.get("reader_costs")
    by = {int(t): v for t, v in (eng.get("tiles_per_s_by_threads") or {}).items()}
    if rc and by:
        # CPU-budget estimate: the engine's CPU time per tile is threads / tiles_per_s at its most frugal
        # thread count; the readers' work (uncontended, single-threaded) comes on top; all of it shares
        # the machine's physical cores. An estimate, not a bound: each term is measured on its own.
        from hishrst_runtime.backends.base import default_threads

        cores = default_threads()
        engine_us = min(1e6 * t / v for t, v in by.items())
        e2e_est = cores * 1e6 / (engine_us + rc["us_per_tile_total"])
        summary.update(cores=cores, engine_core_us_per_tile=engine_us, reader_us_per_tile=rc["us_per_tile_total"],
                       cpu_budget_e2e_tiles_per_s=e2e_est,
                       cpu_budget_estimate_ratio=min(1.0, e2e_est / eng["tiles_per_s"]))
    return summary


def _print_report(args: argparse.Namespace, rows: list[dict[str, Any]], eng: dict[str, Any], summary: dict[str, Any]) -> None:
    print_table([r for r in rows if r.get("kind") != "engine_only"],
                [("slide", "slide"), ("engine", "engine"), ("points", "points"), ("tiles_per_s", "tiles/s"),
                 ("stream_tiles_per_s", "stream tiles/s"), ("slide_seconds", "slide s"), ("prepare_seconds", "prepare s"),
                 ("other_seconds", "store+finalize s"),
                 ("s_read_decode", "read+decode s"), ("s_cut_resample", "cut+resample s"), ("s_encoder", "encoder s"),
                 ("s_head", "head s"), ("s_write", "write s"), ("peak_rss_mb", "peak RSS MB")],
                title=f"hishrst-run end to end ({'quick' if args.quick else 'full'} run, batch {args.batch_size})")
    by = ", ".join(f"{t} thread(s) {v:,.0f}" for t, v in (eng.get("tiles_per_s_by_threads") or {}).items())
    print(f"\nengine alone ({eng['engine']}, pre-cut tiles): {eng['tiles_per_s']:.1f} tiles/s (the faster of: {by})")
    for tag in ("1x", "4x"):
        if f"ratio_{tag}" in summary:
            print(f"end-to-end / engine-only ({tag}): {100 * summary[f'ratio_{tag}']:.0f} % "
                  f"(stream only: {100 * summary[f'stream_ratio_{tag}']:.0f} %; target ≥ {100 * TARGET_RATIO:.0f} %)")
    rc = eng.get("reader_costs")
    if rc:
        parts = ", ".join(f"{k} {v:.0f}" for k, v in rc["us_per_tile"].items())
        print(f"reader CPU per tile, single thread: {rc['us_per_tile_total']:.0f} µs ({parts})")
    if "cpu_budget_estimate_ratio" in summary:
        print(f"CPU budget: engine ≥ {summary['engine_core_us_per_tile']:.0f} core-µs per tile + readers "
              f"{summary['reader_us_per_tile']:.0f} µs on {summary['cores']} cores → end to end about "
              f"{summary['cpu_budget_e2e_tiles_per_s']:,.0f} tiles/s = "
              f"{100 * summary['cpu_budget_estimate_ratio']:.0f} % of engine-only (estimate: perfect overlap, no other cost; "
              "the per-tile costs are measured separately and vary run to run)")
    if "rss_growth" in summary:
        print(f"peak RSS 1x → 4x: {summary['peak_rss_mb_1x']:.0f} → {summary['peak_rss_mb_4x']:.0f} MB "
              f"({100 * summary['rss_growth']:+.0f} %; target within {100 * TARGET_RSS_GROWTH:.0f} % and ≤ {TARGET_RSS_MB:.0f} MB)")
    print(f"-> {args.out}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p, args = _parse_args(argv)
    plan = _setup(p, args)
    rows: list[dict[str, Any]] = []
    with JsonlWriter(args.out, benchmark="pipeline", quick=args.quick, append=args.append) as out:
        eng = None
        for i, size in enumerate(plan.sizes):
            best = _measure_size(plan, size, first=i == 0)
            for key in ("real", "noop"):
                rec = out.write(_run_record(plan, size, key, best[key]))
                rows.append({**rec, **{f"s_{k}": v for k, v in best[key]["stages"].items()}})
            if "engine_only" in best:
                eng = out.write(_engine_record(plan, size, best["engine_only"]))
        assert eng is not None
        summary = _summary(plan, rows, eng)
        out.write(summary)
        _print_report(args, rows, eng, summary)
        return out.records


if __name__ == "__main__":
    main()
