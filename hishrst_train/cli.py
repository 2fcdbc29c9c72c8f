"""Training-stage subcommands of ``hishrst``: ``synth``, ``fit``, ``evaluate``, ``cv``.

This module imports only click, the runtime's core and the torch-free encoder registry, so the
commands parse (and ``--help`` works) in a base install; the training stack is imported inside each
command body, where a missing extra becomes one line naming ``pip install "hishrst[train]"``.
Errors reach the user through :func:`hishrst_runtime.cli.errors.user_errors` (one line, exit 1).

``DATA`` (fit, evaluate --on, cv): a Space Ranger ``outs`` folder, ``PATH.h5ad:IMAGE`` (an ``.h5ad``
paired with its full-resolution image) or a HEST-1k ``<root>/st/<id>.h5ad``; ``--image`` only with one DATA.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import click

from hishrst_runtime.cli.errors import command_errors
from hishrst_runtime.core.extras import import_extra
from hishrst_runtime.core.patches import DEFAULT_PATCH_UM
from hishrst_runtime.core.threads import THREADS_ENV, resolve_threads
from hishrst_runtime.core.tokens import DEFAULT_TOKEN_PITCH_UM
from hishrst_runtime.core.vocab import DEFAULT_HEAD_KIND, DEFAULT_POSITION_MODE, DEFAULT_TASK, HEAD_KINDS, POSITION_MODES, \
    TASKS
from hishrst_runtime.core.vocab import DEFAULT_PLATFORM, PLATFORMS
from hishrst_train.encoders.registry import DEFAULT_ENCODER, ENCODER_NAMES, TEST_ENCODER_NAMES, is_encoder_name

__all__ = ["synth", "fit", "evaluate", "cv", "training_module", "use_threads", "threads_option",
           "allow_test_encoder_option"]

DATA_HELP = ("DATA: Space Ranger outs folder, PATH.h5ad:IMAGE, or a HEST-1k st/<id>.h5ad (finds wsis/ and "
             "metadata/ beside st/).")


def training_module(name: str, *, command: str, extra: str = "train") -> ModuleType:
    """Import ``name`` (a training or export module) for ``hishrst command``; a missing or broken
    dependency is a :class:`~hishrst_runtime.core.extras.MissingExtraError` naming the pip extra."""
    return import_extra(name, extra=extra, needed_by=f"`hishrst {command}`")


_INTEROP_SET: list[int] = []


def use_threads(threads: int | None) -> int:
    """Resolve the thread count (:func:`~hishrst_runtime.core.threads.resolve_threads`: ``--threads``, else
    ``$HISHRST_THREADS``, else the cores this process may use that others are not keeping busy), give it to
    torch (intra-op; inter-op once per process, as torch allows) and print it. Call before any torch work."""
    n = resolve_threads(threads)
    import torch

    torch.set_num_threads(n)
    if not _INTEROP_SET:
        try:
            torch.set_num_interop_threads(max(1, min(n, 4)))
        except RuntimeError:  # inter-op work already ran in this process: torch keeps its pool
            pass
        _INTEROP_SET.append(n)
    click.echo(f"threads: {n} (--threads N or ${THREADS_ENV} to change)")
    return n


def threads_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--threads N`` (default: :func:`~hishrst_runtime.core.threads.resolve_threads`)."""
    return click.option("--threads", type=click.IntRange(min=1), default=None,
                        help=f"CPU threads for torch (default: ${THREADS_ENV}, else the cores this job may use — "
                             "affinity / cgroup quota — minus those other processes keep busy).")(f)


