"""NGFF (OME-Zarr) format objects per version, as ome-zarr-py has them (torch-free).

A format knows its zarr format, where the ``multiscales`` metadata lives, how arrays are created
(``dimension_names`` in zarr v3, ``/``-separated chunk keys in v2), which checksummed compressor
hishrst writes, and how to wrap the metadata it writes:

* :class:`FormatV04` — NGFF 0.4 on zarr v2: ``multiscales`` (with ``version``) in ``.zattrs``.
* :class:`FormatV05` — NGFF 0.5 on zarr v3: ``attributes.ome.multiscales`` in ``zarr.json``.

:func:`find_multiscales` reads either (and NGFF ≤ 0.3 stores, whose ``multiscales`` carry no or old
axes); :func:`parse_axes` and :func:`scale_of` read the parts every version shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from hishrst_runtime.core.vocab import CHUNK_CODECS, DEFAULT_CHUNK_CODEC, ChunkCodec
from hishrst_runtime.slides.errors import SlideError

__all__ = ["NgffFormat", "FormatV04", "FormatV05", "FORMATS", "format_for", "find_multiscales", "parse_axes",
           "scale_of", "multiscale_metadata", "ZSTD_LEVEL", "LZ4_LEVEL", "check_codec", "space_scale"]

#: zstd level of the chunks hishrst writes (zarr-python's default level).
ZSTD_LEVEL = 0
#: blosc level of the ``lz4`` chunks hishrst writes (blosc's default level).
LZ4_LEVEL = 5


def check_codec(codec: str) -> ChunkCodec:
    """``codec`` if it is one of :data:`~hishrst_runtime.core.vocab.CHUNK_CODECS`, else ValueError naming them."""
    if codec not in CHUNK_CODECS:
        raise ValueError(f"codec must be one of {', '.join(CHUNK_CODECS)}, got {codec!r}")
    return codec  # type: ignore[return-value]


@dataclass(frozen=True)
class NgffFormat:
    """One NGFF version; see the module docstring."""

    version: ClassVar[str] = ""
    zarr_format: ClassVar[int] = 0
    #: The attribute that holds ``multiscales`` (``"ome"`` in 0.5), or None for the attributes themselves.
    container: ClassVar[str | None] = None

    def multiscales(self, attrs: dict[str, Any]) -> list[Any] | None:
        """The ``multiscales`` list of a group's attributes in this format, or None."""
        holder = attrs.get(self.container) if self.container else attrs
        ms = holder.get("multiscales") if isinstance(holder, dict) else None
        return ms if isinstance(ms, list) else None

    def wrap(self, ms: dict[str, Any], omero: dict[str, Any]) -> dict[str, Any]:
        """The group attributes holding one multiscale image ``ms`` and its ``omero`` rendering."""
        raise NotImplementedError

    def array_kwargs(self, axes: str, codec: ChunkCodec = DEFAULT_CHUNK_CODEC) -> dict[str, Any]:
        """Keyword arguments of ``zarr.Group.create_array`` for an array with ``axes`` (e.g. ``"cyx"``) whose
        chunks are compressed with ``codec`` (:data:`~hishrst_runtime.core.vocab.ChunkCodec`)."""
        raise NotImplementedError


@dataclass(frozen=True)
class FormatV04(NgffFormat):
    """NGFF 0.4 on zarr v2 (see the module docstring)."""

    version: ClassVar[str] = "0.4"
    zarr_format: ClassVar[int] = 2

    def wrap(self, ms: dict[str, Any], omero: dict[str, Any]) -> dict[str, Any]:
        return {"multiscales": [{**ms, "version": self.version}], "omero": {**omero, "version": self.version}}

    def array_kwargs(self, axes: str, codec: ChunkCodec = DEFAULT_CHUNK_CODEC) -> dict[str, Any]:
        import numcodecs

        # zarr v2 has one compressor and no checksum codec: zstd frames carry their own checksum, blosc ones none
        comp = (numcodecs.Zstd(level=ZSTD_LEVEL, checksum=True) if check_codec(codec) == "zstd"
                else numcodecs.Blosc(cname="lz4", clevel=LZ4_LEVEL, shuffle=numcodecs.Blosc.NOSHUFFLE))
        return {"chunk_key_encoding": {"name": "v2", "separator": "/"}, "compressors": comp}


