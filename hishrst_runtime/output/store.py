"""The per-slide output store: an AnnData zarr store written incrementally and crash-safely.

Layout
------
``OUT.zarr`` is a plain AnnData store (zarr format 2, which every AnnData release reads)::

    X                  float32 [points, genes], chunked by ``chunk_rows`` rows x all genes
    obs                grid_row, grid_col (int64), tissue_fraction (float32); index "p0", "p1", ...
    var                index = gene names
    obsm/spatial       float64 [points, 2], level-0 pixel (x, y)
    uns                the run's JSON-able metadata (bundle hash, mpp, pitch, timings, ...) and
                       uns["spatial"][library_id] = {"images": {"lowres"[, "hires"]: uint8 HWC},
                       "scalefactors": {...}, "metadata": {}} so scanpy.pl.spatial / squidpy plot it.

The skeleton (obs, var, obsm, uns, an empty ``X`` with AnnData's ``array``/``0.2.0`` encoding), the X
chunks and ``.zmetadata`` are written with plain file I/O by :mod:`hishrst_runtime.output.encoding`, with the
encoding AnnData's own writer (:func:`anndata.io.write_elem`) and zarr give them (the tests compare
the two); going through zarr-python 3 cost ~1 s per slide in event-loop round trips. uns values
outside plain JSON-like types are still written by AnnData.

Crash safety
------------
* The store is built in ``OUT.zarr.partial`` (itself assembled in a ``.partial.tmp-*`` directory and
  renamed, so a ``.partial`` always has a full skeleton). :meth:`OutputStore.finalize` writes
  ``hishrst_status: "complete"`` into the root attributes, then publishes the store with one atomic
  ``rename(OUT.zarr.partial, OUT.zarr)``: ``OUT.zarr`` exists only when complete, and
  :meth:`OutputStore.status` says ``"incomplete"`` for anything before the rename.
* Rows arrive in any order and are buffered per X chunk (``chunk_rows`` rows x all genes). A chunk
  goes to disk as one whole chunk file when all its rows are present (then in a background writer
  thread, at most ``MAX_PENDING_CHUNKS`` behind, so compression and fsync do not stall inference),
  when the buffers exceed ``max_buffer_bytes`` (least recently used first), every
  ``flush_interval_s`` and on :meth:`~OutputStore.flush` (which also waits for the writer). A chunk
  with rows already on disk is read back into its buffer first, so a rewrite carries every earlier row.
* Progress is durable per chunk: ``.hishrst_progress/chunk-XXXXXXXX.bits`` (inside the partial
  store) is the packed bitmap of the chunk's rows on disk. Flushing chunk k is *unclaim, write,
  claim*: delete k's bitmap, write the X chunk (fsync), write the new bitmap to a temp file and
  ``os.replace`` it in (fsync). A kill at any instant (``kill -9``, OOM, Slurm time limit) leaves
  every claimed row intact; at worst the rows of the chunk being written are lost (like rows still
  in memory) and recomputed. A failed background write keeps its rows buffered and raises its error
  from the next call. :meth:`~OutputStore.open_incomplete` rebuilds :meth:`~OutputStore.done_mask`
  from the bitmaps, the runtime computes only the missing rows, and since predictions are
  deterministic per row a resumed run gives exactly the X of an uninterrupted one.

One process writes a slide (hold a :class:`~hishrst_runtime.jobs.locks.SlideLock`); methods are thread-safe.
"""

from __future__ import annotations

import glob
import json
import os
import reprlib
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hishrst_runtime.output import encoding as store_io
from hishrst_runtime.output.encoding import SKIP as _SKIP
from hishrst_runtime.core.files import atomic_write as _atomic_write
from hishrst_runtime.core.files import fsync_path as _fsync_path
from hishrst_runtime.core.files import remove_tree as _remove_tree
from hishrst_runtime.output.encoding import to_uns as _to_uns
from hishrst_runtime.output.encoding import values_equal as _values_equal
from hishrst_runtime.core.errors import OutputStateError

__all__ = ["OutputExistsError", "OutputMismatchError", "IncompleteOutputError", "OutputStatus", "SpatialImages",
           "OutputStore", "partial_path", "write_h5ad"]

