"""The crash-safe AnnData output store, its on-disk encoding and the SpatialData store built from it.
Depends on core.

Modules: ``encoding`` (zarr-v2 / AnnData encoding, X chunk codec), ``layout`` (paths, status, publish),
``content`` (validated skeleton, ``uns['spatial']`` images), ``progress`` (per-chunk bitmaps), ``buffers``
(rows in memory and the writer thread), ``resume`` (same-run checks), ``store`` (:class:`OutputStore`),
``bins_store`` (the store of a sub-spot run: one row per bin, obs laid out chunk by chunk with ``chunked``),
``h5ad`` (the copy), ``overview`` (low-resolution slide levels read in bounded memory),
``spatialdata_store`` (``<slide>.sdata.zarr``; imports ``spatialdata`` lazily), ``errors`` (the
``OutputStateError`` branch and :class:`MissingExtraError`).
"""

from hishrst_runtime.output.bins_store import create_bin_store
from hishrst_runtime.output.errors import (IncompleteOutputError, MissingExtraError, OutputExistsError,
                                           OutputMismatchError, OutputNotWritableError)
from hishrst_runtime.output.spatialdata_store import spatialdata_path, spatialdata_status, write_spatialdata
from hishrst_runtime.output.store import OutputStatus, OutputStore, SpatialImages, partial_path, write_h5ad

__all__ = ["OutputStore", "OutputStatus", "create_bin_store", "SpatialImages", "partial_path", "write_h5ad", "write_spatialdata",
           "spatialdata_path", "spatialdata_status", "OutputExistsError", "OutputMismatchError",
           "IncompleteOutputError", "OutputNotWritableError", "MissingExtraError"]
