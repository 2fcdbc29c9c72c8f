"""``hishrst demo``: the whole product on built-in synthetic data, end to end.

synthesize a DLPFC-sized section → write its slide as OME-Zarr → fit (recovery, test encoder) →
evaluate on held-out spots → export an ONNX bundle (parity-checked) → ``hishrst-run`` the slide at 4×
Visium density → print metrics and throughput → write a PNG of one gene, predicted vs measured.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np

__all__ = ["demo", "run_demo"]


def run_demo(out: Path, *, preset: str = "dlpfc", epochs: int = 30, seed: int = 0, progress: bool = True) -> dict:
    """Run the demo into ``out``; returns a summary dict (also written to ``out/demo_summary.json``)."""
    from hishrst_export.bundle import export_bundle
    from hishrst_runtime.slides.convert import write_ome_zarr
    from hishrst_runtime.jobs.runner import run_slides
    from hishrst_train.evaluate import evaluate_run
    from hishrst_train.data import image_mpp, open_fullres_image
    from hishrst_train.synth import make_synthetic_visium
    from hishrst_train.tasks import fit_run

    out.mkdir(parents=True, exist_ok=True)
    t: dict[str, float] = {}

    def step(name: str, msg: str) -> float:
        click.echo(f"[demo] {msg}")
        return time.perf_counter()

    t0 = step("synth", f"1/6 synthesizing a '{preset}' Visium section (seed {seed})")
    outs = make_synthetic_visium(out / "section", preset=preset, seed=seed)  # type: ignore[arg-type]
    t["synth"] = time.perf_counter() - t0

    t0 = step("slide", "2/6 writing the section's H&E image as an OME-Zarr 0.5 slide")
    from hishrst_train.data import read_visium

    adata = read_visium(outs)
    img_path = adata.uns["hishrst"]["fullres_image"]
    mpp = image_mpp(img_path) or adata.uns["hishrst"]["mpp"]
    slide = out / "slide.ome.zarr"
    if not slide.exists():
        write_ome_zarr(open_fullres_image(img_path), slide, mpp=mpp)
    t["slide"] = time.perf_counter() - t0

    t0 = step("fit", f"3/6 training HisHRST (recovery task, test encoder, {epochs} epochs)")
    fit_summary = fit_run(outs, out=out / "run", task="recovery", encoder="test-vit", epochs=epochs, seed=seed,
                          progress=progress)
    metrics = evaluate_run(out / "run")
    t["fit"] = time.perf_counter() - t0

    t0 = step("export", "4/6 exporting the ONNX bundle (with parity checks)")
    manifest = export_bundle(out / "run", out=out / "bundle", overwrite=True)
    t["export"] = time.perf_counter() - t0

    t0 = step("run", "5/6 hishrst-run over the whole slide at 4× Visium density (50 µm hex grid)")
    res = run_slides([slide], bundle_dir=out / "bundle", out_dir=out / "predictions", provider="cpu",
                     overwrite=True, progress=progress)[0]
    if res.status != "ok":
        raise click.ClickException(f"hishrst-run failed on the demo slide: {res.reason}")
    t["run"] = time.perf_counter() - t0

    t0 = step("plot", "6/6 plotting one gene, predicted (dense) vs measured")
    png = _plot(out, gene_metrics=out / "run" / "per_gene_metrics.csv", adata=adata, dense=Path(res.output))
    t["plot"] = time.perf_counter() - t0

    m = metrics["model"]
    summary = {
        "heldout_pcc_mean": m["pcc_mean"], "heldout_mse": m["mse_mean"], "heldout_mae": m["mae_mean"],
        "ssim_mean": m.get("ssim_mean"), "ari_prediction": metrics.get("ari_prediction"),
        "baseline_mean_mse": metrics["baseline_mean"]["mse_mean"],
        "export_parity": {k: {l: v["scaled_max_abs"] for l, v in r.items()} for k, r in manifest["parity"].items() if isinstance(r, dict) and k in ("encoder", "head")},
        "dense_points": res.points, "run_tiles_per_s": res.tiles_per_s, "fit_seconds_per_epoch": fit_summary["seconds_per_epoch"],
        "seconds": {k: round(v, 1) for k, v in t.items()}, "png": str(png),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _plot(out: Path, *, gene_metrics: Path, adata, dense: Path) -> Path:
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    pg = pd.read_csv(gene_metrics).sort_values("pcc", ascending=False)
    gene = str(pg["gene"].iloc[0])
    pred = ad.read_zarr(dense)
    meas = adata[:, gene].X
    meas = np.log1p(np.asarray(meas.toarray() if hasattr(meas, "toarray") else meas).ravel()
                    / np.asarray(adata.X.sum(1)).ravel() * 1e4)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), constrained_layout=True)
    xy = adata.obsm["spatial"]
    dval = np.asarray(pred[:, gene].X).ravel()
    vmax = float(max(np.percentile(meas, 99.5), np.percentile(dval, 99.5)))  # one colour scale for both maps
    a = axes[0].scatter(xy[:, 0], xy[:, 1], c=meas, s=9, cmap="magma", vmin=0, vmax=vmax)
    axes[0].set_title(f"{gene}: measured (Visium spots, {adata.n_obs})")
    dxy = pred.obsm["spatial"]
    b = axes[1].scatter(dxy[:, 0], dxy[:, 1], c=dval, s=2.5, cmap="magma", vmin=0, vmax=vmax)
    axes[1].set_title(f"{gene}: predicted by hishrst-run (4× density, {pred.n_obs} points)")
    for ax, sc in zip(axes, (a, b)):
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(sc, ax=ax, shrink=0.7, label="log1p(counts per 10k)")
    png = out / f"demo_{gene}.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("hishrst_demo"), show_default=True,
              help="Directory for everything the demo writes.")
@click.option("--preset", type=click.Choice(["small", "dlpfc"]), default="dlpfc", show_default=True)
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def demo(out: Path, preset: str, epochs: int, seed: int) -> None:
    """Synthesize, train, export and run the whole pipeline on a built-in demo section."""
    t0 = time.perf_counter()
    s = run_demo(out, preset=preset, epochs=epochs, seed=seed)
    click.echo("\n=== hishrst demo summary ===")
    click.echo(f"held-out PCC (mean over genes) {s['heldout_pcc_mean']:.3f}   MSE {s['heldout_mse']:.4f} "
               f"(mean baseline {s['baseline_mean_mse']:.4f})   MAE {s['heldout_mae']:.4f}")
    if s.get("ssim_mean") is not None:
        click.echo(f"SSIM of gene maps {s['ssim_mean']:.3f}   ARI of k-means vs layers {s.get('ari_prediction') or float('nan'):.3f}")
    click.echo(f"export parity (scaled max |ONNX−PyTorch|): {s['export_parity']}")
    click.echo(f"hishrst-run: {s['dense_points']} points at 4× density, {s['run_tiles_per_s']} tiles/s (CPU)")
    click.echo(f"stage seconds: {s['seconds']}   total {time.perf_counter() - t0:.0f} s")
    click.echo(f"figure: {s['png']}")
