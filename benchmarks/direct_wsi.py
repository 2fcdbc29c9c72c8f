"""Direct WSI reading: tiles/s of reading and cutting patches straight from an SVS / TIFF versus from its
OME-Zarr conversion (``hishrst convert``), with the runtime's own stage functions.

For each source (the TIFF read directly, its converted OME-Zarr store) the script runs what ``hishrst-run``
runs before the encoder: ``prepare_slide`` (open, level choice, tissue, points, groups), ``plan_units`` (a
fresh chunk cache) and ``read_tiles`` over every work unit on ``--workers`` reader threads. Sources
alternate, after one untimed warm-up pass each; the best of ``--repeats`` passes is the result (the
median is recorded too: on a shared machine single passes of a small slide vary by ±30 %). It also times
whole-chunk decoding alone (every level-0 chunk once, one thread) to show where a gap comes from. The
target: direct reading within 10 % of the OME-Zarr throughput (ratio ≥ 0.90). The default bundle
geometry is HisHRST's (64 µm patches at 0.5 µm/px, resized to 224 px), needing no model files.

    python -m benchmarks.direct_wsi            # the shared CMU SVS, 7 repeats
    python -m benchmarks.direct_wsi --quick    # 1 repeat
    python -m benchmarks.direct_wsi --slide my.svs --workers 4 --bundle bundles/r1

Results: JSON lines (``benchmarks/results/direct_wsi.jsonl`` unless ``--out``), one record per source and
one ``kind="ratio"`` summary.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks._common import ROOT, JsonlWriter, base_parser, print_table, workdir_of

TARGET_RATIO = 0.90
SHARED_SVS = ROOT.parent / "shared" / "data" / "cmu_small_region.svs"


def _geometry_bundle(patch_um: float, train_mpp: float, input_size: int) -> Any:
    """A bundle with HisHRST's geometry and no model files (prepare/plan/read_tiles read only the geometry)."""
    from hishrst_runtime.bundle.manifest import Bundle

    enc = {"name": "geometry-only", "fingerprint": "none", "input_size": input_size, "feature_dim": 1024,
           "input": {"name": "tiles", "dtype": "uint8", "layout": "NHWC", "channels": "RGB"},
           "normalisation": {"scale": 1 / 255, "mean": [0.0] * 3, "std": [1.0] * 3, "in_graph": True},
           "gated": False, "license": "MIT"}
    manifest = {"hishrst_version": "bench", "encoder": enc, "genes": ["G0"], "files": {}, "onnx_opset": 17,
                "patch": {"size_um": patch_um, "train_mpp": train_mpp, "resize": "bilinear", "pad_value": 255},
                "position": {"mode": "continuous", "units": "um"}, "max_batch": 64,
                "grouping": {"method": "kd-median-v1", "max_size": 8, "coords": "level0_px"},
                "output": {"name": "expression", "meaning": "log1p of counts per 10k", "target_sum": 1e4,
                           "dtype": "float32"},
                "license": {"gated": False, "redistributable": True, "notice": None}}
    bundle = Bundle(Path("."), manifest)
    _ = bundle.spec  # validate now
    return bundle


def _read_pass(source: str, bundle: Any, *, workers: int, batch_size: int) -> dict[str, Any]:
    """prepare + plan + read_tiles over every unit; timings of one pass."""
    from hishrst_runtime.inference.prepare import prepare_slide
    from hishrst_runtime.inference.stages import plan_units, read_tiles, unit_rows, work_units

    t0 = time.perf_counter()
    prep = prepare_slide(source, bundle)
    t_prep = time.perf_counter() - t0
    try:
        plan = plan_units(prep, bundle, batch_size=batch_size)
        units = work_units(prep.groups, batch_size)
        n = sum(len(unit_rows(prep, u)) for u in units)
        t1 = time.perf_counter()
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for _ in pool.map(lambda u: read_tiles(plan, u), units):
                pass
        t_read = time.perf_counter() - t1
        lv = plan.level
        return {"points": n, "read_seconds": t_read, "tiles_per_s": n / t_read, "prepare_seconds": t_prep,
                "level": prep.level_index, "level_shape": list(lv.shape), "chunks": list(lv.chunks),
                "patch_side_px": plan.side, "kind_opened": prep.slide.kind, "stages": dict(plan.timer.seconds),
                "chunk_cache": {"hits": plan.cache.hits, "misses": plan.cache.misses}}
    finally:
        prep.close()


