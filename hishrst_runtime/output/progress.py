"""Durable per-chunk progress records of a partial store: which rows of X are on disk.

``OUT.zarr.partial/.hishrst_progress/chunk-XXXXXXXX.bits`` is the packed bitmap (``numpy.packbits``) of
the rows of X chunk ``k`` that are on disk, followed by the SHA-256 (32 bytes) of the X chunk file as it
was written. Writing chunk ``k`` is *unclaim, write, claim*: delete its record, write the X chunk, write
the new record to a temporary sibling and rename it in (each fsync'd if asked). A kill at any instant
leaves every claimed row intact; a record of the wrong size (torn or foreign) or a foreign name is
ignored. Records written before the checksum (bitmap only) are still read: :func:`~hishrst_runtime.output.
resume.verify_claims` checks them as far as it can (see there).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hishrst_runtime.core.files import atomic_write, fsync_path
from hishrst_runtime.output.layout import PROGRESS_DIR

__all__ = ["ProgressRecords", "ChunkClaim", "DIGEST_BYTES"]

#: Bytes of the chunk checksum (SHA-256 of the X chunk file) after the bitmap in a record.
DIGEST_BYTES = 32


@dataclass(frozen=True)
class ChunkClaim:
    """One well-formed record: chunk ``k``, its rows ``[lo, hi)``, which of them are on disk (bool
    ``filled``) and the SHA-256 of the chunk file (``None`` in records written before checksums)."""

    k: int
    lo: int
    hi: int
    filled: np.ndarray
    digest: bytes | None


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

    def claims(self) -> list[ChunkClaim]:
        """The well-formed records, by chunk (creates the records folder if missing)."""
        out = []
        self.dir.mkdir(exist_ok=True)
        for f in self.dir.glob("chunk-*.bits"):
            k = int(f.stem[6:]) if f.stem[6:].isdigit() else -1
            lo, hi = self.bounds(k)
            if k < 0 or lo >= hi:
                continue
            raw = f.read_bytes()
            nb = (hi - lo + 7) // 8
            if len(raw) not in (nb, nb + DIGEST_BYTES):  # files are replaced atomically; anything else is foreign
                continue
            filled = np.unpackbits(np.frombuffer(raw[:nb], dtype=np.uint8), count=hi - lo).astype(bool)
            out.append(ChunkClaim(k, lo, hi, filled, raw[nb:] or None))
        return sorted(out, key=lambda c: c.k)

    def load(self) -> np.ndarray:
        """Bool [n_obs]: rows claimed by a well-formed record, unverified (see :func:`~hishrst_runtime.
        output.resume.verify_claims`)."""
        done = np.zeros(self.n_obs, dtype=bool)
        for c in self.claims():
            done[c.lo:c.hi] = c.filled
        return done

    def unclaim(self, k: int) -> None:
        """Delete chunk ``k``'s bitmap before its X chunk is rewritten (a kill then loses only its rows)."""
        path = self.path(k)
        if path.exists():
            path.unlink()
            if self._fsync:
                fsync_path(self.dir, directory=True)

    def claim(self, k: int, filled: np.ndarray, digest: bytes) -> None:
        """Record bool ``filled`` (chunk ``k``'s rows now on disk) and ``digest`` (SHA-256 of the chunk
        file just written) atomically."""
        if len(digest) != DIGEST_BYTES:
            raise ValueError(f"chunk checksum must be {DIGEST_BYTES} bytes, got {len(digest)}")
        atomic_write(self.path(k), np.packbits(filled).tobytes() + bytes(digest), fsync=self._fsync)

    def remove(self) -> None:
        """Delete every record (the store is complete); a failure is harmless (readers skip the folder)."""
        shutil.rmtree(self.dir, ignore_errors=True)
