"""Feed rate: how many tiles per second the runtime's reader side delivers to an engine, at UNI geometry
(224-px uint8 tiles of ``--patch-um`` µm, trained at 0.5 µm/px; encoder batch 256), and how busy that keeps
an engine of a given speed over a multi-slide run.

Part 1, feed rate: on three synthetic slides of the same tissue (built once, cached) — a pyramidal OME-Zarr
at 0.5 µm/px, the same at 0.25 µm/px, and a single-level 40× (0.25 µm/px) TIFF with JPEG tiles, whose
0.5 µm/px level the runtime computes on the fly — ``predict_slide`` (the stage functions ``hishrst-run``
composes: reader threads run ``read_tiles``, the calling thread the encoder, one thread head + write) runs
with the no-op engine and a discarding writer, for each reader thread count (``--threads``, default 1,2).
Reported: tiles/s (best of ``--repeats`` passes after one untimed warm-up, median too), the scaling from
1 to 2 threads, the 1-minute load average around each measurement and the thread settings.

Part 2, engine busy: ``run_slides`` (what ``hishrst-run`` runs, writing its outputs) over 5 OME-Zarr slides
of mixed sizes with the latency engine (:class:`hishrst_runtime.backends.latency.LatencyBackend`:
sleeps batch / ``--engine-rate`` s per call, GIL released, like a GPU engine) injected through
``run_slides(engines=...)``; reported: the engine's busy time as a share of the run's wall time and of
the engine's own span (first call → last call), and where it idled (before its first call, between slides,
within slides, after its last call). ``--compare-overlap`` runs each point without the slide overlap first (the
slide loop before issue 19: the next slide prepared in the background, but its first tiles read only at its turn
and each slide finished before the next one starts). When the reader side is slower than ``--engine-rate``
(two cores), the engine waits for tiles within slides whatever the overlap does: a rate below the feed rate
(e.g. ``--engine-rate 500``) shows the slide boundaries alone.

Part 3 (``--cpu-encoder ENCODER.onnx``, an encoder at UNI geometry): the same 5 slides on the CPU engine,
end-to-end tiles/s against the engine alone on random tiles in the batches the run made (same intra-op threads).

    python -m benchmarks.feed            # 6 mm slides, 3 repeats
    python -m benchmarks.feed --quick    # 1.5 mm slides, 1 repeat (smoke test)
    python -m benchmarks.feed --threads 1,2,4 --engine-rate 2000
    python -m benchmarks.feed --skip-feed --engine-rate 4000,500 --compare-overlap --cpu-encoder uni.onnx
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

from hishrst_runtime.core.vocab import CHUNK_CODECS, DEFAULT_CHUNK_CODEC, DEFAULT_TILE_LAYOUT, TILE_LAYOUTS

from benchmarks._common import JsonlWriter, base_parser, int_list, load_average, print_table, str_list, workdir_of

#: UNI's field: 224 px at 0.5 µm/px.
UNI_PATCH_UM = 112.0
UNI_INPUT = 224
UNI_FEATURES = 1024
BATCH = 256
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
              "ZARR_THREADING_MAX_WORKERS", "RAYON_NUM_THREADS")


def _sizes(quick: bool, side_mm: float | None) -> tuple[float, list[float]]:
    """(side of the feed-rate slides, sides of the 5 engine-busy slides), mm."""
    if quick:
        return side_mm or 1.5, [1.0, 1.5, 0.8, 1.2, 0.6]
    return side_mm or 6.0, [3.0, 8.0, 4.0, 6.0, 2.0]


def thread_settings() -> dict[str, Any]:
    """The thread-related environment, usable cores and the runtime's default reader / engine threads."""
    from hishrst_runtime.backends.base import default_threads
    from hishrst_runtime.jobs.runner import DEFAULT_WORKERS

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"env": {k: os.environ.get(k) for k in THREAD_ENV}, "cores_usable": usable,
            "physical_cores": default_threads(), "runtime_default_workers": DEFAULT_WORKERS}


