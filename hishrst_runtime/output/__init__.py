"""The crash-safe AnnData output store and its on-disk encoding. Depends on core.

Modules: ``encoding`` (zarr-v2 / AnnData encoding, X chunk codec), ``layout`` (paths, status, publish),
``content`` (validated skeleton), ``progress`` (per-chunk bitmaps), ``buffers`` (rows in memory and the
writer thread), ``resume`` (same-run checks), ``store`` (:class:`OutputStore`), ``h5ad`` (the copy),
``errors`` (the ``OutputStateError`` branch).
"""

from hishrst_runtime.output.errors import (IncompleteOutputError, OutputExistsError, OutputMismatchError,
                                           OutputNotWritableError)
from hishrst_runtime.output.store import OutputStatus, OutputStore, SpatialImages, partial_path, write_h5ad

__all__ = ["OutputStore", "OutputStatus", "SpatialImages", "partial_path", "write_h5ad", "OutputExistsError",
           "OutputMismatchError", "IncompleteOutputError", "OutputNotWritableError"]
