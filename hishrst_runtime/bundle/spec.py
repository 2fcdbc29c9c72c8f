"""The typed view of a bundle manifest: frozen dataclasses built once, with every default in one place.

:func:`build_spec` turns an upgraded manifest (see :mod:`hishrst_runtime.bundle.manifest`) into a
:class:`BundleSpec` and checks the values the runtime computes with: positive finite patch size and
training µm/px, positive integer sizes, unique gene names, a known position mode (older manifests'
``continuous`` / ``grid`` included), the head's kind and token geometry. Callers read ``bundle.spec`` instead
of the raw dict, so no caller repeats a default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from hishrst_runtime.bundle.fields import BundleError
from hishrst_runtime.bundle.fields import ManifestReader as _Reader
from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.grouping import GROUPING_METHOD
from hishrst_runtime.core.patches import PAD_VALUE, RESIZE_FILTER
from hishrst_runtime.core.tokens import TokenGeometry
from hishrst_runtime.core.vocab import (DEFAULT_HEAD_KIND, DEFAULT_PRECISION, HEAD_KINDS, POSITION_MODES, PRECISIONS,
                                        LEGACY_TILE_LAYOUT, TILE_LAYOUTS, UM_POSITION_MODES, HeadKind, PositionMode,
                                        TileLayout)

__all__ = [
    "DEFAULT_MAX_BATCH", "BundleError", "BundleSpec", "EncoderSpec", "ExternalDataSpec", "FileSpec", "GroupingSpec",
    "LicenseSpec", "NormalisationSpec", "OutputSpec", "POSITION_MODES", "PatchSpec", "PositionMode", "PositionSpec",
    "ShapeRange", "UM_POSITION_MODES", "build_spec",
]

#: ``max_batch`` of bundles that do not record one: the largest batch the TensorRT profiles cover.
DEFAULT_MAX_BATCH = 64
#: Optimal group count of the head's TensorRT profile (a typical work unit), capped at ``max_batch``.
HEAD_PROFILE_OPT_GROUPS = 8

#: (min, opt, max) shape of one input in a TensorRT optimisation profile.
ShapeRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class NormalisationSpec:
    """Input scaling inside the encoder graph: ``(tiles * scale - mean) / std`` per RGB channel."""

    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_graph: bool


@dataclass(frozen=True)
class EncoderSpec:
    """The image encoder: uint8 RGB tiles of ``input_size`` px in ``layout`` (``NHWC`` or ``NCHW``; ``NHWC`` for
    bundles that do not record it) → ``feature_dim`` features. ``test_encoder``: randomly initialised (tests and
    smoke runs only; its predictions mean nothing); False for bundles written before the key existed.
    ``pooling``: how tokens became the feature (``cls``, ``cls+mean``; None if unrecorded)."""

    name: str
    input_size: int
    feature_dim: int
    fingerprint: str | None
    normalisation: NormalisationSpec | None
    gated: bool
    license: str | None
    test_encoder: bool = False
    pooling: str | None = None
    layout: TileLayout = LEGACY_TILE_LAYOUT


@dataclass(frozen=True)
class PatchSpec:
    """Patches: ``size_um`` µm square, cut at ``train_mpp`` µm/px, resized with ``resize``, padded with ``pad_value``."""

    size_um: float
    train_mpp: float
    resize: str
    pad_value: int
    algorithm: str | None


@dataclass(frozen=True)
class PositionSpec:
    """Positions fed to the head (``mode``, one of :data:`POSITION_MODES`): absolute µm for ``continuous``,
    ``relative`` and ``none`` (any slide), Visium array indices for ``grid``."""

    mode: PositionMode
    units: str
    pos_n_freqs: int | None
    min_wavelength_um: float | None
    max_wavelength_um: float | None

    @property
    def feeds_um(self) -> bool:
        """Whether the head takes absolute µm positions (every mode but ``grid``): runnable on any slide."""
        return self.mode in UM_POSITION_MODES


@dataclass(frozen=True)
class GroupingSpec:
    """Neighbour grouping of query points: ``method``, at most ``max_size`` points a group, in ``coords``."""

    method: str
    max_size: int
    coords: str


@dataclass(frozen=True)
class OutputSpec:
    """What the head predicts: ``meaning`` in words; counts normalised to ``target_sum``, then ``log1p``."""

    name: str
    meaning: str
    target_sum: float
    log1p: bool
    dtype: str


@dataclass(frozen=True)
class ExternalDataSpec:
    """One ONNX external-data file: path relative to the bundle and its SHA-256."""

    path: str
    sha256: str


@dataclass(frozen=True)
class FileSpec:
    """One listed file (``encoder``, ``head``, ``encoder_trt``, ``head_trt``) with what the manifest records."""

    key: str
    path: str
    sha256: str
    precision: str | None
    format: str | None
    external_data: tuple[ExternalDataSpec, ...]
    gpu: str | None
    tensorrt_version: str | None

    @property
    def fp16(self) -> bool:
        """Whether the file holds half-precision weights."""
        return self.precision == "fp16"

    @property
    def int8(self) -> bool:
        """Whether the file is a statically quantised int8 (QDQ) graph: ONNX Runtime CPU, no TensorRT."""
        return self.precision == "int8"

    @property
    def engine_target(self) -> dict[str, Any]:
        """``{"gpu", "tensorrt_version"}`` a TensorRT engine was built for (``expected=`` of the native backend)."""
        return {"gpu": self.gpu, "tensorrt_version": self.tensorrt_version}


@dataclass(frozen=True)
class LicenseSpec:
    """Encoder licence: gated weights are not redistributable; ``notice`` is shown to users."""

    gated: bool
    redistributable: bool
    notice: str | None


@dataclass(frozen=True)
class BundleSpec:
    """The whole bundle contract, typed. Build it with :func:`build_spec` (``load_bundle`` does). ``head_kind``:
    ``spot`` (bundles without ``head.kind``) or ``subspot``; ``tokens``: the token geometry (required by sub-spot
    bundles, whose tile is ``patch.size_um``); ``token_width``: ``tokens.width`` when recorded, else None."""

    encoder: EncoderSpec
    patch: PatchSpec
    position: PositionSpec
    grouping: GroupingSpec
    genes: tuple[str, ...]
    output: OutputSpec
    files: Mapping[str, FileSpec]
    max_batch: int
    onnx_opset: int | None
    license: LicenseSpec
    hishrst_version: str | None
    head_kind: HeadKind = DEFAULT_HEAD_KIND
    tokens: TokenGeometry | None = None
    token_width: int | None = None

    @property
    def subspot(self) -> bool:
        """Whether the head predicts per token (``head.kind`` is ``subspot``): run on a bin lattice, not points."""
        return self.head_kind == "subspot"

    @property
    def test_encoder(self) -> bool:
        """Whether the bundle's encoder is a randomly initialised test encoder (``encoder.test_encoder``)."""
        return self.encoder.test_encoder

    @property
    def precision(self) -> str:
        """The precision the bundle was exported at (``hishrst export --precision``): its encoder's; an ``int8``
        bundle's head is fp32. Bundles that record none are fp32."""
        enc = self.files.get("encoder")
        return enc.precision if enc is not None and enc.precision else DEFAULT_PRECISION

    @property
    def has_engines(self) -> bool:
        """Whether the bundle carries serialized TensorRT engines for both models."""
        return "encoder_trt" in self.files and "head_trt" in self.files

    def file(self, key: str) -> FileSpec | None:
        """The file listed under ``key``, or ``None``."""
        return self.files.get(key)

    def head_profile(self, max_batch: int | None = None, opt: int | None = None) -> dict[str, ShapeRange]:
        """The spot head's TensorRT optimisation profile: ``{input: (min, opt, max) shape}``. Groups (first dimension)
        from 1 to ``max_batch`` (default: the bundle's; a run passes its head batch), optimal ``opt`` (default
        ``min(8, max_batch)``); points per group 1 … ``grouping.max_size`` (optimal = max). (A sub-spot head's only
        dynamic dimension is its batch: its profile comes from the graph, ``backends.profiles.batch_range``.)"""
        m = self.max_batch if max_batch is None else int(max_batch)
        if m < 1 or (opt is not None and not 1 <= opt <= m):
            raise ValueError(f"need 1 <= opt <= max_batch, got max_batch={m}, opt={opt}")
        n, d = self.grouping.max_size, self.encoder.feature_dim
        opt = min(HEAD_PROFILE_OPT_GROUPS, m) if opt is None else int(opt)
        tails: dict[str, tuple[int, ...]] = {"features": (d,), "positions": (2,), "mask": ()}
        return {name: ((1, 1, *tail), (opt, n, *tail), (m, n, *tail)) for name, tail in tails.items()}


