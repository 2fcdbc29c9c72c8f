"""Whole-slide conversion to OME-Zarr (``hishrst convert``), torch-free.

:func:`convert_slide` converts an Aperio SVS, a tiled / pyramidal TIFF or an OME-TIFF into an NGFF
0.5 store with checksummed chunks, streaming: level 0 is read through the lazy
:class:`~hishrst_runtime.slides.tiff.TiffLevel` view in bands of chunk rows and written by
:func:`~hishrst_runtime.slides.pyramid.write_ome_zarr`, so memory stays at a few bands whatever the
slide size. The store is written to a hidden temporary directory next to the output and swapped in
at the end; a truncated or corrupt source is a :class:`ConvertError` naming the file.

The pixel size (µm / pixel) of a source comes from, in order: ``mpp=`` / ``--mpp``; Aperio's
``MPP = ...`` in the ImageDescription; OME-XML ``PhysicalSizeX/Y`` (with units); a JSON
ImageDescription; the TIFF ``XResolution``/``YResolution`` tags with ``ResolutionUnit`` inch or
centimetre (parsers and the plausible range: :mod:`hishrst_runtime.core.units`).
"""

from __future__ import annotations

import os
from pathlib import Path

from hishrst_runtime.core.files import remove_tree, swap_in, temp_sibling
from hishrst_runtime.core.units import PixelSizeError, check_mpp
from hishrst_runtime.slides.errors import ConvertError
from hishrst_runtime.slides.pyramid import DEFAULT_CHUNK, pyramid_shapes, write_ome_zarr
from hishrst_runtime.slides.tiff import TiffError, TiffLevel, rgb8_problem, tiff_mpp_or_reason, tiff_pixel_size

__all__ = [
    "ConvertError",
    "DEFAULT_CHUNK",
    "pyramid_shapes",
    "write_ome_zarr",
    "tiff_pixel_size",
    "convert_slide",
]

_MPP_HINT = "pass the pixel size with --mpp (µm per pixel, e.g. --mpp 0.5 for a 20x scan)"


def _check_rgb8(src: TiffLevel) -> None:
    """Refuse sources that are not one 8-bit RGB(A) plane."""
    problem = rgb8_problem(src.axes, src.dims, src.dtype)
    if problem is not None:
        raise ConvertError(f"{src.path}: {problem}; convert it to 8-bit RGB first")


def _source_mpp(src: TiffLevel, mpp: float | None, bounds: tuple[float, float] | None) -> tuple[float, str]:
    """(µm / pixel, origin) of the source: ``mpp`` if given, else the first plausible value in the file."""
    if mpp is not None:
        return float(mpp), "--mpp"
    value, origin = tiff_mpp_or_reason(src.tif, bounds=bounds)
    if value is None:
        raise ConvertError(f"{src.path}: {origin}; {_MPP_HINT}")
    return value, origin


def _check_paths(src: Path, out: Path, mpp: float | None, overwrite: bool, bounds: tuple[float, float] | None) -> None:
    if not src.is_file():
        raise ConvertError(f"{src}: no such file; check the path of the slide to convert")
    if mpp is not None:
        try:
            check_mpp(mpp, where=str(src), source="--mpp", fix="pass e.g. --mpp 0.5", bounds=bounds)
        except PixelSizeError as e:
            raise ConvertError(str(e)) from e
    if out.exists() and not overwrite:
        raise ConvertError(f"{out}: output already exists; pass --overwrite (overwrite=True) to replace it")
    if out.resolve() == src.resolve():
        raise ConvertError(f"{out}: the output would replace the input; choose another output path")


def _open_source(src: Path) -> TiffLevel:
    try:
        return TiffLevel(src)
    except TiffError as e:
        if "no image" in e.reason:
            raise ConvertError(f"{src}: the file contains no image; check that it is a slide") from e
        raise ConvertError(f"{src}: {e.reason}; convert it to a (pyramidal) TIFF first") from e


def convert_slide(
    src: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    mpp: float | None = None,
    chunk: int = DEFAULT_CHUNK,
    overwrite: bool = False,
    progress: bool = True,
    mpp_range: tuple[float, float] | None = None,
) -> Path:
    """Convert an SVS / TIFF / OME-TIFF slide to an OME-Zarr 0.5 pyramid (``cyx``); returns the store path.

    ``mpp`` (µm / pixel) overrides or supplies the source's pixel size; it and the file's must lie in
    ``mpp_range`` (µm / pixel; default ``$HISHRST_MPP_RANGE`` or 0.05–50). Streaming, bounded memory;
    written to a hidden ``.<name>.partial-…`` beside ``out_path`` and swapped in when complete, so an
    interrupted conversion leaves nothing that looks like a finished store and an existing output
    stays whole until the new one is. Raises :class:`ConvertError` (naming the file) for an
    unreadable, truncated or non-RGB source, a missing or implausible pixel size, or an existing
    output without ``overwrite=True``.
    """
    src, out = Path(src), Path(out_path)
    _check_paths(src, out, mpp, overwrite, mpp_range)
    with _open_source(src) as source:
        _check_rgb8(source)
        use_mpp, origin = _source_mpp(source, mpp, mpp_range)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(out, "partial")
        try:
            write_ome_zarr(source, tmp, mpp=use_mpp, chunk=chunk, version="0.5", axes="cyx", name=src.stem,
                           progress=progress, source_align_rows=source.align_rows,
                           extra_attrs={"hishrst": {"source": src.name, "mpp_source": origin}})
        except TiffError as e:
            remove_tree(tmp)
            raise ConvertError(f"{src}: {e.reason}; copy the complete file again or re-export it") from e
        except BaseException:
            remove_tree(tmp)
            raise
    return swap_in(tmp, out)
