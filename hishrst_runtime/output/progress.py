"""Durable per-chunk progress records of a partial store: which rows of X are on disk.

``OUT.zarr.partial/.hishrst_progress/chunk-XXXXXXXX.bits`` is the packed bitmap (``numpy.packbits``) of
the rows of X chunk ``k`` that are on disk. Writing chunk ``k`` is *unclaim, write, claim*: delete
its bitmap, write the X chunk, write the new bitmap to a temporary sibling and rename it in (each
fsync'd if asked). A kill at any instant leaves every claimed row intact; a bitmap of the wrong size
(torn or foreign) or a foreign name is ignored.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from hishrst_runtime.core.files import atomic_write, fsync_path
from hishrst_runtime.output.layout import PROGRESS_DIR

__all__ = ["ProgressRecords"]


class ProgressRecords:
    """The progress bitmaps of the partial store ``store_dir`` with ``n_obs`` rows in chunks of ``chunk_rows``."""

    def __init__(self, store_dir: Path, *, n_obs: int, chunk_rows: int, fsync: bool) -> None:
        """``fsync``: make each unclaim / claim durable before returning."""
        self.dir = Path(store_dir) / PROGRESS_DIR
        self.n_obs, self.chunk_rows, self._fsync = int(n_obs), int(chunk_rows), fsync

    def bounds(self, k: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of chunk ``k`` (empty when ``k`` is past the end)."""
        return k * self.chunk_rows, min((k + 1) * self.chunk_rows, self.n_obs)

    def path(self, k: int) -> Path:
        """The bitmap file of chunk ``k``."""
        return self.dir / f"chunk-{k:08d}.bits"

    def load(self) -> np.ndarray:
        """Bool [n_obs]: rows claimed by a well-formed bitmap (creates the records folder if missing)."""
        done = np.zeros(self.n_obs, dtype=bool)
        self.dir.mkdir(exist_ok=True)
        for f in self.dir.glob("chunk-*.bits"):
            k = int(f.stem[6:]) if f.stem[6:].isdigit() else -1
            lo, hi = self.bounds(k)
            if k < 0 or lo >= hi:
                continue
            bits = np.frombuffer(f.read_bytes(), dtype=np.uint8)
            if bits.size == (hi - lo + 7) // 8:  # files are replaced atomically; anything else is foreign
                done[lo:hi] = np.unpackbits(bits, count=hi - lo).astype(bool)
        return done

    def unclaim(self, k: int) -> None:
        """Delete chunk ``k``'s bitmap before its X chunk is rewritten (a kill then loses only its rows)."""
        path = self.path(k)
        if path.exists():
            path.unlink()
            if self._fsync:
                fsync_path(self.dir, directory=True)

    def claim(self, k: int, filled: np.ndarray) -> None:
        """Record bool ``filled`` (chunk ``k``'s rows now on disk) atomically."""
        atomic_write(self.path(k), np.packbits(filled).tobytes(), fsync=self._fsync)

    def remove(self) -> None:
        """Delete every record (the store is complete); a failure is harmless (readers skip the folder)."""
        shutil.rmtree(self.dir, ignore_errors=True)
