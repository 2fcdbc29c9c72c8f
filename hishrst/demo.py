"""``hishrst demo``: the whole product on built-in synthetic data, end to end, on a slide the model never saw.

synthesize three sections of one expression model (different tissue shape, placement and rotation) →
fit on sections 0 and 1 (``--task full``, relative positions, the random test encoder — allowed here on
purpose, and the bundle says so) → export an ONNX bundle
(parity-checked) → write section 2's H&E as an OME-Zarr slide → ``hishrst-run`` it at its measured spots
(``--points``) and score against the measured expression, beside the training mean and a ridge on the same
embeddings →
``hishrst-run`` the whole slide at 4× Visium density → write a PNG of one gene, measured vs predicted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

__all__ = ["demo", "run_demo"]

#: Most epochs of the demo's sub-spot fit (its validation loss stops improving within a few epochs; a sub-spot
#: epoch costs ~5× a spot epoch on two cores).
SUBSPOT_EPOCHS = 8
#: How the demo's spot figure chooses its gene: a rule that looks at no prediction.
SPOT_GENE_RULE = "highest variance of the measured expression across the unseen section's spots"


def _step(msg: str) -> float:
    click.echo(f"[demo] {msg}")
    return time.perf_counter()


def _measured(outs: Path, genes: list[str], target_sum: float) -> tuple[Any, np.ndarray]:
    """(AnnData of the section, its log1p-normalised expression of ``genes`` [spots, genes])."""
    from hishrst_train.data.sections import load_adata, parse_section
    from hishrst_train.preprocess import log_expression

    adata = load_adata(parse_section(outs))
    return adata, log_expression(adata, genes, target_sum=target_sum).astype(np.float64)


def _score_unseen(run: Path, outs: Path, pred_store: Path) -> dict[str, Any]:
    """Per-gene PCC / MSE / MAE of the runtime's predictions at section 2's spots, and of the training mean."""
    import anndata as ad

    from hishrst_train.metrics import per_gene_metrics, summarise
    from hishrst_train.rundir import RunLayout

    layout = RunLayout(run)
    config = json.loads(layout.config.read_text())
    genes = list(config["genes"])
    adata, truth = _measured(outs, genes, float(config["preprocessing"]["target_sum"]))
    pred = ad.read_zarr(pred_store)
    if list(pred.obs_names) != list(adata.obs_names):
        raise click.ClickException(f"{pred_store}: rows are not the measured spots in order")
    base = json.loads(layout.baseline.read_text())
    mean = np.asarray(base["train_mean"], np.float64)[[base["genes"].index(g) for g in genes]]
    model = summarise(per_gene_metrics(np.asarray(pred[:, genes].X, np.float64), truth))
    baseline = summarise(per_gene_metrics(np.broadcast_to(mean, truth.shape), truth))
    return {"model": model, "baseline_train_mean": baseline, "adata": adata, "truth": truth, "genes": genes,
            "per_gene_pcc": per_gene_metrics(np.asarray(pred[:, genes].X, np.float64), truth)["pcc"]}


def _ridge_on_unseen(run: Path, outs: Path, *, progress: bool) -> dict[str, Any]:
    """The ridge on the same embeddings (fitted by ``fit`` on training spots), scored on the unseen section's
    spots by ``evaluate --on`` (``run/eval/``)."""
    from hishrst_train.evaluate import evaluate_on

    summary = evaluate_on(run, outs, ssim=False, ari=False, device="cpu", name="unseen", progress=progress)
    return summary["baseline_ridge"]


def is_legacy_demo(path: Path) -> bool:
    """A demo folder written before the ownership marker: ``demo_summary.json`` parses as the demo's summary."""
    try:
        s = json.loads((path / "demo_summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(s, dict) and "unseen_section_pcc_mean" in s and "export_parity" in s


def run_demo(out: Path, *, preset: str = "dlpfc", epochs: int = 30, seed: int = 0, progress: bool = True,
             overwrite: bool = False, subspot: bool = True) -> dict:
    """Run the demo into ``out``; returns a summary dict (also written to ``out/demo_summary.json``).

    ``out`` must be missing, empty, or a demo folder hishrst wrote (replaced only with ``overwrite``, piece
    by piece, each piece kept until its new version is complete); a folder of other files is refused. ``subspot``:
    also the sub-spot steps (:mod:`hishrst.demo_subspot`)."""
    from hishrst_runtime.core.owned import check_replaceable, mark_owned
    from hishrst_train.rundir import claim_output

    out = Path(out)
    with claim_output(out, command="demo"):
        check_replaceable(out, kind="demo", overwrite=overwrite, what="a demo output", legacy=is_legacy_demo)
        out.mkdir(parents=True, exist_ok=True)
        mark_owned(out, "demo")
        return _run_steps(out, preset=preset, epochs=epochs, seed=seed, progress=progress, subspot=subspot)


def _run_steps(out: Path, *, preset: str, epochs: int, seed: int, progress: bool, subspot: bool) -> dict:
    from hishrst_export.bundle import export_bundle
    from hishrst_runtime.inference.points import read_points
    from hishrst_runtime.jobs.runner import run_slides
    from hishrst_runtime.slides.convert import convert_slide
    from hishrst_train.synth.output import write_synth
    from hishrst_train.tasks import fit_run

    n = 9 if subspot else 7
    t0 = _step(f"1/{n} synthesizing three '{preset}' sections of one expression model (seed {seed})")
    outs = write_synth(out / "sections", sections=3, seed=seed, preset=preset, overwrite=True)
    t: dict[str, float] = {"synth": time.perf_counter() - t0}

    t0 = _step(f"2/{n} training HisHRST on sections 0 and 1 (full task, relative positions, test encoder, "
               f"≤ {epochs} epochs)")
    fit = fit_run(outs[:2], out=out / "run", task="full", encoder="test-vit", allow_test_encoder=True, epochs=epochs,
                  seed=seed, position_mode="relative", progress=progress, overwrite=True)
    t["fit"] = time.perf_counter() - t0

    t0 = _step(f"3/{n} exporting the ONNX bundle (with parity checks)")
    manifest = export_bundle(out / "run", out=out / "bundle", overwrite=True)
    t["export"] = time.perf_counter() - t0

    t0 = _step(f"4/{n} writing section 2's H&E image (never seen in training) as an OME-Zarr 0.5 slide")
    slide = out / "slide.ome.zarr"
    convert_slide(outs[2].parent / "image.tif", slide, overwrite=True, progress=False)
    t["slide"] = time.perf_counter() - t0

    t0 = _step(f"5/{n} hishrst-run on section 2 at its measured spots (--points), scored against the measurement")
    points = read_points(outs[2])
    at = run_slides([slide], bundle_dir=out / "bundle", out_dir=out / "at_spots", provider="cpu", overwrite=True,
                    progress=progress, points_px={str(slide): points})[0]
    if at.status != "ok":
        raise click.ClickException(f"hishrst-run failed on the demo slide's spots: {at.reason}")
    scores = _score_unseen(out / "run", outs[2], Path(at.output))
    scores["baseline_ridge"] = _ridge_on_unseen(out / "run", outs[2], progress=progress)
    t["run_points"] = time.perf_counter() - t0

    t0 = _step(f"6/{n} hishrst-run over the whole slide at 4× Visium density (50 µm hex grid)")
    res = run_slides([slide], bundle_dir=out / "bundle", out_dir=out / "predictions", provider="cpu",
                     overwrite=True, progress=progress)[0]
    if res.status != "ok":
        raise click.ClickException(f"hishrst-run failed on the demo slide: {res.reason}")
    t["run_dense"] = time.perf_counter() - t0

    t0 = _step(f"7/{n} plotting one gene, measured vs predicted (dense) on the unseen section")
    png = _plot(out, scores=scores, dense=Path(res.output))
    t["plot"] = time.perf_counter() - t0

    summary = _summary(scores, at=at, res=res, manifest=manifest, fit=fit, t=t, png=png)
    if subspot:
        from hishrst.demo_subspot import run_subspot_steps

        summary["subspot"] = run_subspot_steps(out, sections=outs, slide=slide, at_spots=Path(at.output),
                                               genes=scores["genes"], epochs=min(epochs, SUBSPOT_EPOCHS), seed=seed,
                                               progress=progress, step=_step)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _summary(scores: dict[str, Any], *, at: Any, res: Any, manifest: dict, fit: dict, t: dict[str, float],
             png: Path) -> dict[str, Any]:
    """The demo's figures: the unseen section's scores beside its baselines, export parity, run speed, timings."""
    m, b, ridge = scores["model"], scores["baseline_train_mean"], scores["baseline_ridge"]
    return {
        "unseen_section_pcc_mean": m["pcc_mean_constant_as_zero"], "unseen_section_mse": m["mse_mean"],
        "unseen_section_mae": m["mae_mean"], "baseline_train_mean_mse": b["mse_mean"],
        "baseline_train_mean_mae": b["mae_mean"], "baseline_ridge_pcc_mean": ridge["pcc_mean_constant_as_zero"],
        "baseline_ridge_mse": ridge["mse_mean"], "unseen_spots": at.points,
        "export_parity": {k: {l: v["scaled_max_abs"] for l, v in r.items()} for k, r in manifest["parity"].items()
                          if isinstance(r, dict) and k in ("encoder", "head")},
        "dense_points": res.points, "run_tiles_per_s": res.tiles_per_s,
        "fit_seconds_per_epoch": fit["seconds_per_epoch"],
        "seconds": {k: round(v, 1) for k, v in t.items()}, "png": str(png),
    }


def _plot(out: Path, *, scores: dict[str, Any], dense: Path) -> Path:
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pcc = scores["per_gene_pcc"]
    j = int(np.argmax(scores["truth"].var(axis=0)))  # SPOT_GENE_RULE: no prediction is looked at
    gene, adata = scores["genes"][j], scores["adata"]
    meas = scores["truth"][:, j]
    pred = ad.read_zarr(dense)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), constrained_layout=True)
    xy = adata.obsm["spatial"]
    dval = np.asarray(pred[:, gene].X).ravel()
    vmax = float(max(np.percentile(meas, 99.5), np.percentile(dval, 99.5)))  # one colour scale for both maps
    a = axes[0].scatter(xy[:, 0], xy[:, 1], c=meas, s=9, cmap="magma", vmin=0, vmax=vmax)
    axes[0].set_title(f"{gene}: measured\non the unseen section ({adata.n_obs} spots)")
    dxy = pred.obsm["spatial"]
    b = axes[1].scatter(dxy[:, 0], dxy[:, 1], c=dval, s=2.5, cmap="magma", vmin=0, vmax=vmax)
    axes[1].set_title(f"{gene}: predicted by hishrst-run\n(4× density, {pred.n_obs} points; PCC at the spots {pcc[j]:.2f})")
    fig.suptitle(f"gene rule: {SPOT_GENE_RULE}", fontsize=9)
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
@click.option("--preset", type=click.Choice(["small", "dlpfc"]), default="dlpfc", show_default=True,
              help="Size of each synthetic section: small (~300 spots) or dlpfc (~4,000 spots, as a DLPFC section).")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True,
              help="Maximum training epochs (early stopping on a validation split keeps the best).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic data and the fit.")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier demo in --out (a folder the demo did not write is never replaced).")