def allow_test_encoder_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--allow-test-encoder``: accept a random test encoder (tests and smoke runs only)."""
    return click.option("--allow-test-encoder", is_flag=True,
                        help=f"Accept a randomly initialised test encoder ({', '.join(TEST_ENCODER_NAMES)}): for "
                             "tests and smoke runs only — its model predicts nothing real.")(f)


def _encoder_name(ctx: click.Context, param: click.Parameter, value: str) -> str:  # noqa: ARG001 - click callback
    if not is_encoder_name(value):
        raise click.BadParameter(f"{value!r} is not an encoder; choose one of {', '.join(ENCODER_NAMES)}, or "
                                 "hf-hub:ORG/NAME, timm:FOLDER, timm:ARCH (with --weights)")
    return value


ENCODER_HELP = (f"Frozen encoder: {', '.join(ENCODER_NAMES)}; or hf-hub:ORG/NAME (a timm model on the Hugging Face "
                "hub), timm:FOLDER (local timm config.json + weights) or timm:ARCH with --weights FILE. Weights: "
                "--weights, $HISHRST_WEIGHTS_DIR/<name>/, the Hugging Face cache, then the hub with your token. "
                f"{', '.join(TEST_ENCODER_NAMES)} (random) need --allow-test-encoder.")


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(["small", "dlpfc"]), default="small", show_default=True,
              help="small: a few hundred spots; dlpfc: ≈4,000 spots on a DLPFC-sized image.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (the output is deterministic).")
@click.option("--sections", type=click.IntRange(min=1), default=1, show_default=True,
              help="Number of sections (more than one: OUT_DIR/section_<k>/, one shared expression model, each section "
                   "placed and rotated differently on its slide).")
@click.option("--platform", type=click.Choice(PLATFORMS), default=DEFAULT_PLATFORM, show_default=True,
              help="visium: Space Ranger outs of 55 µm spots; visium-hd: Space Ranger 3 outs/binned_outputs/ with "
                   "square_008um and square_016um bins. Every section also gets truth_bins.npz (8 µm truth).")
@click.option("--overwrite", is_flag=True,
              help="Replace a data set `hishrst synth` wrote in OUT_DIR (kept until the new one is complete); other "
                   "folders are never replaced.")
def synth(out_dir: Path, preset: str, seed: int, sections: int, platform: str, overwrite: bool) -> None:
    """Generate synthetic Visium or Visium HD sections (Space Ranger outs + pyramidal TIFF) in OUT_DIR."""
    t0 = time.perf_counter()
    with command_errors(out_dir):
        mod = training_module("hishrst_train.synth.output", command="synth")
        outs = mod.write_synth(out_dir, sections=sections, preset=preset, seed=seed, overwrite=overwrite,
                               platform=platform)
    for o in outs:
        click.echo(f"wrote synthetic {platform} ({preset}) to {o}")
    click.echo(f"{len(outs)} section(s) in {time.perf_counter() - t0:.1f} s")


COUNTS_HELP = ("What the sections' matrices hold: raw = UMI counts (finite, non-negative whole numbers; hishrst "
               "normalises them to log1p of counts per 10k); log = already log1p of counts per 10k (scanpy "
               "normalize_total(target_sum=1e4) + log1p), used as the target as is. Other values are refused.")


def _fit_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``fit`` and ``cv`` (applied bottom-up, so listed here in reverse help order)."""
    opts = [
        click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars."),
        threads_option, allow_test_encoder_option,
        click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Feature cache folder (one cache entry per section image, encoder and geometry)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="Feature extraction and training device (auto: cuda when torch sees a GPU)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Feature-extraction batch size."),
        click.option("--position", "position_mode", type=click.Choice(POSITION_MODES),
                     default=DEFAULT_POSITION_MODE, show_default=True,
                     help="relative: distances within neighbour groups (transfers to other sections); continuous: "
                          "absolute µm; grid: Visium array embeddings (the reference); none: image only."),
        click.option("--patch-um", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_PATCH_UM,
                     show_default=True, help="Patch side in µm (spot head; a sub-spot head's tile is its token grid "
                                             "× --token-pitch-um)."),
        click.option("--token-pitch-um", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TOKEN_PITCH_UM,
                     show_default=True, help="Sub-spot head: µm per encoder token (8 = Visium HD's smallest bin)."),
        click.option("--head", type=click.Choice(HEAD_KINDS), default=DEFAULT_HEAD_KIND, show_default=True,
                     help="spot: one prediction per spot from its patch (HisHRST); subspot: one per encoder token "
                          "(8 µm), trained from spots through the disk aggregate (then `hishrst-run --resolution`)."),
        click.option("--n-genes", type=click.IntRange(min=1), default=1000, show_default=True,
                     help="Highly variable genes to predict (chosen on training spots, from genes all sections share)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the spot split, weight initialisation and batching (runs are reproducible)."),
        click.option("--val-frac", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
                     help="Fraction of the training spots kept aside for early stopping (0 disables it)."),
        click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True,
                     help="Maximum epochs; training stops early when the validation MSE stops improving."),
        click.option("--lr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=1e-3,
                     show_default=True, help="Peak learning rate of Adam (the paper's 1e-3; warm-up, cosine decay)."),
        click.option("--counts", type=click.Choice(["raw", "log"]), default="raw", show_default=True,
                     help=COUNTS_HELP),
        click.option("--mpp", type=float, default=None,
                     help="µm per full-resolution pixel (overrides the recorded pixel size of every section; "
                          "0.05–50, HISHRST_MPP_RANGE=LO,HI widens it)."),
        click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help="Local encoder weights file (safetensors or state-dict .bin)."),
        click.option("--encoder", default=DEFAULT_ENCODER, show_default=True, callback=_encoder_name,
                     help=ENCODER_HELP),
        click.option("--overwrite", is_flag=True,
                     help="Replace an existing run at --out (the old run is kept until the new fit succeeds)."),
        click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Output directory to write."),
    ]
    for opt in opts:
        f = opt(f)
    return f