def feed_slides(work: Path, side_mm: float, codecs: list[str] | None = None) -> dict[str, tuple[Path, str]]:
    """The three slide kinds of the feed-rate part (same tissue, same physical size): kind → (slide, chunk codec).
    The OME-Zarr kinds come once per chunk codec of ``codecs`` (default: the writer's default only)."""
    from benchmarks._synth_wsi import ensure_jpeg_tiff, ensure_zarr

    um = 1000.0 * side_mm
    kinds: dict[str, tuple[Path, str]] = {}
    for mpp in (0.5, 0.25):
        for codec in codecs or [DEFAULT_CHUNK_CODEC]:
            kinds[f"ome-zarr {mpp:g} µm/px, {codec}"] = (ensure_zarr(work, side_um=um, mpp=mpp, codec=codec), codec)
    kinds["tiff-jpeg 40× single level"] = (ensure_jpeg_tiff(work, side_um=um, mpp=0.25), "jpeg")
    return kinds


def feed_pass(slide: Path, bundle: Any, *, workers: int, batch_size: int = BATCH,
              patch_um: float = UNI_PATCH_UM) -> dict[str, Any]:
    """One ``predict_slide`` pass with the no-op engine and a discarding writer: tiles/s of the feed."""
    from hishrst_runtime.inference.engines import noop_engines
    from hishrst_runtime.inference.pipeline import predict_slide, prepare_slide

    engines = noop_engines(bundle)
    t0 = time.perf_counter()
    prep = prepare_slide(slide, bundle, pitch_um=patch_um, grid="square")
    t_prep = time.perf_counter() - t0
    try:
        stats = predict_slide(prep, bundle, encoder=engines.encoder, head=engines.head, write=lambda rows, values: None,
                              batch_size=batch_size, workers=workers)
    finally:
        prep.close()
    return {"tiles": stats.points_computed, "seconds": stats.seconds, "tiles_per_s": stats.points_computed / stats.seconds,
            "prepare_seconds": t_prep, "level": stats.level, "level_mpp": stats.level_mpp,
            "patch_side_px": stats.patch_side_px, "stages": dict(stats.stages), "chunk_cache": dict(stats.chunk_cache)}


def measure_feed(slide: Path, bundle: Any, *, workers: int, repeats: int) -> dict[str, Any]:
    """Best and median of ``repeats`` passes after one untimed warm-up, with the load average before and after."""
    load_before = load_average()
    feed_pass(slide, bundle, workers=workers)  # warm-up: imports, page cache
    passes = [feed_pass(slide, bundle, workers=workers) for _ in range(max(1, repeats))]
    best = max(passes, key=lambda r: r["tiles_per_s"])
    return {**best, "median_tiles_per_s": statistics.median(r["tiles_per_s"] for r in passes), "passes": len(passes),
            "load_avg_before": load_before, "load_avg_after": load_average()}


# ------------------------------------------------------------------------------------------ engine busy


def busy_slides(work: Path, sides_mm: list[float], codec: str | None = None) -> list[Path]:
    """The engine-busy part's OME-Zarr slides at 0.5 µm/px (one texture seed each; chunks compressed with ``codec``)."""
    from benchmarks._synth_wsi import ensure_zarr

    return [ensure_zarr(work, side_um=1000.0 * s, mpp=0.5, seed=i, codec=codec) for i, s in enumerate(sides_mm)]


def latency_engines(bundle: Any, tiles_per_s: float) -> Any:
    """(latency encoder at ``tiles_per_s``, no-op head) as the runtime's ``Engines``."""
    from hishrst_runtime.backends.latency import LatencyBackend
    from hishrst_runtime.backends.noop import NoopBackend
    from hishrst_runtime.inference.engines import Engines

    d, g = bundle.spec.encoder.feature_dim, len(bundle.spec.genes)
    enc = LatencyBackend(lambda f: (len(f["tiles"]), d), tiles_per_s=tiles_per_s)
    return Engines(enc, NoopBackend(lambda f: (*f["features"].shape[:2], g)), "latency")


