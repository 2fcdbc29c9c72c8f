"""The ``hishrst convert`` command."""

from __future__ import annotations

import time
from pathlib import Path

import click

from hishrst_runtime.cli.errors import user_errors
from hishrst_runtime.cli.logs import configure_logging, progress_enabled
from hishrst_runtime.core.vocab import CHUNK_CODECS, DEFAULT_CHUNK_CODEC
from hishrst_runtime.slides.convert import COMPRESSION_ENV, DEFAULT_CHUNK, DEFAULT_COMPRESSION, convert_slide

__all__ = ["convert_cmd"]


@click.command("convert", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", metavar="IN", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", metavar="OUT.zarr", type=click.Path(path_type=Path))
@click.option("--mpp", type=float, default=None,
              help="Level-0 pixel size in µm/pixel; overrides the file's (needed when the file has none). "
                   "0.05-50 accepted, other range via HISHRST_MPP_RANGE=LO,HI.")
@click.option("--chunk", type=click.IntRange(64, 8192), default=DEFAULT_CHUNK, show_default=True,
              help="Chunk side in pixels.")
@click.option("--codec", type=click.Choice(CHUNK_CODECS), default=DEFAULT_CHUNK_CODEC, show_default=True,
              help="Chunk compression (lossless, checksummed): zstd gives the smallest store; lz4 is decoded ~6x "
                   "faster, for stores that feed GPU nodes (a store about as large on tissue, larger on glass).")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT.zarr if it is a store hishrst converted (anything else is never replaced).")
@click.option("--assume-compression", "compression", type=click.FloatRange(min=0, min_open=True),
              default=None, metavar="RATIO",
              help=f"Compression ratio assumed when checking free space before writing (the store is estimated "
                   f"at level-0 pixels x 3 B x 4/3 / RATIO) [default: ${COMPRESSION_ENV} or "
                   f"{DEFAULT_COMPRESSION:g}]; larger for mostly-background slides.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar [default: only when stderr is a terminal].")
def convert_cmd(src: Path, out: Path, mpp: float | None, chunk: int, codec: str, overwrite: bool,
                compression: float | None, progress: bool | None) -> None:
    """Convert an SVS / TIFF / OME-TIFF slide IN to an OME-Zarr 0.5 pyramid OUT.zarr.

    Streams the slide with bounded memory; the pixel size is carried over from the file
    (Aperio MPP, OME PhysicalSize or TIFF resolution) unless --mpp is given.
    """
    from hishrst_runtime.slides.reader import open_slide

    t0 = time.perf_counter()
    configure_logging()
    with user_errors():
        path = convert_slide(src, out, mpp=mpp, chunk=chunk, overwrite=overwrite, progress=progress_enabled(progress),
                             compression=compression, codec=codec)
        with open_slide(path) as slide:
            shapes = ", ".join(f"{lv.shape[1]}x{lv.shape[0]}" for lv in slide.levels)
            click.echo(f"Wrote {path}: {len(slide.levels)} levels ({shapes} px, W x H), "
                       f"{slide.mpp0:.4g} µm/px at level 0, chunks {chunk} ({codec}), {time.perf_counter() - t0:.1f} s")
