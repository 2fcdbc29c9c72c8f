"""The ``hishrst-run`` / ``hishrst run`` command: argument parsing and the summary table.

The work itself is :func:`hishrst_runtime.jobs.runner.run_slides`.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import click
import numpy as np

from hishrst_runtime.cli.errors import user_errors
from hishrst_runtime.jobs.runner import DEFAULT_WORKERS, output_collisions, run_slides

__all__ = ["run"]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Model bundle directory written by `hishrst export`.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory; one <slide>.zarr AnnData store per slide.")
@click.option("--pitch-um", type=float, default=None, help="Query-point spacing in µm [default: 50, 4× Visium density].")
@click.option("--grid", type=click.Choice(["hex", "square"]), default="hex", show_default=True)
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt", "trt-native", "noop"]), default="auto",
              show_default=True, help="Inference engine; `auto` picks the fastest available and says which.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Encoder batch size (tiles).")
@click.option("--workers", type=int, default=DEFAULT_WORKERS, show_default=True, help="Reader threads (fetch, decode, cut).")
@click.option("--engine-threads", type=int, default=None,
              help="ONNX Runtime intra-op threads [default: the physical cores the readers leave free, at least 1].")
@click.option("--mpp", type=float, default=None, help="µm per level-0 pixel (overrides or supplies the store's).")
@click.option("--min-tissue", type=float, default=0.25, show_default=True, help="Minimum tissue fraction under a patch.")
@click.option("--shard", default=None, help="I/N: process the I-th (0-based) of N shards of the slide list "
              "[default: from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT].")
@click.option("--resume", is_flag=True, help="Finish incomplete outputs instead of refusing them.")
@click.option("--overwrite", is_flag=True, help="Recompute outputs that exist.")
@click.option("--h5ad", is_flag=True, help="Also write <slide>.h5ad next to each store.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def run(slides: tuple[Path, ...], bundle_dir: Path, out_dir: Path, pitch_um: float | None, grid: str, provider: str,
        batch_size: int, workers: int, mpp: float | None, min_tissue: float, shard: str | None, resume: bool,
        overwrite: bool, h5ad: bool, no_progress: bool, engine_threads: int | None) -> None:
    """Predict dense gene expression over whole-slide OME-Zarr SLIDES with an exported bundle."""
    from hishrst_runtime.jobs.locks import parse_shard, shard_from_env, shard_items

    if batch_size < 1:
        raise click.BadParameter("must be >= 1", param_hint="--batch-size")
    if workers < 0:
        raise click.BadParameter("must be >= 0 (0 reads in the inference thread)", param_hint="--workers")
    if engine_threads is not None and engine_threads < 1:
        raise click.BadParameter("must be >= 1", param_hint="--engine-threads")
    if pitch_um is not None and not (np.isfinite(pitch_um) and pitch_um > 0):
        raise click.BadParameter("must be a positive number of µm", param_hint="--pitch-um")
    if not 0.0 <= min_tissue <= 1.0:
        raise click.BadParameter("must be a fraction in [0, 1]", param_hint="--min-tissue")
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise click.BadParameter("must be a positive number of µm per pixel, e.g. 0.5", param_hint="--mpp")
    collisions = output_collisions(list(slides), out_dir)  # on the full list, so every shard agrees
    if collisions:
        lines = "; ".join(f"{o.name} <- {', '.join(map(str, s))}" for o, s in collisions.items())
        raise click.BadParameter(f"several slides would write the same output ({lines}); rename them", param_hint="SLIDES")
    items = list(slides)
    try:
        sh = parse_shard(shard) if shard else shard_from_env()
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--shard") from e
    if sh is not None:
        items = shard_items(items, index=sh[0], count=sh[1])
        click.echo(f"shard {sh[0]}/{sh[1]}: {len(items)} of {len(slides)} slides")
    with user_errors():
        results = run_slides(items, bundle_dir=bundle_dir, out_dir=out_dir, pitch_um=pitch_um, grid=grid,
                             provider=provider, batch_size=batch_size, workers=workers, mpp=mpp, resume=resume,
                             overwrite=overwrite, h5ad=h5ad, min_tissue=min_tissue, progress=not no_progress,
                             engine_threads=engine_threads, echo=click.echo)
    click.echo(f"\n{'slide':<34}{'status':<9}{'points':>9}{'tiles/s':>10}{'seconds':>9}")
    for r in results:
        click.echo(f"{Path(r['slide']).name[:33]:<34}{r['status']:<9}{r.get('points', ''):>9}"
                   f"{r.get('tiles_per_s', ''):>10}{r.get('seconds', ''):>9}")
        if r["status"] != "ok":
            click.echo(f"    {r.get('reason', '')}")
    counts = Counter(r["status"] for r in results)
    click.echo(f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed (of {len(results)} slides)")
    if counts["failed"]:
        click.echo(f"{counts['failed']} of {len(results)} slides failed", err=True)
        sys.exit(1)
