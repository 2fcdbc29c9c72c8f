"""DICOM whole slides (a local folder of DICOM VL Whole Slide Microscopy files), read with ``wsidicom``, with
the same :class:`~hishrst_runtime.slides.slide.Slide` interface (torch-free).

Needs the ``dicom`` extra (``pip install "hishrst[dicom]"``: wsidicom, which brings pydicom); without it,
:func:`open_dicom_slide` raises :class:`~hishrst_runtime.slides.errors.SlideExtraMissing` naming the extra.
Neither package is imported until a DICOM slide is opened: :func:`is_dicom_folder`, the registry's
content sniff, only reads the 4-byte ``DICM`` magic of a few files.

* **Slide.** ``wsidicom.WsiDicom.open(folder)``: the folder's files (not its sub-folders) that are
  VL Whole Slide Microscopy instances; the levels of the selected pyramid (wsidicom's default, the first)
  are the slide's levels, finest (the base) first. Labels, overviews and thumbnails are not used.
* **Reads.** Each level is a :class:`~hishrst_runtime.slides.level.Level` whose box source, a
  :class:`DicomBoxes`, calls ``read_region`` on that stored level (never a rescaled one), as uint8 RGB (grey images are replicated to three channels). The chunk
  grid is the level's DICOM tile grid, so whole-chunk reads decode whole frames. The default focal plane
  and optical path are read. wsidicom's file reads are locked, so reader threads may share a slide.
* **Pixel size.** Level 0's DICOM PixelSpacing (mm, rows then columns) × 1000 → µm per pixel, resolved
  with :func:`~hishrst_runtime.core.units.resolve_mpp` (the one record: an implausible value is an error
  naming it); ``mpp=`` overrides it. wsidicom itself
  needs the spacing to order the levels, so a folder without it cannot be opened even with ``mpp=``.
* **Completeness.** wsidicom silently skips files it cannot read — a damaged level-0 file would leave a
  coarser level as the base. So a file with the DICOM magic that wsidicom did not take is an error unless
  its header names another kind of object (not VL WSI) or a label / overview / thumbnail; and the last
  tile of every level is decoded at open, which catches a truncated file. Errors are one line naming the
  folder (and file), what is wrong and the fix.
* **Levels** below the coarsest stored one are added by 2 × 2 mean pooling
  (:mod:`hishrst_runtime.slides.pooled`), as for other directly read formats. Chunk-integrity checks do
  not apply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.limits import check_raster_size
from hishrst_runtime.core.units import MppCandidate, resolve_mpp
from hishrst_runtime.slides.errors import ChunkDecodeError, SlideError, SlideExtraMissing, SlidePixelSizeError
from hishrst_runtime.slides.level import Level
from hishrst_runtime.slides.pooled import extend_pyramid, level_downsample
from hishrst_runtime.slides.slide import Slide

__all__ = ["DicomBoxes", "import_wsidicom", "is_dicom_folder", "open_dicom_slide"]

_EXTRA = 'pip install "hishrst[dicom]"'
#: The DICOM file magic and where it sits (after the 128-byte preamble).
_MAGIC, _MAGIC_AT = b"DICM", 128
#: The sniff looks at no more than this many directory entries and reads no more than this many files.
_SNIFF_ENTRIES, _SNIFF_FILES = 64, 8
_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_UNUSED_KINDS = ("LABEL", "OVERVIEW", "THUMBNAIL")
_CORRUPT = "the DICOM file is truncated or corrupt; copy the slide folder again (or export it again)"
#: What wsidicom and pydicom raise for files they cannot parse or decode (wsidicom's own errors are added).
_BASE_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, IndexError, AttributeError,
                                                 OSError, EOFError, NotImplementedError, RuntimeError)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _has_dicm(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(_MAGIC_AT)
            return f.read(4) == _MAGIC
    except OSError:
        return False


def is_dicom_folder(path: Path) -> bool:
    """Whether ``path`` is a directory holding at least one DICOM file (``DICM`` at byte 128).

    Cheap: looks at the first :data:`_SNIFF_ENTRIES` entries only and reads 4 bytes of at most
    :data:`_SNIFF_FILES` files (``.dcm`` names first); imports neither wsidicom nor pydicom."""
    path = Path(path)
    try:
        if not path.is_dir():
            return False
        with os.scandir(path) as it:
            entries = [e for _, e in zip(range(_SNIFF_ENTRIES), it)]
    except OSError:
        return False
    files = []
    for e in entries:
        try:
            if e.is_file() and not e.name.startswith("."):
                files.append(e)
        except OSError:
            continue
    files.sort(key=lambda e: not e.name.lower().endswith(".dcm"))
    return any(_has_dicm(Path(e.path)) for e in files[:_SNIFF_FILES])


def import_wsidicom(path: str) -> Any:
    """The ``wsidicom`` module, or :class:`SlideExtraMissing` naming ``path`` and the extra to install."""
    try:
        import wsidicom
    except ImportError as e:
        raise SlideExtraMissing(f"{path}: DICOM whole slides are read with wsidicom, which is not installed ({e}); "
                                f"install it with: {_EXTRA}") from e
    return wsidicom


def _errors(wsidicom: Any) -> tuple[type[BaseException], ...]:
    mod = getattr(wsidicom, "errors", None)
    own = tuple(v for v in vars(mod).values() if isinstance(v, type) and issubclass(v, Exception)) if mod else ()
    return _BASE_ERRORS + own


@dataclass(frozen=True)
class DicomBoxes:
    """The :class:`~hishrst_runtime.slides.boxes.BoxSource` of one stored level of a DICOM pyramid: ``read_region``
    of the ``WsiDicom`` handle ``wsi`` on wsidicom's pyramid level ``pyramid_level`` (log2 of its downsample),
    so nothing is rescaled. ``store``, ``path``: the folder and the level's files, for messages."""

    wsi: Any
    pyramid_level: int
    store: str
    path: str
    corrupt_hint: str = _CORRUPT
    _read_errors: tuple[type[BaseException], ...] = field(default=_BASE_ERRORS, repr=False)

    def read_box(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        try:
            data = np.asarray(self.wsi.read_region((x0, y0), self.pyramid_level, (x1 - x0, y1 - y0), as_array=True))
        except self._read_errors as e:
            raise ChunkDecodeError(f"{self.store}: DICOM {self.path} pixels [{y0}:{y1}, {x0}:{x1}] cannot be read "
                                   f"({_one_line(e)}); {self.corrupt_hint}") from e
        if data.ndim == 2:
            data = data[..., None]
        if data.shape[-1] == 1:
            data = np.repeat(data, 3, axis=-1)
        if data.shape != (y1 - y0, x1 - x0, data.shape[-1]) or data.shape[-1] < 3:
            raise ChunkDecodeError(f"{self.store}: DICOM {self.path} pixels [{y0}:{y1}, {x0}:{x1}] decode to shape "
                                   f"{data.shape}, expected ({y1 - y0}, {x1 - x0}, 3); {self.corrupt_hint}")
        return np.ascontiguousarray(data[..., :3], dtype=np.uint8)


def _header_kind(path: Path) -> tuple[str | None, str | None]:
    """(SOP class UID, image-type flavour) from ``path``'s header, or (None, None) when it cannot be read."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "ImageType"])
        meta = getattr(ds, "file_meta", None)
        sop = str(getattr(meta, "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "")) or None
        image_type = list(ds.get("ImageType", []) or [])
    except (*_BASE_ERRORS, InvalidDicomError):  # a header pydicom cannot even walk: damaged
        return None, None
    return sop, (str(image_type[2]).upper() if len(image_type) > 2 else None)


def _unread_file_error(folder: Path, used: set[Path]) -> SlideError | None:
    """A :class:`SlideError` naming the first DICOM file in ``folder`` that wsidicom did not read (``used``)
    and should have (damaged, incomplete, another slide's level); None when every skipped file is another
    kind of object or a label / overview / thumbnail."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        return SlideError(f"{folder}: cannot list the folder ({_one_line(e)}); check the path and its permissions")
    for name in names:
        f = folder / name
        if f.resolve() in used or not f.is_file() or not _has_dicm(f):
            continue
        sop, flavour = _header_kind(f)
        if sop is not None and (sop != _WSI_SOP_CLASS or flavour in _UNUSED_KINDS):
            continue
        what = "its header cannot be read" if sop is None else "wsidicom could not read it as a level of this slide"
        return SlideError(f"{folder}: DICOM file {name} is not part of the opened slide ({what}); the file is "
                          "truncated or corrupt, or belongs to another slide: copy the folder again, or keep one "
                          "slide's files per folder")
    return None


def _open_wsi(wsidicom: Any, path: Path) -> Any:
    errors = _errors(wsidicom)
    try:
        return wsidicom.WsiDicom.open(path)
    except wsidicom.errors.WsiDicomNotFoundError as e:
        damaged = _unread_file_error(path, set()) if path.is_dir() else None
        if damaged is not None:
            raise damaged from e
        raise SlideError(f"{path}: no DICOM whole-slide image levels found (VL Whole Slide Microscopy files of "
                         "image type VOLUME); pass the folder that holds the slide's .dcm files (not a DICOMDIR "
                         "folder above it)") from e
    except wsidicom.errors.WsiDicomNoResolutionError as e:
        raise SlideError(f"{path}: the DICOM files have no pixel spacing (PixelSpacing in the Shared Functional "
                         "Groups), which wsidicom needs to open the slide; export the slide again with its pixel "
                         "spacing") from e
    except errors as e:
        raise SlideError(f"{path}: wsidicom cannot open the DICOM slide ({_one_line(e)}); check that the folder "
                         "holds one complete slide (copy it again or export it again)") from e


def _mpp_yx(wsi: Any, path: str, mpp: float | None,
            bounds: tuple[float, float] | None) -> tuple[tuple[float, float], str]:
    spacing = None if mpp is not None else wsi.levels[0].pixel_spacing  # SizeMm(width=columns, height=rows)
    value = None if spacing is None else (float(spacing.height) * 1000.0, float(spacing.width) * 1000.0)
    yx, origin = resolve_mpp(path, override=mpp, bounds=bounds, strict=True, error=SlidePixelSizeError,
                             candidates=[MppCandidate(value, "the DICOM PixelSpacing of level 0 (× 1000)")],
                             missing="the DICOM files have no pixel spacing")
    return yx, "override" if origin == "override" else "metadata"


def _level_files(wsi_level: Any) -> str:
    files = getattr(wsi_level.default_instance.image_data, "files", None) or []
    return ", ".join(Path(str(f)).name for f in files) or "?"


def _levels(wsi: Any, wsidicom: Any, path: str, mpp_yx: tuple[float, float]) -> list[Level]:
    base = wsi.levels[0]
    h0, w0 = int(base.size.height), int(base.size.width)
    check_raster_size(h0, w0, kind="slide", where=f"{path} (DICOM level 0)")
    levels: list[Level] = []
    for i, lv in enumerate(wsi.levels):
        data = lv.default_instance.image_data
        if int(data.bits) != 8 or int(data.samples_per_pixel) not in (1, 3):
            raise SlideError(f"{path}: DICOM level {i} ({_level_files(lv)}) has {data.samples_per_pixel} samples of "
                             f"{data.bits} bits per pixel; hishrst reads 8-bit RGB (or grey) slides: export the "
                             "slide again as 8-bit RGB")
        h, w = int(lv.size.height), int(lv.size.width)
        th, tw = int(lv.tile_size.height), int(lv.tile_size.width)
        dy, dx = level_downsample((h0, w0), (h, w))
        name = f"level {i} ({_level_files(lv)})"
        levels.append(Level(
            index=i, mpp=0.5 * (mpp_yx[0] * dy + mpp_yx[1] * dx), mpp_yx=(mpp_yx[0] * dy, mpp_yx[1] * dx),
            downsample=0.5 * (dy + dx), shape=(h, w), chunks=(min(th, h), min(tw, w)), path=name, store=path,
            corrupt_hint=_CORRUPT, source=DicomBoxes(wsi, int(lv.level), path, name, _CORRUPT, _errors(wsidicom))))
    return levels


def open_dicom_slide(location: str | os.PathLike[str], *, mpp: float | None = None,
                     mpp_range: tuple[float, float] | None = None, allow_missing_chunks: bool = False) -> Slide:
    """Open a local DICOM whole slide (a folder of its ``.dcm`` files, or one file; see the module docstring);
    ``mpp`` (µm per level-0 pixel) overrides its pixel size; ``allow_missing_chunks`` is kept on the Slide
    (chunk-integrity checks do not apply). Raises :class:`SlideExtraMissing` without
    wsidicom, :class:`SlideError` naming the folder when it is missing, incomplete or unreadable."""
    spath = os.fspath(location)
    wsidicom = import_wsidicom(spath)
    p = Path(spath)
    if not p.exists():
        raise SlideError(f"{spath}: no such folder; check the path of the DICOM slide folder")
    wsi = _open_wsi(wsidicom, p)
    try:
        if p.is_dir():
            damaged = _unread_file_error(p, {Path(str(f)).resolve() for f in (wsi.files or [])})
            if damaged is not None:
                raise damaged
        mpp_yx, source = _mpp_yx(wsi, spath, mpp, mpp_range)
        levels = _levels(wsi, wsidicom, spath, mpp_yx)
        for lv in levels:  # decode each level's last tile: a truncated file fails here, not mid-run
            h, w = lv.shape
            lv.read_region(w - 1, h - 1, w, h)
    except BaseException:
        wsi.close()
        raise
    return Slide(spath, extend_pyramid(levels), mpp_source=source, kind="dicom", on_close=wsi.close,
                 allow_missing_chunks=allow_missing_chunks)
