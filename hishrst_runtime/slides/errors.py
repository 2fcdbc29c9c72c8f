"""The slide layer's errors (all :class:`hishrst_runtime.core.errors.InputError`, so also ``ValueError``).

Each message names the store, chunk file or source file, says what is wrong and the fix, on one line.
"""

from __future__ import annotations

from typing import Literal

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.extras import MissingExtraError
from hishrst_runtime.core.limits import RasterTooLargeError, check_raster_size
from hishrst_runtime.core.units import PixelSizeError

__all__ = ["SlideError", "SlidePixelSizeError", "ChunkDecodeError", "MissingChunkError", "ConvertError",
           "SlideExtraMissing", "RemoteSlideError", "MaskError", "SlideTooLargeError", "check_slide_size"]


class SlideError(InputError):
    """A slide store that cannot be used; the message names the store, the problem and the fix."""


class SlidePixelSizeError(SlideError, PixelSizeError):
    """A slide's pixel size (``--mpp`` or the store's scales) that is not positive or not plausible."""


class ChunkDecodeError(SlideError):
    """A chunk file that cannot be read, fails its checksum or does not decode to the chunk's shape."""


class MissingChunkError(SlideError):
    """A chunk file is missing where the slide's overview shows tissue (it would be read as the fill value)."""


class ConvertError(InputError):
    """A source or output that cannot be converted; the message names the file, the problem and the fix."""


class SlideExtraMissing(MissingExtraError):
    """A slide needs an optional package (fsspec for URLs, OpenSlide for vendor formats); the message names
    the slide and the extra to install (``pip install "hishrst[remote]"`` / ``"hishrst[openslide]"``)."""


class RemoteSlideError(SlideError):
    """A remote slide (http(s)://, s3://) that cannot be reached or read; the message names the URL."""


class MaskError(InputError):
    """A tissue-mask file (GeoJSON, PNG, TIFF) that cannot be read or marks no tissue; the message names it."""


class SlideTooLargeError(SlideError, RasterTooLargeError):
    """A slide level (or an overview of it) larger than :mod:`hishrst_runtime.core.limits` allows."""


def check_slide_size(height: int, width: int, *, where: str, kind: Literal["slide", "overview"] = "slide",
                     fix: str = "") -> None:
    """:func:`~hishrst_runtime.core.limits.check_raster_size` raising :class:`SlideTooLargeError` (a SlideError)."""
    try:
        check_raster_size(height, width, kind=kind, where=where, fix=fix)
    except RasterTooLargeError as e:
        raise SlideTooLargeError(str(e)) from e
