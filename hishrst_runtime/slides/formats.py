"""The slide-format registry: one entry per format owns its name endings, how its content is recognised,
which module opens it and which optional extra that module needs.

Every list of slide suffixes elsewhere derives from here — folder scans (``hishrst-run DIR``), output
names (``S.svs`` → ``S.zarr``), training's image readers — so a reader the runtime can open is also
found in folders and named the same way; :func:`~hishrst_runtime.slides.reader.open_slide` dispatches a
local file or directory to its format's opener through :func:`format_for_path`. Adding a format is one
reader module plus one :func:`register_format` call below (e.g. DICOM WSI:
:mod:`hishrst_runtime.slides.dicom_slide`); no other module changes.

An opener is named as ``"module:function"`` and imported only when a slide of that format is opened,
so an optional package is never imported at start-up. Every opener has the signature
``open(location: str, *, mpp: float | None, mpp_range: tuple[float, float] | None,
allow_missing_chunks: bool) -> Slide``; it builds plain :class:`~hishrst_runtime.slides.level.Level` s
over its own :class:`~hishrst_runtime.slides.boxes.BoxSource` (or a zarr-like array), decides the pixel
size with :func:`~hishrst_runtime.core.units.resolve_mpp`, and names itself in ``Slide.kind``.
A file no format claims goes to the ``fallback`` format (OpenSlide), unless it is clearly not a slide
(:data:`~hishrst_runtime.slides.sources.NOT_SLIDE_SUFFIXES`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SlideFormat", "register_format", "slide_formats", "get_format", "slide_suffixes", "scan_suffixes",
           "strip_slide_suffix", "format_for_path", "format_for_name", "fallback_format", "load_opener",
           "ZARR_SUFFIXES"]

#: Directory endings of (OME-)Zarr stores.
ZARR_SUFFIXES: tuple[str, ...] = (".ome.zarr", ".zarr")


@dataclass(frozen=True)
class SlideFormat:
    """One slide format. ``suffixes``: lower-case name endings (``.ome.tiff`` before ``.tiff`` is not needed:
    lookups try the longest first); ``opener``: ``"module:function"``; ``sniff``: recognises the content
    whatever the name (None: by name only); ``directory``: the slide is a directory (zarr store, DICOM
    folder); ``extra``: the pip extra its opener needs (None: base install); ``scan``: found by folder
    scans (False for formats opened only when named); ``fallback``: opens local files no format claims
    (one format, OpenSlide's catch-all)."""

    name: str
    suffixes: tuple[str, ...]
    opener: str | None
    sniff: Callable[[Path], bool] | None = None
    directory: bool = False
    extra: str | None = None
    scan: bool = True
    description: str = ""
    fallback: bool = False


_REGISTRY: dict[str, SlideFormat] = {}


def register_format(fmt: SlideFormat, *, replace: bool = False) -> SlideFormat:
    """Add ``fmt`` to the registry (``replace``: overwrite an entry of the same name)."""
    if fmt.name in _REGISTRY and not replace:
        raise ValueError(f"slide format {fmt.name!r} is already registered")
    bad = [s for s in fmt.suffixes if not s.startswith(".") or s != s.lower()]
    if bad:
        raise ValueError(f"slide format {fmt.name!r}: suffixes must be lower case and start with '.', got {bad}")
    _REGISTRY[fmt.name] = fmt
    return fmt


def slide_formats() -> tuple[SlideFormat, ...]:
    """Every registered format, in registration order."""
    return tuple(_REGISTRY.values())


def get_format(name: str) -> SlideFormat:
    """The format registered as ``name`` (KeyError naming the known ones otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no slide format {name!r}; known: {', '.join(_REGISTRY)}") from None


def _longest_first(suffixes: list[str]) -> tuple[str, ...]:
    return tuple(sorted(dict.fromkeys(suffixes), key=lambda s: (-len(s), s)))


def slide_suffixes() -> tuple[str, ...]:
    """Every registered name ending, longest first (what output names drop)."""
    return _longest_first([s for f in _REGISTRY.values() for s in f.suffixes])


def scan_suffixes(*, directory: bool) -> tuple[str, ...]:
    """Name endings a folder scan picks up: of directories (``directory=True``) or of files."""
    return _longest_first([s for f in _REGISTRY.values() if f.scan and f.directory == directory for s in f.suffixes])


def strip_slide_suffix(name: str) -> str:
    """``name`` without its slide ending (``a.ome.tiff`` → ``a``, ``b.bif`` → ``b``); unchanged when none matches
    or nothing would be left."""
    low = name.lower()
    for suffix in slide_suffixes():
        if low.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def format_for_path(path: Path) -> SlideFormat | None:
    """The format of a local file or directory: by content (``sniff``) first, then by name; None when no
    registered format claims it."""
    path = Path(path)
    is_dir = path.is_dir()
    for fmt in _REGISTRY.values():
        if fmt.directory == is_dir and fmt.sniff is not None and fmt.sniff(path):
            return fmt
    low = path.name.lower()
    for fmt in _REGISTRY.values():
        if fmt.directory == is_dir and any(low.endswith(s) for s in fmt.suffixes):
            return fmt
    return None


def format_for_name(name: str) -> SlideFormat | None:
    """The format whose name ending ``name`` has (longest ending first; no file is touched, e.g. for URLs)."""
    low = name.lower()
    for suffix in slide_suffixes():
        if low.endswith(suffix):
            return next(f for f in _REGISTRY.values() if suffix in f.suffixes)
    return None


def fallback_format() -> SlideFormat | None:
    """The format that opens local files no format claims (OpenSlide), or None when none is registered."""
    return next((f for f in _REGISTRY.values() if f.fallback), None)


def load_opener(fmt: SlideFormat) -> Callable[..., Any]:
    """Import and return ``fmt``'s opener (only now is its module, and any optional package it needs, imported)."""
    if fmt.opener is None:
        raise ValueError(f"slide format {fmt.name!r} is opened by the zarr reader, not through an opener")
    module, _, func = fmt.opener.partition(":")
    return getattr(importlib.import_module(module), func)


# ------------------------------------------------------------------------------------------ the formats


def _sniff_tiff(path: Path) -> bool:
    from hishrst_runtime.slides.tiffslide import is_tiff_file

    return is_tiff_file(path)


def _sniff_zarr(path: Path) -> bool:
    return any((path / m).is_file() for m in ("zarr.json", ".zgroup", ".zattrs"))


register_format(SlideFormat(
    "ome-zarr", ZARR_SUFFIXES, None, sniff=_sniff_zarr, directory=True,
    description="OME-Zarr (NGFF 0.4 / 0.5, bioformats2raw), local or over http(s) / s3; SpatialData image elements"))
register_format(SlideFormat(  # the one list of TIFF-family endings (training's readers derive theirs from it)
    "tiff", (".svs", ".tif", ".tiff", ".ome.tif", ".ome.tiff", ".ndpi", ".scn", ".bif", ".qptiff", ".btf", ".tf2",
             ".tf8"),
    "hishrst_runtime.slides.tiffslide:open_tiff_slide", sniff=_sniff_tiff,
    description="TIFF-family whole-slide files (SVS, TIFF, OME-TIFF, NDPI, SCN, BIF, QPTIFF, BigTIFF), read directly"))
register_format(SlideFormat(
    "openslide", (".mrxs", ".vms", ".vmu", ".svslide"), "hishrst_runtime.slides.openslide_slide:open_openslide_slide",
    extra="openslide", fallback=True, description="other vendor formats through OpenSlide"))


def _sniff_dicom(path: Path) -> bool:
    from hishrst_runtime.slides.dicom_slide import is_dicom_folder  # imports neither wsidicom nor pydicom

    return is_dicom_folder(path)


register_format(SlideFormat(
    "dicom", (".dcm",), "hishrst_runtime.slides.dicom_slide:open_dicom_slide", sniff=_sniff_dicom, directory=True,
    extra="dicom", description="DICOM whole slides (a folder of VL Whole Slide Microscopy files) through wsidicom"))
