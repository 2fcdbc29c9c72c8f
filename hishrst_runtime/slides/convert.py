"""Whole-slide conversion to OME-Zarr (``hishrst convert``), torch-free.

:func:`convert_slide` converts an Aperio SVS, a tiled / pyramidal TIFF or an OME-TIFF into an NGFF
0.5 store with checksummed chunks, streaming: level 0 is read through the lazy
:class:`~hishrst_runtime.slides.tiff.TiffLevel` view in bands of chunk rows and written by
:func:`~hishrst_runtime.slides.pyramid.write_ome_zarr`, so memory stays at a few bands whatever the
slide size. The pixels are read through level 0 of the direct TIFF reader
(:func:`~hishrst_runtime.slides.tiffslide.open_tiff_slide`), so convert applies the same missing / corrupt
tile rule as ``hishrst-run`` on the file (:mod:`hishrst_runtime.slides.integrity`): a tile with no data
(``TileByteCounts`` / ``TileOffsets`` 0) is background only where the next coarser stored level is plain
background, and a tile that does not decode or is a JPEG cut short is an error naming the tile — never
black or silently damaged pixels in the store. The store is written to a hidden temporary directory next
to the output and swapped in at the end; a truncated or corrupt source is a :class:`ConvertError` naming
the file.

The pixel size (µm / pixel) of a source comes from, in order: ``mpp=`` / ``--mpp``; Aperio's
``MPP = ...`` in the ImageDescription; OME-XML ``PhysicalSizeX/Y`` (with units); a JSON
ImageDescription; the TIFF ``XResolution``/``YResolution`` tags with ``ResolutionUnit`` inch or
centimetre (parsers and the plausible range: :mod:`hishrst_runtime.core.units`).

Safety, all decided before anything is written: the output may not overlap the input; an existing
output is replaced (with ``overwrite``) only when it is a store hishrst converted — marked with
:data:`~hishrst_runtime.core.owned.OWNER_FILE`, or, for stores converted before the marker, with the
``hishrst`` root attribute convert has always written (:func:`converted_by_hishrst`); the declared level-0
size must lie within the ``slide`` limit of :mod:`hishrst_runtime.core.limits`; and the destination must
have room for :func:`estimate_output_bytes`. A full or read-only disk during the write is a one-line
:class:`ConvertOutputError` and the partial store is removed. The debris of killed conversions (hidden
``.<name>.partial-PID-…`` siblings of dead processes) is removed first; a store a killed ``overwrite``
left renamed aside (``.<name>.old-PID-…``, output missing) is put back.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import time
from pathlib import Path
from typing import NoReturn

from hishrst_runtime.core.errors import OutputStateError
from hishrst_runtime.core.files import (clean_stale_siblings, read_json, remove_tree, restore_stale_old, swap_in,
                                        temp_sibling)
from hishrst_runtime.core.limits import RasterTooLargeError, check_raster_size
from hishrst_runtime.core.owned import check_replaceable, mark_owned
from hishrst_runtime.core.units import PixelSizeError, resolve_mpp
from hishrst_runtime.core.vocab import DEFAULT_CHUNK_CODEC, ChunkCodec
from hishrst_runtime.slides.errors import ConvertError, MissingChunkError, SlideError
from hishrst_runtime.slides.ngff import check_codec
from hishrst_runtime.slides.pyramid import DEFAULT_CHUNK, pyramid_shapes, write_ome_zarr
from hishrst_runtime.slides.tiff import (NO_TIFF_MPP, TiffError, TiffLevel, rgb8_problem, tiff_mpp_candidates,
                                         tiff_pixel_size)

__all__ = [
    "ConvertError",
    "ConvertOutputError",
    "SlideTooLargeError",
    "DEFAULT_CHUNK",
    "COMPRESSION_ENV",
    "DEFAULT_COMPRESSION",
    "pyramid_shapes",
    "write_ome_zarr",
    "tiff_pixel_size",
    "estimate_output_bytes",
    "converted_by_hishrst",
    "convert_slide",
]

#: Environment variable overriding the compression ratio :func:`estimate_output_bytes` assumes.
COMPRESSION_ENV = "HISHRST_CONVERT_COMPRESSION"
#: The assumed ratio of uncompressed to written bytes (the real SVS test slide, all tissue, gives 2.6).
DEFAULT_COMPRESSION = 2.0
_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class ConvertOutputError(ConvertError, OutputStateError):
    """The output cannot be written: it overlaps the input, holds something hishrst did not convert, exists
    without ``overwrite``, or its disk is too small, full or read-only. Nothing of the input is touched."""


class SlideTooLargeError(ConvertError, RasterTooLargeError):
    """The source declares a level 0 larger than the ``slide`` limit (``HISHRST_MAX_SLIDE_PIXELS``)."""


def _compression_ratio(value: float | None) -> float:
    """``value``, else ``$HISHRST_CONVERT_COMPRESSION``, else :data:`DEFAULT_COMPRESSION`; must be > 0."""
    text = str(value) if value is not None else os.environ.get(COMPRESSION_ENV, "").strip()
    try:
        ratio = float(text) if text else DEFAULT_COMPRESSION
    except ValueError:
        ratio = math.nan
    if not (math.isfinite(ratio) and ratio > 0):
        raise ConvertError(f"assumed compression ratio {text!r} is not a positive number; pass e.g. "
                           f"--assume-compression 4 (or set {COMPRESSION_ENV}=4), or leave it unset for "
                           f"{DEFAULT_COMPRESSION:g}")
    return ratio


def estimate_output_bytes(height: int, width: int, *, compression: float | None = None) -> int:
    """Conservative size in bytes of the store :func:`convert_slide` writes for a ``height × width`` px level 0.

    The rule: uncompressed RGB (3 bytes / px) × 4/3 for the pyramid (each level a quarter of the one
    before) ÷ an assumed compression ratio — ``compression``, else ``$HISHRST_CONVERT_COMPRESSION``, else
    :data:`DEFAULT_COMPRESSION` = 2, i.e. 2 bytes per level-0 pixel. Lossless zstd gives about 2.6 on
    tissue and far more on the white background around it, so real stores are usually smaller; pass a
    larger ratio for slides that are mostly background.
    """
    ratio = _compression_ratio(compression)
    return math.ceil(int(height) * int(width) * 4 / ratio)


def _size_text(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _check_free_space(src: Path, out: Path, shape: tuple[int, int], compression: float | None) -> None:
    """Refuse (before writing) when the destination's disk has less free space than the estimated store."""
    need = estimate_output_bytes(*shape, compression=compression)
    where = out.absolute().parent
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return  # cannot tell: the write itself reports a full disk
    if need > free:
        raise ConvertOutputError(
            f"{src}: converting its {shape[0]:,} × {shape[1]:,} px needs about {_size_text(need)} "
            f"(assuming {_compression_ratio(compression):g}× compression) but {where} has {_size_text(free)} free; "
            "free space there, choose an OUT.zarr on a larger disk, or, for a mostly-background slide, pass "
            f"--assume-compression 4 (or set {COMPRESSION_ENV}=4)")


