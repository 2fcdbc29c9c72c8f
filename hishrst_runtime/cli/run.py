"""The ``hishrst-run`` / ``hishrst run`` command: argument parsing and the summary table.

Options are parsed here and validated once, by :class:`~hishrst_runtime.jobs.options.RunOptions`; the
work itself is :func:`hishrst_runtime.jobs.runner.run_slides`.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from hishrst_runtime.cli.errors import option_errors, user_errors
from hishrst_runtime.jobs.options import DEFAULT_WORKERS, PROVIDERS, RunOptions
from hishrst_runtime.jobs.paths import SlideArg, output_collisions, remote_problem
from hishrst_runtime.jobs.results import SlideResult
from hishrst_runtime.jobs.runner import run_slides

__all__ = ["run", "print_results"]

_OPTIONS = [
    click.option("--bundle", "bundle_dir", required=True,
                 type=click.Path(exists=True, file_okay=False, path_type=Path),
                 help="Model bundle directory written by `hishrst export`."),
    click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
                 help="Output directory; one <slide>.zarr AnnData store per slide."),
    click.option("--pitch-um", type=float, default=None,
                 help="Query-point spacing in µm [default: 50, 4× Visium density]."),
    click.option("--grid", type=click.Choice(["hex", "square"]), default="hex", show_default=True),
    click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True,
                 help="Inference engine; `auto` picks the fastest available and says which."),
    click.option("--batch-size", type=int, default=64, show_default=True, help="Encoder batch size (tiles)."),
    click.option("--workers", type=int, default=DEFAULT_WORKERS, show_default=True,
                 help="Reader threads (fetch, decode, cut)."),
    click.option("--engine-threads", type=int, default=None, help="ONNX Runtime intra-op threads [default: the "
                 "physical cores the readers leave free, at least 1]."),
    click.option("--mpp", type=float, default=None, help="µm per level-0 pixel (overrides or supplies the store's); "
                 "0.05-50 accepted, other range via HISHRST_MPP_RANGE=LO,HI."),
    click.option("--min-tissue", type=float, default=0.25, show_default=True,
                 help="Minimum tissue fraction under a patch."),
    click.option("--shard", default=None, help="I/N: process the I-th (0-based) of N shards of the slide list "
                 "[default: from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT]."),
    click.option("--resume", is_flag=True, help="Finish incomplete outputs instead of refusing them."),
    click.option("--overwrite", is_flag=True, help="Recompute outputs that exist (the old one stays until the "
                 "new one is complete)."),
    click.option("--allow-missing-chunks", is_flag=True, help="Read chunk files missing inside tissue as "
                 "background fill instead of failing the slide."),
    click.option("--h5ad", is_flag=True, help="Also write <slide>.h5ad next to each store."),
    click.option("--no-progress", is_flag=True, help="No progress bars."),
]


def _with_options(f: Any) -> Any:
    for opt in reversed(_OPTIONS):
        f = opt(f)
    return f


def _slide_args(slides: Sequence[str]) -> list[SlideArg]:
    """URLs stay strings (``s3://b/x`` must not become ``s3:/b/x``); everything else is a local path."""
    return [s if remote_problem(s) else Path(s) for s in slides]


def _select_shard(items: list[SlideArg], shard: str | None) -> list[SlideArg]:
    from hishrst_runtime.jobs.shards import parse_shard, shard_from_env, shard_items

    try:
        sh = parse_shard(shard) if shard else shard_from_env()
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--shard") from e
    if sh is None:
        return items
    chosen = shard_items(items, index=sh[0], count=sh[1])
    click.echo(f"shard {sh[0]}/{sh[1]}: {len(chosen)} of {len(items)} slides")
    return chosen


def print_results(results: Sequence[SlideResult]) -> Counter[str]:
    """The summary table of ``results`` (one row per slide, the reason under each that is not ok)."""
    click.echo(f"\n{'slide':<34}{'status':<9}{'points':>9}{'tiles/s':>10}{'seconds':>9}")
    blank = lambda v: "" if v is None else v  # noqa: E731
    for r in results:
        click.echo(f"{r.name[:33]:<34}{r.status:<9}{blank(r.points):>9}{blank(r.tiles_per_s):>10}"
                   f"{blank(r.seconds):>9}")
        if r.status != "ok":
            click.echo(f"    {r.reason}")
    counts = Counter(r.status for r in results)
    click.echo(f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed (of {len(results)} slides)")
    return counts


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("slides", nargs=-1, required=True, type=str)
@_with_options
def run(slides: tuple[str, ...], bundle_dir: Path, out_dir: Path, shard: str | None, no_progress: bool,
        **settings: Any) -> None:
    """Predict dense gene expression over whole-slide OME-Zarr SLIDES with an exported bundle."""
    items = _slide_args(slides)
    collisions = output_collisions(items, out_dir)  # on the full list, so every shard agrees
    if collisions:
        lines = "; ".join(f"{o.name} <- {', '.join(map(str, s))}" for o, s in collisions.items())
        raise click.BadParameter(f"several slides would write the same output ({lines}); rename them",
                                 param_hint="SLIDES")
    with option_errors():
        options = RunOptions(progress=not no_progress, **settings)
    items = _select_shard(items, shard)
    with user_errors():
        results = run_slides(items, bundle_dir=bundle_dir, out_dir=out_dir, options=options, echo=click.echo)
    counts = print_results(results)
    if counts["failed"]:
        click.echo(f"{counts['failed']} of {len(results)} slides failed", err=True)
        sys.exit(1)