@dataclass(frozen=True)
class FormatV05(NgffFormat):
    """NGFF 0.5 on zarr v3 (see the module docstring)."""

    version: ClassVar[str] = "0.5"
    zarr_format: ClassVar[int] = 3
    container: ClassVar[str | None] = "ome"

    def wrap(self, ms: dict[str, Any], omero: dict[str, Any]) -> dict[str, Any]:
        return {"ome": {"version": self.version, "multiscales": [ms], "omero": omero}}

    def array_kwargs(self, axes: str, codec: ChunkCodec = DEFAULT_CHUNK_CODEC) -> dict[str, Any]:
        from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

        if check_codec(codec) == "zstd":  # the zstd frame's own content checksum
            comps: list[Any] = [ZstdCodec(level=ZSTD_LEVEL, checksum=True)]
        else:  # blosc frames carry no checksum: a crc32c codec after it (verified before decompression)
            comps = [BloscCodec(cname="lz4", clevel=LZ4_LEVEL, shuffle="noshuffle", typesize=1), Crc32cCodec()]
        return {"dimension_names": list(axes), "compressors": comps}


FORMATS: dict[str, NgffFormat] = {"0.4": FormatV04(), "0.5": FormatV05()}


def format_for(version: Literal["0.4", "0.5"]) -> NgffFormat:
    """The format object of NGFF ``version``; ValueError for another version."""
    try:
        return FORMATS[version]
    except KeyError:
        raise ValueError(f"version must be '0.4' or '0.5', got {version!r}") from None


def find_multiscales(root: Any, path: str) -> tuple[Any, list[dict[str, Any]]]:
    """(image group, multiscales list) from the root group or its bioformats2raw child ``"0"``.

    Raises :class:`SlideError` naming ``path`` when neither holds NGFF ``multiscales`` metadata.
    """
    candidates = [root]
    try:
        child = root.get("0")
    except (KeyError, OSError, ValueError):  # an unreadable child just means "no bioformats2raw image"
        child = None
    if child is not None and hasattr(child, "attrs") and not hasattr(child, "shape"):
        candidates.append(child)
    for group in candidates:
        attrs = dict(group.attrs)
        for fmt in (FORMATS["0.5"], FORMATS["0.4"]):
            ms = fmt.multiscales(attrs)
            if ms is not None:
                return group, ms
    raise SlideError(
        f"{path}: this zarr store is not an OME-Zarr image (no 'multiscales' metadata in the group or in its '0' "
        "child). Convert the slide with `hishrst convert SLIDE.svs OUT.zarr`, or point to the image group of the store.")


def scale_of(transforms: Any) -> list[float] | None:
    """The ``scale`` of the first scale transformation in an NGFF ``coordinateTransformations`` list."""
    if not isinstance(transforms, list):
        return None
    for t in transforms:
        if isinstance(t, dict) and t.get("type") == "scale" and isinstance(t.get("scale"), list):
            try:
                return [float(v) for v in t["scale"]]
            except (TypeError, ValueError):
                return None
    return None


def parse_axes(ms: dict[str, Any], ndim: int, path: str) -> tuple[list[str], list[str | None]]:
    """(lower-case axis names, their units or None) of a multiscale; NGFF ≤ 0.2 stores are 5-D ``tczyx``."""
    axes = ms.get("axes")
    if axes is None:
        return list("tczyx")[-ndim:], [None] * ndim
    names: list[str] = []
    units: list[str | None] = []
    for a in axes:
        if isinstance(a, dict):
            names.append(str(a.get("name", "")).lower())
            unit = a.get("unit")
            units.append(str(unit).lower() if unit is not None else None)
        else:  # NGFF 0.3: list of names
            names.append(str(a).lower())
            units.append(None)
    if len(names) != ndim:
        raise SlideError(f"{path}: the multiscales metadata lists {len(names)} axes {names} but the arrays have "
                         f"{ndim} dimensions. Re-write the store with consistent metadata (e.g. `hishrst convert`).")
    return names, units