def converted_by_hishrst(path: Path) -> bool:
    """Whether ``path`` is an OME-Zarr store hishrst converted before the ownership marker existed: its root
    ``zarr.json`` has the ``ome`` attributes and the ``hishrst`` {source, mpp_source} attribute that
    :func:`convert_slide` has always written."""
    meta = read_json(Path(path) / "zarr.json")
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    mark = attrs.get("hishrst") if isinstance(attrs, dict) else None
    return isinstance(mark, dict) and "mpp_source" in mark and "source" in mark and "ome" in attrs


def _check_pixels(src: TiffLevel) -> None:
    """Refuse sources that are not one 8-bit RGB(A) plane, or declare a level 0 beyond the slide limit."""
    problem = rgb8_problem(src.axes, src.dims, src.dtype)
    if problem is not None:
        raise ConvertError(f"{src.path}: {problem}; convert it to 8-bit RGB first")
    try:
        check_raster_size(src.shape[0], src.shape[1], kind="slide", where=f"{src.path} (level 0)")
    except RasterTooLargeError as e:
        raise SlideTooLargeError(str(e)) from e


def _source_mpp(src: Path, tif: object, mpp: float | None, bounds: tuple[float, float] | None) -> tuple[float, str]:
    """(µm / pixel, origin) of the source (:func:`~hishrst_runtime.core.units.resolve_mpp`): ``mpp`` if given
    (origin ``"--mpp"``), else the first plausible value in the file."""
    candidates = tiff_mpp_candidates(tif) if mpp is None else []
    try:
        (value, _), origin = resolve_mpp(str(src), override=mpp, candidates=candidates, bounds=bounds,
                                         missing=NO_TIFF_MPP)
    except PixelSizeError as e:
        raise ConvertError(str(e)) from e
    return value, "--mpp" if origin == "override" else origin


