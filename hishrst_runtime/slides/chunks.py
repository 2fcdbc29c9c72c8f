"""Whole-chunk reads straight from a local zarr directory store: the slide reader's fast path (torch-free).

zarr-python 3 routes every read through its asyncio event loop and codec pipeline, which costs more
per call than the decompression itself (measurements: benchmarks/RESULTS.md). The runtime reads
slides one whole chunk at a time, so for the common, simple layout — an unsharded array in a local
directory, uint8, C order, no filters, and at most one compressor that numcodecs implements (zstd,
gzip, blosc), optionally followed by a crc32c checksum — :class:`DirectChunkReader` opens the chunk
file and decompresses it
with numcodecs directly (which releases the GIL, so reader threads decode in parallel). Anything
else (sharding, other codecs or filters, remote stores) returns ``None`` from
:meth:`DirectChunkReader.for_array` and the caller keeps using zarr. The decoded bytes are exactly
what zarr would return; a missing chunk file is ``None`` from :meth:`DirectChunkReader.read_or_none` (the
level judges it by the rule of :mod:`hishrst_runtime.slides.integrity`, which :class:`MissingChunks` carries
per slide), and a file that does not decode to the chunk's size raises :class:`ChunkDecodeError` instead
of returning wrong pixels.

Checksums: zstd frames written with a content checksum (``hishrst convert`` writes them) are verified
by the zstd decoder, and a zarr v3 ``crc32c`` codec is verified before decompression; a mismatch is a
:class:`ChunkDecodeError` naming the chunk file. Chunks written without a checksum (zarr's default) can
only be checked for decoding to the right size.
"""

from __future__ import annotations

import threading
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hishrst_runtime.slides.errors import ChunkDecodeError

__all__ = ["ChunkDecodeError", "DirectChunkReader", "ChunkAbsent", "MissingChunks", "is_metadata_key",
           "local_store"]

#: Keys of zarr metadata documents (an absent one is normal; every other absent key is a chunk).
_METADATA_KEYS = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})


def is_metadata_key(key: str) -> bool:
    """Whether the store key ``key`` names a zarr metadata document rather than a chunk."""
    return key.rsplit("/", 1)[-1] in _METADATA_KEYS


def local_store(store: Any) -> Any:
    """The zarr ``LocalStore`` under ``store`` (itself or the store a wrapper wraps), or None."""
    from zarr.storage import LocalStore

    for _ in range(4):
        if isinstance(store, LocalStore):
            return store
        store = getattr(store, "_store", None)
    return None


