"""The ``hishrst-run`` / ``hishrst run`` command: argument parsing, the summary table and the run report.

Options are parsed here and validated once, by :class:`~hishrst_runtime.jobs.options.RunOptions`; the
slide list is built by :func:`~hishrst_runtime.jobs.slide_lists.expand_slides`, the work itself is
:func:`hishrst_runtime.jobs.runner.run_slides`, and every invocation that reaches its output folder
leaves a report there (:mod:`hishrst_runtime.jobs.report`).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from hishrst_runtime.core.version import __version__
from hishrst_runtime.cli.errors import one_line, option_errors, user_errors
from hishrst_runtime.cli.logs import configure_logging, progress_enabled
from hishrst_runtime.core.errors import OutputStateError
from hishrst_runtime.core.urls import redact_text
from hishrst_runtime.core.vocab import DEFAULT_GRID, DEFAULT_PROVIDER, GRID_KINDS, PROVIDERS
from hishrst_runtime.core.vocab import DEFAULT_MASK_MODE, DEFAULT_POINTS_OUTSIDE, MASK_MODES, POINTS_OUTSIDE, RESOLUTIONS
from hishrst_runtime.jobs.formats import OUTPUT_FORMATS
from hishrst_runtime.jobs.inputs import SlideInput
from hishrst_runtime.jobs.locks import DEFAULT_LEASE_S
from hishrst_runtime.jobs.interrupts import Interrupted, raising_on_signals
from hishrst_runtime.jobs.options import DEFAULT_WORKERS, RunOptions
from hishrst_runtime.jobs.paths import output_collisions
from hishrst_runtime.jobs.results import SlideResult
from hishrst_runtime.jobs.runner import run_slides
from hishrst_runtime.jobs.shards import ShardChoice
from hishrst_runtime.output.encoding import DEFAULT_X_DTYPE, X_DTYPES

__all__ = ["run", "print_results"]

_PATH = click.Path(path_type=Path)
_OPTIONS = [
    click.option("--bundle", "bundle_dir", required=True,
                 type=click.Path(exists=True, file_okay=False, path_type=Path),
                 help="Model bundle directory written by `hishrst export`."),
    click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
                 help="Output directory; one <slide>.zarr AnnData store per slide, and the run report "
                      "(hishrst_run.json, summary.md)."),
    click.option("--points", "points_file", type=click.Path(exists=True, path_type=Path), default=None,
                 help="Predict at these points instead of a grid (one slide; a --slides-from sheet gives each "
                      "slide its own in its points column): a CSV with header x,y (level-0 pixels; optional id "
                      "column, used as obs names), an .h5ad with obsm['spatial'], or a Space Ranger outs folder "
                      "(in-tissue spots, named by barcode). Rows keep the file's order; --pitch-um, --grid and "
                      "--min-tissue do not apply."),
    click.option("--points-outside", type=click.Choice(POINTS_OUTSIDE), default=DEFAULT_POINTS_OUTSIDE,
                 show_default=True, help="Explicit points outside the slide: drop them with a warning giving the "
                 "count (the report records it; kept rows keep their names), or error: the slide fails, naming "
                 "the count and the first point."),
    click.option("--slides-from", "slides_from", multiple=True, type=click.Path(exists=True, dir_okay=False,
                 path_type=Path), help="Read more slides from FILE (repeatable): a CSV sheet with a header "
                 "slide[,points][,mask][,name] (each slide with its own points file, tissue mask and output "
                 "name; relative paths from the sheet's folder), or a plain list, one path or URL a line "
                 "(relative paths from the current directory); # comment lines and blank lines ignored."),
    click.option("--recursive", is_flag=True, help="Also take the slides in sub-folders of a folder argument; "
                 "outputs mirror the sub-folders (DIR/p1/S.svs -> OUT/p1/S.zarr)."),
    click.option("--pitch-um", type=float, default=None,
                 help="Query-point spacing in µm [default: 50, 4× Visium density]."),
    click.option("--grid", type=click.Choice(GRID_KINDS), default=DEFAULT_GRID, show_default=True,
                 help="Query-grid layout: hexagonal (as Visium) or square rows of points --pitch-um apart."),
    click.option("--resolution", type=click.Choice(RESOLUTIONS), default=None,
                 help="Bin size of a sub-spot bundle's output (square bins on its token lattice, as Visium HD's "
                      "binned outputs): 8um, one bin per token, or 16um, 2 x 2 tokens pooled in count space "
                      "[default: 8um]. Sub-spot bundles only; --points, --pitch-um, --grid and --min-tissue do not "
                      "apply to them."),
    click.option("--dtype", type=click.Choice(list(X_DTYPES)), default=DEFAULT_X_DTYPE, show_default=True,
                 help="Element type of X: float16 halves the output (about 3 significant digits)."),
    click.option("--provider", type=click.Choice(PROVIDERS), default=DEFAULT_PROVIDER, show_default=True,
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
                 "(sorted, dealt round-robin) [default: from the array job: Slurm SLURM_ARRAY_TASK_ID / "
                 "SLURM_ARRAY_TASK_COUNT, Kubernetes Indexed Job JOB_COMPLETION_INDEX / HISHRST_SHARD_COUNT (set "
                 "it to spec.completions), AWS Batch AWS_BATCH_JOB_ARRAY_INDEX / AWS_BATCH_JOB_ARRAY_SIZE]."),
    click.option("--claim", is_flag=True, help="Work stealing instead of shards: walk the slides sorted by path "
                 "and take each one whose lock is free and whose output is not complete, so any number of "
                 "workers (array tasks, nodes, hosts) sharing --out balance uneven slides; a killed worker's "
                 "slide is finished by the next to claim it. Implies --resume; not with --shard (array "
                 "variables are ignored)."),
    click.option("--stale-after", "stale_after", type=float, default=DEFAULT_LEASE_S, show_default=True,
                 help="Seconds a slide lock may go unrefreshed before other workers, on any host, take the slide "
                 "over (its holder refreshes it every min(60, SECONDS/4) s); keep it well above the clock skew "
                 "between hosts."),
    click.option("--resume", is_flag=True, help="Finish incomplete outputs instead of refusing them."),
    click.option("--overwrite", is_flag=True, help="Recompute outputs that exist (the old one stays until the "
                 "new one is complete)."),
    click.option("--allow-missing-chunks", is_flag=True, help="Read chunk files missing inside tissue as "
                 "background fill instead of failing the slide."),
    click.option("--h5ad", is_flag=True, help="Deprecated: use --format anndata,h5ad. Adds h5ad to --format."),
    click.option("--format", "output_format", default="anndata", show_default=True,
                 help="Outputs, a comma-separated set of: " + "; ".join(f"{f.name}: {f.description}" for f in
                                                                      OUTPUT_FORMATS.values())
                 + " (both = anndata,spatialdata). Without anndata the AnnData store is removed once the others "
                   "are written."),
    click.option("--tissue-mask", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                 help="Tissue mask of the (one) slide (a --slides-from sheet gives each slide its own in its mask "
                      "column): GeoJSON polygons in level-0 pixels (QuPath export) or a PNG / TIFF mask "
                      "stretched over the slide; combined with detected tissue as --mask-mode says."),
    click.option("--mask-mode", type=click.Choice(MASK_MODES), default=DEFAULT_MASK_MODE, show_default=True,
                 help="How a tissue mask meets tissue detection: intersect = tissue only where the mask and the "
                      "detector agree (glass inside the mask is left out); replace = the mask alone, and points "
                      "whose patch is mostly background by the detector get obs['background'] = True."),
    click.option("--qc/--no-qc", default=True, show_default=True,
                 help="Write a QC thumbnail <slide>.qc.png per slide (tissue outline, query points coloured by the "
                      "gene with the highest variance across points, scale bar), linked from summary.md."),
    click.option("--tissue-geojson/--no-tissue-geojson", default=None,
                 help="Write the tissue mask used as <slide>.tissue.geojson (level-0 pixel polygons, for "
                      "QuPath) beside the output [default: only with --tissue-mask]."),
    click.option("--progress/--no-progress", "progress", default=None, help="Show progress bars [default: "
                 "only when stderr is a terminal]."),
    click.option("-q", "--quiet", is_flag=True, help="Print only errors: no engine line, table or warnings."),
    click.option("-v", "--verbose", count=True, help="More log messages (-v: info, -vv: debug)."),
    click.version_option(__version__, "--version", prog_name="hishrst-run", message="%(prog)s %(version)s",
                         help="Show the version and exit."),
]


def _with_options(f: Any) -> Any:
    for opt in reversed(_OPTIONS):
        f = opt(f)
    return f


def _slides(slides: Sequence[str], slides_from: Sequence[Path], recursive: bool, out_dir: Path, *,
            points: Path | None, mask: Path | None) -> list[SlideInput]:
    """The slides (folders expanded without hishrst's outputs, lists and sheets read, URLs kept as strings),
    ``--points`` / ``--tissue-mask`` the defaults of every slide without its own; exit 2 when empty."""
    from hishrst_runtime.jobs.slide_lists import expand_inputs

    if not slides and not slides_from:
        raise click.UsageError("no slides: pass SLIDE... (stores, files, folders or URLs) or --slides-from FILE")
    with option_errors():
        items = expand_inputs(slides, slides_from=slides_from, recursive=recursive, out_dir=out_dir)
    collisions = output_collisions(items, Path("."))  # on the full list, so every shard agrees
    if collisions:
        lines = "; ".join(f"{o.as_posix()} <- {', '.join(map(str, s))}" for o, s in collisions.items())
        raise click.BadParameter(f"several slides would write the same output ({lines}); rename them",
                                 param_hint="SLIDES")
    _one_slide("--points", points, [i for i in items if i.points is None])
    _one_slide("--tissue-mask", mask, [i for i in items if i.mask is None])
    return [i.with_defaults(points=points, mask=mask) for i in items]


def _one_slide(option: str, value: Path | None, takers: list[SlideInput]) -> None:
    """Exit 2 when ``option`` was given and more than one slide would take it (it applies to one slide)."""
    if value is not None and len(takers) > 1:
        shown = ", ".join(str(i.slide) for i in takers[:3]) + (", ..." if len(takers) > 3 else "")
        raise click.UsageError(f"{option} takes exactly one slide, got {len(takers)} ({shown}); run each slide "
                               f"with its own {option} file, or give each its own in a --slides-from sheet")


def _select_shard(items: list[SlideInput], shard: str | None, claim: bool, echo: Callable[[str], Any]
                  ) -> tuple[list[SlideInput], ShardChoice | None]:
    """(this job's slides, its shard or None) from ``--shard`` or an array job's variables; ``--claim`` takes
    the whole list (workers claim slides one by one) and refuses ``--shard``."""
    from hishrst_runtime.jobs.shards import parse_shard, shard_choice_from_env, shard_items

    if claim:
        if shard:
            raise click.UsageError("--claim and --shard are exclusive: claiming workers share the whole slide list")
        echo(f"claim: {len(items)} slides, each taken by the first free worker")
        return items, None
    try:
        sh = ShardChoice(*parse_shard(shard)) if shard else shard_choice_from_env()
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--shard") from e
    if sh is None:
        return items, None
    chosen = shard_items(items, index=sh.index, count=sh.count)
    echo(f"shard {sh.index}/{sh.count}: {len(chosen)} of {len(items)} slides (from {sh.describe()})")
    return chosen, sh


def _grid_flags() -> tuple[str, ...]:
    """The query-grid flags given on the command line (refused with a sub-spot bundle, whose bins are fixed)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    return tuple(f"--{name.replace('_', '-')}" for name in ("pitch_um", "grid", "min_tissue")
                 if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE)


def print_results(results: Sequence[SlideResult], *, echo: Callable[[str], Any] = click.echo) -> Counter[str]:
    """The summary table of ``results`` (one row per slide, the reason under each that is not ok)."""
    echo(f"\n{'slide':<34}{'status':<9}{'points':>9}{'tiles/s':>10}{'seconds':>9}")
    blank = lambda v: "" if v is None else v  # noqa: E731
    for r in results:
        echo(f"{r.name[:33]:<34}{r.status:<9}{blank(r.points):>9}{blank(r.tiles_per_s):>10}{blank(r.seconds):>9}")
        if r.status != "ok":
            echo(f"    {redact_text(r.reason)}")
    counts = Counter(r.status for r in results)
    stopped = f", {counts['interrupted']} interrupted" if counts["interrupted"] else ""
    echo(f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed{stopped} "
         f"(of {len(results)} slides)")
    return counts


def _report(out_dir: Path, results: Sequence[SlideResult], *, started: float, shard: ShardChoice | None,
            error: BaseException | None = None) -> None:
    """Leave the run report in ``out_dir``; never for an invocation that stopped before ``out_dir`` existed
    or because of the output location itself (it may be an input)."""
    from hishrst_runtime.jobs.report import build_report, write_run_report

    cause = error.__cause__ if error is not None else None
    if not out_dir.is_dir() or isinstance(cause, OutputStateError):
        return
    params = dict(click.get_current_context().params)
    stop = error if isinstance(error, Interrupted) else None
    report = build_report(results=results, args=params, started=started, finished=time.time(),
                          shard=None if shard is None else shard.pair, error=None if error is None else one_line(error),
                          interrupted=None if stop is None else stop.name)
    if shard is not None:
        report["shard"] = shard.record()  # with its source: --shard, slurm, kubernetes or aws-batch
    try:
        write_run_report(out_dir, report)
    except OSError as e:  # the predictions are written: a report that cannot be is a warning, not a failure
        click.echo(f"warning: could not write the run report in {out_dir} ({e.strerror or e})", err=True)


def _interrupted(out_dir: Path, e: Interrupted, *, started: float, shard: ShardChoice | None,
                 echo: Callable[[str], Any]) -> None:
    """SIGTERM / SIGINT: the report (the slide in flight ``interrupted``), the table, exit ``128 + signum``."""
    _report(out_dir, e.results, started=started, shard=shard, error=e)
    if e.results:
        print_results(e.results, echo=echo)
    click.echo(f"interrupted by {e.name}: rerun with --resume to finish (rows already written are kept)", err=True)
    sys.exit(e.exit_status)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("slides", nargs=-1, required=False, type=str)
@_with_options
def run(slides: tuple[str, ...], bundle_dir: Path, out_dir: Path, shard: str | None, progress: bool | None,
        quiet: bool, verbose: int, points_file: Path | None, slides_from: tuple[Path, ...], recursive: bool,
        tissue_geojson: bool | None, **settings: Any) -> None:
    """Predict dense gene expression over whole-slide SLIDES with an exported bundle.

    SLIDES are OME-Zarr stores, slide files, folders of slides (every registered slide format: *.zarr,
    .svs, .tif(f), .ndpi, .scn, .bif, .qptiff, .mrxs, DICOM folders, ...) or URLs; --slides-from FILE adds
    more (a plain list, or a CSV sheet slide[,points][,mask][,name]). Writes OUT/<slide>.zarr per slide,
    a QC thumbnail and a run report.
    """
    started = time.time()
    configure_logging(quiet=quiet, verbose=verbose)
    echo: Callable[[str], Any] = (lambda s: None) if quiet else click.echo
    sh: ShardChoice | None = None
    with raising_on_signals():  # SIGTERM / SIGINT: report, then exit 128 + signum
        try:
            items = _slides(slides, slides_from, recursive, out_dir, points=points_file,
                            mask=settings["tissue_mask"])
            if settings["h5ad"]:
                click.echo("warning: --h5ad is deprecated; use --format anndata,h5ad (h5ad added to --format)",
                           err=True)
            with option_errors():
                options = RunOptions(progress=progress_enabled(progress, quiet=quiet), tissue_geojson=tissue_geojson,
                                     grid_options=_grid_flags(), **settings)
            items, sh = _select_shard(items, shard, settings["claim"], echo)
            try:
                with user_errors():
                    results = run_slides(items, bundle_dir=bundle_dir, out_dir=out_dir, options=options, echo=echo)
            except click.ClickException as e:
                _report(out_dir, [], started=started, shard=sh, error=e)
                raise
        except Interrupted as e:
            _interrupted(out_dir, e, started=started, shard=sh, echo=echo)
        _report(out_dir, results, started=started, shard=sh)
    counts = print_results(results, echo=echo)
    if counts["failed"]:
        if quiet:
            for r in results:
                if r.status == "failed":
                    click.echo(redact_text(f"{r.slide}: {r.reason}"), err=True)
        click.echo(f"{counts['failed']} of {len(results)} slides failed", err=True)
        sys.exit(1)