def _decode_rate(source: str) -> dict[str, Any]:
    """Every level-0 chunk decoded once on one thread: megapixels / s."""
    from hishrst_runtime.slides.reader import open_slide

    with open_slide(source) as s:
        lv = s.levels[0]
        (h, w), (ch, cw) = lv.shape, lv.chunks
        t0 = time.perf_counter()
        for cy in range(-(-h // ch)):
            for cx in range(-(-w // cw)):
                lv.read_chunk(cy, cx)
        dt = time.perf_counter() - t0
    return {"decode_mpix_per_s": h * w / dt / 1e6, "decode_seconds": dt}


def _converted(slide: Path, work: Path) -> Path:
    from hishrst_runtime.slides.convert import convert_slide

    out = work / "direct_wsi" / f"{slide.stem}.ome.zarr"
    if not out.exists():
        t0 = time.perf_counter()
        convert_slide(slide, out, progress=False)
        print(f"[setup] hishrst convert {slide.name} -> {out} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def _measure(sources: dict[str, str], bundle: Any, *, repeats: int, workers: int, batch_size: int) -> dict[str, dict]:
    """Best pass per source (highest tiles/s), with the median of all passes and the decode rate."""
    best: dict[str, dict[str, Any]] = {}
    rates: dict[str, list[float]] = {tag: [] for tag in sources}
    for tag, src in sources.items():  # warm-up: imports, page cache
        _read_pass(src, bundle, workers=workers, batch_size=batch_size)
    for rep in range(repeats):
        order = list(sources.items()) if rep % 2 == 0 else list(reversed(sources.items()))
        for tag, src in order:
            r = _read_pass(src, bundle, workers=workers, batch_size=batch_size)
            print(f"  run {rep + 1} {tag:9s} {r['tiles_per_s']:8.0f} tiles/s ({r['points']} tiles, "
                  f"{r['read_seconds']:.2f} s)", flush=True)
            rates[tag].append(r["tiles_per_s"])
            if tag not in best or r["tiles_per_s"] > best[tag]["tiles_per_s"]:
                best[tag] = r
    for tag, src in sources.items():
        best[tag].update(_decode_rate(src), median_tiles_per_s=statistics.median(rates[tag]), passes=len(rates[tag]))
    return best


def _end_to_end(sources: dict[str, str], bundle_dir: Path, work: Path, *, repeats: int) -> dict[str, dict[str, Any]]:
    """Whole ``hishrst-run`` passes (prepare, read, encode, head, write; ONNX Runtime CPU) per source:
    best and median tiles/s from the runtime's own :class:`SlideResult`."""
    import shutil

    from hishrst_runtime.jobs.runner import run_slides

    rates: dict[str, list[float]] = {tag: [] for tag in sources}
    for rep in range(repeats + 1):  # the first pass warms imports, engines and the page cache
        order = list(sources.items()) if rep % 2 == 0 else list(reversed(sources.items()))
        for tag, src in order:
            out = work / f"e2e-{tag}"
            shutil.rmtree(out, ignore_errors=True)
            res = run_slides([src], bundle_dir=bundle_dir, out_dir=out, provider="cpu", progress=False,
                             echo=lambda *_: None)[0]
            if res.status != "ok":
                raise RuntimeError(f"hishrst-run failed on {src}: {res.reason}")
            if rep:
                rates[tag].append(float(res.tiles_per_s))
                print(f"  e2e {rep} {tag:9s} {res.tiles_per_s:8.0f} tiles/s ({res.points} points)", flush=True)
    return {tag: {"tiles_per_s": max(v), "median_tiles_per_s": statistics.median(v), "passes": len(v)}
            for tag, v in rates.items()}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = base_parser("direct_wsi", __doc__.split("\n\n")[0])
    p.add_argument("--slide", type=Path, default=None, help=f"SVS / TIFF to read (default: {SHARED_SVS})")
    p.add_argument("--bundle", type=Path, default=None, help="a bundle whose geometry to use (default: HisHRST's)")
    p.add_argument("--workers", type=int, default=2, help="reader threads (hishrst-run's default: 2)")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per work unit (hishrst-run's default: 64)")
    p.add_argument("--repeats", type=int, default=None, help="timed passes per source (default 7; --quick: 1)")
    p.add_argument("--patch-um", type=float, default=64.0, help="patch side, µm (default bundle only)")
    p.add_argument("--input-size", type=int, default=224, help="encoder input side, px (default bundle only)")
    p.add_argument("--run-bundle", type=Path, default=None,
                   help="also time whole hishrst-run passes with this bundle (default: the benchmarks' small "
                        "test-vit bundle, trained on first use; 'none' skips)")
    args = p.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 7)
    slide = (args.slide or SHARED_SVS).resolve()
    with JsonlWriter(args.out, benchmark="direct_wsi", quick=args.quick, append=args.append) as out:
        if not slide.is_file():
            return [out.skip(f"no slide at {slide} (pass --slide)", slide=str(slide))]
        from hishrst_runtime.bundle.manifest import load_bundle

        bundle = load_bundle(args.bundle) if args.bundle else _geometry_bundle(args.patch_um, 0.5, args.input_size)
        sources = {"direct": str(slide), "ome-zarr": str(_converted(slide, workdir_of(args)))}
        print(f"reading {slide.name} directly and as OME-Zarr: {args.workers} reader thread(s), "
              f"{repeats} repeat(s) ...", flush=True)
        best = _measure(sources, bundle, repeats=repeats, workers=args.workers, batch_size=args.batch_size)
        common = {"slide": str(slide), "workers": args.workers, "batch_size": args.batch_size, "repeats": repeats,
                  "patch_um": bundle.patch_um, "input_size": bundle.spec.encoder.input_size}
        rows = [out.write({**common, "kind": "source", "source": tag, "path": sources[tag], "status": "ok", **r})
                for tag, r in best.items()]
        ratio = best["direct"]["tiles_per_s"] / best["ome-zarr"]["tiles_per_s"]
        median_ratio = best["direct"]["median_tiles_per_s"] / best["ome-zarr"]["median_tiles_per_s"]
        rows.append(out.write({**common, "kind": "ratio", "status": "ok", "direct_over_omezarr": ratio,
                               "median_direct_over_omezarr": median_ratio,
                               "target": TARGET_RATIO, "meets_target": ratio >= TARGET_RATIO,
                               "decode_ratio": best["direct"]["decode_mpix_per_s"] / best["ome-zarr"]["decode_mpix_per_s"]}))
        if args.run_bundle is None or str(args.run_bundle).lower() != "none":
            from benchmarks._data import ensure_bundle

            run_bundle = args.run_bundle or ensure_bundle(workdir_of(args), "small", epochs=1, n_genes=50)[1]
            e2e = _end_to_end(sources, Path(run_bundle), workdir_of(args), repeats=repeats)
            e_best = e2e["direct"]["tiles_per_s"] / e2e["ome-zarr"]["tiles_per_s"]
            e_median = e2e["direct"]["median_tiles_per_s"] / e2e["ome-zarr"]["median_tiles_per_s"]
            rows.append(out.write({**common, "kind": "end_to_end", "status": "ok", "bundle": str(run_bundle),
                                   "direct": e2e["direct"], "ome_zarr": e2e["ome-zarr"],
                                   "direct_over_omezarr": e_best, "median_direct_over_omezarr": e_median,
                                   "target": TARGET_RATIO, "meets_target": e_median >= TARGET_RATIO}))
            print(f"whole hishrst-run passes, direct / OME-Zarr: {e_best:.2f} best, {e_median:.2f} median")
    print_table([r for r in rows if r["kind"] == "source"],
                [("source", "source"), ("tiles_per_s", "tiles/s"), ("median_tiles_per_s", "median"), ("points", "tiles"), ("read_seconds", "read s"),
                 ("prepare_seconds", "prepare s"), ("decode_mpix_per_s", "decode MP/s"), ("chunks", "chunk")],
                title="read + cut + resample (runtime stage functions)")
    print(f"direct / OME-Zarr: {ratio:.2f} best, {median_ratio:.2f} median (target ≥ {TARGET_RATIO:.2f}: {'met' if ratio >= TARGET_RATIO else 'NOT met'})")
    return rows


if __name__ == "__main__":
    main()