OutputStatus = Literal["missing", "incomplete", "complete"]

FORMAT_VERSION = 1
STATUS_ATTR = "hishrst_status"
PARTIAL_SUFFIX = ".partial"
PROGRESS_DIR = ".hishrst_progress"
DEFAULT_CHUNK_BYTES = 4 << 20
DEFAULT_MAX_BUFFER_BYTES = 256 << 20
MAX_PENDING_CHUNKS = 2  # full chunks handed to the writer thread and not yet on disk (memory: 2 chunks)


class OutputExistsError(OutputStateError, FileExistsError):
    """An output (complete or incomplete) already exists and overwriting was not requested."""


class OutputMismatchError(OutputStateError, ValueError):
    """An incomplete output was made with different points, genes or metadata than this run."""


class IncompleteOutputError(OutputStateError):
    """An operation needs a complete output (or all rows written) but it is not."""


@dataclass(frozen=True)
class SpatialImages:
    """Slide thumbnail(s) and scale factors for ``uns['spatial'][library_id]`` (10x Visium layout).

    ``lowres_scalef`` / ``hires_scalef``: image pixels per level-0 pixel. ``spot_diameter_fullres``:
    the query-point diameter in level-0 pixels (what scanpy uses as spot size).
    """

    library_id: str
    lowres: np.ndarray
    lowres_scalef: float
    spot_diameter_fullres: float
    hires: np.ndarray | None = None
    hires_scalef: float | None = None

    def __post_init__(self) -> None:
        for name, img in (("lowres", self.lowres), ("hires", self.hires)):
            if img is not None and not (isinstance(img, np.ndarray) and img.dtype == np.uint8
                                        and img.ndim == 3 and img.shape[2] in (3, 4)):
                raise ValueError(f"SpatialImages.{name} must be a uint8 HxWx3 (RGB) or HxWx4 array, got "
                                 f"{getattr(img, 'dtype', type(img))} {getattr(img, 'shape', '')}")
        if (self.hires is None) != (self.hires_scalef is None):
            raise ValueError("SpatialImages: give hires and hires_scalef together, or neither")
        for name in ("lowres_scalef", "spot_diameter_fullres", "hires_scalef"):
            v = getattr(self, name)
            if v is not None and not (np.isfinite(v) and v > 0):
                raise ValueError(f"SpatialImages.{name} must be a positive number, got {v!r}")
        if not self.library_id or "/" in self.library_id:
            raise ValueError(f"SpatialImages.library_id must be a non-empty name without '/', got {self.library_id!r}")

    def to_uns(self) -> dict[str, Any]:
        """``{library_id: {images, scalefactors, metadata}}``; without hires, tissue_hires_scalef mirrors lowres."""
        images = {"lowres": self.lowres, **({"hires": self.hires} if self.hires is not None else {})}
        scalefactors = {
            "tissue_lowres_scalef": float(self.lowres_scalef),
            "tissue_hires_scalef": float(self.hires_scalef if self.hires_scalef is not None else self.lowres_scalef),
            "spot_diameter_fullres": float(self.spot_diameter_fullres),
        }
        return {self.library_id: {"images": images, "scalefactors": scalefactors, "metadata": {}}}


def partial_path(path: str | os.PathLike[str]) -> Path:
    """Where the output for ``path`` is built until it is finalized (``OUT.zarr.partial``)."""
    p = Path(path)
    return p.with_name(p.name + PARTIAL_SUFFIX)


def _read_root_attrs(store: Path) -> dict[str, Any] | None:
    attrs = store_io.read_json(store / ".zattrs")
    return attrs if isinstance(attrs, dict) else None


def _update_root_attrs(store: Path, updates: Mapping[str, Any], *, fsync: bool) -> None:
    attrs = _read_root_attrs(store)
    if attrs is None:
        raise IncompleteOutputError(f"{store}: root attributes (.zattrs) are unreadable; rerun with --overwrite")
    attrs.update(updates)
    _atomic_write(store / ".zattrs", json.dumps(attrs, indent=2).encode(), fsync=fsync)


