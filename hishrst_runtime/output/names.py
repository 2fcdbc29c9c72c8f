"""The names of one slide's output files, in one place: :class:`SlideOutputs`.

Every file ``hishrst-run`` writes for a slide is named from its AnnData store ``OUT/S.zarr``:

==========================  ====================================================================
``OUT/S.zarr``              the crash-safe AnnData store (the work product every format is built from)
``OUT/S.zarr.partial``      the store while it is being built
``OUT/S.zarr.lock``         the lock guarding every file of the slide
``OUT/S.sdata.zarr``        the SpatialData store (``--format spatialdata``)
``OUT/S.h5ad``              the AnnData copy (``--format h5ad``)
``OUT/S.tissue.geojson``    the tissue mask used (QuPath polygons, level-0 pixels)
``OUT/S.qc.png``            the QC thumbnail (tissue outline, points, one gene, scale bar)
==========================  ====================================================================

``S`` may hold folders (``p1/slide``: a slide found in sub-folder ``p1`` of a folder given with
``--recursive``): every file above then lies in ``OUT/p1/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SlideOutputs", "STORE_SUFFIX", "PARTIAL_SUFFIX", "LOCK_SUFFIX", "SDATA_SUFFIX", "H5AD_SUFFIX",
           "TISSUE_GEOJSON_SUFFIX", "QC_SUFFIX"]

STORE_SUFFIX = ".zarr"
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
SDATA_SUFFIX = ".sdata.zarr"
H5AD_SUFFIX = ".h5ad"
TISSUE_GEOJSON_SUFFIX = ".tissue.geojson"
QC_SUFFIX = ".qc.png"


@dataclass(frozen=True)
class SlideOutputs:
    """Every output file of one slide, named from its AnnData store ``store`` (``OUT/S.zarr``)."""

    store: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", Path(self.store))

    @classmethod
    def of(cls, store: str | os.PathLike[str] | SlideOutputs) -> SlideOutputs:
        """``store`` (``OUT/S.zarr``) as a :class:`SlideOutputs` (one is returned as it is)."""
        return store if isinstance(store, SlideOutputs) else cls(Path(store))

    @classmethod
    def named(cls, out_dir: str | os.PathLike[str], name: str) -> SlideOutputs:
        """The outputs of output name ``name`` (``S`` or ``p1/S``, without ``.zarr``) in ``out_dir``."""
        return cls(Path(out_dir) / f"{name}{STORE_SUFFIX}")

    @property
    def stem(self) -> str:
        """``S``: the store's file name without ``.zarr``."""
        name = self.store.name
        return name[: -len(STORE_SUFFIX)] if name.endswith(STORE_SUFFIX) and len(name) > len(STORE_SUFFIX) else name

    def _beside(self, suffix: str) -> Path:
        return self.store.with_name(self.stem + suffix)

    @property
    def partial(self) -> Path:
        """``OUT/S.zarr.partial``: the store while it is being built."""
        return self.store.with_name(self.store.name + PARTIAL_SUFFIX)

    @property
    def lock(self) -> Path:
        """``OUT/S.zarr.lock``."""
        return self.store.with_name(self.store.name + LOCK_SUFFIX)

    @property
    def spatialdata(self) -> Path:
        """``OUT/S.sdata.zarr``."""
        return self._beside(SDATA_SUFFIX)

    @property
    def spatialdata_partial(self) -> Path:
        """``OUT/S.sdata.zarr.partial``."""
        return self._beside(SDATA_SUFFIX + PARTIAL_SUFFIX)

    @property
    def h5ad(self) -> Path:
        """``OUT/S.h5ad``."""
        return self._beside(H5AD_SUFFIX)

    @property
    def tissue_geojson(self) -> Path:
        """``OUT/S.tissue.geojson``."""
        return self._beside(TISSUE_GEOJSON_SUFFIX)

    @property
    def qc(self) -> Path:
        """``OUT/S.qc.png``."""
        return self._beside(QC_SUFFIX)

    def all(self) -> tuple[Path, ...]:
        """Every file or store hishrst-run may write for this slide."""
        return (self.store, self.partial, self.lock, self.h5ad, self.spatialdata, self.spatialdata_partial,
                self.tissue_geojson, self.qc)