def _normalisation(r: _Reader) -> NormalisationSpec | None:
    return None if r.get("encoder.normalisation") is None else NormalisationSpec(
        scale=r.positive_float("encoder.normalisation.scale", "factor on uint8 values", 1 / 255),
        mean=r.floats("encoder.normalisation.mean", ()), std=r.floats("encoder.normalisation.std", ()),
        in_graph=bool(r.get("encoder.normalisation.in_graph", True)),
    )


def _encoder(r: _Reader) -> EncoderSpec:
    return EncoderSpec(
        name=r.text("encoder.name"), input_size=r.positive_int("encoder.input_size"),
        feature_dim=r.positive_int("encoder.feature_dim"), fingerprint=r.optional_text("encoder.fingerprint"),
        normalisation=_normalisation(r), gated=bool(r.get("encoder.gated", False)),
        license=r.optional_text("encoder.license"), test_encoder=r.get("encoder.test_encoder", False) is True,
        pooling=r.optional_text("encoder.pooling"), layout=_layout(r),
    )


def _layout(r: _Reader) -> TileLayout:
    layout = r.text("encoder.input.layout", LEGACY_TILE_LAYOUT)
    if layout not in TILE_LAYOUTS:
        raise r.fail("encoder.input.layout", f"must be one of {', '.join(TILE_LAYOUTS)}, got {layout!r} (or upgrade hishrst)")
    return cast(TileLayout, layout)


