"""The options of one ``hishrst-run`` job, validated once (:class:`RunOptions`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.inference.prepare import DEFAULT_PITCH_UM, check_layout_options
from hishrst_runtime.slides.cache import DEFAULT_CACHE_BYTES

__all__ = ["DEFAULT_WORKERS", "Provider", "PROVIDERS", "OutputFormat", "OUTPUT_FORMATS", "RunOptions"]

#: Reader threads (fetch, decode, cut) by default.
DEFAULT_WORKERS = 2
Provider = Literal["auto", "cpu", "cuda", "tensorrt", "trt-native"]
#: The ``--provider`` choices (the no-op engine is for benchmarks: pass ``engines=`` to ``run_slides``).
PROVIDERS: tuple[str, ...] = get_args(Provider)
OutputFormat = Literal["anndata", "spatialdata", "both"]
#: The ``--format`` choices: the AnnData store, a SpatialData store built from it (which then replaces it), both.
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)


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
    write ``<slide>.h5ad``; ``allow_missing_chunks``: read chunk files missing inside tissue as fill;
    ``cache_dir``: TensorRT engine cache; ``cache_bytes``: decoded-chunk cache bound per slide (bytes);
    ``progress``: progress bars; ``output_format``: ``anndata`` (``<slide>.zarr``), ``spatialdata``
    (``<slide>.sdata.zarr``, built from the AnnData store, which is then removed) or ``both``;
    ``tissue_mask``: a tissue-mask file used instead of detected tissue (one slide per run);
    ``tissue_geojson``: write the tissue mask used as ``<slide>.tissue.geojson`` beside the output.
    """

    pitch_um: float | None = None
    grid: Literal["hex", "square"] = "hex"
    provider: Provider = "auto"
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
    output_format: OutputFormat = "anndata"
    tissue_mask: Path | None = None
    tissue_geojson: bool = False

    def __post_init__(self) -> None:
        if self.pitch_um is None:
            object.__setattr__(self, "pitch_um", DEFAULT_PITCH_UM)
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
        if self.output_format not in OUTPUT_FORMATS:
            raise InputError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, got {self.output_format!r}")
        if self.tissue_mask is not None and not Path(self.tissue_mask).is_file():
            raise InputError(f"--tissue-mask {self.tissue_mask}: no such file; pass a GeoJSON (QuPath export, "
                             "level-0 pixels) or a PNG / TIFF mask")
        if self.mpp is not None and not (isinstance(self.mpp, (int, float)) and math.isfinite(self.mpp)
                                         and self.mpp > 0):
            raise InputError(f"--mpp must be a positive number of µm per pixel, e.g. 0.5; got {self.mpp!r}")

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