class CallLog:
    """An encoder wrapper recording each call's (start, end, tiles) on ``time.perf_counter``."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, []

    def run(self, feeds: Any) -> Any:
        t0 = time.perf_counter()
        out = self.inner.run(feeds)
        self.calls.append((t0, time.perf_counter(), len(next(iter(feeds.values())))))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def idle_breakdown(calls: list[tuple[float, float, int]], t0: float, wall: float, tiles: list[int]) -> dict[str, Any]:
    """Where the engine idled (seconds): before its first call (``start``: opening the first slide and reading its
    first tiles), between slides (a slide's last call to the next one's first), within slides (between calls of
    one slide: waiting for tiles), after its last call (``end``: finishing the last slide). Calls are assigned to
    slides by the slides' tile counts (slides stream one after another, in order)."""
    if not calls:
        return {}
    k, done, first, last = 0, 0, [], []
    for n_slide in (n for n in tiles if n):
        first.append(k)
        while k < len(calls) and done < n_slide:
            done += calls[k][2]
            k += 1
        last.append(k - 1)
        done = 0
    between = [calls[first[j + 1]][0] - calls[last[j]][1] for j in range(len(first) - 1)]
    gaps = [calls[c + 1][0] - calls[c][1] for c in range(len(calls) - 1)]
    bounds = {"start_s": calls[0][0] - t0, "end_s": t0 + wall - calls[-1][1], "between_slides_s": sum(between),
              "within_slides_s": sum(gaps) - sum(between), "between_slides_each_s": [round(b, 3) for b in between]}
    return {key: (round(v, 3) if isinstance(v, float) else v) for key, v in bounds.items()}


def engine_busy(slides: list[Path], bundle_dir: Path, out_dir: Path, *, tiles_per_s: float | None,
                workers: int, overlap: bool = True, engines: Any = None, pitch_um: float = UNI_PATCH_UM,
                batch_size: int = BATCH, keep_calls: bool = False) -> dict[str, Any]:
    """``run_slides`` over ``slides`` with the latency engine at ``tiles_per_s`` injected (or ``engines``, e.g.
    the CPU engine): the engine's busy share of the run and where it idled (:func:`idle_breakdown`).
    ``overlap=False``: the slide loop without read-ahead and with each slide finished before the next (before)."""
    from hishrst_runtime.bundle.manifest import load_bundle
    from hishrst_runtime.jobs import runner

    engines = engines or latency_engines(load_bundle(bundle_dir), float(tiles_per_s or 0))
    log = CallLog(engines.encoder)
    engines = engines._replace(encoder=log)
    shutil.rmtree(out_dir, ignore_errors=True)
    said: list[str] = []
    load_before = load_average()
    saved, runner._Runner.overlap = runner._Runner.overlap, overlap
    try:
        t0 = time.perf_counter()
        results = runner.run_slides(slides, bundle_dir=bundle_dir, out_dir=out_dir, engines=engines, pitch_um=pitch_um,
                                    grid="square", batch_size=batch_size, workers=workers, overwrite=True,
                                    progress=False, echo=said.append)
        wall = time.perf_counter() - t0
    finally:
        runner._Runner.overlap = saved
    shutil.rmtree(out_dir, ignore_errors=True)
    failed = [f"{r.slide}: {r.reason}" for r in results if r.status != "ok"]
    if failed:
        raise RuntimeError("hishrst-run failed: " + "; ".join(failed))
    busy = sum(b - a for a, b, _ in log.calls)
    span = log.calls[-1][1] - log.calls[0][0] if log.calls else 0.0
    tiles = sum(int(r.computed or 0) for r in results)
    st = {"engine": engines.provider, "tiles_per_s_set": tiles_per_s, "calls": len(log.calls), "busy_s": busy,
          "span_s": span, "wall_s": wall, "busy_fraction": busy / span if span else None,
          "busy_fraction_of_wall": busy / wall}
    if hasattr(log.inner, "stats"):  # the latency engine's own figures (time inside its calls)
        st |= log.inner.stats(wall_s=wall)
    if keep_calls:
        st["call_log"] = log.calls
    return {**st, "overlap": overlap,
            "idle": idle_breakdown(log.calls, t0, wall, [int(r.computed or 0) for r in results]),
            "tiles": tiles, "tiles_per_s": tiles / wall, "workers": workers, "slides": len(slides),
            "per_slide": [{"slide": Path(r.slide).name, "points": r.points, "seconds": r.seconds,
                           "tiles_per_s": r.tiles_per_s, "wait_for_tiles_s": (r.stats.stages or {}).get("wait_for_tiles")}
                          for r in results],
            "load_avg_before": load_before, "load_avg_after": load_average(),
            "hook": "hishrst_runtime.jobs.runner.run_slides(engines=Engines(encoder, head, provider))",
            "engine_line": next((s for s in said if s.startswith("engine:")), None)}