def _auto_chunk_rows(n_obs: int, n_vars: int) -> int:
    return int(max(1, min(max(n_obs, 1), DEFAULT_CHUNK_BYTES // (4 * max(n_vars, 1)))))


def _check_points(obs_xy_px: Any, grid_index: Any, tissue_fraction: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xy = np.asarray(obs_xy_px, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise ValueError(f"obs_xy_px must be a finite [N, 2] array of level-0 (x, y) pixels, got shape {xy.shape}")
    grid = np.asarray(grid_index)
    if grid.shape != xy.shape or (grid.size and grid.dtype.kind not in "iu"):
        raise ValueError(f"grid_index must be an integer [N, 2] array matching obs_xy_px {xy.shape}, "
                         f"got {grid.dtype} {grid.shape}")
    tf = np.asarray(tissue_fraction, dtype=np.float32)
    if tf.shape != (xy.shape[0],):
        raise ValueError(f"tissue_fraction must have shape ({xy.shape[0]},), got {tf.shape}")
    return xy, grid.astype(np.int64), tf


@dataclass
class _ChunkBuffer:
    """One X chunk in memory: values [rows, G], which rows hold values, whether disk is behind."""

    data: np.ndarray
    filled: np.ndarray
    dirty: bool = False



class OutputStore:
    """An incrementally written, crash-safe AnnData zarr store for one slide (see the module docstring).

    Get one with :meth:`create` (new run) or :meth:`open_incomplete` (``--resume``); feed it with
    :meth:`write_rows`; publish it with :meth:`finalize`.
    """

    def __init__(self, path: Path, *, fsync: bool, max_buffer_bytes: int, flush_interval_s: float) -> None:
        """Internal: use :meth:`create` or :meth:`open_incomplete`."""
        self.path = path
        self.work_path = partial_path(path)
        if not (self.work_path / ".zgroup").is_file():
            raise FileNotFoundError(f"{self.work_path}: not a zarr group (.zgroup missing)")
        self._X = store_io.XChunks(self.work_path / "X")
        self.n_obs, self.n_vars, self.chunk_rows = self._X.n_obs, self._X.n_vars, self._X.chunk_rows
        self._fsync = fsync
        self._max_buffer_bytes = int(max_buffer_bytes)
        self._flush_interval_s = float(flush_interval_s)
        self._buffers: OrderedDict[int, _ChunkBuffer] = OrderedDict()
        self._pending: dict[int, tuple[Future[None], _ChunkBuffer]] = {}  # full chunks in the writer thread
        self._writer: ThreadPoolExecutor | None = None
        self._lock = threading.RLock()  # buffers, pending writes; never taken by the writer thread
        self._done_lock = threading.Lock()  # _done, which the writer thread updates when it claims rows
        self._last_flush = time.monotonic()
        self._finalized = False
        self._done = self._load_done()

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], *,
        obs_xy_px: np.ndarray, grid_index: np.ndarray, tissue_fraction: np.ndarray,
        genes: Sequence[str], uns: Mapping[str, Any], spatial: SpatialImages | None = None,
        chunk_rows: int | None = None, overwrite: bool = False, fsync: bool = True,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES, flush_interval_s: float = 60.0,
    ) -> OutputStore:
        """Create a new, empty (incomplete) output for ``path`` (``OUT.zarr``).

        ``obs_xy_px``: [N, 2] level-0 pixel (x, y); ``grid_index``: [N, 2] int (row, col);
        ``tissue_fraction``: [N] in [0, 1]; ``genes``: G unique names; ``uns``: JSON-able metadata;
        ``spatial``: thumbnail + scale factors for ``uns['spatial']``; ``chunk_rows``: X rows per chunk
        (default: about 4 MiB per chunk). Raises :class:`OutputExistsError` when ``OUT.zarr`` or
        ``OUT.zarr.partial`` exists, unless ``overwrite`` (which deletes them).
        """
        final = Path(path)
        xy, grid, tf = _check_points(obs_xy_px, grid_index, tissue_fraction)
        gene_list = [str(g) for g in genes]
        if not gene_list or len(set(gene_list)) != len(gene_list):
            raise ValueError(f"genes must be a non-empty list of unique names (got {len(gene_list)}, "
                             f"{len(gene_list) - len(set(gene_list))} duplicates)")
        n_obs, n_vars = xy.shape[0], len(gene_list)
        rows = _auto_chunk_rows(n_obs, n_vars) if chunk_rows is None else int(chunk_rows)
        if rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        uns_dict = _to_uns(dict(uns), "uns")
        if spatial is not None:
            if "spatial" in uns_dict:
                raise ValueError("give the slide images either as spatial= or as uns['spatial'], not both")
            uns_dict["spatial"] = spatial.to_uns()

        work = partial_path(final)
        if final.exists() or work.exists():
            if not overwrite:
                which = final if final.exists() else work
                state = OutputStore.status(final)
                hint = "--overwrite to replace it" if state == "complete" else "--resume to finish it or --overwrite"
                raise OutputExistsError(f"{which}: an {state} output already exists; use {hint}")
            _remove_tree(final)
            _remove_tree(work)
        final.parent.mkdir(parents=True, exist_ok=True)
        prefix = glob.escape(final.name)  # debris of a killed create / overwrite (the caller holds the SlideLock)
        for pattern in (".partial.tmp-*", ".trash-*", ".partial.trash-*"):
            for junk in final.parent.glob(prefix + pattern):
                shutil.rmtree(junk, ignore_errors=True)

        tmp = final.with_name(f"{work.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:  # AnnData's layout, as anndata.io.write_elem(AnnData(obs, var, obsm, uns)) writes it, minus raw
            store_io.write_group(tmp, {"encoding-type": "anndata", "encoding-version": "0.1.0",
                                       STATUS_ATTR: "incomplete", "hishrst_format_version": FORMAT_VERSION})
            store_io.write_dataframe(tmp / "obs", np.array([f"p{i}" for i in range(n_obs)], dtype=object),
                                     {"grid_row": grid[:, 0], "grid_col": grid[:, 1], "tissue_fraction": tf})
            store_io.write_dataframe(tmp / "var", np.array(gene_list, dtype=object), {})
            for name in ("layers", "obsm", "obsp", "uns", "varm", "varp"):
                store_io.write_group(tmp / name, store_io.DICT_ATTRS)
            store_io.write_array(tmp / "obsm" / "spatial", xy, store_io.ARRAY_ATTRS)
            for key, value in uns_dict.items():
                store_io.write_uns(tmp / "uns", key, value)
            store_io.write_x_metadata(tmp / "X", n_obs, n_vars, rows)
            (tmp / PROGRESS_DIR).mkdir()
            os.rename(tmp, work)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if fsync:
            _fsync_path(final.parent, directory=True)
        return cls(final, fsync=fsync, max_buffer_bytes=max_buffer_bytes, flush_interval_s=flush_interval_s)

    @classmethod
    def open_incomplete(
        cls, path: str | os.PathLike[str], *,
        obs_xy_px: np.ndarray | None = None, grid_index: np.ndarray | None = None,
        genes: Sequence[str] | None = None, expected_uns: Mapping[str, Any] | None = None,
        fsync: bool = True, max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES, flush_interval_s: float = 60.0,
    ) -> OutputStore:
        """Reopen ``OUT.zarr.partial`` to finish it (``--resume``).

        Whatever is given is compared with what the store holds: ``obs_xy_px`` / ``grid_index``
        (the query points), ``genes``, and each ``expected_uns`` key (e.g. ``{"bundle_hash": ...}``)
        against ``uns``; any difference raises :class:`OutputMismatchError`.
        """
        final = Path(path)
        work = partial_path(final)
        state = OutputStore.status(final)
        if state == "complete" or (state == "incomplete" and not work.is_dir()):
            what = "is already complete, nothing to resume" if state == "complete" else "was not written by hishrst"
            raise OutputExistsError(f"{final}: the output {what}; use --overwrite to recompute it")
        if state == "missing":
            raise FileNotFoundError(f"{work}: no incomplete output to resume; run without --resume")
        try:
            store = cls(final, fsync=fsync, max_buffer_bytes=max_buffer_bytes, flush_interval_s=flush_interval_s)
            if genes is None and obs_xy_px is None and grid_index is None and not expected_uns:
                return store  # a bare resume (no checks) does not pay for importing zarr / anndata
            import zarr

            root: Any = zarr.open_group(work, mode="r", zarr_format=2, use_consolidated=False)
        except (KeyError, OSError, ValueError) as e:
            raise OutputMismatchError(f"{work}: the incomplete output is unreadable ({e}); use --overwrite") from e

        def mismatch(what: str, detail: str) -> OutputMismatchError:
            return OutputMismatchError(f"{work}: the incomplete output was made with different {what} than this run "
                                       f"({detail}); rerun with --overwrite to discard it and start again")

        if genes is not None or expected_uns:
            import anndata as ad  # only here: checking points alone does not pay for importing anndata
        if genes is not None:
            stored = [str(g) for g in ad.io.read_elem(root["var"]).index]
            if stored != [str(g) for g in genes]:
                raise mismatch("genes", f"{len(stored)} stored vs {len(genes)} now")
        if obs_xy_px is not None:
            stored_xy = np.asarray(root["obsm"]["spatial"][...])
            xy = np.asarray(obs_xy_px, dtype=np.float64)
            if stored_xy.shape != xy.shape or not np.array_equal(stored_xy, xy):
                raise mismatch("query points", f"{stored_xy.shape[0]} stored vs {xy.shape[0]} now")
        if grid_index is not None:
            obs = root["obs"]
            stored_grid = np.stack([obs["grid_row"][...], obs["grid_col"][...]], axis=1)
            if not _values_equal(stored_grid, np.asarray(grid_index)):
                raise mismatch("grid indices", "grid_row/grid_col differ")
        uns = root["uns"]
        for key, value in (expected_uns or {}).items():
            want = _to_uns(value, key)  # normalised exactly as create() stored it (None values dropped)
            have = ad.io.read_elem(uns[key]) if key in uns else _SKIP
            if (have is _SKIP) != (want is _SKIP) or (want is not _SKIP and not _values_equal(have, want)):
                raise mismatch(f"uns[{key!r}]", f"stored {reprlib.repr(have)} vs {reprlib.repr(value)} now")
        return store

    @staticmethod
    def status(path: str | os.PathLike[str]) -> OutputStatus:
        """``"complete"`` if ``OUT.zarr`` exists and is marked complete, ``"incomplete"`` if a partial
        (or an unmarked ``OUT.zarr``) exists, else ``"missing"``."""
        final = Path(path)
        if final.exists():
            attrs = _read_root_attrs(final)
            return "complete" if attrs is not None and attrs.get(STATUS_ATTR) == "complete" else "incomplete"
        return "incomplete" if partial_path(final).exists() else "missing"

    def _chunk_bounds(self, k: int) -> tuple[int, int]:
        return k * self.chunk_rows, min((k + 1) * self.chunk_rows, self.n_obs)

    def _load_done(self) -> np.ndarray:
        attrs = _read_root_attrs(self.work_path) or {}
        if attrs.get(STATUS_ATTR) == "complete":  # crashed inside finalize, after every row was on disk
            return np.ones(self.n_obs, dtype=bool)
        done = np.zeros(self.n_obs, dtype=bool)
        progress = self.work_path / PROGRESS_DIR
        progress.mkdir(exist_ok=True)
        for f in progress.glob("chunk-*.bits"):
            k = int(f.stem[6:]) if f.stem[6:].isdigit() else -1
            lo, hi = self._chunk_bounds(k)
            if k < 0 or lo >= hi:
                continue
            bits = np.frombuffer(f.read_bytes(), dtype=np.uint8)
            if bits.size == (hi - lo + 7) // 8:  # files are replaced atomically; anything else is foreign
                done[lo:hi] = np.unpackbits(bits, count=hi - lo).astype(bool)
        return done

    def done_mask(self) -> np.ndarray:
        """Bool [N]: rows whose values are on disk and claimed by a durable progress record."""
        with self._done_lock:
            return self._done.copy()

    def missing_rows(self) -> np.ndarray:
        """int64 indices of the rows not yet durably written (``~done_mask()``)."""
        return np.flatnonzero(~self.done_mask())

    def write_rows(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Store predictions ``values`` (float [len(rows), G]) for point indices ``rows`` (any order).

        Rows are buffered and reach disk with their chunk (see the module docstring); call
        :meth:`flush` to force them out.
        """
        rows_arr = np.asarray(rows)
        if rows_arr.ndim != 1 or (rows_arr.size and rows_arr.dtype.kind not in "iu"):
            raise ValueError(f"rows must be a 1-D integer array, got {rows_arr.dtype} {rows_arr.shape}")
        vals = np.asarray(values)
        if vals.shape != (rows_arr.size, self.n_vars) or (vals.size and vals.dtype.kind != "f"):
            raise ValueError(f"values must be a float array of shape ({rows_arr.size}, {self.n_vars}), "
                             f"got {vals.dtype} {vals.shape}")
        if rows_arr.size == 0:
            return
        rows_arr = rows_arr.astype(np.int64)
        if rows_arr.min() < 0 or rows_arr.max() >= self.n_obs:
            raise IndexError(f"rows out of range [0, {self.n_obs}): min {rows_arr.min()}, max {rows_arr.max()}")
        vals = vals.astype(np.float32, copy=False)
        with self._lock:
            self._check_open()
            chunk_of = rows_arr // self.chunk_rows
            groups: list[tuple[int, Any]]
            if rows_arr.size == 1 or bool((rows_arr[1:] > rows_arr[:-1]).all()):  # the usual case: increasing rows
                cuts = (np.flatnonzero(chunk_of[1:] != chunk_of[:-1]) + 1).tolist()
                groups = [(int(chunk_of[a]), slice(a, b)) for a, b in zip([0, *cuts], [*cuts, rows_arr.size], strict=True)]
            else:
                order = np.argsort(chunk_of, kind="stable")
                ks, starts = np.unique(chunk_of[order], return_index=True)
                groups = list(zip(ks.tolist(), np.split(order, starts[1:]), strict=True))
            for k, sel in groups:
                buf = self._buffer(k)
                local: Any = rows_arr[sel] - k * self.chunk_rows
                if isinstance(sel, slice) and local[-1] - local[0] == local.size - 1:  # consecutive: copy a block
                    local = slice(int(local[0]), int(local[-1]) + 1)
                buf.data[local] = vals[sel]
                buf.filled[local] = True
                buf.dirty = True
                if buf.filled.all():
                    del self._buffers[k]
                    self._submit(k, buf)
            self._enforce_memory()
            if time.monotonic() - self._last_flush >= self._flush_interval_s:
                self._flush_all()
            else:
                self._reap()

    def flush(self) -> None:
        """Write every buffered row to disk and record it as done."""
        with self._lock:
            self._check_open()
            self._flush_all()

    def _check_open(self) -> None:
        if self._finalized:
            raise RuntimeError(f"{self.path}: the output is finalized; no more writes")

    def _buffer(self, k: int) -> _ChunkBuffer:
        if k in self._pending:  # rows again for a chunk being written: wait, then read it back
            self._drain(k)
        buf = self._buffers.get(k)
        if buf is not None:
            self._buffers.move_to_end(k)
            return buf
        lo, hi = self._chunk_bounds(k)
        with self._done_lock:
            filled = self._done[lo:hi].copy()  # rows already on disk are read back, so a rewrite keeps them
        shape = (hi - lo, self.n_vars)
        data = self._X.read(k, hi - lo) if filled.any() else np.zeros(shape, np.float32)
        buf = self._buffers[k] = _ChunkBuffer(data, filled)
        return buf

    def _submit(self, k: int, buf: _ChunkBuffer) -> None:
        """Hand the full chunk ``k`` to the writer thread; waits while MAX_PENDING_CHUNKS are pending.

        Compression releases the GIL and fsync is a wait: the caller (the inference thread) goes on.
        The write is the same unclaim-write-claim as a synchronous one, so crash safety is unchanged;
        a failed write puts the rows back in the buffers and its error is raised by the next call
        (write_rows, flush, close or finalize).
        """
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hishrst-output")
        self._pending[k] = (self._writer.submit(self._flush_chunk, k, buf), buf)
        self._reap()
        while len(self._pending) > MAX_PENDING_CHUNKS:
            self._drain(next(iter(self._pending)))

    def _reap(self) -> None:
        """Collect finished background writes (raising the first failure)."""
        for k in [k for k, (fut, _) in self._pending.items() if fut.done()]:
            self._drain(k)

    def _drain(self, k: int | None = None) -> None:
        """Wait for the background writes (of chunk ``k`` only, if given); raise the first failure."""
        error: Exception | None = None
        for j in list(self._pending) if k is None else [k]:
            fut, buf = self._pending.pop(j)
            try:
                fut.result()
            except Exception as e:  # noqa: BLE001 - re-raised below, after every write has ended
                self._buffers.setdefault(j, buf)  # still dirty: the next flush writes it again
                error = error or e
        if error is not None:
            raise error

    def _flush_chunk(self, k: int, buf: _ChunkBuffer) -> None:
        """Write chunk ``k`` (unclaim, write, claim); runs in the writer thread or under ``_lock``."""
        if not buf.dirty:
            return
        lo, hi = self._chunk_bounds(k)
        progress = self.work_path / PROGRESS_DIR / f"chunk-{k:08d}.bits"
        if progress.exists():  # unclaim first: a kill during the X write must not leave claimed rows torn
            progress.unlink()
            if self._fsync:
                _fsync_path(progress.parent, directory=True)
        self._X.write(k, buf.data, fsync=self._fsync)
        _atomic_write(progress, np.packbits(buf.filled).tobytes(), fsync=self._fsync)
        with self._done_lock:
            self._done[lo:hi] = buf.filled
        buf.dirty = False

    def _flush_all(self) -> None:
        self._drain()
        for k, buf in list(self._buffers.items()):
            self._flush_chunk(k, buf)
        self._last_flush = time.monotonic()

    def _enforce_memory(self) -> None:
        """Flush and drop least recently used chunk buffers while they exceed ``max_buffer_bytes``."""
        while len(self._buffers) > 1 and sum(b.data.nbytes for b in self._buffers.values()) > self._max_buffer_bytes:
            self._flush_chunk(*self._buffers.popitem(last=False))

    def finalize(self, extra_uns: Mapping[str, Any] | None = None) -> None:
        """Flush, add ``extra_uns`` (e.g. timings) to ``uns``, mark complete and publish ``OUT.zarr``.

        Raises :class:`IncompleteOutputError` if any row was never written.
        """
        with self._lock:
            self._check_open()
            self._flush_all()
            missing = int((~self._done).sum())
            if missing:
                raise IncompleteOutputError(f"{self.work_path}: {missing} of {self.n_obs} rows were never written")
            for key, value in _to_uns(dict(extra_uns or {}), "uns").items():
                store_io.write_uns(self.work_path / "uns", key, value)
            _update_root_attrs(self.work_path, {STATUS_ATTR: "complete", "hishrst_completed_at": time.time()},
                               fsync=self._fsync)
            shutil.rmtree(self.work_path / PROGRESS_DIR, ignore_errors=True)
            _atomic_write(self.work_path / ".zmetadata", store_io.consolidated_metadata(self.work_path), fsync=False)
            if self.path.exists():
                raise OutputExistsError(f"{self.path}: appeared while this run was writing {self.work_path}; "
                                        "another job wrote the same slide (use a SlideLock)")
            os.rename(self.work_path, self.path)
            if self._fsync:
                _fsync_path(self.path.parent, directory=True)
            self._finalized = True
            self._buffers.clear()
            self._stop_writer()

    def close(self) -> None:
        """Flush buffered rows (the output stays incomplete until :meth:`finalize`)."""
        with self._lock:
            try:
                if not self._finalized:
                    self._flush_all()
            finally:
                self._stop_writer()

    def _stop_writer(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)  # idle here: every write was drained (or failed) before
            self._writer = None

    def __enter__(self) -> OutputStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"OutputStore({str(self.path)!r}, n_obs={self.n_obs}, n_vars={self.n_vars}, "
                f"chunk_rows={self.chunk_rows}, done={int(self._done.sum())})")


def write_h5ad(zarr_path: str | os.PathLike[str], h5ad_path: str | os.PathLike[str]) -> Path:
    """Convert a complete output to ``.h5ad`` (``--h5ad``), via a temp file and an atomic rename."""
    import anndata as ad

    src, dst = Path(zarr_path), Path(h5ad_path)
    state = OutputStore.status(src)
    if state != "complete":
        raise IncompleteOutputError(f"{src}: output is {state}; finish it before converting to h5ad")
    adata = ad.read_zarr(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst
