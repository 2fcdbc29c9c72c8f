"""Sub-spot runs at run time: bins/s and memory of ``hishrst-run --resolution 8um`` against today's spot grid.

Two bundles of one encoder (``test-vit-uni``: UNI's token geometry, 224-px tiles, random weights; the speed does
not depend on the weights, so each head is fitted for one epoch on the sub-spot benchmark's synthetic ``dlpfc``
sections): a spot bundle and a sub-spot bundle, exported as ``hishrst export`` does. Each run is ``run_slides``
(what ``hishrst-run`` runs, CPU provider, default threads, AnnData output) in a fresh process
(:func:`benchmarks._common.run_child`: peak RSS of the process tree, torch never imported):

* ``spot-50um`` — the spot bundle at the default 50 µm hex grid over section 2's slide (the ~17k-point run of the
  issue); points/s;
* ``subspot-8um`` — the sub-spot bundle at 8 µm bins over the same slide; bins/s;
* ``subspot-8um-large`` — the sub-spot bundle over a larger synthetic slide (``--large-side-um``, cached) with
  ≥ 1,000,000 bins: peak RSS against the 17k-point run.

The done-when of issue #17: bins/s ≥ 20 × the spot run's points/s; the ≥ 1 M-bin run's peak RSS ≤ 1.5 × the
17k-point run's.

    python -m benchmarks.bins_run --append
    python -m benchmarks.bins_run --quick        # small preset, a small "large" slide: a smoke run
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks._common import JsonlWriter, base_parser, load_average, mb, print_table, run_child, workdir_of


def bundles(work: Path, preset: str) -> dict[str, Path]:
    """Spot and sub-spot bundles of ``test-vit-uni`` (one-epoch fits on sections 0 and 1; cached)."""
    from benchmarks.subspot import ENCODER, sections
    from hishrst_export.bundle import export_bundle
    from hishrst_train.tasks import fit_run

    outs = sections(work, 0, preset)
    found: dict[str, Path] = {}
    for head in ("spot", "subspot"):
        bdir = work / "bundles" / f"bins-{preset}-{head}"
        if not (bdir / "manifest.json").is_file():
            run = work / "runs" / f"bins-{preset}-{head}"
            fit_run(outs[:2], out=run, task="full", encoder=ENCODER, allow_test_encoder=True, head=head,  # type: ignore[arg-type]
                    epochs=1, cache_dir=work / "cache", progress=False, overwrite=True)
            export_bundle(run, out=bdir, overwrite=True, echo=lambda _m: None)
        found[head] = bdir
    found["section"] = outs[2].parent
    return found


def section_slide(work: Path, section: Path) -> Path:
    """Section 2's H&E as an OME-Zarr slide (cached)."""
    from hishrst_runtime.slides.convert import convert_slide

    slide = work / "slides" / f"{section.parent.name}-{section.name}.ome.zarr"
    if not (slide / "zarr.json").exists() and not (slide / ".zattrs").exists():
        slide.parent.mkdir(parents=True, exist_ok=True)
        convert_slide(section / "image.tif", slide, overwrite=True, progress=False)
    return slide


def run_once(slide: str, bundle: str, out: str, resolution: str | None) -> dict[str, Any]:
    """``run_slides`` on one slide (a :func:`run_child` target): points, seconds, rate."""
    import shutil

    from hishrst_runtime.jobs.runner import run_slides

    shutil.rmtree(out, ignore_errors=True)
    kw = {"resolution": resolution} if resolution else {}
    t0 = time.perf_counter()
    res = run_slides([Path(slide)], bundle_dir=Path(bundle), out_dir=Path(out), provider="cpu", progress=False,
                     echo=lambda _m: None, **kw)[0]
    wall = time.perf_counter() - t0
    if res.status != "ok":
        raise RuntimeError(f"{slide}: {res.reason}")
    return {"points": int(res.points), "seconds": wall, "rate": res.points / wall, "tiles_per_s": res.tiles_per_s}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = base_parser("bins_run", __doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["dlpfc", "small"], default=None, help="default dlpfc; --quick: small")
    p.add_argument("--large-side-um", type=float, default=None,
                   help="side of the large synthetic slide (µm; default 13000 → ≥ 1 M bins; --quick 2000)")
    args = p.parse_args(argv)
    from benchmarks._synth_wsi import ensure_zarr

    preset = args.preset or ("small" if args.quick else "dlpfc")
    work = workdir_of(args)
    b = bundles(work, preset)
    slide = section_slide(work, b["section"])
    large = ensure_zarr(work / "slides", side_um=args.large_side_um or (2000.0 if args.quick else 13000.0), mpp=0.5)
    writer = JsonlWriter(args.out, benchmark="bins_run", quick=args.quick, append=args.append)
    rows = []
    for name, sl, bundle, res in (("spot-50um", slide, b["spot"], None), ("subspot-8um", slide, b["subspot"], "8um"),
                                  ("subspot-8um-large", large, b["subspot"], "8um")):
        r = run_child("benchmarks.bins_run:run_once", {"slide": str(sl), "bundle": str(bundle),
                                                        "out": str(work / "bins_out" / name), "resolution": res})
        rows.append(writer.write({"status": "ok", "run": name, "slide": Path(sl).name, "preset": preset, **r,
                                  "peak_rss_mb": mb(r["tree_peak_rss_bytes"]), "load_end": load_average()}))
    spot, sub, big = rows
    summary = {"status": "ok", "run": "ratios", "bins_per_s_over_points_per_s": sub["rate"] / spot["rate"],
               "large_rss_over_spot_rss": big["peak_rss_mb"] / spot["peak_rss_mb"], "large_bins": big["points"]}
    rows.append(writer.write(summary))
    writer.close()
    print_table(rows[:3], [("run", "run"), ("points", "points / bins"), ("seconds", "s"), ("rate", "per s"),
                           ("peak_rss_mb", "peak RSS MB"), ("torch_imported", "torch"), ("load_avg_1m", "load")])
    print(f"bins/s ÷ points/s = {summary['bins_per_s_over_points_per_s']:.1f}; "
          f"{big['points']:,} bins: peak RSS {summary['large_rss_over_spot_rss']:.2f} × the spot run's")
    return rows


if __name__ == "__main__":
    main()
