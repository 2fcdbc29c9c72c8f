"""Ours vs a reference-style pipeline on the same slide, points and encoder, each in a fresh subprocess.

The reference is built the way the reference HisHRST code works: the whole full-resolution image read
into memory (``tifffile.imread``), one patch at a time through PIL and torchvision transforms
(``Compose([Resize, ToTensor, Normalize])``) in a ``Dataset`` served by a torch ``DataLoader``
(same batch size as ours; ``num_workers`` 0 and 2), the encoder and the HisHRST head in eager
PyTorch, the result written as ``.h5ad``. Ours is ``hishrst-run`` with ONNX Runtime on the CPU, reading
the OME-Zarr copy of the same image and computing the same grid points (its time includes tissue
detection and laying the grid, which the reference is handed for free).

Reported: tiles/s of both (points / seconds from reading the image to the written output; engine
loading and interpreter start-up excluded for both) and their ratio (target: ours ≥ 3× on the CPU with
the test encoder), and peak RSS of both.

    python -m benchmarks.reference           # dlpfc preset
    python -m benchmarks.reference --quick   # small preset
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import JsonlWriter, base_parser, count_list, mb, print_table, run_child
from benchmarks._data import prepare_data

TARGET_SPEEDUP = 3.0


def reference_child(image: str, points_file: str, run_dir: str, mpp: float, batch_size: int, num_workers: int,
                    out_path: str, threads: int | None = None) -> dict:
    """The reference-style pipeline (see the module docstring); returns its timings."""
    import anndata as ad
    import tifffile
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from hishrst_runtime.core.grouping import group_points
    from hishrst_runtime.core.patches import patch_side_px
    from hishrst_train.encoders import load_encoder
    from hishrst_train.train import load_checkpoint, predict

    if threads:
        torch.set_num_threads(threads)
    model, config = load_checkpoint(Path(run_dir))
    enc = load_encoder(config["encoder"]["name"], weights=config["encoder"].get("weights"))
    backbone = enc.backbone.eval()
    pts = np.load(points_file)
    side = patch_side_px(float(config["patch"]["size_um"]), mpp)
    size = int(enc.input_size)
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                             transforms.Normalize(mean=list(enc.spec.mean), std=list(enc.spec.std))])

    t0 = time.perf_counter()
    img = tifffile.imread(image)  # the whole full-resolution image in memory
    t_read = time.perf_counter() - t0

    class Patches(Dataset):
        def __len__(self) -> int:
            return len(pts)

        def __getitem__(self, i: int) -> Any:
            x, y = pts[i]
            x0, y0 = max(round(float(x) - side / 2), 0), max(round(float(y) - side / 2), 0)
            return tf(Image.fromarray(img[y0 : y0 + side, x0 : x0 + side]))

    t1 = time.perf_counter()
    feats = []
    with torch.no_grad():
        for batch in DataLoader(Patches(), batch_size=batch_size, shuffle=False, num_workers=num_workers):
            feats.append(backbone(batch))
    f = torch.cat(feats).numpy()
    t_enc = time.perf_counter() - t1
    t1 = time.perf_counter()
    groups = group_points(pts, max_size=int(config["grouping"]["max_size"]))
    pred = predict(model, f, pts * mpp, groups=groups)
    t_head = time.perf_counter() - t1
    t1 = time.perf_counter()
    a = ad.AnnData(X=pred)
    a.obsm["spatial"] = pts
    a.write_h5ad(out_path)
    t_write = time.perf_counter() - t1
    seconds = time.perf_counter() - t0
    return {"points": len(pts), "seconds": seconds, "tiles_per_s": len(pts) / seconds, "threads": torch.get_num_threads(),
            "stages": {"read_whole_image": t_read, "patches_transforms_encoder": t_enc, "head": t_head, "write": t_write}}


def _points(slide: Path, bundle: Path, out: Path) -> int:
    """The grid points ``hishrst-run`` lays on ``slide`` (level-0 px), saved for the reference."""
    from hishrst_runtime.bundle.manifest import load_bundle
    from hishrst_runtime.inference.pipeline import prepare_slide

    prep = prepare_slide(slide, load_bundle(bundle))
    np.save(out, np.asarray(prep.points_px, dtype=np.float64))
    n = len(prep.points_px)
    prep.close()
    return n


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser("reference", __doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64, help="batch size of both pipelines (default 64)")
    p.add_argument("--ref-workers", type=count_list, default=[0, 2], help="DataLoader num_workers values (default 0,2)")
    p.add_argument("--repeats", type=int, default=1, help="runs per pipeline (the fastest is reported)")
    return p.parse_args(argv)


@dataclasses.dataclass
class _Plan:
    """The slide, its points and the fitted run both pipelines are given."""

    args: argparse.Namespace
    slide: Path
    run_dir: Path
    bundle: Path
    image: Path
    mpp: float
    pts_file: Path
    n_points: int
    scratch: Path
    common: dict[str, Any]


def _setup(args: argparse.Namespace) -> _Plan:
    from hishrst_train.synth import PRESETS

    data = prepare_data(args)
    preset, work = data.preset, data.work
    slide = data.slides["1x"]
    assert data.run_dir is not None and data.bundle is not None
    pts_file = work / f"points-{preset}-1x.npy"
    n_points = _points(slide, data.bundle, pts_file)
    common = {"preset": preset, "slide": f"{preset}-1x", "encoder": "test-vit", "batch_size": args.batch_size, "points": n_points}
    return _Plan(args, slide, data.run_dir, data.bundle, work / f"synth-{preset}" / "image.tif",
                 float(PRESETS[preset].mpp), pts_file, n_points, work / "out-reference", common)


def _best(plan: _Plan, target: str, kw: dict[str, Any], key: str) -> dict[str, Any]:
    """``--repeats`` fresh-process runs of ``target`` on a clean scratch folder; the one with the least ``key``."""
    runs = []
    for _ in range(max(1, plan.args.repeats)):
        shutil.rmtree(plan.scratch, ignore_errors=True)
        plan.scratch.mkdir(parents=True)
        runs.append(run_child(target, kw))
    shutil.rmtree(plan.scratch, ignore_errors=True)
    return min(runs, key=lambda r: r[key])


def _measure_ours(out: JsonlWriter, plan: _Plan) -> dict[str, Any]:
    print(f"ours: hishrst-run {plan.slide.name} --provider cpu ...", flush=True)
    o = _best(plan, "benchmarks.pipeline:run_pipeline_child", {"slide": str(plan.slide), "bundle": str(plan.bundle),
              "out_dir": str(plan.scratch), "provider": "cpu", "batch_size": plan.args.batch_size, "workers": None},
              "slide_seconds")
    if o["points"] != plan.n_points:
        raise RuntimeError(f"hishrst-run computed {o['points']} points, the reference was given {plan.n_points}")
    return out.write({**plan.common, "pipeline": "ours", "status": "ok", "engine": o["engine"],
                      "tiles_per_s": o["points"] / o["slide_seconds"], "seconds": o["slide_seconds"],
                      "stages": {**o["stages"], "prepare": o["prepare_seconds"]},
                      "peak_rss_mb": mb(o["child_maxrss_bytes"]), "tree_peak_rss_mb": mb(o["tree_peak_rss_bytes"]),
                      "process_wall_s": o["process_wall_s"], "torch_imported": o["torch_imported"]})


def _measure_reference(out: JsonlWriter, plan: _Plan, nw: int) -> dict[str, Any]:
    print(f"reference: tifffile.imread + PIL/torchvision + DataLoader(num_workers={nw}) + eager torch ...", flush=True)
    r = _best(plan, "benchmarks.reference:reference_child", {"image": str(plan.image), "points_file": str(plan.pts_file),
              "run_dir": str(plan.run_dir), "mpp": plan.mpp, "batch_size": plan.args.batch_size, "num_workers": nw,
              "out_path": str(plan.scratch / "reference.h5ad")}, "seconds")
    return out.write({**plan.common, "pipeline": "reference", "status": "ok", "num_workers": nw,
                      "engine": "torch eager fp32", "tiles_per_s": r["tiles_per_s"], "seconds": r["seconds"],
                      "stages": r["stages"], "threads": r["threads"], "peak_rss_mb": mb(r["child_maxrss_bytes"]),
                      "tree_peak_rss_mb": mb(r["tree_peak_rss_bytes"]), "process_wall_s": r["process_wall_s"]})


def _summary(plan: _Plan, ours: dict[str, Any], refs: list[dict[str, Any]]) -> dict[str, Any]:
    fastest = max(refs, key=lambda r: r["tiles_per_s"])
    mem_ref = next((r for r in refs if r["num_workers"] == 0), fastest)
    return {**plan.common, "kind": "summary", "status": "ok", "speedup": ours["tiles_per_s"] / fastest["tiles_per_s"],
            "speedup_vs": f"reference num_workers={fastest['num_workers']} (the fastest)",
            "speedup_by_workers": {str(r["num_workers"]): ours["tiles_per_s"] / r["tiles_per_s"] for r in refs},
            "rss_ratio_ref_over_ours": mem_ref["peak_rss_mb"] / ours["peak_rss_mb"],
            "rss_ratio_vs": f"reference num_workers={mem_ref['num_workers']} (own process peak RSS)",
            "target_speedup": TARGET_SPEEDUP, "target_met": ours["tiles_per_s"] / fastest["tiles_per_s"] >= TARGET_SPEEDUP}


def _print_report(args: argparse.Namespace, ours: dict[str, Any], refs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    rows = [{**r, "name": r["pipeline"] + (f" (workers={r['num_workers']})" if "num_workers" in r else "")}
            for r in [ours, *refs]]
    print_table(rows, [("name", "pipeline"), ("engine", "engine"), ("points", "points"), ("tiles_per_s", "tiles/s"),
                       ("seconds", "seconds"), ("peak_rss_mb", "peak RSS MB"), ("tree_peak_rss_mb", "tree RSS MB"),
                       ("process_wall_s", "process s")],
                title=f"ours vs reference-style pipeline ({'quick' if args.quick else 'full'} run, batch {args.batch_size})")
    print(f"\nours / reference throughput: {summary['speedup']:.2f}× (vs {summary['speedup_vs']}; target ≥ {TARGET_SPEEDUP:g}×)")
    print(f"reference / ours peak RSS: {summary['rss_ratio_ref_over_ours']:.2f}× ({summary['rss_ratio_vs']})")
    print(f"-> {args.out}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = _parse_args(argv)
    plan = _setup(args)
    with JsonlWriter(args.out, benchmark="reference", quick=args.quick, append=args.append) as out:
        ours = _measure_ours(out, plan)
        refs = [_measure_reference(out, plan, nw) for nw in args.ref_workers]
        summary = out.write(_summary(plan, ours, refs))
        _print_report(args, ours, refs, summary)
        return out.records


if __name__ == "__main__":
    main()
