"""Pixel sizes: the one unit table, the one parser per metadata format, and the plausibility bound (torch-free).

Every place a pixel size (µm / pixel) enters hishrst goes through this module: OME-Zarr axis units
(:func:`unit_to_um`), OME-XML ``PhysicalSizeX/Y`` (:func:`ome_physical_size_um`), Aperio's ``MPP = ...``
(:func:`aperio_mpp`), a JSON ImageDescription ``{"mpp": ...}`` (:func:`json_description_mpp`), the TIFF
``XResolution`` / ``YResolution`` / ``ResolutionUnit`` tags (:func:`tiff_resolution_mpp`), and the
user's ``--mpp`` (:func:`check_mpp`, :func:`check_mpp_option`). Every slide reader decides a slide's level-0
pixel size with the one resolver, :func:`resolve_mpp`: the override, else its metadata candidates in order
of trust, checked against the plausible range, or the one standard "no usable pixel size" error.

**Missing ResolutionUnit.** TIFF 6.0 makes inch the default, but files that omit the tag are, in
practice, files that never recorded a physical resolution (the 72 dpi / "1 pixel per unit"
placeholders). hishrst handles it one way everywhere: a missing ``ResolutionUnit`` (or unit 1, "no
absolute unit") means the resolution tags carry **no pixel size**; the user passes ``--mpp``.

**Plausible range.** Brightfield microscopy scans lie between 0.05 and 50 µm / pixel
(:data:`DEFAULT_MPP_RANGE`). A value outside it is a unit mix-up or a placeholder, never a scan: from
file metadata it counts as absent (and is named in the "no pixel size" message), from the user or a
store's scales it is an error. Set the environment variable ``HISHRST_MPP_RANGE="LO,HI"`` (µm / pixel)
or pass ``mpp_range=(lo, hi)`` to widen it for unusual data.
"""

from __future__ import annotations

import json
import math
import os
import re
import xml.etree.ElementTree as ET
from typing import Any, NamedTuple, Sequence

from hishrst_runtime.core.errors import InputError

__all__ = [
    "UNIT_TO_UM",
    "DEFAULT_MPP_RANGE",
    "MPP_RANGE_ENV",
    "PixelSizeError",
    "unit_to_um",
    "mpp_range",
    "is_plausible_mpp",
    "check_mpp",
    "check_mpp_option",
    "MppCandidate",
    "MPP_FIX",
    "resolve_mpp",
    "ome_physical_size_um",
    "aperio_mpp",
    "json_description_mpp",
    "tiff_resolution_mpp",
]

#: Length unit names (lower case; UDUNITS-2 names as NGFF uses, OME's symbols, common abbreviations)
#: → micrometres per unit. Anything else counts as "no unit".
UNIT_TO_UM: dict[str, float] = {
    "picometer": 1e-6, "pm": 1e-6,
    "angstrom": 1e-4, "å": 1e-4,
    "nanometer": 1e-3, "nm": 1e-3,
    "micrometer": 1.0, "micron": 1.0, "microns": 1.0, "um": 1.0, "µm": 1.0, "μm": 1.0,
    "millimeter": 1e3, "mm": 1e3,
    "centimeter": 1e4, "cm": 1e4,
    "inch": 25400.0, "in": 25400.0,
    "meter": 1e6, "m": 1e6,
}
#: TIFF ResolutionUnit codes → micrometres per unit (1 = "no absolute unit" is absent on purpose).
_TIFF_RESUNIT_TO_UM = {2: 25400.0, 3: 1e4}

#: Plausible brightfield pixel sizes, µm / pixel (inclusive).
DEFAULT_MPP_RANGE: tuple[float, float] = (0.05, 50.0)
#: Environment variable overriding :data:`DEFAULT_MPP_RANGE`, as ``"LO,HI"`` in µm / pixel.
MPP_RANGE_ENV = "HISHRST_MPP_RANGE"


#: The fix every "no usable pixel size" message ends with.
MPP_FIX = "pass the pixel size with --mpp (µm per level-0 pixel, e.g. --mpp 0.5 for a 20x scan)"


class PixelSizeError(InputError):
    """A pixel size that is not a plausible positive number of µm / pixel; the message names its source."""


def unit_to_um(unit: str | None) -> float | None:
    """Micrometres per ``unit`` (case-insensitive, e.g. ``"micrometer"``, ``"nm"``, ``"inch"``); None if unknown."""
    if unit is None:
        return None
    return UNIT_TO_UM.get(str(unit).strip().lower())