def engine_only(engines: Any, sizes: list[int], layout: str = DEFAULT_TILE_LAYOUT) -> dict[str, Any]:
    """The encoder alone on random uint8 tiles at UNI geometry in its ``layout``, one call per entry of ``sizes``
    (the batches a run made, so the same work; after one untimed call): tiles/s."""
    import numpy as np

    from hishrst_runtime.core.patches import tile_batch_shape

    tiles = np.random.default_rng(0).integers(0, 256, tile_batch_shape(max(sizes), UNI_INPUT, layout), dtype=np.uint8)
    engines.encoder.run({"tiles": tiles[:sizes[0]]})
    t0 = time.perf_counter()
    for n in sizes:
        engines.encoder.run({"tiles": tiles[:n]})
    seconds = time.perf_counter() - t0
    return {"engine_only_tiles_per_s": sum(sizes) / seconds, "engine_only_s": seconds, "engine_only_calls": len(sizes)}


def print_busy(b: dict[str, Any]) -> None:
    idle = b.get("idle") or {}
    print(f"engine busy ({'overlap' if b['overlap'] else 'no overlap'}): {100 * b['busy_fraction_of_wall']:.1f} % "
          f"of the run's wall time ({100 * (b['busy_fraction'] or 0):.1f} % of the engine's span), {b['tiles']} tiles "
          f"over {b['slides']} slides at {b['tiles_per_s']:.0f} tiles/s end to end in {b['wall_s']:.2f} s; engine "
          f"{b['engine']} {b['tiles_per_s_set'] or ''}; idle s: start {idle.get('start_s')}, between slides "
          f"{idle.get('between_slides_s')}, within slides {idle.get('within_slides_s')}, end {idle.get('end_s')}; "
          f"load {b['load_avg_before']} → {b['load_avg_after']}", flush=True)


# --------------------------------------------------------------------------------------------- main


