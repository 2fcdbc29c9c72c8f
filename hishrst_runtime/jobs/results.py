"""What ``run_slides`` reports per slide: a :class:`SlideResult`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from hishrst_runtime.core.urls import redact_url

__all__ = ["SlideStatus", "SlideResult", "Pending"]

SlideStatus = Literal["ok", "skipped", "failed", "interrupted"]


@dataclass(frozen=True)
class SlideResult:
    """One slide's outcome.

    ``slide``: the argument as given (a path, or a URL string); ``output``: the ``OUT/S.zarr`` store
    (``None`` for a slide that has none, such as a URL); ``status``: ``ok`` / ``skipped`` / ``failed``;
    ``reason``: one line for skipped and failed slides; ``points``: query points of the slide;
    ``computed``: points computed by this run (fewer than ``points`` after ``--resume``);
    ``engine``: the provider that ran it; ``tiles_per_s``: computed points per second of inference; ``seconds``: wall time of the slide
    (prepare, predict, finalize); ``resumed``: finished an incomplete output; ``timings``: seconds per
    stage; ``stats``: the pipeline's counters
    (:class:`~hishrst_runtime.inference.pipeline.PredictStats`); ``chunks_recomputed``: X chunks of a
    resumed partial that failed verification (missing or changed) and were computed again;
    ``filled_chunks``: names of slide chunks read as fill (``--allow-missing-chunks``); ``test_encoder``: the
    bundle's encoder is a random test encoder (its predictions mean nothing biologically);
    ``points_dropped``: explicit points left out because they lie outside the slide (``--points-outside
    drop``); ``qc``: the QC thumbnail written (``OUT/S.qc.png``), ``qc_gene`` the gene it shows and
    ``qc_rule`` how that gene was chosen. A sub-spot run (bins instead of points: ``points`` / ``computed`` count
    bins, ``tiles_per_s`` bins per second) also says its ``resolution`` (``8um`` / ``16um``), the ``tiles`` of its
    lattice and the ``encoder_passes`` this run made (fewer than ``tiles`` after ``--resume``).
    """

    slide: str
    output: Path | None
    status: SlideStatus
    reason: str = ""
    points: int | None = None
    computed: int | None = None
    engine: str | None = None
    tiles_per_s: float | None = None
    seconds: float | None = None
    resumed: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    stats: Any = None
    chunks_recomputed: int = 0
    filled_chunks: tuple[str, ...] = ()
    points_dropped: int = 0
    qc: Path | None = None
    qc_gene: str | None = None
    qc_rule: str | None = None
    test_encoder: bool = False
    resolution: str | None = None
    tiles: int | None = None
    encoder_passes: int | None = None

    def with_(self, **changes: Any) -> SlideResult:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)

    @property
    def name(self) -> str:
        """The slide's file name (or the URL's last path segment, without credentials or query), for tables."""
        return redact_url(str(self.slide)).rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Pending:
    """A slide whose every row is in its (flushed) ``.partial`` store, with what is left to do: ``finish()``
    finalizes the store, writes its QC thumbnail and returns its :class:`SlideResult` (the caller runs it, e.g. on
    a thread while the next slide streams, holding the slide's lock until it returns)."""

    finish: Callable[[], SlideResult]
