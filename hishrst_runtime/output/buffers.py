"""Rows in memory until their X chunk is written: per-chunk buffers, the background writer, the done mask.

Rows arrive in any order and are buffered per X chunk (``chunk_rows`` rows x all genes). A chunk goes
to disk as one whole chunk file when all its rows are present (then in a background writer thread, at
most ``MAX_PENDING_CHUNKS`` behind, so compression and fsync do not stall inference), when the buffers
exceed ``max_buffer_bytes`` (least recently used first) and on :meth:`ChunkBuffers.flush_all`. A chunk
with rows already on disk is read back into its buffer first, so a rewrite carries every earlier row.

A failed write — in the writer thread or synchronously — keeps its buffer (still dirty), so a retry or
a later flush writes every row again; the chunk's rows count as not done until a write succeeds.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from hishrst_runtime.output.encoding import XChunks
from hishrst_runtime.output.progress import ProgressRecords

__all__ = ["ChunkBuffers", "MAX_PENDING_CHUNKS"]

MAX_PENDING_CHUNKS = 2  # full chunks handed to the writer thread and not yet on disk (memory: 2 chunks)


@dataclass
class _ChunkBuffer:
    """One X chunk in memory: values [rows, G], which rows hold values, whether disk is behind."""

    data: np.ndarray
    filled: np.ndarray
    dirty: bool = False


class ChunkBuffers:
    """The buffered rows of one store and its done mask (rows on disk and claimed).

    Not thread-safe by itself: the owner serialises calls (``OutputStore`` holds its lock); the writer
    thread touches only the chunks handed to it and the done mask (under its own lock).
    """

    def __init__(self, x: XChunks, progress: ProgressRecords, done: np.ndarray, *, fsync: bool,
                 max_buffer_bytes: int) -> None:
        """``done``: bool [n_obs], the rows already claimed on disk; ``max_buffer_bytes``: memory bound."""
        self._X, self._progress, self._fsync = x, progress, fsync
        self._max_buffer_bytes = int(max_buffer_bytes)
        self._buffers: OrderedDict[int, _ChunkBuffer] = OrderedDict()
        self._pending: dict[int, tuple[Future[None], _ChunkBuffer]] = {}  # full chunks in the writer thread
        self._writer: ThreadPoolExecutor | None = None
        self._done = done
        self._done_lock = threading.Lock()  # _done, which the writer thread updates when it claims rows

    def done_mask(self) -> np.ndarray:
        """A copy of the done mask (bool [n_obs])."""
        with self._done_lock:
            return self._done.copy()

    def done_count(self) -> int:
        """How many rows are done."""
        with self._done_lock:
            return int(self._done.sum())

    def put(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Buffer float32 ``values`` [len(rows), G] for the valid int64 ``rows``; full chunks go to the writer."""
        chunk_rows = self._X.chunk_rows
        chunk_of = rows // chunk_rows
        groups: list[tuple[int, Any]]
        if rows.size == 1 or bool((rows[1:] > rows[:-1]).all()):  # the usual case: increasing rows
            cuts = (np.flatnonzero(chunk_of[1:] != chunk_of[:-1]) + 1).tolist()
            groups = [(int(chunk_of[a]), slice(a, b)) for a, b in zip([0, *cuts], [*cuts, rows.size], strict=True)]
        else:
            order = np.argsort(chunk_of, kind="stable")
            ks, starts = np.unique(chunk_of[order], return_index=True)
            groups = list(zip(ks.tolist(), np.split(order, starts[1:]), strict=True))
        for k, sel in groups:
            buf = self._buffer(k)
            local: Any = rows[sel] - k * chunk_rows
            if isinstance(sel, slice) and local[-1] - local[0] == local.size - 1:  # consecutive: copy a block
                local = slice(int(local[0]), int(local[-1]) + 1)
            buf.data[local] = values[sel]
            buf.filled[local] = True
            buf.dirty = True
            if buf.filled.all():
                del self._buffers[k]
                self._submit(k, buf)
        self._enforce_memory()

    def _buffer(self, k: int) -> _ChunkBuffer:
        if k in self._pending:  # rows again for a chunk being written: wait, then read it back
            self._drain(k)
        buf = self._buffers.get(k)
        if buf is not None:
            self._buffers.move_to_end(k)
            return buf
        lo, hi = self._progress.bounds(k)
        with self._done_lock:
            filled = self._done[lo:hi].copy()  # rows already on disk are read back, so a rewrite keeps them
        data = self._X.read(k, hi - lo) if filled.any() else np.zeros((hi - lo, self._X.n_vars), np.float32)
        buf = self._buffers[k] = _ChunkBuffer(data, filled)
        return buf

    def _submit(self, k: int, buf: _ChunkBuffer) -> None:
        """Hand the full chunk ``k`` to the writer thread; waits while MAX_PENDING_CHUNKS are pending.

        Compression releases the GIL and fsync is a wait: the caller (the inference thread) goes on.
        The write is the same unclaim-write-claim as a synchronous one, so crash safety is unchanged;
        a failed write puts the rows back in the buffers and its error is raised by the next call.
        """
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hishrst-output")
        self._pending[k] = (self._writer.submit(self._flush_chunk, k, buf), buf)
        self.reap()
        while len(self._pending) > MAX_PENDING_CHUNKS:
            self._drain(next(iter(self._pending)))

    def reap(self) -> None:
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
        """Write chunk ``k`` (unclaim, write, claim); runs in the writer thread or in the owner's thread."""
        if not buf.dirty:
            return
        lo, hi = self._progress.bounds(k)
        self._progress.unclaim(k)  # first: a kill during the X write must not leave claimed rows torn
        with self._done_lock:
            self._done[lo:hi] = False  # no longer claimed on disk until the claim below
        digest = self._X.write(k, buf.data, fsync=self._fsync)
        self._progress.claim(k, buf.filled, digest)
        with self._done_lock:
            self._done[lo:hi] = buf.filled
        buf.dirty = False

    def flush_all(self) -> None:
        """Write every buffered row (waiting for the writer thread first); failures keep their buffers."""
        self._drain()
        for k, buf in list(self._buffers.items()):
            self._flush_chunk(k, buf)

    def _enforce_memory(self) -> None:
        """Flush and drop least recently used chunk buffers while they exceed ``max_buffer_bytes``.

        A buffer is dropped only after its write succeeded: a failed write raises with the rows kept.
        """
        while len(self._buffers) > 1 and sum(b.data.nbytes for b in self._buffers.values()) > self._max_buffer_bytes:
            k, buf = next(iter(self._buffers.items()))
            self._flush_chunk(k, buf)
            del self._buffers[k]

    def clear(self) -> None:
        """Drop every buffer (after a successful :meth:`flush_all`, when the store is complete)."""
        self._buffers.clear()

    def stop(self) -> None:
        """Shut the writer thread down (idle here: every write was drained, or failed, before)."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
