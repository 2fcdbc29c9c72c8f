"""Cross-section transfer on synthetic sections: does a model work on a slide it never saw, wherever the
tissue lies on that slide?

Three synthetic sections share one expression model (``hishrst synth --sections 3``; seed 11 — not the
seed the tests use) but differ in tissue shape, arrangement, array rotation and placement (``--quick``:
not placement). For each position mode (``relative``, ``continuous``, ``none``):

* **within a section** — ``hishrst fit S0 --task recovery`` then ``hishrst evaluate``: held-out PCC;
* **across sections** — ``hishrst fit S0 S1 --task full``, ``hishrst export``, then the *runtime*
  (``hishrst-run SLIDE2 --points S2/outs``) on section 2's slide, scored against its measured expression;
* **moved** — the same, on section 2's slide moved 5 mm (its image pasted 5 mm further right and down on a
  larger canvas of glass; the points moved with it).

Each fit is run with learning rates 1e-3 (the paper's), 3e-4 and 1e-4 (``--lr``) and the run with the lowest
validation MSE is kept — chosen on the training sections' validation groups only, never on section 2.

Baseline: ridge regression (sklearn ``RidgeCV``) from simple colour / stain statistics of the same patches
(RGB mean, std and 10/50/90 % quantiles of grey; haematoxylin / eosin / DAB means and stds from
``skimage.color.rgb2hed``), trained on S0 + S1 and scored on S2 like the model.

PCC: mean over genes of the per-gene Pearson correlation across spots, genes constant in the prediction
counted as 0 (``hishrst_train.metrics``).

    python -m benchmarks.transfer            # ~1,000 spots per section, 60 epochs at most (≈ 20 min, 2 cores)
    python -m benchmarks.transfer --quick    # small preset, sections not shifted on their slides, few epochs: a smoke run
"""

from __future__ import annotations

import csv
import dataclasses
import warnings
from pathlib import Path
from typing import Any

from hishrst_runtime.core.vocab import UM_POSITION_MODES

import numpy as np

from benchmarks._common import JsonlWriter, base_parser, print_table, str_list, workdir_of
from benchmarks._data import TEST_ENCODER

#: Mid-sized synthetic section: ~1,400 in-tissue spots, 600 genes.
MEDIUM = dict(n_rows=40, n_cols=64, mpp=0.6, n_genes=600, margin_um=120.0,
              layer_um=(150, 130, 420, 130, 300, 330), depth_at_centre=0.55, mean_umis=3000.0)
MOVE_UM = 5000.0


def _preset(quick: bool) -> Any:
    from hishrst_train.synth import PRESETS, SynthPreset

    return PRESETS["small"] if quick else SynthPreset(**MEDIUM)  # type: ignore[arg-type]