def _parse_args(argv: list[str] | None) -> Any:
    p = base_parser("feed", __doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int_list, default=[1, 2], help="reader thread counts (default 1,2)")
    p.add_argument("--repeats", type=int, default=None, help="timed passes per point (default 3; --quick 1)")
    p.add_argument("--side-mm", type=float, default=None, help="side of the feed-rate slides, mm (default 6; --quick 1.5)")
    p.add_argument("--patch-um", type=float, default=UNI_PATCH_UM, help="tile side, µm (default 112: UNI's 224 px at 0.5 µm/px)")
    p.add_argument("--engine-rate", type=float_list, default=[4000.0],
                   help="latency engine speeds, tiles/s (default 4000; several: 4000,500)")
    p.add_argument("--busy-workers", type=int, default=None, help="reader threads of the engine-busy run (default: hishrst-run's)")
    p.add_argument("--codecs", type=partial(str_list, choices=CHUNK_CODECS), default=list(CHUNK_CODECS),
                   help=f"chunk codecs of the OME-Zarr feed slides (default {','.join(CHUNK_CODECS)})")
    p.add_argument("--layouts", type=partial(str_list, choices=TILE_LAYOUTS), default=list(TILE_LAYOUTS),
                   help=f"encoder tile layouts of the feed part (default {','.join(TILE_LAYOUTS)})")
    p.add_argument("--busy-layout", choices=TILE_LAYOUTS, default=DEFAULT_TILE_LAYOUT,
                   help=f"encoder tile layout of the engine-busy part (default {DEFAULT_TILE_LAYOUT})")
    p.add_argument("--busy-codec", choices=CHUNK_CODECS, default=DEFAULT_CHUNK_CODEC,
                   help=f"chunk codec of the engine-busy slides (default {DEFAULT_CHUNK_CODEC})")
    p.add_argument("--skip-busy", action="store_true", help="measure the feed rate only")
    p.add_argument("--skip-feed", action="store_true", help="measure the engine-busy part only")
    p.add_argument("--compare-overlap", action="store_true",
                   help="run each engine-busy point without the slide overlap too (the slide loop before issue 19)")
    p.add_argument("--cpu-encoder", type=Path, default=None,
                   help="an encoder ONNX at UNI geometry (uint8 224-px tiles, either layout → features): also run "
                        "the 5 slides on the CPU engine and report end-to-end / engine-only tiles/s")
    return p.parse_args(argv)


def _feed_records(out: JsonlWriter, work: Path, args: Any, common: dict[str, Any]) -> list[dict[str, Any]]:
    from benchmarks._synth_wsi import ensure_placeholder_bundle
    from hishrst_runtime.bundle.manifest import load_bundle

    side, _ = _sizes(args.quick, args.side_mm)
    repeats = args.repeats or (1 if args.quick else 3)
    rows = []
    for kind, (path, codec) in feed_slides(work, side, args.codecs).items():
        for layout in args.layouts:
            bundle = load_bundle(ensure_placeholder_bundle(work, args.patch_um, layout=layout))
            by: dict[int, float] = {}
            for n in args.threads:
                r = measure_feed(path, bundle, workers=n, repeats=repeats)
                by[n] = r["tiles_per_s"]
                rows.append(out.write({**common, "kind": "feed", "status": "ok", "slide_kind": kind, "slide": str(path),
                                       "codec": codec, "layout": layout, "side_mm": side, "workers": n, **r}))
                print(f"  {kind:28s} {layout} {n} reader thread(s): {r['tiles_per_s']:8.0f} tiles/s ({r['tiles']} "
                      f"tiles, load {r['load_avg_before']} → {r['load_avg_after']})", flush=True)
            if 1 in by and len(by) > 1:
                rows.append(out.write({**common, "kind": "scaling", "status": "ok", "slide_kind": kind, "layout": layout,
                                       "tiles_per_s_by_threads": {str(k): v for k, v in by.items()},
                                       "scaling": {str(k): v / by[1] for k, v in by.items()}}))
    return rows


def float_list(text: str) -> list[float]:
    """``"4000,500"`` → ``[4000.0, 500.0]`` (argparse type; every value > 0)."""
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e
    if not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
    return vals