def mpp_range(override: tuple[float, float] | None = None) -> tuple[float, float]:
    """The plausible pixel-size range (µm / pixel): ``override``, else ``$HISHRST_MPP_RANGE``, else the default.

    Raises :class:`PixelSizeError` naming the variable when ``$HISHRST_MPP_RANGE`` is malformed.
    """
    if override is None:
        text = os.environ.get(MPP_RANGE_ENV, "").strip()
        if not text:
            return DEFAULT_MPP_RANGE
        try:
            lo, hi = (float(v) for v in text.split(","))
        except ValueError as e:
            raise PixelSizeError(f"${MPP_RANGE_ENV}={text!r} is not 'LO,HI' in µm/pixel; "
                                 "set it like HISHRST_MPP_RANGE=0.01,100 or unset it") from e
        override = (lo, hi)
    lo, hi = float(override[0]), float(override[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise PixelSizeError(f"pixel-size range {override!r} must be two positive numbers LO < HI in µm/pixel "
                             f"(mpp_range= or ${MPP_RANGE_ENV})")
    return lo, hi


def is_plausible_mpp(value: float, *, bounds: tuple[float, float] | None = None) -> bool:
    """Whether ``value`` (µm / pixel) is finite and inside the plausible range (:func:`mpp_range`)."""
    lo, hi = mpp_range(bounds)
    return isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi


def check_mpp(value: Any, *, where: str, source: str, fix: str, bounds: tuple[float, float] | None = None,
              error: type[PixelSizeError] | None = None) -> float:
    """``value`` as a float µm / pixel, or :class:`PixelSizeError` naming ``where`` (a file) and ``source``.

    ``source`` says where the value came from (``"--mpp"``, ``"the store's scale metadata"``), ``fix``
    what to do. Zero, negative and non-finite values are named as such; positive values outside the
    plausible range (:func:`mpp_range`) are called implausible. ``error`` is the class raised (a
    :class:`PixelSizeError` subclass, e.g. the slide layer's).
    """
    error = error or PixelSizeError
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise error(f"{where}: {source} {value!r} is not a number of µm per pixel; {fix}") from e
    if not math.isfinite(v) or v <= 0:
        what = "zero" if v == 0 else "negative" if v < 0 else "not finite"
        raise error(f"{where}: {source} {value!r} is {what}; a pixel size must be a positive number of "
                    f"µm per pixel; {fix}")
    lo, hi = mpp_range(bounds)
    if not lo <= v <= hi:
        raise error(f"{where}: {source} {v:g} µm/pixel is an implausible pixel size (outside {lo:g}–{hi:g} "
                    f"µm/pixel, set {MPP_RANGE_ENV}=LO,HI to change the range); {fix}")
    return v


def ome_physical_size_um(ome_xml: str) -> float | None:
    """Mean of ``PhysicalSizeX/Y`` (converted to µm with their units, µm by default) of the first
    ``Pixels`` element of an OME-XML document; None when absent, unparsable or not positive."""
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] != "Pixels":
            continue
        sizes = []
        for ax in ("X", "Y"):
            v, f = el.get(f"PhysicalSize{ax}"), unit_to_um(el.get(f"PhysicalSize{ax}Unit", "µm"))
            try:
                if v is not None and f is not None:
                    sizes.append(float(v) * f)
            except ValueError:
                continue
        return sum(sizes) / len(sizes) if sizes and all(s > 0 for s in sizes) else None
    return None


def aperio_mpp(description: str) -> float | None:
    """Aperio's ``| MPP = 0.499`` (µm / pixel) in an SVS ImageDescription; None when absent or not positive."""
    m = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", description or "")
    try:
        v = float(m.group(1)) if m else None
    except ValueError:
        return None
    return v if v is not None and v > 0 else None


def json_description_mpp(description: str) -> float | None:
    """``mpp`` / ``mpp_x`` / ``microns_per_pixel`` of a JSON ImageDescription (hishrst's synthetic images)."""
    try:
        meta = json.loads(description or "")
    except ValueError:
        return None
    if not isinstance(meta, dict):
        return None
    for key in ("mpp", "mpp_x", "microns_per_pixel"):
        try:
            v = float(meta[key])
        except (KeyError, TypeError, ValueError):
            continue
        if v > 0:
            return v
    return None


def _rational(r: Any) -> float | None:
    num, den = r if isinstance(r, tuple) else (r, 1)
    try:
        value = float(num) / float(den)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None


def tiff_resolution_mpp(xres: Any, yres: Any, unit: Any) -> float | None:
    """µm / pixel from TIFF ``XResolution`` / ``YResolution`` (pixels per unit, rationals) and
    ``ResolutionUnit`` (2 inch, 3 centimetre); the mean of x and y. None when the unit is missing or
    1 (see the module docstring), or the resolutions are absent or not positive."""
    try:
        per_unit_um = _TIFF_RESUNIT_TO_UM.get(int(unit)) if unit is not None else None
    except (TypeError, ValueError):
        per_unit_um = None
    if per_unit_um is None or xres is None:
        return None
    vals = [_rational(r) for r in (xres, yres if yres is not None else xres)]
    if any(v is None for v in vals):
        return None
    return sum(per_unit_um / v for v in vals) / len(vals)  # type: ignore[operator]


def check_mpp_option(value: Any, *, bounds: tuple[float, float] | None = None,
                     error: type[PixelSizeError] | None = None) -> float | None:
    """The user's ``--mpp`` (µm per level-0 pixel) as a float, None when not given; the one check of the
    option (what :func:`resolve_mpp` applies to an override), for a run to call once before any slide."""
    if value is None:
        return None
    return check_mpp(value, where="--mpp", source="the pixel size", fix="pass e.g. --mpp 0.5 for a 20x scan",
                     bounds=bounds, error=error)


class MppCandidate(NamedTuple):
    """A pixel size a slide's metadata records: ``value`` µm / pixel (a number, a ``(y, x)`` pair, or None when
    absent), ``source`` (where it comes from, for messages: ``"Aperio MPP"``, ``"the DICOM PixelSpacing"``) and
    ``conflict``: why the value cannot be trusted although plausible (e.g. it contradicts the magnification)."""

    value: Any
    source: str
    conflict: str | None = None


def _yx(value: Any) -> tuple[float, float]:
    if isinstance(value, (tuple, list)):
        return float(value[0]), float(value[1])
    return float(value), float(value)


def resolve_mpp(where: str, *, override: Any = None, candidates: Sequence[MppCandidate | tuple[Any, str]] = (),
                bounds: tuple[float, float] | None = None, strict: bool = False,
                missing: str = "the slide has no usable pixel size", fix: str = MPP_FIX,
                error: type[PixelSizeError] | None = None) -> tuple[tuple[float, float], str]:
    """The level-0 pixel size ``((y, x) µm / pixel, source)`` of the slide ``where`` — the one resolver every reader calls.

    ``override`` (the user's ``--mpp``), when given, wins and is checked (:func:`check_mpp`; source
    ``"override"``). Else the first present ``candidates`` value (in order of trust) that lies in the plausible
    range (:func:`mpp_range` of ``bounds``): with ``strict`` (a store's scales, DICOM PixelSpacing: the one
    authoritative record) an implausible first value is an error naming it; otherwise it counts as absent
    (a placeholder) and is named in the error if nothing else is usable. A chosen candidate with a ``conflict``
    is an error. Raises ``error`` (a :class:`PixelSizeError`): ``"{where}: {missing} (...ignored values); {fix}"``.
    """
    error = error or PixelSizeError
    if override is not None:
        v = check_mpp(override, where=where, source="--mpp", fix="pass e.g. --mpp 0.5", bounds=bounds, error=error)
        return (v, v), "override"
    lo, hi = mpp_range(bounds)
    ignored = []
    for cand in (MppCandidate(*c) for c in candidates):
        if cand.value is None:
            continue
        yx = _yx(cand.value)
        if strict:
            yx = tuple(check_mpp(v, where=where, source=cand.source, fix="check it, or " + fix, bounds=bounds,
                                 error=error) for v in yx)  # type: ignore[assignment]
        elif not all(is_plausible_mpp(v, bounds=bounds) for v in yx):
            shown = f"{yx[0]:.4g}" if yx[0] == yx[1] else f"{yx[0]:.4g} × {yx[1]:.4g}"
            ignored.append(f"{cand.source} give {shown} µm/pixel, outside the plausible {lo:g}–{hi:g} µm/pixel "
                           f"({MPP_RANGE_ENV} widens it)")
            continue
        if cand.conflict is not None:
            raise error(f"{where}: {cand.conflict}, so the pixel size is unknown (one of them is wrong); {fix}")
        return yx, cand.source
    raise error(f"{where}: {missing}{'; ' + '; '.join(ignored) if ignored else ''}; {fix}")