class ChunkAbsent(Exception):
    """Internal signal (never shown to users): the store has no object for chunk ``key`` (a missing file,
    HTTP 404). Raised by a store wrapper in place of zarr's silent fill; the slide level judges it."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class MissingChunks:
    """One slide's rule for chunks and tiles with no usable data (see
    :mod:`hishrst_runtime.slides.integrity`): ``allow`` (``--allow-missing-chunks``) reads them as the fill
    value, and every chunk so read is appended once to ``filled`` (thread-safe)."""

    def __init__(self, *, allow: bool = False) -> None:
        self.allow = bool(allow)
        self.filled: list[str] = []
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def record(self, name: str) -> None:
        """Count chunk ``name`` as read as fill (once)."""
        with self._lock:
            if name not in self._seen:
                self._seen.add(name)
                self.filled.append(name)


def _compressor_decoder(name: str) -> Callable[[bytes], bytes] | None:
    import numcodecs

    if name == "ZstdCodec":  # zstd verifies a frame's content checksum itself when the frame has one
        return numcodecs.Zstd().decode
    if name == "GzipCodec":
        return numcodecs.GZip().decode
    if name == "BloscCodec":
        return numcodecs.Blosc().decode  # blosc frames describe themselves (codec, shuffle, typesize)
    return None


def _v3_decoder(codecs: Any) -> Callable[[bytes], bytes] | None:
    """Decoder for a zarr v3 codec chain ``[bytes, (zstd | gzip | blosc)?, crc32c?]``; ``None`` if not that simple."""
    names = [type(c).__name__ for c in codecs]
    if not names or names[0] != "BytesCodec":
        return None
    checked = names[-1] == "Crc32cCodec"
    names = names[:-1] if checked else names
    if len(names) > 2:
        return None
    decode = bytes if len(names) == 1 else _compressor_decoder(names[1])
    if decode is None or not checked:
        return decode
    import numcodecs

    crc = numcodecs.CRC32C()  # verifies and strips the trailing 4-byte checksum, ValueError on mismatch
    return lambda raw: decode(crc.decode(raw))


def _v2_decoder(meta: Any) -> Callable[[bytes], bytes] | None:
    """Decoder for a zarr v2 array with no filters and at most one numcodecs compressor."""
    if getattr(meta, "filters", None) or getattr(meta, "order", "C") != "C":
        return None
    comp = getattr(meta, "compressor", None)
    if comp is None:
        return bytes
    import numcodecs

    allowed = (numcodecs.Zstd, numcodecs.GZip, numcodecs.Blosc, numcodecs.Zlib)
    return comp.decode if isinstance(comp, allowed) else None


class DirectChunkReader:
    """Decodes whole chunks of a simple local zarr array with numcodecs (see the module docstring).

    Build it with :meth:`for_array`; :meth:`read` returns one chunk, **padded** to the full chunk
    shape as zarr stores edge chunks.
    """

    def __init__(self, root: Path, encode_key: Callable[[tuple[int, ...]], str], decode: Callable[[bytes], bytes],
                 chunk_shape: tuple[int, ...], fill_value: int) -> None:
        self.root, self._encode_key, self._decode = root, encode_key, decode
        self.chunk_shape = chunk_shape
        self.fill_value = int(fill_value)
        self._nbytes = int(np.prod(chunk_shape))

    @classmethod
    def for_array(cls, arr: Any) -> DirectChunkReader | None:
        """A reader for the zarr-python 3 array ``arr``, or ``None`` when its layout is not the simple one."""
        try:
            meta, store = arr.metadata, local_store(arr.store)
            if store is None or np.dtype(arr.dtype) != np.uint8:
                return None
            if getattr(arr, "shards", None) is not None:
                return None
            if meta.zarr_format == 3:
                decode = _v3_decoder(meta.codecs)
            elif meta.zarr_format == 2:
                decode = _v2_decoder(meta)
            else:
                return None
            if decode is None:
                return None
            fill = meta.fill_value
            fill = 0 if fill is None else int(fill)
            root = Path(store.root) / arr.path if arr.path else Path(store.root)
            chunk_shape = tuple(int(c) for c in arr.chunks)
            encode_key = meta.encode_chunk_key
            encode_key(tuple(0 for _ in chunk_shape))  # must work for this metadata
        except (AttributeError, TypeError, ValueError, ImportError):  # an unfamiliar zarr version or layout
            return None
        return cls(root, encode_key, decode, chunk_shape, fill)

    def name(self, coords: tuple[int, ...]) -> str:
        """The chunk file of chunk-grid ``coords`` (for messages)."""
        return str(self.root / self._encode_key(tuple(int(c) for c in coords)))

    def read(self, coords: tuple[int, ...]) -> np.ndarray:
        """Chunk at chunk-grid ``coords`` as a uint8 array of the full chunk shape (fill value if absent)."""
        data = self.read_or_none(coords)
        return np.full(self.chunk_shape, self.fill_value, dtype=np.uint8) if data is None else data

    def read_or_none(self, coords: tuple[int, ...]) -> np.ndarray | None:
        """Like :meth:`read`, but None when the chunk file is absent."""
        path = self.root / self._encode_key(tuple(int(c) for c in coords))
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ChunkDecodeError(f"{path}: cannot read the chunk file ({e}); check the slide store's files") from e
        try:
            data = self._decode(raw)
        except (RuntimeError, ValueError, TypeError, OSError, EOFError, zlib.error) as e:  # zstd/blosc, gzip, zlib
            raise ChunkDecodeError(f"{path}: the chunk does not decompress ({e}); the slide store is corrupt, "
                                   "convert the slide again") from e
        buf = np.frombuffer(data, dtype=np.uint8)
        if buf.size != self._nbytes:
            raise ChunkDecodeError(f"{path}: the chunk decodes to {buf.size} bytes, expected {self._nbytes} "
                                   f"({self.chunk_shape}); the slide store is corrupt, convert the slide again")
        return buf.reshape(self.chunk_shape)