def _patch(r: _Reader) -> PatchSpec:
    return PatchSpec(
        size_um=r.positive_float("patch.size_um", "µm"), train_mpp=r.positive_float("patch.train_mpp", "µm/px"),
        resize=r.text("patch.resize", RESIZE_FILTER), pad_value=r.int_at_least("patch.pad_value", 0, PAD_VALUE, high=255),
        algorithm=r.optional_text("patch.algorithm"),
    )


def _position(r: _Reader) -> PositionSpec:
    mode = r.text("position.mode")
    if mode not in POSITION_MODES:
        raise r.fail("position.mode", f"must be one of {', '.join(POSITION_MODES)}, got {mode!r} (or upgrade hishrst)")
    return PositionSpec(
        mode=cast(PositionMode, mode), units=r.text("position.units", "um" if mode in UM_POSITION_MODES else "array"),
        pos_n_freqs=r.optional_int("position.pos_n_freqs", 0),
        min_wavelength_um=r.optional_positive_float("position.min_wavelength_um", "µm"),
        max_wavelength_um=r.optional_positive_float("position.max_wavelength_um", "µm"),
    )


def _grouping(r: _Reader) -> GroupingSpec:
    return GroupingSpec(method=r.text("grouping.method", GROUPING_METHOD), max_size=r.positive_int("grouping.max_size"),
                        coords=r.text("grouping.coords", "level0_px"))


def _genes(r: _Reader) -> tuple[str, ...]:
    genes = r.get("genes")
    if not isinstance(genes, list) or not genes or not all(isinstance(g, str) and g for g in genes):
        raise r.fail("genes", "must be a non-empty list of gene names")
    seen: set[str] = set()
    dupes = sorted({g for g in genes if g in seen or seen.add(g)})  # type: ignore[func-returns-value]
    if dupes:
        shown = ", ".join(dupes[:5]) + (f" … ({len(dupes)} in all)" if len(dupes) > 5 else "")
        raise r.fail("genes", f"lists duplicate names ({shown}); each output column needs a unique gene name")
    return tuple(genes)