def _busy_records(out: JsonlWriter, work: Path, args: Any, common: dict[str, Any]) -> None:
    """Part 2 (each ``--engine-rate``; without the overlap first with ``--compare-overlap``) and, with
    ``--cpu-encoder``, the same slides on the CPU engine beside that engine alone."""
    from benchmarks._synth_wsi import ensure_placeholder_bundle
    from hishrst_runtime.jobs.runner import DEFAULT_WORKERS

    _, sides = _sizes(args.quick, None)
    slides = busy_slides(work, sides, args.busy_codec)
    workers = args.busy_workers if args.busy_workers is not None else DEFAULT_WORKERS
    modes = [False, True] if args.compare_overlap else [True]
    bundle = ensure_placeholder_bundle(work, args.patch_um, layout=args.busy_layout)
    # untimed: the smallest slide once, so the first point does not pay the process's first imports (anndata, ...)
    engine_busy(slides[-1:], bundle, work / "feed" / "out-busy", tiles_per_s=args.engine_rate[0], workers=workers)
    for rate in args.engine_rate:
        for overlap in modes:
            b = engine_busy(slides, bundle, work / "feed" / "out-busy", tiles_per_s=rate, workers=workers,
                            overlap=overlap)
            out.write({**common, "kind": "engine_busy", "status": "ok", "sides_mm": sides, "codec": args.busy_codec,
                       "layout": args.busy_layout, **b})
            print_busy(b)
    if args.cpu_encoder is None:
        return
    from hishrst_runtime.bundle.manifest import load_bundle
    from hishrst_runtime.inference.engines import default_engine_threads, load_engines

    cpu_bundle = ensure_placeholder_bundle(work, args.patch_um, encoder=args.cpu_encoder)
    threads = default_engine_threads(workers)
    for overlap in modes:
        engines = load_engines(load_bundle(cpu_bundle), "cpu", cache_dir=None, threads=threads)
        b = engine_busy(slides, cpu_bundle, work / "feed" / "out-cpu", tiles_per_s=None, workers=workers,
                        overlap=overlap, engines=engines, keep_calls=True)
        loaded = load_bundle(cpu_bundle)
        alone = engine_only(load_engines(loaded, "cpu", cache_dir=None, threads=threads),
                            [n for _, _, n in b.pop("call_log")], loaded.spec.encoder.layout)
        b |= alone | {"engine_threads": threads, "encoder_onnx": str(args.cpu_encoder),
                      "end_to_end_over_engine_only": b["tiles_per_s"] / alone["engine_only_tiles_per_s"]}
        out.write({**common, "kind": "cpu_engine", "status": "ok", "sides_mm": sides, **b})
        print_busy(b)
        print(f"  CPU engine: end to end {b['tiles_per_s']:.1f} tiles/s, the engine alone on the same batches "
              f"{alone['engine_only_tiles_per_s']:.1f} tiles/s ({threads} intra-op thread(s)): "
              f"{b['end_to_end_over_engine_only']:.2f} of engine-only", flush=True)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = _parse_args(argv)
    work = workdir_of(args)
    common = {"batch_size": BATCH, "patch_um": args.patch_um, "input_size": UNI_INPUT, "train_mpp": 0.5,
              "threads": thread_settings()}
    with JsonlWriter(args.out, benchmark="feed", quick=args.quick, append=args.append) as out:
        print(f"feed rate at UNI geometry ({args.patch_um:g} µm → {UNI_INPUT} px, batch {BATCH}), no-op engine; "
              f"reader threads {args.threads}; load {load_average()}", flush=True)
        rows = [] if args.skip_feed else _feed_records(out, work, args, common)
        print_table([r for r in rows if r["kind"] == "feed"],
                    [("slide_kind", "slide"), ("layout", "tiles"), ("workers", "reader threads"), ("tiles_per_s", "tiles/s"),
                     ("median_tiles_per_s", "median"), ("tiles", "tiles"), ("level_mpp", "level µm/px"),
                     ("load_avg_before", "load before"), ("load_avg_after", "load after")], title="feed rate")
        for r in (r for r in rows if r["kind"] == "scaling"):
            print(f"  scaling {r['slide_kind']} {r.get('layout', '')}: " + ", ".join(f"{k} → {v:.2f}×" for k, v in r["scaling"].items()))
        if not args.skip_busy:
            _busy_records(out, work, args, common)
        print(f"-> {args.out}")
        return out.records


if __name__ == "__main__":
    main()
