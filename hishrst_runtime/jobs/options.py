"""The options of one ``hishrst-run`` job, validated once (:class:`RunOptions`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.units import check_mpp_option
from hishrst_runtime.core.vocab import (DEFAULT_GRID, DEFAULT_MASK_MODE, DEFAULT_POINTS_OUTSIDE, DEFAULT_PROVIDER,
                                        MASK_MODES, POINTS_OUTSIDE, PROVIDERS, RESOLUTIONS, GridKind, MaskMode,
                                        PointsOutside, Provider, Resolution)
from hishrst_runtime.inference.prepare import DEFAULT_PITCH_UM, check_layout_options
from hishrst_runtime.jobs.formats import parse_formats
from hishrst_runtime.jobs.locks import DEFAULT_LEASE_S
from hishrst_runtime.core.vocab import DEFAULT_X_DTYPE, X_DTYPES, XDtype
from hishrst_runtime.slides.cache import DEFAULT_CACHE_BYTES

__all__ = ["DEFAULT_WORKERS", "Provider", "PROVIDERS", "RunOptions"]

#: Reader threads (fetch, decode, cut) by default.
DEFAULT_WORKERS = 2


def _int_at_least(name: str, value: Any, low: int, fix: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}{fix}")


@dataclass(frozen=True)
class RunOptions:
    """Validated settings of one run over many slides; the constructor raises :class:`InputError`
    naming the option (as its ``hishrst-run`` flag) for any bad value.

    ``pitch_um``: query-grid pitch (µm; ``None``: 50, 4× Visium density); ``grid``: ``hex`` / ``square``;
    ``provider``: inference engine (``auto`` picks the fastest available); ``batch_size``: encoder batch
    (tiles); ``workers``: reader threads (0: read in the inference thread); ``engine_threads``: ONNX
    Runtime intra-op threads (``None``: the cores the readers leave free); ``mpp``: µm per level-0 pixel
    overriding or supplying the stores'; ``min_tissue``: least tissue fraction under a grid point's
    patch; ``resume`` / ``overwrite``: finish incomplete / recompute complete outputs; ``h5ad``: also
    write ``<slide>.h5ad`` (deprecated: add ``h5ad`` to ``output_format``); ``allow_missing_chunks``: read chunk files missing inside tissue as fill;
    ``cache_dir``: TensorRT engine cache; ``cache_bytes``: decoded-chunk cache bound per slide (bytes);
    ``progress``: progress bars; ``output_format``: the output formats, comma-separated text or names of
    :data:`~hishrst_runtime.jobs.formats.OUTPUT_FORMATS` (``anndata``, ``spatialdata``, ``h5ad``; ``both``:
    ``anndata,spatialdata``), kept as a tuple in registry order (``h5ad=True`` adds ``h5ad``);
    ``tissue_mask``: the default tissue-mask file of every slide without its own;
    ``mask_mode``: ``intersect`` (a mask is combined with detected tissue) or ``replace`` (the mask alone;
    points over detected background get ``obs['background']``); ``points_outside``: ``drop`` (points
    outside the slide are dropped with a warning) or ``error`` (the slide fails); ``tissue_geojson``: write
    the tissue mask used as ``<slide>.tissue.geojson`` beside the output (None: for slides with a mask);
    ``qc``: write the QC thumbnail ``<slide>.qc.png``; ``claim``: work stealing — walk the slides sorted by
    path and take each one whose lock is free and whose output is not complete, sweeping again while a sweep
    took any (implies ``resume``, so a dead job's partial output is finished exactly); ``stale_after``: the
    lease of this job's slide locks (seconds): they are refreshed every ``min(60, stale_after / 4)`` s, and
    one left unrefreshed that long (a killed job, on any host) is taken over. ``resolution``: the bin size of a
    sub-spot bundle's output (``8um``, the default for such bundles, or ``16um``; refused with a spot bundle);
    ``dtype``: X's element type (``float32``, or ``float16`` for half the disk); ``grid_options``: the query-grid
    flags given explicitly on the command line (``--pitch-um``, ``--grid``, ``--min-tissue``), refused with a
    sub-spot bundle.
    """

    pitch_um: float | None = None
    grid: GridKind = DEFAULT_GRID
    provider: Provider = DEFAULT_PROVIDER
    batch_size: int = 64
    workers: int = DEFAULT_WORKERS
    engine_threads: int | None = None
    mpp: float | None = None
    min_tissue: float = 0.25
    resume: bool = False
    overwrite: bool = False
    h5ad: bool = False
    allow_missing_chunks: bool = False
    cache_dir: Path | None = None
    cache_bytes: int | None = None
    progress: bool = True
    output_format: str | tuple[str, ...] = "anndata"
    tissue_mask: Path | None = None
    tissue_geojson: bool | None = False
    mask_mode: MaskMode = DEFAULT_MASK_MODE
    points_outside: PointsOutside = DEFAULT_POINTS_OUTSIDE
    qc: bool = True
    claim: bool = False
    stale_after: float = DEFAULT_LEASE_S
    resolution: Resolution | None = None
    dtype: XDtype = DEFAULT_X_DTYPE
    grid_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid_options", tuple(self.grid_options))
        if self.pitch_um is None:
            object.__setattr__(self, "pitch_um", DEFAULT_PITCH_UM)
        if self.resolution is not None and self.resolution not in RESOLUTIONS:
            raise InputError(f"--resolution must be one of {', '.join(RESOLUTIONS)}, got {self.resolution!r}")
        if self.dtype not in X_DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(X_DTYPES)}, got {self.dtype!r}")
        if self.cache_bytes is None:
            object.__setattr__(self, "cache_bytes", DEFAULT_CACHE_BYTES)
        check_layout_options(pitch_um=self.pitch_um, grid=self.grid, min_tissue=self.min_tissue)  # type: ignore[arg-type]
        object.__setattr__(self, "pitch_um", float(self.pitch_um))  # type: ignore[arg-type]
        if self.provider not in PROVIDERS:
            raise InputError(f"--provider must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")
        _int_at_least("--batch-size", self.batch_size, 1)
        _int_at_least("--workers", self.workers, 0, " (0 reads in the inference thread)")
        if self.engine_threads is not None:
            _int_at_least("--engine-threads", self.engine_threads, 1)
        _int_at_least("cache_bytes", self.cache_bytes, 1)
        formats = parse_formats(self.output_format, h5ad=bool(self.h5ad))
        object.__setattr__(self, "output_format", formats)
        object.__setattr__(self, "h5ad", "h5ad" in formats)
        if self.mask_mode not in MASK_MODES:
            raise InputError(f"--mask-mode must be one of {', '.join(MASK_MODES)}, got {self.mask_mode!r}")
        if self.points_outside not in POINTS_OUTSIDE:
            raise InputError(f"--points-outside must be one of {', '.join(POINTS_OUTSIDE)}, got "
                             f"{self.points_outside!r}")
        if self.tissue_mask is not None and not Path(self.tissue_mask).is_file():
            raise InputError(f"--tissue-mask {self.tissue_mask}: no such file; pass a GeoJSON (QuPath export, "
                             "level-0 pixels) or a PNG / TIFF mask")
        if isinstance(self.stale_after, bool) or not isinstance(self.stale_after, (int, float)) or not (
                0 < self.stale_after < float("inf")):
            raise InputError(f"--stale-after must be a number of seconds > 0, got {self.stale_after!r}")
        object.__setattr__(self, "stale_after", float(self.stale_after))
        if self.claim and self.overwrite:
            raise InputError("--claim cannot be combined with --overwrite: a worker could not tell a slide another "
                             "worker just recomputed from an old one; remove the old outputs or use --shard I/N")
        if self.claim:
            object.__setattr__(self, "resume", True)  # a dead worker's partial is finished, not refused
        check_mpp_option(self.mpp)  # the one per-run check (the same rule and bounds as the slide readers)

    @property
    def formats(self) -> tuple[str, ...]:
        """The output formats (names of :data:`~hishrst_runtime.jobs.formats.OUTPUT_FORMATS`), in order."""
        return tuple(self.output_format)

    @classmethod
    def from_settings(cls, options: RunOptions | None, settings: dict[str, Any]) -> RunOptions:
        """``options`` as given, or built from keyword ``settings`` (one of the two, not both)."""
        if options is not None:
            if settings:
                raise TypeError(f"give either options= or keyword settings, not both (got {sorted(settings)})")
            return options
        unknown = set(settings) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown run settings: {', '.join(sorted(unknown))}")
        return cls(**settings)