def _output(r: _Reader) -> OutputSpec:
    return OutputSpec(
        name=r.text("output.name", "expression"), meaning=r.text("output.meaning"),
        target_sum=r.positive_float("output.target_sum", "counts", 1e4), log1p=bool(r.get("output.log1p", True)),
        dtype=r.text("output.dtype", "float32"),
    )


def _files(r: _Reader) -> dict[str, FileSpec]:
    out = {}
    for key, e in r.get("files", {}).items():
        if e.get("precision") is not None and e["precision"] not in PRECISIONS:
            raise r.fail(f"files.{key}.precision", f"must be one of {', '.join(PRECISIONS)}, got {e['precision']!r}")
        ext = tuple(ExternalDataSpec(path=x["path"], sha256=x["sha256"]) for x in e.get("external_data", []))
        out[key] = FileSpec(key=key, path=e["path"], sha256=e["sha256"], precision=e.get("precision"),
                            format=e.get("format"), external_data=ext, gpu=e.get("gpu"),
                            tensorrt_version=e.get("tensorrt_version"))
    return out


def _license(r: _Reader, encoder: EncoderSpec) -> LicenseSpec:
    gated = bool(r.get("license.gated", encoder.gated))
    return LicenseSpec(gated=gated, redistributable=bool(r.get("license.redistributable", not gated)),
                       notice=r.optional_text("license.notice"))


def _head(r: _Reader, encoder: EncoderSpec, patch: PatchSpec) -> tuple[HeadKind, TokenGeometry | None, int | None]:
    """``(head.kind, tokens geometry, tokens.width)``: the kind defaults to ``spot``; a sub-spot bundle needs
    ``tokens`` with the encoder's input size and ``patch.size_um`` equal to the tile's side."""
    kind, raw = r.text("head.kind", DEFAULT_HEAD_KIND), r.get("tokens")
    if kind not in HEAD_KINDS:
        raise r.fail("head.kind", f"must be one of {', '.join(HEAD_KINDS)}, got {kind!r} (or upgrade hishrst)")
    if raw is None and kind == "subspot":
        raise r.fail("tokens", "is missing; a sub-spot bundle (head.kind subspot) records its token geometry")
    try:
        geom = None if raw is None else TokenGeometry.from_dict(dict(raw))
    except (InputError, TypeError, ValueError) as e:
        raise r.fail("tokens", f"is not a token geometry {{grid, input_size, pitch_um, margin}} ({e})") from e
    if geom is not None and geom.input_size != encoder.input_size:
        raise r.fail("tokens.input_size", f"is {geom.input_size} px but encoder.input_size is {encoder.input_size} px")
    if geom is not None and kind == "subspot" and not math.isclose(patch.size_um, geom.tile_um, rel_tol=1e-6):
        raise r.fail("patch.size_um", f"is {patch.size_um} µm but a sub-spot tile is tokens.grid × tokens.pitch_um "
                     f"= {geom.tile_um} µm")
    return cast(HeadKind, kind), geom, r.optional_int("tokens.width", 1)


def build_spec(manifest: Mapping[str, Any], *, path: Path | str = "manifest.json") -> BundleSpec:
    """The :class:`BundleSpec` of an upgraded, structurally validated manifest.

    Raises :class:`BundleError` naming ``path`` and the field for a value the runtime cannot use
    (non-positive or non-finite patch size / µm/px, non-integer sizes, duplicate gene names, …).
    """
    r = _Reader(manifest, path)
    encoder, patch = _encoder(r), _patch(r)
    kind, tokens, width = _head(r, encoder, patch)  # before the rest: its errors name the head's contract
    return BundleSpec(
        encoder=encoder, patch=patch, position=_position(r), grouping=_grouping(r), genes=_genes(r),
        output=_output(r), files=_files(r), max_batch=r.positive_int("max_batch", DEFAULT_MAX_BATCH),
        onnx_opset=r.optional_int("onnx_opset", 1), license=_license(r, encoder),
        hishrst_version=r.optional_text("hishrst_version"), head_kind=kind, tokens=tokens, token_width=width,
    )
