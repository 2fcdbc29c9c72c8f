"""The ``hishrst features`` command: per-slide encoder embeddings (no head) as TRIDENT-style HDF5 files.

Its options are ``hishrst-run``'s own (the same click parameters, so the same names, choices, defaults and
validation by :class:`~hishrst_runtime.jobs.options.RunOptions`) for slides, points, masks, the grid, pixel
size, engine, readers, batch size, locks, ``--resume`` and ``--overwrite``; ``--out`` and ``--points`` say
what they mean here. The work is :func:`hishrst_runtime.jobs.features.extract_features`; the file format is
:mod:`hishrst_runtime.output.features_h5`.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import click

from hishrst_runtime.cli.errors import option_errors, user_errors
from hishrst_runtime.cli.logs import configure_logging, progress_enabled
from hishrst_runtime.cli.run import _slides, print_results
from hishrst_runtime.cli.run import run as run_command
from hishrst_runtime.core.urls import redact_text
from hishrst_runtime.jobs.interrupts import Interrupted, raising_on_signals
from hishrst_runtime.jobs.options import RunOptions

__all__ = ["features"]

#: ``hishrst-run`` parameters that ``hishrst features`` shares, in help order.
SHARED = ("bundle_dir", "out_dir", "points_file", "points_outside", "slides_from", "recursive", "pitch_um", "grid",
          "provider", "batch_size", "workers", "engine_threads", "mpp", "min_tissue", "stale_after", "resume",
          "overwrite", "allow_missing_chunks", "tissue_mask", "mask_mode", "progress", "quiet", "verbose")
_HELP = {
    "out_dir": "Output directory; one <slide>.h5 per slide: datasets features [N, D] float32 and coords [N, 2] "
               "(int64 top-left level-0 pixels, TRIDENT layout), coords_center (float64 level-0 centres) and "
               "attributes (encoder, feature dim, patch size in µm and level-0 px, mpp, bundle hash, version).",
    "points_file": "Embed patches at these points instead of a grid (one slide; a --slides-from sheet gives each "
                   "slide its own in its points column): a CSV with header x,y (level-0 pixels; optional id "
                   "column, written as obs_names), an .h5ad with obsm['spatial'], or a Space Ranger outs folder. "
                   "Rows keep the file's order; --pitch-um, --grid and --min-tissue do not apply.",
    "recursive": "Also take the slides in sub-folders of a folder argument; outputs mirror the sub-folders "
                 "(DIR/p1/S.svs -> OUT/p1/S.h5).",
    "resume": "Finish slides a stopped run left incomplete (<slide>.h5.partial): each is recomputed whole, so the "
              "file equals an uninterrupted run's.",
    "overwrite": "Recompute complete <slide>.h5 files hishrst wrote (the old one stays until the new one is "
                 "complete); files hishrst did not write are never replaced.",
}


def _params() -> list[click.Parameter]:
    """Copies of ``hishrst-run``'s shared parameters, with this command's help where it differs."""
    by_name = {p.name: p for p in run_command.params}
    out = []
    for name in SHARED:
        p = copy.copy(by_name[name])
        if name in _HELP and isinstance(p, click.Option):
            p.help = _HELP[name]
        out.append(p)
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, params=_params())
@click.argument("slides", nargs=-1, required=False, type=str)
def features(slides: tuple[str, ...], bundle_dir: Path, out_dir: Path, points_file: Path | None,
             slides_from: tuple[Path, ...], recursive: bool, progress: bool | None, quiet: bool, verbose: int,
             **settings: Any) -> None:
    """Write the bundle encoder's patch embeddings of whole-slide SLIDES (no expression head).

    SLIDES are taken as by `hishrst run` (stores, slide files, folders, URLs; --slides-from FILE adds more).
    Writes OUT/<slide>.h5 per slide at the default grid over tissue or at --points, crash-safely
    (<slide>.h5.partial renamed when complete); a complete file is skipped unless --overwrite.
    """
    configure_logging(quiet=quiet, verbose=verbose)
    echo = (lambda s: None) if quiet else click.echo
    with raising_on_signals():
        try:
            items = _slides(slides, slides_from, recursive, out_dir, points=points_file, mask=settings["tissue_mask"])
            with option_errors():
                options = RunOptions(progress=progress_enabled(progress, quiet=quiet), qc=False, **settings)
            with user_errors():
                from hishrst_runtime.jobs.features import extract_features

                results = extract_features(items, bundle_dir=bundle_dir, out_dir=out_dir, options=options, echo=echo)
        except Interrupted as e:
            click.echo(f"interrupted by {e.name}: rerun with --resume to finish (incomplete slides are recomputed)",
                       err=True)
            sys.exit(e.exit_status)
    counts = print_results(results, echo=echo)
    if counts["failed"]:
        for r in results:
            if quiet and r.status == "failed":
                click.echo(redact_text(f"{r.slide}: {r.reason}"), err=True)
        click.echo(f"{counts['failed']} of {len(results)} slides failed", err=True)
        sys.exit(1)