@click.command(epilog=DATA_HELP)
@click.argument("data", nargs=-1, required=True)
@_fit_options
@click.option("--task", type=click.Choice(TASKS), default=DEFAULT_TASK, show_default=True,
              help="recovery: train on half of each section's spots, predict the rest; generation: predict a denser "
                   "grid; full: train on every spot (then `hishrst evaluate RUN --on OTHER`).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Full-resolution image of a single DATA: pairs a plain .h5ad with its image, or replaces the "
                   "image found next to an outs folder / HEST sample.")
@click.option("--densify", type=click.FloatRange(min=1, min_open=True), default=4.0, show_default=True,
              help="Generation task: density factor.")
def fit(data: tuple[str, ...], out: Path, task: str, image: Path | None, densify: float, **opts: Any) -> None:
    """Train HisHRST on one or several sections DATA... and write a run directory to --out."""
    threads = opts.pop("threads")
    with command_errors(out):
        tasks = training_module("hishrst_train.tasks", command="fit")
        use_threads(threads)
        s = tasks.fit_run(list(data), out=out, task=task, image=image, densify=densify, **opts)
    click.echo(f"\n{task} run written to {out}")
    last = {"recovery": ("held-out spots", s.get("n_heldout")), "generation": ("dense points", s.get("n_dense"))}
    rows = [("sections", s["n_sections"]), ("spots", s["n_spots"]), ("training spots", s["n_train"]),
            ("validation spots", s["n_val"]), last.get(task, ("held-out spots", 0)),
            ("epochs (best)", f"{s['epochs_run']} ({s['best_epoch']})"),
            ("best val. MSE", f"{s['best_val_mse']:.4f}" if s["best_val_mse"] is not None else "n/a"),
            ("final train MSE", f"{s['final_train_mse']:.4f}"), ("device", s["device"]),
            ("features (s)", s["seconds_features"]), ("training (s/epoch)", s["seconds_per_epoch"]),
            ("total (s)", s["seconds_total"])]
    for k, v in rows:
        click.echo(f"  {k:<20} {v}")


def _echo_metrics(s: dict[str, Any], where: Path) -> None:
    """The model beside its baselines (training mean, ridge on the same embeddings, kNN), then warnings."""
    from hishrst_train.evaluate import format_scores  # imported by the command already (training stack)

    for line in format_scores(s):
        click.echo(line)
    click.echo(f"wrote {where / 'metrics.json'} and {where / 'per_gene_metrics.csv'}")


def _check_run_encoder(run_dir: Path, *, allow_test_encoder: bool) -> None:
    """Refuse to score a run trained on a random test encoder unless ``--allow-test-encoder`` (an unreadable
    ``config.json`` is left for evaluate itself to report)."""
    from hishrst_train.encoders.registry import check_encoder_allowed
    from hishrst_train.runconfig import RunConfig, RunConfigError
    from hishrst_train.rundir import RunLayout

    try:
        name = str(RunConfig.from_json(RunLayout(run_dir).config).encoder.get("name"))
    except RunConfigError:
        return
    check_encoder_allowed(name, allow_test_encoder=allow_test_encoder, where=f"{run_dir}: trained with encoder")


@click.command(epilog=DATA_HELP)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("more", nargs=-1, metavar="")
@click.option("--on", "on", multiple=True, metavar="DATA [DATA ...]",
              help="Score sections the run never trained on (written to RUN/eval/<name>/).")
