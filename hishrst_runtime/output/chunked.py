"""A zarr-v2 array of known length written front to back, one chunk at a time (the obs table of a bin store).

:func:`~hishrst_runtime.output.encoding.write_array` writes an array whole, as one chunk; a store of millions of
bins lays out its obs columns (names, lattice indices, centres) before any bin is predicted, and holding them
whole would cost ~100 bytes per bin. :class:`ChunkedArray` takes the rows in order, in blocks of any size, and
writes each full chunk as it fills (the same codecs and JSON as :mod:`~hishrst_runtime.output.encoding`; zarr
and AnnData read the result like any chunked array), so memory is one chunk whatever the length.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.output.encoding import COMPRESSOR

__all__ = ["ChunkedArray", "DEFAULT_CHUNK_LEN"]

#: Rows per chunk of an obs column (a few MiB of names or centres per chunk).
DEFAULT_CHUNK_LEN = 1 << 16


class ChunkedArray:
    """A new zarr-v2 array at ``path`` of ``n`` rows (each of shape ``tail``) and ``dtype`` (numbers, or ``object``
    for UTF-8 strings), written in order by :meth:`append`, ``chunk_len`` rows per chunk; ``attrs`` its
    ``.zattrs``. :meth:`close` writes the last (padded) chunk and checks that exactly ``n`` rows came."""

    def __init__(self, path: Path, *, n: int, dtype: Any, attrs: Mapping[str, Any], tail: tuple[int, ...] = (),
                 chunk_len: int = DEFAULT_CHUNK_LEN) -> None:
        import numcodecs

        self.path, self.n, self.tail = Path(path), int(n), tuple(int(t) for t in tail)
        self.dtype = np.dtype(dtype)
        self.strings = self.dtype.kind == "O"
        self.chunk_len = max(1, min(int(chunk_len), self.n or 1))
        self._codec = numcodecs.get_codec(dict(COMPRESSOR))
        self._vlen = numcodecs.VLenUTF8() if self.strings else None
        self._pending: list[np.ndarray] = []
        self._held = self._written = self._chunk = 0
        fill: Any = "" if self.strings else {"b": False, "f": 0.0}.get(self.dtype.kind, 0)
        meta = {"shape": [self.n, *self.tail], "chunks": [self.chunk_len, *self.tail],
                "dtype": "|O" if self.strings else self.dtype.str, "fill_value": fill, "order": "C",
                "filters": [{"id": "vlen-utf8"}] if self.strings else None, "dimension_separator": ".",
                "compressor": COMPRESSOR, "zarr_format": 2}
        self.path.mkdir()
        (self.path / ".zarray").write_bytes(json.dumps(meta, indent=2).encode())
        (self.path / ".zattrs").write_bytes(json.dumps(dict(attrs), indent=2).encode())

    def append(self, block: Any) -> None:
        """Add the next rows (``[m, *tail]``); full chunks are written at once."""
        arr = np.asarray(block, dtype=self.dtype).reshape(-1, *self.tail)
        if self._written + self._held + len(arr) > self.n:
            raise ValueError(f"{self.path}: more than the {self.n} rows the array was created for")
        self._pending.append(arr)
        self._held += len(arr)
        while self._held >= self.chunk_len:
            self._emit(self.chunk_len)

    def _emit(self, rows: int) -> None:
        data = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        out, rest = data[:rows], data[rows:]
        self._pending, self._held = ([rest] if len(rest) else []), len(rest)
        if rows < self.chunk_len:  # the edge chunk: zarr v2 stores every chunk at full size
            pad = np.full((self.chunk_len - rows, *self.tail), "" if self.strings else 0, dtype=self.dtype)
            out = np.concatenate([out, pad])
        payload: Any = self._vlen.encode(out.reshape(-1)) if self._vlen is not None else np.ascontiguousarray(out)
        name = ".".join([str(self._chunk), *("0" for _ in self.tail)])
        (self.path / name).write_bytes(self._codec.encode(payload))
        self._chunk += 1
        self._written += rows

    def close(self) -> None:
        """Write the last chunk; :class:`ValueError` unless exactly ``n`` rows were appended."""
        if self._held:
            self._emit(self._held)
        if self._written != self.n:
            raise ValueError(f"{self.path}: {self._written} rows written, the array was created for {self.n}")