@click.option("--subspot/--no-subspot", default=True, show_default=True,
              help="Also train the sub-spot head and run the unseen slide at 8 µm bins (adds a few minutes).")
def demo(out: Path, preset: str, epochs: int, seed: int, overwrite: bool, subspot: bool) -> None:
    """Synthesize three sections, train on two, export, and run the third (unseen) section's slide."""
    from hishrst_runtime.cli.errors import command_errors

    t0 = time.perf_counter()
    with command_errors(out):
        s = run_demo(out, preset=preset, epochs=epochs, seed=seed, overwrite=overwrite, subspot=subspot)
    click.echo("\n=== hishrst demo summary ===")
    click.echo(f"unseen section ({s['unseen_spots']} spots, predicted by hishrst-run --points): "
               f"PCC (mean over genes) {s['unseen_section_pcc_mean']:.3f}   MSE {s['unseen_section_mse']:.4f} "
               f"(training-mean baseline {s['baseline_train_mean_mse']:.4f})   MAE {s['unseen_section_mae']:.4f} "
               f"(baseline {s['baseline_train_mean_mae']:.4f})")
    click.echo(f"ridge on the same embeddings (HEST-Benchmark baseline, same spots): PCC "
               f"{s['baseline_ridge_pcc_mean']:.3f}   MSE {s['baseline_ridge_mse']:.4f}")
    click.echo(f"export parity (scaled max |ONNX−PyTorch|): {s['export_parity']}")
    click.echo(f"hishrst-run: {s['dense_points']} points at 4× density, {s['run_tiles_per_s']} tiles/s (CPU)")
    if "subspot" in s:
        b = s["subspot"]
        click.echo(f"sub-spot (8 µm bins, {b['bins']:,} bins at {b['bins_per_s']:,} bins/s): mean per-gene PCC against the "
                   f"8 µm truth {b['pcc_8um']['subspot']:.3f} vs the spot model interpolated to the bins "
                   f"{b['pcc_8um']['interpolated_spots']:.3f} (16 µm: {b['pcc_16um']['subspot']:.3f} vs "
                   f"{b['pcc_16um']['interpolated_spots']:.3f}); figure: {b['figure']['figure']}")
    click.echo(f"stage seconds: {s['seconds']}   total {time.perf_counter() - t0:.0f} s")
    click.echo(f"figure: {s['png']}")