def _check_source(src: Path) -> None:
    if not src.is_file():
        raise ConvertError(f"{src}: no such file; check the path of the slide to convert")


def _check_output(src: Path, out: Path, overwrite: bool) -> bool:
    """:func:`~hishrst_runtime.core.owned.check_replaceable` for a converted store (see the module docstring)."""
    try:
        return check_replaceable(out, kind="ome-zarr", overwrite=overwrite, what="an OME-Zarr store",
                                 option="OUT.zarr", inputs=[src], legacy=converted_by_hishrst)
    except OutputStateError as e:
        raise ConvertOutputError(str(e)) from e


def _prepare_output(src: Path, out: Path, overwrite: bool) -> None:
    """Put back a store a killed overwrite left aside (and check it again), then remove killed runs' debris."""
    if restore_stale_old(out) is not None:
        _check_output(src, out, overwrite)
    clean_stale_siblings(out)


def _open_source(src: Path) -> TiffLevel:
    try:
        return TiffLevel(src)
    except TiffError as e:
        if "no image" in e.reason:
            raise ConvertError(f"{src}: the file contains no image; check that it is a slide") from e
        raise ConvertError(f"{src}: {e.reason}; convert it to a (pyramidal) TIFF first") from e


def _os_error(e: OSError, src: Path, out: Path) -> ConvertOutputError | None:
    """A one-line error for a full or read-only destination (None for other OS errors: a bug)."""
    if e.errno in _FULL:
        return ConvertOutputError(f"{out}: the disk is full ({e.strerror}) while converting {src}; the partial "
                                  f"output was removed — free space in {out.absolute().parent} or choose an "
                                  "OUT.zarr on another disk")
    if e.errno in _NOT_WRITABLE:
        return ConvertOutputError(f"{out}: cannot be written ({e.strerror}: {e.filename or out.parent}); "
                                  "choose an OUT.zarr in a folder you can write to")
    return None


def _raise_os_error(e: OSError, src: Path, out: Path) -> NoReturn:
    """Raise the one-line error of :func:`_os_error` (chained to ``e``), or ``e`` itself for other OS errors."""
    error = _os_error(e, src, out)
    if error is None:
        raise e
    raise error from e


def _tile_error(e: SlideError) -> ConvertError:
    """A missing or corrupt tile met while converting, as a one-line :class:`ConvertError` naming the tile."""
    if isinstance(e, MissingChunkError):  # its fix names hishrst-run's --allow-missing-chunks, which convert lacks
        what = str(e).split("; restore", 1)[0]
        return ConvertError(f"{what}; restore the tile (copy the slide again or re-export it): hishrst convert "
                            "does not fill missing tiles")
    return ConvertError(str(e))


def _discard(tmp: Path, *, settle_s: float = 0.5) -> None:
    """Remove a failed store. zarr writes chunks concurrently and, when one write fails, the others may still
    land (re-creating folders) after the error reached us: remove again until the path stays gone (``settle_s``
    seconds, 0.2 s more after each re-created path; a straggler after that is a hidden ``.partial-…`` sibling the
    next conversion to the same output removes)."""
    deadline = time.monotonic() + settle_s
    remove_tree(tmp)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if os.path.lexists(tmp):
            remove_tree(tmp)
            deadline = max(deadline, time.monotonic() + 0.2)


