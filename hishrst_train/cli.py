"""Training-stage subcommands of ``hishrst``: ``synth``, ``fit``, ``evaluate``.

This module imports only click, the runtime's core and the torch-free encoder registry, so the
commands parse (and ``--help`` works) in a base install; the training stack is imported inside each
command body, where a missing extra becomes one line naming ``pip install "hishrst[train]"``.
Errors reach the user through :func:`hishrst_runtime.cli.errors.user_errors` (one line, exit 1).
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import click

from hishrst_runtime.cli.errors import user_errors
from hishrst_runtime.core.errors import EnvironmentProblem, HishrstError, OutputStateError
from hishrst_runtime.core.patches import DEFAULT_PATCH_UM
from hishrst_train.encoders.registry import ENCODER_NAMES

__all__ = ["synth", "fit", "evaluate", "training_module", "command_errors", "MissingExtraError"]

class MissingExtraError(EnvironmentProblem):
    """A package of an extra (``[train]``, ``[export]``) is not installed (or does not import)."""


def training_module(name: str, *, command: str, extra: str = "train") -> ModuleType:
    """Import ``name`` (a training or export module) for ``hishrst command``; a missing or broken
    dependency is a :class:`MissingExtraError` naming the pip extra to install."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        raise MissingExtraError(f"`hishrst {command}` needs {missing!r}, which is not installed or does not import "
                                f'({type(e).__name__}); install the {extra} extra: pip install "hishrst[{extra}]"') from e


@contextlib.contextmanager
def command_errors() -> Iterator[None]:
    """:func:`user_errors`, plus file-system refusals (permissions, full disk) as one line naming the path."""
    with user_errors():
        try:
            yield
        except HishrstError:
            raise
        except (PermissionError, IsADirectoryError, NotADirectoryError) as e:
            raise OutputStateError(f"{e.filename or '?'}: {e.strerror or e}; check the path and its permissions, "
                                   "or choose another location") from e
        except OSError as e:
            if e.errno is None or e.filename is None:
                raise
            raise OutputStateError(f"{e.filename}: {e.strerror or e}; free space or choose another location") from e


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(["small", "dlpfc"]), default="small", show_default=True,
              help="small: a few hundred spots; dlpfc: ≈4,000 spots on a DLPFC-sized image.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (the output is deterministic).")
def synth(out_dir: Path, preset: str, seed: int) -> None:
    """Generate a synthetic Visium section (Space Ranger outs + pyramidal TIFF) in OUT_DIR."""
    t0 = time.perf_counter()
    with command_errors():
        mod = training_module("hishrst_train.synth", command="synth")
        outs = mod.make_synthetic_visium(out_dir, preset=preset, seed=seed)
    click.echo(f"wrote synthetic Visium ({preset}, seed {seed}) to {outs} in {time.perf_counter() - t0:.1f} s")


@click.command()
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run directory to write.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing run at --out (the old run is kept until the new fit succeeds).")
@click.option("--task", type=click.Choice(["recovery", "generation"]), default="recovery", show_default=True)
@click.option("--encoder", type=click.Choice(ENCODER_NAMES), default="test-vit", show_default=True,
              help="Encoder (test-vit: tiny random ViT for smoke runs, no download).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Local encoder weights file (safetensors or state-dict .bin).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Full-resolution image: needed when DATA is an .h5ad; for a Space Ranger outs folder it "
                   "replaces the image found next to it.")
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
def fit(data: Path, out: Path, overwrite: bool, task: str, encoder: str, weights: Path | None, image: Path | None,
        mpp: float | None, epochs: int, val_frac: float, seed: int, n_genes: int, patch_um: float, position_mode: str,
        densify: float, batch_size: int) -> None:
    """Train HisHRST on DATA (Space Ranger outs directory, or .h5ad with --image)."""
    with command_errors():
        tasks = training_module("hishrst_train.tasks", command="fit")
        s = tasks.fit_run(data, out=out, task=task, encoder=encoder, weights=weights, image=image, mpp=mpp,
                          epochs=epochs, seed=seed, n_genes=n_genes, patch_um=patch_um, position_mode=position_mode,
                          densify=densify, batch_size=batch_size, val_frac=val_frac, overwrite=overwrite)
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
    with command_errors():
        mod = training_module("hishrst_train.evaluate", command="evaluate")
        s = mod.evaluate_run(run_dir, ssim=not no_ssim, ari=not no_ari)
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