def _truth(outs: Path, genes: list[str], target_sum: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(spots' level-0 px [N, 2], measured log1p-normalised expression [N, G], barcodes) of one section."""
    from hishrst_train.data.sections import load_adata, parse_section
    from hishrst_train.preprocess import log_expression

    a = load_adata(parse_section(outs))
    x = log_expression(a, genes, target_sum=target_sum)
    return np.asarray(a.obsm["spatial"], np.float64), np.asarray(x, np.float64), list(a.obs_names)


def _mean_pcc(pred: np.ndarray, truth: np.ndarray) -> float:
    from hishrst_train.metrics import per_gene_metrics, summarise

    return float(summarise(per_gene_metrics(pred, truth))["pcc_mean_constant_as_zero"])


def _moved_slide(image_tif: Path, out: Path, *, move_px: int) -> Path:
    """``image_tif`` pasted ``move_px`` further right and down on a larger canvas of its own glass colour."""
    import tifffile

    from hishrst_runtime.slides.tiff import tiff_pixel_size

    img = tifffile.imread(image_tif)
    glass = np.median(np.concatenate([img[:8].reshape(-1, 3), img[-8:].reshape(-1, 3)]), axis=0).astype(np.uint8)
    canvas = np.empty((img.shape[0] + move_px, img.shape[1] + move_px, 3), np.uint8)
    canvas[:] = glass
    canvas[move_px:, move_px:] = img
    with tifffile.TiffFile(image_tif) as tif:
        mpp = tiff_pixel_size(tif)[0]
    if mpp is None:
        raise RuntimeError(f"{image_tif}: no pixel size")
    tifffile.imwrite(out, canvas, tile=(512, 512), compression="zlib", photometric="rgb",
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
                     description=f"Aperio Image|MPP = {mpp}")
    return out


def _points_csv(path: Path, xy: np.ndarray, ids: list[str]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "x", "y"])
        w.writerows([i, f"{x:.3f}", f"{y:.3f}"] for i, (x, y) in zip(ids, xy))
    return path


def _runtime_at_points(slide: Path, points: Path, bundle: Path, out: Path) -> np.ndarray:
    """``hishrst-run SLIDE --points FILE`` through the CLI; returns X in the file's row order."""
    import anndata as ad
    from click.testing import CliRunner

    from hishrst_runtime.cli.run import run as run_cmd

    r = CliRunner().invoke(run_cmd, [str(slide), "--bundle", str(bundle), "--out", str(out), "--points",
                                     str(points), "--provider", "cpu", "--overwrite", "--no-progress"])
    if r.exit_code != 0:
        raise RuntimeError(f"hishrst-run failed ({r.exit_code}): {r.output}")
    store = next(p for p in out.glob("*.zarr") if not p.name.endswith(".sdata.zarr"))
    return np.asarray(ad.read_zarr(store).X, np.float64)


def _colour_features(image_path: Path, xy: np.ndarray, *, patch_um: float, mpp: float) -> np.ndarray:
    """Colour / stain statistics [N, 18] of the patches the model sees (same size, same centres)."""
    from skimage.color import rgb2hed

    from hishrst_runtime.core.patches import cut_patches, patch_side_px
    from hishrst_train.data import open_fullres_image

    img = open_fullres_image(image_path)
    side = patch_side_px(patch_um, mpp)
    feats = []
    for i in range(0, len(xy), 256):
        p = cut_patches(img, xy[i:i + 256], side=side, out_size=64).astype(np.float64) / 255.0
        grey = p.mean(-1).reshape(len(p), -1)
        hed = rgb2hed(p.reshape(-1, 64, 3)).reshape(len(p), -1, 3)
        rgb = p.reshape(len(p), -1, 3)
        feats.append(np.concatenate([rgb.mean(1), rgb.std(1), np.quantile(grey, [0.1, 0.5, 0.9], axis=1).T,
                                     hed.mean(1), hed.std(1), grey.std(1, keepdims=True)], axis=1))
    return np.concatenate(feats)


def _ridge(train: list[tuple[np.ndarray, np.ndarray]], test: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([f for f, _ in train])
    y = np.concatenate([t for _, t in train])
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    return model.fit(x, y).predict(test)


@dataclasses.dataclass
class _Data:
    outs: list[Path]
    slide2: Path
    moved2: Path
    move_px: int


def _prepare(work: Path, *, quick: bool, seed: int) -> _Data:
    from hishrst_runtime.slides.convert import convert_slide
    from hishrst_train.synth import make_synthetic_sections

    root = work / f"transfer-{'quick' if quick else 'medium'}-{seed}"
    p = _preset(quick)
    if not (root / "data" / "sections.json").exists():
        # --quick: every section at the origin of its slide (no placement shift of up to 2 mm per axis):
        # smaller images to render, convert and move; the 5 mm move below is kept
        shift = {"max_shift_um": 0.0} if quick else {}
        make_synthetic_sections(root / "data", 3, seed=seed, preset=p, compression="zlib", **shift)
    outs = [root / "data" / f"section_{k}" / "outs" for k in range(3)]
    move_px = int(round(MOVE_UM / p.mpp))
    slide2 = root / "section2.ome.zarr"
    if not slide2.exists():
        convert_slide(outs[2].parent / "image.tif", slide2, progress=False)
    moved2 = root / "section2_moved5mm.ome.zarr"
    if not moved2.exists():
        tif = _moved_slide(outs[2].parent / "image.tif", root / "section2_moved5mm.tif", move_px=move_px)
        convert_slide(tif, moved2, progress=False)
        tif.unlink()
    return _Data(outs, slide2, moved2, move_px)


def _fit_best(data: Any, out: Path, *, lrs: list[float], **kw: Any) -> float:
    """Fit once per learning rate and keep the run with the lowest validation MSE (training spots only:
    the held-out / unseen section plays no part in the choice); returns the chosen learning rate."""
    import shutil

    from hishrst_train.tasks import fit_run

    if not lrs:
        raise SystemExit("--lrs: give at least one learning rate")
    best: tuple[float, float] | None = None
    for lr in lrs:
        tmp = out.with_name(f"{out.name}-lr{lr:g}")
        val = float(fit_run(data, out=tmp, lr=lr, **TEST_ENCODER, **kw)["best_val_mse"])
        if best is None or val < best[0]:
            best = (val, lr)
    best = best or (0.0, lrs[0])
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(out.with_name(f"{out.name}-lr{best[1]:g}"), out)
    return best[1]


def _one_mode(mode: str, d: _Data, work: Path, *, epochs: int, seed: int, cache: Path, lrs: list[float]
              ) -> dict[str, Any]:
    import json

    from hishrst_export import export_bundle
    from hishrst_train.evaluate import evaluate_run

    kw = dict(epochs=epochs, seed=seed, position_mode=mode, progress=False, cache_dir=cache, overwrite=True)
    within = work / f"within-{mode}"
    lr_within = _fit_best(d.outs[0], within, task="recovery", lrs=lrs, **kw)
    pcc_within = float(evaluate_run(within, ssim=False, ari=False)["model"]["pcc_mean_constant_as_zero"])
    run = work / f"across-{mode}"
    lr_across = _fit_best(d.outs[:2], run, task="full", lrs=lrs, **kw)
    bundle = work / f"bundle-{mode}"
    export_bundle(run, out=bundle, overwrite=True, echo=lambda s: None)
    config = json.loads((run / "config.json").read_text())
    xy, truth, ids = _truth(d.outs[2], config["genes"], float(config["preprocessing"]["target_sum"]))
    here = _runtime_at_points(d.slide2, _points_csv(work / "points2.csv", xy, ids), bundle, work / f"pred-{mode}")
    moved = _runtime_at_points(d.moved2, _points_csv(work / "points2_moved.csv", xy + d.move_px, ids), bundle,
                               work / f"pred-moved-{mode}")
    return {"mode": mode, "pcc_within_recovery": round(pcc_within, 4),
            "pcc_unseen_section": round(_mean_pcc(here, truth), 4),
            "pcc_unseen_moved_5mm": round(_mean_pcc(moved, truth), 4), "genes": len(config["genes"]),
            "lr_within": lr_within, "lr_across": lr_across,
            "config": config, "xy": xy, "truth": truth}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = base_parser("transfer", __doc__.split("\n\n")[0])
    p.add_argument("--modes", type=str_list, default=list(UM_POSITION_MODES), help="position modes")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (early stopping; default 40, --quick 5)")
    p.add_argument("--seed", type=int, default=11, help="seed of the synthetic sections (tests use 0)")
    p.add_argument("--lrs", type=str_list, default=None,
                   help="learning rates tried per fit, the lowest validation MSE kept (default 1e-3,3e-4,1e-4; --quick 1e-3)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    epochs = args.epochs or (5 if args.quick else 60)
    lrs = [float(v) for v in (args.lrs or (["1e-3"] if args.quick else ["1e-3", "3e-4", "1e-4"]))]
    work = workdir_of(args)
    d = _prepare(work, quick=args.quick, seed=args.seed)
    runs = work / f"transfer-runs-{'quick' if args.quick else 'medium'}-{args.seed}"
    runs.mkdir(exist_ok=True)
    writer = JsonlWriter(args.out, benchmark="transfer", quick=args.quick, append=args.append)
    rows, ridge = [], None
    for mode in args.modes:
        r = _one_mode(mode, d, runs, epochs=epochs, seed=0, cache=runs / "cache", lrs=lrs)
        if ridge is None:
            cfg = r["config"]
            patch_um, mpp = float(cfg["patch"]["size_um"]), float(cfg["patch"]["train_mpp"])
            train = []
            for k in (0, 1):
                xy, t, _ = _truth(d.outs[k], cfg["genes"], float(cfg["preprocessing"]["target_sum"]))
                train.append((_colour_features(d.outs[k].parent / "image.tif", xy, patch_um=patch_um, mpp=mpp), t))
            test = _colour_features(d.outs[2].parent / "image.tif", r["xy"], patch_um=patch_um, mpp=mpp)
            ridge = round(_mean_pcc(_ridge(train, test), r["truth"]), 4)
        rec = {k: v for k, v in r.items() if k not in ("config", "xy", "truth")}
        rec.update(status="ok", ridge_colour_pcc=ridge, ratio_to_ridge=round(rec["pcc_unseen_section"] / ridge, 3),
                   moved_minus_here=round(rec["pcc_unseen_moved_5mm"] - rec["pcc_unseen_section"], 4),
                   epochs_max=epochs, seed=args.seed, preset="small" if args.quick else "medium")
        rows.append(writer.write(rec))
    writer.close()
    print_table(rows, [("mode", "position mode"), ("pcc_within_recovery", "PCC within (recovery)"),
                       ("pcc_unseen_section", "PCC unseen section"), ("pcc_unseen_moved_5mm", "PCC moved 5 mm"),
                       ("moved_minus_here", "moved − here"), ("ridge_colour_pcc", "ridge (colour) PCC"),
                       ("ratio_to_ridge", "model / ridge"), ("lr_across", "lr (across)")], title="cross-section transfer (synthetic, 3 sections)")
    return rows


if __name__ == "__main__":
    main()