def _write_store(source: TiffLevel, src: Path, out: Path, *, mpp: float, origin: str, chunk: int,
                 progress: bool, bounds: tuple[float, float] | None, codec: ChunkCodec) -> Path:
    """Write the store to a hidden ``.<name>.partial-…`` beside ``out`` and mark it; removed on any failure.
    The pixels are level 0 of the direct reader (its missing / corrupt tile rule, see the module docstring)."""
    from hishrst_runtime.slides.tiffslide import open_tiff_slide

    tmp = temp_sibling(out, "partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open_tiff_slide(src, mpp=mpp, mpp_range=bounds) as direct:
            write_ome_zarr(direct.levels[0].image, tmp, mpp=mpp, chunk=chunk, version="0.5", axes="cyx",
                           codec=codec, name=src.stem, progress=progress, source_align_rows=source.align_rows,
                           extra_attrs={"hishrst": {"source": src.name, "mpp_source": origin}})
        mark_owned(tmp, "ome-zarr", source=src.name)
    except TiffError as e:
        _discard(tmp)
        raise ConvertError(f"{src}: {e.reason}; copy the complete file again or re-export it") from e
    except SlideError as e:  # a tile with no data inside tissue, or one that does not decode
        _discard(tmp)
        raise _tile_error(e) from e
    except OSError as e:
        _discard(tmp)
        _raise_os_error(e, src, out)
    except BaseException:
        _discard(tmp)
        raise
    return tmp


def convert_slide(
    src: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    mpp: float | None = None,
    chunk: int = DEFAULT_CHUNK,
    overwrite: bool = False,
    progress: bool = True,
    mpp_range: tuple[float, float] | None = None,
    compression: float | None = None,
    codec: ChunkCodec = DEFAULT_CHUNK_CODEC,
) -> Path:
    """Convert an SVS / TIFF / OME-TIFF slide to an OME-Zarr 0.5 pyramid (``cyx``); returns the store path.

    ``mpp`` (µm / pixel) overrides or supplies the source's pixel size; it and the file's must lie in
    ``mpp_range`` (µm / pixel; default ``$HISHRST_MPP_RANGE`` or 0.05–50). Streaming, bounded memory;
    written to a hidden ``.<name>.partial-…`` beside ``out_path`` and swapped in when complete, so an
    interrupted conversion leaves nothing that looks like a finished store and an existing output
    stays whole until the new one is. ``compression`` is the ratio :func:`estimate_output_bytes` assumes
    for the free-space check; ``codec`` compresses the chunks (``zstd``: smallest; ``lz4``: ~6× faster to
    decode, for stores that feed GPU nodes; both lossless and checksummed). Raises :class:`ConvertError` (naming the file) for an unreadable, truncated,
    too large or non-RGB source or a missing or implausible pixel size, and :class:`ConvertOutputError`
    for an output that overlaps the input, is not a store hishrst converted, exists without
    ``overwrite=True``, or does not fit on (or is full on) its disk (module docstring).
    """
    src, out = Path(src), Path(out_path)
    _compression_ratio(compression)
    check_codec(codec)
    _check_source(src)
    _check_output(src, out, overwrite)
    with _open_source(src) as source:
        _check_pixels(source)
        use_mpp, origin = _source_mpp(src, source.tif, mpp, mpp_range)
        _prepare_output(src, out, overwrite)
        _check_free_space(src, out, source.shape[:2], compression)
        tmp = _write_store(source, src, out, mpp=use_mpp, origin=origin, chunk=chunk, progress=progress,
                           bounds=mpp_range, codec=codec)
    try:
        return swap_in(tmp, out)
    except OSError as e:
        remove_tree(tmp)
        _raise_os_error(e, src, out)
