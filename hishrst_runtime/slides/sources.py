"""What a slide argument names: a local OME-Zarr store, a URL, a SpatialData image element, or a local file or
directory of a registered format (TIFF-family, OpenSlide, DICOM, …: :mod:`hishrst_runtime.slides.formats`)
(torch-free). :func:`parse_source` only classifies; :func:`open_slide` opens.

How sources are addressed (the same strings in ``hishrst-run`` and ``open_slide``):

=====================================  ==============================================================
``slide.ome.zarr``                      a local OME-Zarr (NGFF 0.4 / 0.5) directory, or bioformats2raw
``https://host/slide.ome.zarr``         a remote OME-Zarr over HTTP(S) (``hishrst[remote]``); also
``s3://bucket/slide.ome.zarr``          ``s3://`` and any other fsspec protocol whose package is installed
``sdata.zarr::he_image``                image element ``he_image`` of a SpatialData store (local or URL);
                                        ``sdata.zarr`` alone works when it holds exactly one image, and
                                        ``sdata.zarr/images/he_image`` is plain NGFF and works too
``slide.svs`` / ``.tif`` / ``.ndpi`` …  a TIFF-family file (recognised by its header), read directly
``slide.mrxs`` / ``.vms`` / ``.vmu`` …  other formats, through OpenSlide (``hishrst[openslide]``)
``slide_dicom/``                        a folder of DICOM WSI files (recognised by content; ``hishrst[dicom]``)
``file:///data/slide.svs``              a local path (:func:`file_url_path`)
=====================================  ==============================================================

A local file or directory goes to the registered format :func:`~hishrst_runtime.slides.formats.format_for_path`
finds (by content first, then by name): zarr stores to the zarr reader, the others to their opener. A file
no format claims goes to the fallback format (OpenSlide). Files that are clearly not slides (text, CSV, JSON / GeoJSON, ``.h5ad``, PNG / JPEG:
:data:`NOT_SLIDE_SUFFIXES`) are refused with a :class:`SlideError` naming the file (lists of slides go to
``--slides-from FILE``).

``::`` separates an element name only when what follows has no ``/`` or ``:``, so fsspec's chained
URLs (``simplecache::s3://…``) pass through unchanged.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from hishrst_runtime.slides.errors import SlideError
from hishrst_runtime.slides.formats import SlideFormat, fallback_format, format_for_path
from hishrst_runtime.slides.ngff import FORMATS

__all__ = ["SlideSource", "SourceKind", "parse_source", "is_url", "file_url_path", "spatialdata_image_group",
           "NOT_SLIDE_SUFFIXES"]

#: ``"zarr"`` (a local zarr store, or anything the zarr reader should name), ``"remote"`` (a URL), or the
#: name of the registered format whose opener reads the file or directory (``"tiff"``, ``"dicom"``, …).
SourceKind = str
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_ELEMENT = re.compile(r"^[A-Za-z0-9_.\-]+$")
#: Files that are never slides: refused naming the file, not handed to OpenSlide (whose missing extra would
#: be the message). Lists of slides (``_LIST_SUFFIXES``) go to ``--slides-from FILE``.
NOT_SLIDE_SUFFIXES: tuple[str, ...] = (".txt", ".csv", ".tsv", ".list", ".json", ".geojson", ".h5ad", ".h5",
                                       ".png", ".jpg", ".jpeg", ".gif", ".md", ".yaml", ".yml")
_LIST_SUFFIXES = (".txt", ".csv", ".list")


@dataclass(frozen=True)
class SlideSource:
    """A classified slide argument: ``kind``, the store / file ``location`` (path or URL), the SpatialData
    image ``element`` (or None), ``text``, the argument as given (for messages), and ``format``: the
    registered format whose opener reads it (None for zarr stores and URLs)."""

    text: str
    kind: SourceKind
    location: str
    element: str | None = None
    format: SlideFormat | None = None


def is_url(text: str | os.PathLike[str]) -> bool:
    """Whether ``text`` is a URL (``scheme://…``) other than ``file://`` (a ``Path`` never is)."""
    if not isinstance(text, str):
        return False
    return bool(_URL.match(text)) and not text.lower().startswith("file://")


def file_url_path(text: str) -> str | None:
    """The local path a ``file://`` URL names (``file:///data/s.svs`` and ``file://localhost/data/s.svs``
    give ``/data/s.svs``; percent escapes decoded, a ``::element`` suffix kept), or None for other text."""
    if not isinstance(text, str) or not text.lower().startswith("file://"):
        return None
    rest = text[len("file://"):]
    if rest.lower().startswith("localhost/"):
        rest = rest[len("localhost"):]
    return unquote(rest)


def _split_element(text: str) -> tuple[str, str | None]:
    head, sep, tail = text.rpartition("::")
    if sep and head and _ELEMENT.match(tail):
        return head, tail
    return text, None


def parse_source(source: str | os.PathLike[str]) -> SlideSource:
    """Classify a slide argument (see the module docstring); never touches the network."""
    text = os.fspath(source)
    location, element = _split_element(text)
    location = file_url_path(location) or location
    if is_url(location):
        return SlideSource(text, "remote", location.rstrip("/"), element)
    p = Path(location)
    if element is not None or not p.exists():  # the zarr reader names a missing path
        return SlideSource(text, "zarr", location, element)
    fmt = format_for_path(p)
    if fmt is not None and fmt.opener is not None:
        return SlideSource(text, fmt.name, location, format=fmt)
    if fmt is not None or p.is_dir():  # zarr stores, and directories no format claims (the zarr reader says why)
        return SlideSource(text, "zarr", location)
    suffix = p.suffix.lower()
    fallback = fallback_format()
    if suffix in NOT_SLIDE_SUFFIXES or fallback is None:
        fix = (f"to list slides in a file use --slides-from {text}" if suffix in _LIST_SUFFIXES else
               "pass an OME-Zarr store, a TIFF-family file (.svs, .tif, .ndpi, ...), a DICOM folder, an OpenSlide "
               "format or a URL")
        raise SlideError(f"{text}: not a slide (a {suffix or 'suffix-less'} file); {fix}")
    return SlideSource(text, fallback.name, location, format=fallback)


def _image_names(root: Any) -> list[str]:
    try:
        images = root.get("images")
        if images is None or hasattr(images, "shape"):
            return []
        return sorted(str(k) for k in images.group_keys())
    except (KeyError, OSError, ValueError, TypeError, AttributeError):
        return []


def spatialdata_image_group(root: Any, element: str | None, text: str) -> Any | None:
    """The image group of SpatialData element ``element`` in the zarr group ``root``.

    With ``element=None``: the only image of a SpatialData store, or None when ``root`` is not one (it
    may be a plain OME-Zarr image). Raises :class:`SlideError` naming the store and the elements
    present when the element is missing, or when there are several and none was named.
    """
    names = _image_names(root)
    if element is None:
        attrs = dict(root.attrs)
        if not names or any(f.multiscales(attrs) is not None for f in FORMATS.values()):
            return None
        if len(names) > 1:
            raise SlideError(f"{text}: this SpatialData store has {len(names)} image elements ({', '.join(names)}); "
                             f"name one as {text}::{names[0]}")
        element = names[0]
    if element not in names:
        have = ", ".join(names) if names else "none"
        raise SlideError(f"{text}: no image element {element!r} in this store (image elements: {have}); "
                         "pass STORE::ELEMENT with one of them (SpatialData stores keep images under images/)")
    return root["images"][element]