def multiscale_metadata(
    n_levels: int, *, mpp: float | None, axes: str, name: str, fmt: NgffFormat
) -> dict[str, Any]:
    """Group attributes of a ``n_levels`` 2×-mean pyramid with level-0 pixel size ``mpp`` µm / pixel
    (``None``: unit-less scales) and RGB ``omero`` rendering, wrapped for ``fmt``."""
    unit = {"unit": "micrometer"} if mpp is not None else {}
    axes_md = [{"name": "c", "type": "channel"} if a == "c" else {"name": a, "type": "space", **unit} for a in axes]
    base = float(mpp) if mpp is not None else 1.0
    datasets = [{"path": str(k), "coordinateTransformations": [
        {"type": "scale", "scale": [1.0 if a == "c" else base * 2.0**k for a in axes]}]} for k in range(n_levels)]
    ms: dict[str, Any] = {
        "name": name, "axes": axes_md, "datasets": datasets, "type": "mean",
        "metadata": {"description": "2x2 mean pooling per level", "method": "hishrst_runtime.slides.convert"},
    }
    window = {"min": 0, "max": 255, "start": 0, "end": 255}
    channels = [{"color": c, "label": lab, "active": True, "coefficient": 1.0, "family": "linear", "inverted": False,
                 "window": dict(window)} for c, lab in (("FF0000", "red"), ("00FF00", "green"), ("0000FF", "blue"))]
    return fmt.wrap(ms, {"channels": channels, "rdefs": {"model": "color"}})


def _axis_names(t: dict[str, Any], key: str, names: list[str]) -> list[str]:
    axes = t.get(key, {}).get("axes") if isinstance(t.get(key), dict) else None
    if isinstance(axes, list) and axes:
        return [str(a.get("name", "")).lower() if isinstance(a, dict) else str(a).lower() for a in axes]
    return list(names)


def _yx_scale(t: Any, names: list[str]) -> tuple[float, float] | str:
    """(y, x) scale of one SpatialData / NGFF transformation, or why it cannot be honoured."""
    if not isinstance(t, dict):
        return f"an unreadable transformation {t!r}"
    kind = str(t.get("type", ""))
    if kind == "identity":
        return 1.0, 1.0
    if kind in ("scale", "translation"):
        vals, axes = t.get(kind), _axis_names(t, "input", names)
        if not isinstance(vals, list) or len(vals) != len(axes) or "y" not in axes or "x" not in axes:
            return f"a {kind} whose values {vals!r} do not match the axes {axes}"
        if kind == "translation":
            return (1.0, 1.0) if all(float(v) == 0 for v in vals) else f"a translation by {vals}"
        return float(vals[axes.index("y")]), float(vals[axes.index("x")])
    if kind == "sequence":
        sy = sx = 1.0
        for inner in t.get("transformations") or []:
            got = _yx_scale(inner, names)
            if isinstance(got, str):
                return got
            sy, sx = sy * got[0], sx * got[1]
        return sy, sx
    if kind == "affine":
        m, ins, outs = t.get("affine"), _axis_names(t, "input", names), _axis_names(t, "output", names)
        try:
            rows = [[float(v) for v in r] for r in m]  # type: ignore[union-attr]
            (oy, ox), (iy, ix) = (outs.index("y"), outs.index("x")), (ins.index("y"), ins.index("x"))
            if rows[oy][ix] == 0 and rows[ox][iy] == 0 and rows[oy][-1] == 0 and rows[ox][-1] == 0:
                return rows[oy][iy], rows[ox][ix]
        except (TypeError, ValueError, IndexError):
            pass
        return f"an affine transformation {m!r} (rotation, shear, flip or translation)"
    return f"a {kind or 'typeless'} transformation"


def space_scale(ms: dict[str, Any], names: list[str], path: str, *,
                preferred: str = "global") -> tuple[float, float] | None:
    """(y, x) scale from a SpatialData element's level 0 to its coordinate system (``preferred``, else the
    first listed), or None when the multiscale names no coordinate system. Raises :class:`SlideError`
    naming ``path`` for a transformation that is not a positive scale (rotation, shear, translation)."""
    listed = [t for t in ms.get("coordinateTransformations") or [] if isinstance(t, dict) and isinstance(t.get("output"), dict)]
    if not listed:
        return None
    chosen = next((t for t in listed if t["output"].get("name") == preferred), listed[0])
    got = _yx_scale(chosen, names)
    if isinstance(got, tuple) and all(math.isfinite(v) and v > 0 for v in got):
        return got
    what = got if isinstance(got, str) else f"a scale of {got} (not positive)"
    cs = chosen["output"].get("name")
    raise SlideError(f"{path}: the image's transformation to coordinate system {cs!r} is {what}, which hishrst cannot "
                     "honour (only identity and positive scales); write the image with a Scale or Identity "
                     "transformation, or pass the plain image group (STORE/images/NAME) to read it in its own pixels")