@click.option("--name", default=None, help="Subfolder name under RUN/eval/ (default: the section names).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --on and a single DATA: its full-resolution image.")
@click.option("--mpp", type=float, default=None, help="µm/px of the --on sections (0.05–50).")
@click.option("--counts", type=click.Choice(["raw", "log"]), default=None,
              help=COUNTS_HELP + " Default: what the run was trained on.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Device for feature extraction and prediction (auto: cuda when torch sees a GPU).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Feature cache folder.")
@click.option("--no-ssim", is_flag=True, help="Skip SSIM of gene maps.")
@click.option("--no-ari", is_flag=True, help="Skip k-means ARI against the layer truth.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
@click.option("--bins", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A sub-spot RUN: score its 8/16 µm maps on this synthetic section's bin truth (with --spot-run).")
@click.option("--spot-run", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="With --bins: the spot run whose interpolated predictions and 16 µm grid are the alternatives.")
@click.option("--window-um", type=click.FloatRange(min=16), default=2000.0, show_default=True,
              help="With --bins: side of the scored square of tissue (µm).")
@threads_option
@allow_test_encoder_option
def evaluate(run_dir: Path, more: tuple[str, ...], on: tuple[str, ...], name: str | None, image: Path | None,
             mpp: float | None, counts: str | None, device: str, cache_dir: Path | None, no_ssim: bool, no_ari: bool,
             progress: bool, threads: int | None, allow_test_encoder: bool, bins: Path | None,
             spot_run: Path | None, window_um: float) -> None:
    """Score RUN: its held-out spots (recovery), with --on DATA... sections it never saw, or with --bins a
    sub-spot run's 8/16 µm maps."""
    if bins is not None:
        return _evaluate_bins(run_dir, bins, spot_run, window_um=window_um, threads=threads,
                              allow_test_encoder=allow_test_encoder)
    data = list(on) + list(more)
    if more and not on:
        raise click.UsageError(f"unexpected argument {more[0]!r}; sections to score go after --on")
    if not data and (image or mpp is not None or name or counts):
        raise click.UsageError("--image, --mpp, --counts and --name apply to --on DATA")
    with command_errors(run_dir):
        _check_run_encoder(run_dir, allow_test_encoder=allow_test_encoder)
        mod = training_module("hishrst_train.evaluate", command="evaluate")
        use_threads(threads)
        if data:
            training_module("hishrst_train.tasks", command="evaluate --on")
            s = mod.evaluate_on(run_dir, data, image=image, mpp=mpp, ssim=not no_ssim, ari=not no_ari, device=device,
                                cache_dir=cache_dir, name=name, progress=progress, counts=counts)
            where = Path(s["folder"])
        else:
            s, where = mod.evaluate_run(run_dir, ssim=not no_ssim, ari=not no_ari), run_dir
    _echo_metrics(s, where)


def _evaluate_bins(run_dir: Path, section: Path, spot_run: Path | None, *, window_um: float, threads: int | None,
                   allow_test_encoder: bool) -> None:
    if spot_run is None:
        raise click.UsageError("--bins needs --spot-run RUN (the spot model the sub-spot maps are compared with)")
    with command_errors(run_dir):
        for run in (run_dir, spot_run):
            _check_run_encoder(run, allow_test_encoder=allow_test_encoder)
        mod = training_module("hishrst_train.bins_eval", command="evaluate --bins")
        use_threads(threads)
        scores = mod.score_bins(run_dir, section, spot_run=spot_run, window_um=window_um)
    for line in mod.format_bin_scores(scores):
        click.echo(line)


@click.command(epilog=DATA_HELP)
@click.argument("data", nargs=-1, required=True)
@_fit_options
@click.option("--no-ssim", is_flag=True, help="Skip SSIM of gene maps.")
@click.option("--no-ari", is_flag=True, help="Skip k-means ARI against the layer truth.")
def cv(data: tuple[str, ...], out: Path, no_ssim: bool, no_ari: bool, **opts: Any) -> None:
    """Leave-one-section-out cross-validation over DATA... (each fold a `--task full` run under --out)."""
    threads = opts.pop("threads")
    with command_errors(out):
        training_module("hishrst_train.tasks", command="cv")
        mod = training_module("hishrst_train.cv", command="cv")
        use_threads(threads)
        table = mod.cv_run(list(data), out=out, ssim=not no_ssim, ari=not no_ari, **opts)
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for warning in table.attrs.get("warnings", []):
        click.echo(f"warning: {warning}")
    click.echo(f"wrote {out / 'cv_metrics.csv'} and one run per fold under {out}")
