"""Render the JSON-lines results as the Markdown tables of ``benchmarks/RESULTS.md`` (numbers are copied
from the measurements, never typed by hand).

    python -m benchmarks.report                        # all of benchmarks/results/*.jsonl -> stdout
    python -m benchmarks.report --dir /tmp/run --md /tmp/run/RESULTS.tables.md
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS_DIR, fmt, read_jsonl


def md_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join(fmt(_get(r, k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def _get(r: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        r = r.get(part) if isinstance(r, dict) else None  # type: ignore[assignment]
    return r


def _machine(recs: list[dict[str, Any]]) -> str:
    m = recs[0]["machine"]
    v = m.get("versions", {})
    quick = any(r.get("quick") for r in recs)
    loads = [r["load_avg_1m"] for r in recs if r.get("load_avg_1m") is not None]
    stamps = [r["timestamp"] for r in recs]
    return (f"*Machine*: {m.get('cpu_model')} ({m.get('cores_usable')} usable / {m.get('cores_logical')} logical cores, "
            f"{m.get('memory_gb')} GB), GPU: {m.get('gpu') or 'none'}; torch {v.get('torch')}, onnxruntime "
            f"{v.get('onnxruntime-gpu') or v.get('onnxruntime')}, tensorrt {v.get('tensorrt') or '-'}; "
            f"{min(stamps)} – {max(stamps)}; 1-min load average during the run {min(loads, default=0):.1f}–{max(loads, default=0):.1f}"
            f"{' — **QUICK run: placeholder numbers**' if quick else ''}.\n\n*Command*: "
            + "; ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in recs)))


def _short(text: str, n: int = 220) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _encoder(ok: list[dict[str, Any]]) -> list[str]:
    gpu = any(r.get("pct_of_peak") is not None for r in ok)
    cols = [("encoder", "encoder"), ("backend", "backend"), ("label", "engine"), ("device", "device"),
            ("batch_size", "batch"), ("tiles_per_s", "tiles/s"), ("ms_per_batch_median", "ms/batch")]
    cols += [("tflops", "TFLOP/s"), ("pct_of_peak", "% of fp16 peak")] if gpu else []
    return [md_table(ok, cols)]


def _pipeline(ok: list[dict[str, Any]]) -> list[str]:
    runs = [r for r in ok if r.get("kind") in ("end_to_end", "noop")]
    out = [md_table(runs, [("slide", "slide"), ("engine", "engine"), ("points", "points"), ("tiles_per_s", "tiles/s"),
                           ("stream_tiles_per_s", "stream tiles/s"), ("slide_seconds", "slide s"),
                           ("prepare_seconds", "prepare s"), ("other_seconds", "store+finalize s"),
                           ("stages.read_decode", "read+decode s"), ("stages.cut_resample", "cut+resample s"),
                           ("stages.encoder", "encoder s"), ("stages.head", "head s"), ("stages.write", "write s"),
                           ("peak_rss_mb", "peak RSS MB")])]
    out.append("")
    eng_rows = [{**r, "by_threads": ", ".join(f"{t}: {fmt(v)}" for t, v in (r.get("tiles_per_s_by_threads") or {}).items())}
                for r in ok if r.get("kind") == "engine_only"]
    out.append(md_table(eng_rows, [("slide", "engine only, tiles of"), ("engine", "engine"), ("tiles_per_s", "tiles/s"),
                                   ("threads", "intra-op threads"), ("by_threads", "tiles/s by intra-op threads"),
                                   ("tiles", "tiles")]))
    lines = sorted({r["engine_line"] for r in runs if r.get("engine_line") and r.get("kind") == "end_to_end"})
    if lines:
        out += ["", "hishrst-run said: " + "; ".join(f"`{x}`" for x in lines)]
    for s in (r for r in ok if r.get("kind") == "summary"):
        out += _pipeline_summary(s)
    return out + _reader_costs(ok)


def _pipeline_summary(s: dict[str, Any]) -> list[str]:
    out = ["", md_table([s], [("ratio_1x", "e2e/engine 1×"), ("ratio_4x", "e2e/engine 4×"),
                              ("stream_ratio_1x", "stream/engine 1×"), ("stream_ratio_4x", "stream/engine 4×"),
                              ("peak_rss_mb_1x", "RSS 1× MB"), ("peak_rss_mb_4x", "RSS 4× MB"),
                              ("rss_growth", "RSS growth"), ("ratio_met", "≥ 90 %"), ("rss_flat", "RSS flat")])]
    if s.get("cpu_budget_estimate_ratio") is not None:
        out.append("")
        out.append(md_table([s], [("cores", "physical cores"), ("engine_core_us_per_tile", "engine core-µs/tile (least)"),
                                  ("reader_us_per_tile", "reader µs/tile, 1 thread"),
                                  ("cpu_budget_e2e_tiles_per_s", "CPU-budget e2e estimate tiles/s"),
                                  ("cpu_budget_estimate_ratio", "CPU-budget estimate of e2e/engine")]))
    return out


def _reader_costs(ok: list[dict[str, Any]]) -> list[str]:
    costs = [{"slide": r["slide"], **{f"rc_{k}": v for k, v in r["reader_costs"]["us_per_tile"].items()},
              "rc_tiles": r["reader_costs"]["tiles"], "rc_chunks": r["reader_costs"]["chunks"]}
             for r in ok if r.get("kind") == "engine_only" and r.get("reader_costs")]
    if not costs:
        return []
    return ["", "Reader CPU per tile (µs, one thread, no contention; `reader_costs_child`):", "",
            md_table(costs, [("slide", "tiles of"), ("rc_tiles", "tiles"), ("rc_chunks", "chunks decoded"),
                             ("rc_decode", "decode"),
                             ("rc_cut_resample", "cut + resample (Pillow) + mosaic → numpy")])]


def _reference(ok: list[dict[str, Any]]) -> list[str]:
    rows = [{**r, "name": r["pipeline"] + (f" (num_workers={r['num_workers']})" if "num_workers" in r else ""),
             "stage_s": ", ".join(f"{k} {fmt(v)}" for k, v in (r.get("stages") or {}).items() if v is not None)}
            for r in ok if r.get("pipeline")]
    out = [md_table(rows, [("name", "pipeline"), ("engine", "engine"), ("points", "points"), ("tiles_per_s", "tiles/s"),
                           ("seconds", "seconds"), ("peak_rss_mb", "peak RSS MB"), ("tree_peak_rss_mb", "tree RSS MB"),
                           ("stage_s", "stage seconds (reader stages summed over threads)")])]
    for s in (r for r in ok if r.get("kind") == "summary"):
        out.append("")
        out.append(md_table([s], [("speedup", "ours / reference tiles/s"), ("speedup_vs", "vs"),
                                  ("rss_ratio_ref_over_ours", "reference / ours peak RSS"), ("target_met", "≥ 3×")]))
    return out


def _training(ok: list[dict[str, Any]]) -> list[str]:
    return [md_table([r for r in ok if r.get("kind") == "features"],
                     [("preset", "preset"), ("encoder", "encoder"), ("device", "device"), ("batch_size", "batch"),
                      ("tiles", "tiles"), ("tiles_per_s", "tiles/s")]),
            "",
            md_table([r for r in ok if r.get("kind") == "fit"],
                     [("preset", "preset"), ("device", "device"), ("train_spots", "train spots"), ("groups", "groups"),
                      ("n_genes", "genes"), ("epochs", "epochs"), ("seconds_per_epoch", "s/epoch")])]


def _transfer(ok: list[dict[str, Any]]) -> list[str]:
    return [md_table(ok, [("mode", "position mode"), ("pcc_within_recovery", "PCC within a section (recovery)"),
                          ("pcc_unseen_section", "PCC unseen section"), ("pcc_unseen_moved_5mm", "PCC same slide moved 5 mm"),
                          ("moved_minus_here", "moved − unmoved"), ("ridge_colour_pcc", "ridge on colour/stain stats"),
                          ("ratio_to_ridge", "model / ridge"), ("lr_within", "lr within"), ("lr_across", "lr across"),
                          ("genes", "genes"), ("preset", "preset"), ("seed", "seed")])]


def _direct_wsi(ok: list[dict[str, Any]]) -> list[str]:
    src = [r for r in ok if r.get("kind") == "source"]
    e2e = [{"kind": "whole hishrst-run", "direct": r["direct"]["tiles_per_s"], "direct_median": r["direct"]["median_tiles_per_s"],
            "omezarr": r["ome_zarr"]["tiles_per_s"], "omezarr_median": r["ome_zarr"]["median_tiles_per_s"],
            "best": r["direct_over_omezarr"], "median": r["median_direct_over_omezarr"]}
           for r in ok if r.get("kind") == "end_to_end"]
    ratios = [{"kind": "read + cut + resample", "best": r["direct_over_omezarr"], "median": r["median_direct_over_omezarr"]}
              for r in ok if r.get("kind") == "ratio"]
    return [md_table(src, [("source", "source"), ("tiles_per_s", "read+cut tiles/s (best)"),
                           ("median_tiles_per_s", "median"), ("points", "tiles"), ("decode_mpix_per_s", "decode MP/s"),
                           ("chunks", "chunk px"), ("passes", "passes")]),
            "", md_table(ratios + e2e, [("kind", "passes"), ("direct", "direct tiles/s (best)"),
                                        ("direct_median", "median"), ("omezarr", "OME-Zarr tiles/s (best)"),
                                        ("omezarr_median", "median"), ("best", "direct / OME-Zarr, best"),
                                        ("median", "direct / OME-Zarr, median")])]


def _pct(v: Any) -> float | None:
    return None if v is None else 100.0 * v


def _feed(ok: list[dict[str, Any]]) -> list[str]:
    feed = [r for r in ok if r.get("kind") == "feed"]
    out = [md_table(feed, [("slide_kind", "slide"), ("layout", "tile layout"), ("workers", "reader threads"),
                           ("tiles_per_s", "tiles/s (best)"), ("median_tiles_per_s", "median"), ("tiles", "tiles"),
                           ("level_mpp", "level read µm/px"), ("patch_side_px", "patch px"),
                           ("load_avg_before", "load before"), ("load_avg_after", "load after")])]
    scaling = [{**r, **{f"tps_{k}": v for k, v in r["tiles_per_s_by_threads"].items()},
                **{f"x_{k}": v for k, v in r["scaling"].items()}} for r in ok if r.get("kind") == "scaling"]
    if scaling:
        keys = sorted({k for r in scaling for k in r["scaling"]}, key=int)
        out += ["", md_table(scaling, [("slide_kind", "slide"), ("layout", "tile layout"),
                                       *[(f"tps_{k}", f"{k} thr tiles/s") for k in keys],
                                       *[(f"x_{k}", f"{k} thr / 1 thr") for k in keys if k != "1"]])]
    busy = [{**r, "busy_pct": _pct(r.get("busy_fraction_of_wall")), "span_pct": _pct(r.get("busy_fraction")),
             **{f"idle_{k}": v for k, v in (r.get("idle") or {}).items()}}
            for r in ok if r.get("kind") in ("engine_busy", "cpu_engine")]
    if busy:
        out += ["", md_table(busy, [("kind", "engine"), ("codec", "chunks"), ("layout", "tiles"),
                                    ("overlap", "overlap"), ("tiles", "tiles"), ("tiles_per_s_set", "engine set to tiles/s"),
                                    ("tiles_per_s", "run tiles/s"), ("busy_pct", "engine busy % of wall"),
                                    ("span_pct", "busy % of engine span"), ("idle_start_s", "idle: start s"),
                                    ("idle_between_slides_s", "between slides s"), ("idle_within_slides_s", "within s"),
                                    ("idle_end_s", "end s"), ("wall_s", "wall s"), ("load_avg_before", "load before")])]
    cpu = [r for r in ok if r.get("kind") == "cpu_engine"]
    if cpu:
        out += ["", md_table(cpu, [("encoder_onnx", "encoder"), ("overlap", "overlap"), ("engine_threads", "engine threads"),
                                   ("tiles_per_s", "end-to-end tiles/s"), ("engine_only_tiles_per_s", "engine alone tiles/s"),
                                   ("end_to_end_over_engine_only", "end to end ÷ engine alone")])]
    th = next((r.get("threads") for r in ok if r.get("threads")), None)
    if th:
        env = ", ".join(f"{k}={v}" for k, v in th["env"].items() if v is not None) or "none set"
        out += ["", f"Threads: {th['cores_usable']} usable cores, {th['physical_cores']} physical; thread variables: {env}."]
    return out


def _gpu(ok: list[dict[str, Any]]) -> list[str]:
    rows = [{**r, "ratio_pct": _pct(r.get("e2e_over_engine"))} for r in ok if r.get("kind") == "step"]
    gpus = sorted({r["gpu_name"] for r in rows if r.get("gpu_name")})
    return [f"GPU: {', '.join(gpus) or 'unknown'}", "",
            md_table(rows, [("step", "step"), ("label", "engine"), ("batch_size", "batch"), ("tiles_per_s", "tiles/s"),
                            ("ms_per_batch_median", "ms/batch"), ("iters", "calls"),
                            ("stream_tiles_per_s", "hishrst-run stream tiles/s"), ("points", "slide tiles"),
                            ("ratio_pct", "e2e % of ORT-CUDA engine")])]


def _baselines(ok: list[dict[str, Any]]) -> list[str]:
    rows = [{**r, "yes_mean": "yes" if r.get("beats_mean_mse") else "NO",
             "yes_ridge": "yes" if r.get("beats_ridge_pcc") else "NO"} for r in ok if not r.get("note")]
    return [md_table(rows, [("config", "config"), ("preset", "preset"), ("seed", "seed"), ("heldout", "unseen"),
                            ("pcc", "model PCC"), ("ridge_pcc", "ridge PCC"), ("mse", "model MSE"),
                            ("mean_mse", "training-mean MSE"), ("ridge_mse", "ridge MSE"), ("yes_ridge", "PCC ≥ ridge"),
                            ("yes_mean", "MSE < mean"), ("load_avg_1m", "load")]),
            "", "Records relabelled after the fact (their `note` says why) are left out of this table."]


def _claim(ok: list[dict[str, Any]]) -> list[str]:
    return [md_table([r for r in ok if r.get("kind") == "makespan"],
                     [("mode", "mode"), ("repeat", "repeat"), ("workers", "workers"), ("slides", "slides"),
                      ("makespan_s", "makespan s"), ("busiest_worker_s", "busiest worker s"),
                      ("lower_bound_s", "lower bound s"), ("load_avg_before", "load before")])]


def _int8(ok: list[dict[str, Any]]) -> list[str]:
    return [md_table(ok, [("encoder", "encoder"), ("weights", "weights"), ("threads", "threads"), ("batch", "batch"),
                          ("fp32.tiles_per_s_best", "fp32 tiles/s"), ("int8.tiles_per_s_best", "int8 tiles/s"),
                          ("speedup_best", "speed-up (best)"), ("speedup_median", "speed-up (median)"),
                          ("parity.cosine_mean", "cosine"), ("parity.centred_cosine_mean", "centred cosine"),
                          ("parity.feature_pcc_mean", "feature PCC"), ("load_avg_1m_before_timing", "load")])]


def _threads(ok: list[dict[str, Any]]) -> list[str]:
    return [md_table(ok, [("busy_cores", "cores kept busy by others"), ("threads_option", "--threads"),
                          ("chosen", "chosen"), ("epochs", "epochs"), ("wall_s", "fit wall s"),
                          ("load_avg_1m", "load")])]


def _subspot(ok: list[dict[str, Any]]) -> list[str]:
    rows = [{**r, "meets": "yes" if r.get("meets_pcc") else "NO"} for r in ok]
    return [md_table(rows, [("preset", "preset"), ("seed", "seed"), ("pcc_8um_subspot", "sub-spot PCC 8 µm"),
                            ("pcc_8um_interpolated_spots", "spot model interpolated"),
                            ("pcc_8um_spot_grid_16um", "spot model at a 16 µm grid"), ("gain_vs_interpolated", "gain"),
                            ("meets", "≥ interp. + 0.05 and ≥ grid"), ("pcc_16um_subspot", "sub-spot 16 µm"),
                            ("pcc_16um_interpolated_spots", "interp. 16 µm"), ("ssim_8um_subspot", "SSIM 8 µm sub-spot"),
                            ("ssim_8um_interpolated_spots", "SSIM interp."), ("passes_ratio", "encoder passes: grid ÷ sub-spot"),
                            ("spots_subspot.pcc", "spot-level PCC sub-spot"), ("spots_spot.pcc", "spot-level PCC spot head"),
                            ("load_avg_1m", "load")])]


def _bins_run(ok: list[dict[str, Any]]) -> list[str]:
    runs = [r for r in ok if r.get("run") != "ratios"]
    ratios = [r for r in ok if r.get("run") == "ratios"]
    return [md_table(runs, [("run", "run"), ("slide", "slide"), ("points", "points / bins"), ("seconds", "s"),
                            ("rate", "points or bins / s"), ("peak_rss_mb", "peak RSS MB (process tree)"),
                            ("torch_imported", "torch imported"), ("load_avg_1m", "load")]), "",
            md_table(ratios, [("bins_per_s_over_points_per_s", "bins/s ÷ points/s"),
                              ("large_bins", "bins of the large run"),
                              ("large_rss_over_spot_rss", "its peak RSS ÷ the spot run's")])]


#: The tables of each benchmark's section, from its successful records.
_TABLES: dict[str, Callable[[list[dict[str, Any]]], list[str]]] = {
    "encoder": _encoder, "pipeline": _pipeline, "reference": _reference, "training": _training,
    "transfer": _transfer, "direct_wsi": _direct_wsi, "feed": _feed, "gpu": _gpu, "baselines": _baselines,
    "claim": _claim, "int8": _int8, "threads": _threads, "subspot": _subspot, "bins_run": _bins_run,
}
#: The benchmarks ``main`` renders, in order.
SECTIONS = ("encoder", "gpu", "pipeline", "feed", "reference", "training", "direct_wsi", "transfer", "baselines",
            "claim", "int8", "threads", "subspot", "bins_run")


def section(name: str, recs: list[dict[str, Any]], *, title: str | None = None) -> str:
    ok = [r for r in recs if r.get("status", "ok") == "ok"]
    skipped = [r for r in recs if r.get("status") in ("skipped", "failed")]
    out = [f"### {title or name}", "", _machine(recs), ""]
    if name in _TABLES:
        out += _TABLES[name](ok)
    if skipped:
        out += ["", "Not measured:", *[f"- {' '.join(str(r.get(k)) for k in ('encoder', 'backend', 'step', 'batch_size') if r.get(k) is not None)}"
                                       f"{' (failed)' if r['status'] == 'failed' else ''}: {_short(r['reason'])}" for r in skipped]]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=RESULTS_DIR, help="folder of <name>.jsonl files")
    p.add_argument("--md", type=Path, default=None, help="write the Markdown here (default: stdout only)")
    args = p.parse_args(argv)
    parts = []
    for name in SECTIONS:
        files = sorted(args.dir.glob(f"{name}*.jsonl"), key=lambda f: (f.stem != name, f.stem))
        for f in files:  # <name>.jsonl first, then variants such as pipeline-whatif-ort-nospin.jsonl
            if f.stat().st_size:
                parts.append(section(name, read_jsonl(f), title=f.stem))
    text = "\n".join(parts) or f"no results in {args.dir}\n"
    print(text)
    if args.md:
        args.md.write_text(text)
    return text


if __name__ == "__main__":
    main()
