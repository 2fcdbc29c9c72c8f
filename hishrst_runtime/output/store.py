"""The per-slide output store: an AnnData zarr store written incrementally and crash-safely.

Layout
------
``OUT.zarr`` is a plain AnnData store (zarr format 2, which every AnnData release reads)::

    X                  float32 (or float16) [points, genes], chunked by ``chunk_rows`` rows x all genes
    obs                grid_row, grid_col (int64), tissue_fraction (float32); index "p0", "p1", ...
    var                index = gene names
    obsm/spatial       float64 [points, 2], level-0 pixel (x, y)
    uns                the run's JSON-able metadata (bundle hash, mpp, pitch, timings, ...) and
                       uns["spatial"][library_id] = {"images": {"lowres", "hires": uint8 HWC},
                       "scalefactors": {...}, "metadata": {}} so scanpy.pl.spatial / squidpy plot it.

The skeleton (:mod:`~hishrst_runtime.output.content`), the X chunks and ``.zmetadata`` are written with
plain file I/O by :mod:`~hishrst_runtime.output.encoding`, with the encoding AnnData's own writer
(:func:`anndata.io.write_elem`) and zarr give them (the tests compare the two).

Crash safety
------------
* The store is built in ``OUT.zarr.partial`` and published by :meth:`OutputStore.finalize` (marked
  complete, then renamed — or swapped in over an earlier complete output, ``replace=True``): see
  :mod:`~hishrst_runtime.output.layout`. ``OUT.zarr`` exists only when complete.
* Rows are buffered per X chunk and written whole (:mod:`~hishrst_runtime.output.buffers`); every
  chunk's rows on disk are claimed by a durable bitmap (:mod:`~hishrst_runtime.output.progress`). A
  kill at any instant (``kill -9``, OOM, Slurm time limit) leaves every claimed row intact;
  :meth:`OutputStore.open_incomplete` rebuilds :meth:`~OutputStore.done_mask` from the bitmaps after
  checking every claimed chunk against the checksum recorded with it (a missing or changed chunk is
  unclaimed and counted in :attr:`OutputStore.chunks_recomputed`), the runtime computes only the
  missing rows, and since predictions are deterministic per row a resumed run gives exactly the X of
  an uninterrupted one.
* A location that refuses a write (read-only, permission denied, disk full) raises
  :class:`~hishrst_runtime.output.errors.OutputNotWritableError` (one line naming the path and the fix)
  from the call that met it; the rows not yet written stay buffered, so a retry can still write them.

One process writes a slide (hold a :class:`~hishrst_runtime.jobs.locks.SlideLock`); methods are thread-safe.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.files import atomic_write
from hishrst_runtime.output import encoding as store_io
from hishrst_runtime.output.buffers import MAX_PENDING_CHUNKS, ChunkBuffers
from hishrst_runtime.output.content import DEFAULT_CHUNK_BYTES, SpatialImages, build_content, write_skeleton
from hishrst_runtime.output.errors import (IncompleteOutputError, OutputExistsError, OutputMismatchError,
                                           OutputNotWritableError, writing)
from hishrst_runtime.output.h5ad import write_h5ad
from hishrst_runtime.output.layout import (FORMAT_VERSION, PARTIAL_SUFFIX, PROGRESS_DIR, STATUS_ATTR, OutputStatus,
                                           output_status, partial_path, prepare_location, publish, read_root_attrs,
                                           update_root_attrs)
from hishrst_runtime.output.progress import ProgressRecords
from hishrst_runtime.output.resume import check_same_run, open_group, unreadable, verify_claims

__all__ = ["OutputExistsError", "OutputMismatchError", "IncompleteOutputError", "OutputNotWritableError",
           "OutputStatus", "SpatialImages", "OutputStore", "partial_path", "write_h5ad",
           "FORMAT_VERSION", "STATUS_ATTR", "PARTIAL_SUFFIX", "PROGRESS_DIR", "DEFAULT_CHUNK_BYTES",
           "DEFAULT_MAX_BUFFER_BYTES", "MAX_PENDING_CHUNKS"]

DEFAULT_MAX_BUFFER_BYTES = 256 << 20


class OutputStore:
    """An incrementally written, crash-safe AnnData zarr store for one slide (see the module docstring).

    Get one with :meth:`create` (new run) or :meth:`open_incomplete` (``--resume``); feed it with
    :meth:`write_rows`; publish it with :meth:`finalize`.
    """

    def __init__(self, path: Path, *, fsync: bool, max_buffer_bytes: int, flush_interval_s: float,
                 replace: bool = False) -> None:
        """Internal: use :meth:`create` or :meth:`open_incomplete`."""
        self.path = path
        self.work_path = partial_path(path)
        if not (self.work_path / ".zgroup").is_file():
            raise FileNotFoundError(f"{self.work_path}: not a zarr group (.zgroup missing)")
        x = store_io.XChunks(self.work_path / "X")
        self.n_obs, self.n_vars, self.chunk_rows = x.n_obs, x.n_vars, x.chunk_rows
        self._fsync = fsync
        self._replace = replace
        self._flush_interval_s = float(flush_interval_s)
        self._lock = threading.RLock()  # buffers, pending writes; never taken by the writer thread
        self._last_flush = time.monotonic()
        self._finalized = False
        progress = ProgressRecords(self.work_path, n_obs=self.n_obs, chunk_rows=self.chunk_rows, fsync=fsync)
        attrs = read_root_attrs(self.work_path) or {}
        #: X chunks whose claimed rows failed verification when reopened (computed again), by index
        self.chunks_recomputed: list[int] = []
        if attrs.get(STATUS_ATTR) == "complete":  # crashed inside finalize, after every row was on disk
            done = np.ones(self.n_obs, dtype=bool)
        else:
            done, self.chunks_recomputed, _ = verify_claims(progress, x, self.work_path)
        self._progress = progress
        self._rows = ChunkBuffers(x, progress, done, fsync=fsync, max_buffer_bytes=max_buffer_bytes)

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], *,
        obs_xy_px: np.ndarray, grid_index: np.ndarray, tissue_fraction: np.ndarray,
        genes: Sequence[str], uns: Mapping[str, Any], spatial: SpatialImages | None = None,
        chunk_rows: int | None = None, overwrite: bool = False, replace: bool = False, fsync: bool = True,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES, flush_interval_s: float = 60.0,
        obs_names: Sequence[str] | None = None, extra_obs: Mapping[str, np.ndarray] | None = None,
        x_dtype: str = store_io.DEFAULT_X_DTYPE,
    ) -> OutputStore:
        """Create a new, empty (incomplete) output for ``path`` (``OUT.zarr``) in ``OUT.zarr.partial``.

        ``obs_xy_px``: [N, 2] level-0 pixel (x, y); ``grid_index``: [N, 2] int (row, col);
        ``tissue_fraction``: [N] in [0, 1]; ``genes``: G unique names; ``uns``: JSON-able metadata;
        ``spatial``: thumbnail + scale factors for ``uns['spatial']``; ``chunk_rows``: X rows per chunk
        (default: about 4 MiB per chunk); ``obs_names``: N unique row names (default ``p0, p1, ...``);
        ``max_buffer_bytes``: bound on buffered rows (bytes);
        ``flush_interval_s``: write buffered rows at least this often (seconds); ``x_dtype``: X's element type
        (``float32``, or ``float16``: rows are given as float32 and stored rounded).

        An existing output raises :class:`OutputExistsError`, except: ``replace=True`` keeps a complete
        ``OUT.zarr`` until :meth:`finalize` swaps the new one in (a failed or killed run leaves it as
        it was) and discards an incomplete ``OUT.zarr.partial``; ``overwrite=True`` (legacy) deletes
        both at once. An ``OUT.zarr`` hishrst did not complete is never replaced. A location that
        refuses the write raises :class:`OutputNotWritableError`.
        """
        final = Path(path)
        content = build_content(obs_xy_px=obs_xy_px, grid_index=grid_index, tissue_fraction=tissue_fraction,
                                genes=genes, uns=uns, spatial=spatial, chunk_rows=chunk_rows,
                                obs_names=obs_names, extra_obs=extra_obs, x_dtype=x_dtype)
        with writing(final, "create the output"):
            prepare_location(final, overwrite=overwrite, replace=replace)
            write_skeleton(partial_path(final), content, fsync=fsync)
            return cls(final, fsync=fsync, max_buffer_bytes=max_buffer_bytes, flush_interval_s=flush_interval_s,
                       replace=replace)

    @classmethod
    def open_incomplete(
        cls, path: str | os.PathLike[str], *,
        obs_xy_px: np.ndarray | None = None, grid_index: np.ndarray | None = None,
        genes: Sequence[str] | None = None, expected_uns: Mapping[str, Any] | None = None,
        fsync: bool = True, max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES, flush_interval_s: float = 60.0,
        replace: bool = False,
    ) -> OutputStore:
        """Reopen ``OUT.zarr.partial`` to finish it (``--resume``).

        Whatever is given is compared with what the store holds: ``obs_xy_px`` / ``grid_index``
        (the query points), ``genes``, and each ``expected_uns`` key (e.g. ``{"bundle_hash": ...}``)
        against ``uns``; any difference raises :class:`OutputMismatchError`. ``replace=True`` finishes
        a partial that is to replace a complete ``OUT.zarr`` (a resumed ``create(..., replace=True)``).
        """
        final = Path(path)
        work = partial_path(final)
        state = output_status(final)
        if state == "complete" and not (replace and work.is_dir()):
            raise OutputExistsError(f"{final}: the output is already complete, nothing to resume; "
                                    "use --overwrite to recompute it")
        if state == "incomplete" and not work.is_dir():
            raise OutputExistsError(f"{final}: exists but was not written by hishrst; it is left as it is: "
                                    "move it away or choose another --out")
        if state == "missing":
            raise FileNotFoundError(f"{work}: no incomplete output to resume; run without --resume")
        try:
            store = cls(final, fsync=fsync, max_buffer_bytes=max_buffer_bytes, flush_interval_s=flush_interval_s,
                        replace=replace)
        except (KeyError, OSError, ValueError) as e:
            raise unreadable(work, e) from e
        if genes is None and obs_xy_px is None and grid_index is None and not expected_uns:
            return store  # a bare resume (no checks) does not pay for importing zarr / anndata
        check_same_run(work, open_group(work), obs_xy_px=obs_xy_px, grid_index=grid_index, genes=genes,
                       expected_uns=expected_uns)
        return store

    @staticmethod
    def status(path: str | os.PathLike[str]) -> OutputStatus:
        """``"complete"`` if ``OUT.zarr`` exists and is marked complete, ``"incomplete"`` if a partial
        (or an unmarked ``OUT.zarr``) exists, else ``"missing"``."""
        return output_status(path)

    def done_mask(self) -> np.ndarray:
        """Bool [N]: rows whose values are on disk and claimed by a durable progress record."""
        return self._rows.done_mask()

    def missing_rows(self) -> np.ndarray:
        """int64 indices of the rows not yet durably written (``~done_mask()``)."""
        return np.flatnonzero(~self.done_mask())

    def _check_rows(self, rows: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows_arr = np.asarray(rows)
        if rows_arr.ndim != 1 or (rows_arr.size and rows_arr.dtype.kind not in "iu"):
            raise ValueError(f"rows must be a 1-D integer array, got {rows_arr.dtype} {rows_arr.shape}")
        vals = np.asarray(values)
        if vals.shape != (rows_arr.size, self.n_vars) or (vals.size and vals.dtype.kind != "f"):
            raise ValueError(f"values must be a float array of shape ({rows_arr.size}, {self.n_vars}), "
                             f"got {vals.dtype} {vals.shape}")
        rows_arr = rows_arr.astype(np.int64)
        if rows_arr.size and (rows_arr.min() < 0 or rows_arr.max() >= self.n_obs):
            raise IndexError(f"rows out of range [0, {self.n_obs}): min {rows_arr.min()}, max {rows_arr.max()}")
        return rows_arr, vals.astype(np.float32, copy=False)

    def write_rows(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Store predictions ``values`` (float [len(rows), G]) for point indices ``rows`` (any order).

        Rows are buffered and reach disk with their chunk (see the module docstring); call
        :meth:`flush` to force them out. A failed write raises :class:`OutputNotWritableError` and
        keeps the rows buffered.
        """
        rows_arr, vals = self._check_rows(rows, values)
        if rows_arr.size == 0:
            return
        with self._lock, writing(self.work_path, "write predictions"):
            self._check_open()
            self._rows.put(rows_arr, vals)
            if time.monotonic() - self._last_flush >= self._flush_interval_s:
                self._flush_all()
            else:
                self._rows.reap()

    def flush(self) -> None:
        """Write every buffered row to disk and record it as done."""
        with self._lock, writing(self.work_path, "write predictions"):
            self._check_open()
            self._flush_all()

    def _check_open(self) -> None:
        if self._finalized:
            raise RuntimeError(f"{self.path}: the output is finalized; no more writes")

    def _flush_all(self) -> None:
        self._rows.flush_all()
        self._last_flush = time.monotonic()

    def finalize(self, extra_uns: Mapping[str, Any] | None = None) -> None:
        """Flush, add ``extra_uns`` (e.g. timings) to ``uns``, mark complete and publish ``OUT.zarr``
        (swapped in over the earlier complete output when created with ``replace=True``).

        Raises :class:`IncompleteOutputError` if any row was never written.
        """
        with self._lock, writing(self.work_path, "finalize the output"):
            self._check_open()
            self._flush_all()
            missing = self.n_obs - self._rows.done_count()
            if missing:
                raise IncompleteOutputError(f"{self.work_path}: {missing} of {self.n_obs} rows were never written")
            for key, value in store_io.to_uns(dict(extra_uns or {}), "uns").items():
                store_io.write_uns(self.work_path / "uns", key, value)
            update_root_attrs(self.work_path, {STATUS_ATTR: "complete", "hishrst_completed_at": time.time()},
                              fsync=self._fsync)
            self._progress.remove()
            atomic_write(self.work_path / ".zmetadata", store_io.consolidated_metadata(self.work_path), fsync=False)
            publish(self.work_path, self.path, replace=self._replace, fsync=self._fsync)
            self._finalized = True
            self._rows.clear()
            self._rows.stop()

    def close(self) -> None:
        """Flush buffered rows (the output stays incomplete until :meth:`finalize`)."""
        with self._lock:
            try:
                if not self._finalized:
                    with writing(self.work_path, "write predictions"):
                        self._flush_all()
            finally:
                self._rows.stop()

    def __enter__(self) -> OutputStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"OutputStore({str(self.path)!r}, n_obs={self.n_obs}, n_vars={self.n_vars}, "
                f"chunk_rows={self.chunk_rows}, done={self._rows.done_count()})")
