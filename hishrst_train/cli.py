"""Training-stage subcommands of ``hishrst``: ``synth``, ``fit``, ``evaluate``."""

from __future__ import annotations

import time
from pathlib import Path

import click

from hishrst_runtime.core.patches import DEFAULT_PATCH_UM

__all__ = ["synth", "fit", "evaluate"]


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(["small", "dlpfc"]), default="small", show_default=True,
              help="small: a few hundred spots (seconds); dlpfc: ≈4,000 spots on a DLPFC-sized image.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (the output is deterministic).")
def synth(out_dir: Path, preset: str, seed: int) -> None:
    """Generate a synthetic Visium section (Space Ranger outs + pyramidal TIFF) in OUT_DIR."""
    from hishrst_train.synth import make_synthetic_visium

    t0 = time.perf_counter()
    outs = make_synthetic_visium(out_dir, preset=preset, seed=seed)  # type: ignore[arg-type]
    click.echo(f"wrote synthetic Visium ({preset}, seed {seed}) to {outs} in {time.perf_counter() - t0:.1f} s")


@click.command()
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run directory to write.")
@click.option("--task", type=click.Choice(["recovery", "generation"]), default="recovery", show_default=True)
@click.option("--encoder", default="test-vit", show_default=True, help="Encoder name: uni, uni2-h, test-vit.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Local encoder weights file (safetensors or state-dict .bin).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Full-resolution image (needed when DATA is an .h5ad).")
@click.option("--mpp", type=float, default=None, help="µm per full-resolution pixel (overrides the scalefactors).")
@click.option("--epochs", type=int, default=100, show_default=True,
              help="Maximum epochs; training stops early when the validation MSE stops improving.")
@click.option("--val-frac", type=float, default=0.1, show_default=True,
              help="Fraction of the training spots kept aside for early stopping (0 disables it).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--n-genes", type=int, default=1000, show_default=True, help="Highly variable genes to predict.")
@click.option("--patch-um", type=float, default=DEFAULT_PATCH_UM, show_default=True, help="Patch side in µm.")
@click.option("--position", "position_mode", type=click.Choice(["continuous", "grid"]), default="continuous", show_default=True)
@click.option("--densify", type=float, default=4.0, show_default=True, help="Generation task: density factor.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Feature-extraction batch size.")
def fit(data: Path, out: Path, task: str, encoder: str, weights: Path | None, image: Path | None, mpp: float | None,
        epochs: int, val_frac: float, seed: int, n_genes: int, patch_um: float, position_mode: str, densify: float, batch_size: int) -> None:
    """Train HisHRST on DATA (Space Ranger outs directory, or .h5ad with --image)."""
    from hishrst_train.tasks import fit_run

    try:
        s = fit_run(data, out=out, task=task, encoder=encoder, weights=weights, image=image, mpp=mpp,  # type: ignore[arg-type]
                    epochs=epochs, seed=seed, n_genes=n_genes, patch_um=patch_um, position_mode=position_mode,  # type: ignore[arg-type]
                    densify=densify, batch_size=batch_size, val_frac=val_frac)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"\n{task} run written to {out}")
    rows = [("spots", s["n_spots"]), ("training spots", s["n_train"]), ("validation spots", s["n_val"]),
            ("held-out spots" if task == "recovery" else "dense points", s.get("n_heldout", s.get("n_dense"))),
            ("epochs (best)", f"{s['epochs_run']} ({s['best_epoch']})"),
            ("best val. MSE", f"{s['best_val_mse']:.4f}" if s["best_val_mse"] is not None else "n/a"),
            ("final train MSE", f"{s['final_train_mse']:.4f}"), ("features (s)", s["seconds_features"]),
            ("training (s/epoch)", s["seconds_per_epoch"]), ("total (s)", s["seconds_total"])]
    for k, v in rows:
        click.echo(f"  {k:<20} {v}")


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--no-ssim", is_flag=True, help="Skip SSIM of gene maps.")
@click.option("--no-ari", is_flag=True, help="Skip k-means ARI against the layer truth.")
def evaluate(run_dir: Path, no_ssim: bool, no_ari: bool) -> None:
    """Score a recovery run on its held-out spots; writes metrics.json and per_gene_metrics.csv."""
    from hishrst_train.evaluate import evaluate_run

    try:
        s = evaluate_run(run_dir, ssim=not no_ssim, ari=not no_ari)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    m, b = s["model"], s["baseline_mean"]
    click.echo(f"held-out spots: {s['n_heldout_spots']}, genes: {m['n_genes']} (constant predictions: {m['n_constant']})")
    click.echo(f"{'':<22}{'model':>10}{'mean baseline':>16}")
    click.echo(f"{'PCC (mean)':<22}{m['pcc_mean']:>10.4f}{'undefined':>16}")
    click.echo(f"{'PCC (const as 0)':<22}{m['pcc_mean_constant_as_zero']:>10.4f}{b['pcc_mean_constant_as_zero']:>16.4f}")
    click.echo(f"{'MSE':<22}{m['mse_mean']:>10.4f}{b['mse_mean']:>16.4f}")
    click.echo(f"{'MAE':<22}{m['mae_mean']:>10.4f}{b['mae_mean']:>16.4f}")
    if "ssim_mean" in m:
        click.echo(f"{'SSIM (mean)':<22}{m['ssim_mean']:>10.4f}")
    if "ari_prediction" in s:
        click.echo(f"{'ARI k-means vs layers':<22}{s['ari_prediction']:>10.4f}   (measured expression: {s['ari_measured']:.4f})")
    click.echo(f"wrote {run_dir / 'metrics.json'} and {run_dir / 'per_gene_metrics.csv'}")
