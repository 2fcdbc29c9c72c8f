"""Size limits for every raster hishrst reads, in one place.

A slide level, a tissue-mask image, an overview computed from a slide and the output of ``hishrst
convert`` are all checked against these limits *before* anything is decoded or allocated, so a damaged
or hostile header (a 1.7 MB TIFF declaring 40,000² pixels, a 15 MB TIFF declaring 10⁶ × 10⁶) is a
one-line error naming the file instead of gigabytes of memory or a full disk.

Each limit can be raised with an environment variable (a number of pixels, e.g. ``2e11``), for the
rare real input beyond it. The defaults:

| what | default (pixels) | environment variable |
|---|---|---|
| one slide level (the largest whole-slide scans are ~10¹⁰ px) | 10¹¹ | ``HISHRST_MAX_SLIDE_PIXELS`` |
| a tissue-mask image (PNG / TIFF; a mask is a thumbnail) | 2.5 × 10⁸ | ``HISHRST_MAX_MASK_PIXELS`` |
| an overview decoded in memory (thumbnail, computed pyramid level held whole) | 2.5 × 10⁸ | ``HISHRST_MAX_OVERVIEW_PIXELS`` |
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

from hishrst_runtime.core.errors import InputError

__all__ = ["RasterLimit", "LIMITS", "RasterTooLargeError", "max_pixels", "check_raster_size"]

RasterKind = Literal["slide", "mask", "overview"]


class RasterTooLargeError(InputError):
    """A raster declares more pixels than hishrst will read for that purpose; the message names the file."""


@dataclass(frozen=True)
class RasterLimit:
    """The pixel limit for one kind of raster: ``default`` pixels, overridable by ``env``."""

    kind: str
    default: float
    env: str
    why: str


#: The one table of raster size limits (see the module docstring).
LIMITS: dict[str, RasterLimit] = {
    "slide": RasterLimit("slide", 1e11, "HISHRST_MAX_SLIDE_PIXELS",
                         "more than any whole-slide scan; the metadata is probably damaged"),
    "mask": RasterLimit("mask", 2.5e8, "HISHRST_MAX_MASK_PIXELS",
                        "a tissue mask is a thumbnail; downsample it (any size is stretched over the slide)"),
    "overview": RasterLimit("overview", 2.5e8, "HISHRST_MAX_OVERVIEW_PIXELS",
                            "an overview this large would be decoded whole in memory"),
}


def max_pixels(kind: RasterKind) -> float:
    """The pixel limit for ``kind``: ``$<env>`` when set to a positive number, else the default."""
    limit = LIMITS[kind]
    text = os.environ.get(limit.env, "").strip()
    if not text:
        return limit.default
    try:
        value = float(text)
    except ValueError as e:
        raise InputError(f"${limit.env}={text!r} is not a number of pixels; set it like {limit.env}=2e11 "
                         "or unset it") from e
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"${limit.env}={text!r} must be a positive number of pixels; unset it for the default")
    return value


def check_raster_size(height: int, width: int, *, kind: RasterKind, where: str, fix: str = "") -> None:
    """Raise :class:`RasterTooLargeError` when a ``height × width`` raster of ``kind`` exceeds its limit.

    ``where`` names the file (and level); ``fix`` is appended to the standard advice. Call it with the
    *declared* size, before decoding or allocating anything. Non-positive sizes are errors too.
    """
    h, w = int(height), int(width)
    if h <= 0 or w <= 0:
        raise RasterTooLargeError(f"{where}: declares an empty or negative size {h} × {w} px; the file is damaged")
    limit = LIMITS[kind]
    cap = max_pixels(kind)
    if h * w > cap:
        advice = fix or limit.why
        raise RasterTooLargeError(f"{where}: {h:,} × {w:,} px ({h * w:.2g} px) exceeds the {kind} limit of "
                                  f"{cap:.2g} px — {advice}; set {limit.env} to raise the limit")
