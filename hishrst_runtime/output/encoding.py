"""File-level I/O for :mod:`hishrst_runtime.output.store`: durable writes, uns values, a direct zarr-v2 writer.

Why not zarr + AnnData's writer for everything: zarr-python 3 sends every metadata and chunk operation
through its asyncio event-loop thread (~1-4 ms each, more on a CPU busy with inference); AnnData's
writer needs ~270 of them for one slide's obs/var/obsm/uns (~0.8 s) and each X chunk write pays a
few thread hops. Here the same files are written with plain file I/O:

* the ``.zgroup`` / ``.zarray`` / ``.zattrs`` JSON is what zarr 3.1 and AnnData write for these
  elements (``tests/runtime/output/test_store.py`` checks it against :func:`anndata.io.write_elem`), with the same
  Blosc LZ4 compressor; each array is a single chunk (readers do not depend on the chunking);
* ``.zmetadata`` is what :func:`zarr.consolidate_metadata` writes (also checked by the tests);
* X chunks are encoded / decoded with the codec named in ``X/.zarray``, so stores from earlier
  releases (written through zarr, same layout) are read and resumed alike;
* uns values outside the plain JSON-like types (see :func:`is_plain`) are left to AnnData's writer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.files import fsync_path, read_json, remove_tree
from hishrst_runtime.core.vocab import DEFAULT_X_DTYPE, X_DTYPES, XDtype  # noqa: F401 - re-exported for the store modules

#: The zarr dtype string of each element type of X (:data:`~hishrst_runtime.core.vocab.X_DTYPES`).
X_ZARR_DTYPES: dict[str, str] = {"float32": "<f4", "float16": "<f2"}

#: The compressor of every array written here: zarr 3.1's default for zarr-format-2 arrays (and what
#: earlier releases wrote through zarr). Measured on a real 1,024 x 1,000 float32 prediction chunk it
#: has the cheapest compression per byte saved: ratio 0.85 at ~4-7 ms CPU per 4 MiB (zstd-1: 0.65 at
#: ~17 ms; bitshuffle-LZ4: 0.88 at ~4 ms).
COMPRESSOR: dict[str, Any] = {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1, "blocksize": 0}
_VLEN_UTF8 = [{"id": "vlen-utf8"}]
DICT_ATTRS = {"encoding-type": "dict", "encoding-version": "0.1.0"}
ARRAY_ATTRS = {"encoding-type": "array", "encoding-version": "0.2.0"}
_INT64 = (-(2**63), 2**63 - 1)


SKIP = object()  # to_uns: a value not stored (None)


def to_uns(value: Any, key: str) -> Any:
    """Convert a JSON-able value to what AnnData writes to ``uns`` (None is dropped: AnnData < 0.12 cannot read it)."""
    if value is None:
        return SKIP
    if isinstance(value, (np.ndarray, bool, int, float, str)):
        return value
    if isinstance(value, (np.generic, os.PathLike)):
        return os.fspath(value) if isinstance(value, os.PathLike) else value.item()
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str) or not k or "/" in k:
                raise ValueError(f"uns key {key}/{k!r} must be a non-empty string without '/'")
            conv = to_uns(v, f"{key}/{k}")
            if conv is not SKIP:
                out[k] = conv
        return out
    if isinstance(value, (list, tuple)):  # numbers -> array, strings -> string array, anything else -> JSON text
        if all(isinstance(v, (bool, int, float, np.number, np.bool_)) for v in value):
            return np.asarray(value, dtype=None if value else np.float64)
        if all(isinstance(v, str) for v in value):
            return np.asarray(value, dtype=object)
        return json.dumps(value, default=str)
    raise TypeError(f"uns value {key!r} of type {type(value).__name__} cannot be stored; use JSON-able values")


def values_equal(a: Any, b: Any) -> bool:
    """Whether two uns values (as stored / as read back by AnnData) hold the same content."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        both = isinstance(a, Mapping) and isinstance(b, Mapping) and set(a) == set(b)
        return both and all(values_equal(a[k], b[k]) for k in a)
    if isinstance(a, (np.ndarray, list, tuple)) or isinstance(b, (np.ndarray, list, tuple)):
        a_arr, b_arr = np.asarray(a), np.asarray(b)
        if a_arr.dtype.kind in "OUT" or b_arr.dtype.kind in "OUT":
            return a_arr.shape == b_arr.shape and [str(x) for x in a_arr.ravel()] == [str(x) for x in b_arr.ravel()]
        return bool(np.array_equal(a_arr, b_arr))
    if isinstance(a, str) or isinstance(b, str):
        return str(a) == str(b)
    return bool(a == b)


def _write_json(path: Path, obj: Any) -> None:
    path.write_bytes(json.dumps(obj, indent=2, allow_nan=True).encode())


def _blosc() -> Any:
    import numcodecs

    return numcodecs.get_codec(dict(COMPRESSOR))


def write_group(path: Path, attrs: Mapping[str, Any]) -> None:
    """A zarr-v2 group (``.zgroup`` + ``.zattrs``) at the new directory ``path``."""
    path.mkdir()
    _write_json(path / ".zgroup", {"zarr_format": 2})
    _write_json(path / ".zattrs", dict(attrs))


def write_array(path: Path, value: np.ndarray, attrs: Mapping[str, Any]) -> None:
    """A single-chunk zarr-v2 array at the new directory ``path``: numbers / bools, or str (vlen-utf8).

    A 0-d ``value`` is stored as AnnData stores scalars (``shape`` [], numbers with ``fill_value`` null).
    """
    strings = value.dtype.kind in "OU"
    arr = value.astype(object) if strings else np.asarray(value, order="C")  # (ascontiguousarray makes 0-d 1-d)
    scalar = arr.ndim == 0
    fill: Any = "" if strings else None if scalar else {"b": False, "f": 0.0}.get(arr.dtype.kind, 0)
    meta = {
        "shape": list(arr.shape), "chunks": [max(1, int(s)) for s in arr.shape], "dtype": "|O" if strings else arr.dtype.str,
        "fill_value": fill, "order": "C", "filters": _VLEN_UTF8 if strings else None, "dimension_separator": ".",
        "compressor": COMPRESSOR, "zarr_format": 2,
    }
    path.mkdir()
    _write_json(path / ".zarray", meta)
    _write_json(path / ".zattrs", dict(attrs))
    if arr.size:
        if strings:
            import numcodecs

            payload: Any = numcodecs.VLenUTF8().encode(arr.reshape(-1))
        else:
            payload = arr.reshape(-1)
        (path / ("0" if scalar else ".".join("0" * arr.ndim))).write_bytes(_blosc().encode(payload))


def is_plain(value: Any) -> bool:
    """Whether :func:`write_uns_value` writes ``value`` itself (else AnnData's writer does).

    Plain: str, bool, int64-range int, float, native-order bool / int / float arrays (any shape,
    at least 1-d), 1-d str arrays, and str-keyed mappings of those.
    """
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    if isinstance(value, (str, bool, float)):
        return True
    if isinstance(value, int):
        return _INT64[0] <= value <= _INT64[1]
    if not isinstance(value, np.ndarray) or value.ndim == 0:
        return False
    kind = value.dtype.kind
    if kind in "biuf":
        return value.dtype.str[0] in "<|" and value.dtype.itemsize <= 8
    return value.ndim == 1 and (kind == "U" or (kind == "O" and all(isinstance(v, str) for v in value)))


def write_uns_value(path: Path, value: Any) -> None:
    """Write a plain (:func:`is_plain`) uns value at the new path ``path`` with AnnData's encoding."""
    if isinstance(value, Mapping):
        write_group(path, DICT_ATTRS)
        for k, v in value.items():
            write_uns_value(path / k, v)
    elif isinstance(value, str):
        write_array(path, np.array(value, dtype=object), {"encoding-type": "string", "encoding-version": "0.2.0"})
    elif isinstance(value, (bool, int, float)):
        write_array(path, np.array(value), {"encoding-type": "numeric-scalar", "encoding-version": "0.2.0"})
    elif value.dtype.kind in "OU":
        write_array(path, value, {"encoding-type": "string-array", "encoding-version": "0.2.0"})
    else:
        write_array(path, value, ARRAY_ATTRS)


def write_uns(uns_dir: Path, key: str, value: Any) -> None:
    """Write (or replace) ``uns[key]`` in the uns group ``uns_dir``: directly when plain, else by AnnData."""
    remove_tree(uns_dir / key)
    if is_plain(value):
        write_uns_value(uns_dir / key, value)
        return
    import anndata as ad
    import zarr

    ad.io.write_elem(zarr.open_group(uns_dir, mode="r+", zarr_format=2, use_consolidated=False), key, value)


def write_dataframe(path: Path, index: np.ndarray, columns: Mapping[str, np.ndarray]) -> None:
    """An AnnData dataframe group: str ``index`` (stored as ``_index``) and numeric ``columns`` in order."""
    write_group(path, {"column-order": list(columns), "_index": "_index", "encoding-type": "dataframe",
                       "encoding-version": "0.2.0"})
    write_array(path / "_index", index, {"encoding-type": "string-array", "encoding-version": "0.2.0"})
    for name, col in columns.items():
        write_array(path / name, col, ARRAY_ATTRS)


def write_x_metadata(path: Path, n_obs: int, n_vars: int, chunk_rows: int, dtype: str = DEFAULT_X_DTYPE) -> None:
    """The empty X array: ``dtype`` (a key of :data:`X_DTYPES`) [n_obs, n_vars], chunks of ``chunk_rows`` x all
    genes, fill 0."""
    if dtype not in X_DTYPES:
        raise ValueError(f"X dtype must be one of {', '.join(X_DTYPES)}, got {dtype!r}")
    path.mkdir()
    _write_json(path / ".zarray", {
        "shape": [n_obs, n_vars], "chunks": [chunk_rows, n_vars], "dtype": X_ZARR_DTYPES[dtype], "fill_value": 0.0, "order": "C",
        "filters": None, "dimension_separator": ".", "compressor": COMPRESSOR, "zarr_format": 2,
    })
    _write_json(path / ".zattrs", ARRAY_ATTRS)


def consolidated_metadata(root: Path) -> bytes:
    """``.zmetadata`` for the zarr-v2 hierarchy at ``root``, as :func:`zarr.consolidate_metadata` (3.1) makes it."""
    meta: dict[str, Any] = {".zgroup": {"zarr_format": 2}, ".zattrs": read_json(root / ".zattrs") or {}}
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        members = []
        for name in sorted(dirnames):
            child = here / name
            if name.startswith(".") or not ((child / ".zarray").is_file() or (child / ".zgroup").is_file()):
                continue  # not a zarr node (e.g. the progress records): zarr does not list it either
            key = child.relative_to(root).as_posix()
            meta[f"{key}/.zattrs"] = read_json(child / ".zattrs") or {}
            if (child / ".zarray").is_file():
                meta[f"{key}/.zarray"] = read_json(child / ".zarray")
            else:
                meta[f"{key}/.zgroup"] = {"zarr_format": 2, "consolidated_metadata": {
                    "metadata": {}, "must_understand": False, "kind": "inline"}}
                members.append(name)
        dirnames[:] = members  # descend into groups only
    return json.dumps({"metadata": meta, "zarr_consolidated_format": 1}, allow_nan=True).encode()


class XChunks:
    """X's chunk files (``X/<k>.0``), encoded and decoded with the codec named in ``X/.zarray``.

    Only the layout :class:`~hishrst_runtime.output.OutputStore` creates is accepted: zarr format 2,
    float32 or float16 (:data:`X_DTYPES`), C order, [points, genes] chunked by rows x all genes. Raises ValueError
    otherwise. Values are read as float32 and written in the array's own type.
    """

    def __init__(self, array_dir: Path) -> None:
        import numcodecs

        self.dir = array_dir
        meta = read_json(array_dir / ".zarray")
        ok = isinstance(meta, dict) and meta.get("zarr_format") == 2 and meta.get("order") == "C"
        shape, chunks = (meta.get("shape"), meta.get("chunks")) if ok else (None, None)
        if not (ok and meta.get("dtype") in X_ZARR_DTYPES.values() and isinstance(shape, list) and len(shape) == 2
                and isinstance(chunks, list) and len(chunks) == 2 and chunks[1] == shape[1] and chunks[0] >= 1
                and meta.get("dimension_separator", ".") == "."):
            raise ValueError(f"{array_dir}: not an X array written by hishrst (.zarray: {meta!r})")
        self.n_obs, self.n_vars = int(shape[0]), int(shape[1])
        self.chunk_rows, self.dtype = int(chunks[0]), np.dtype(meta["dtype"])
        fill = meta.get("fill_value")
        self.fill_value = np.float32(0.0 if fill is None else fill)
        self.compressor = numcodecs.get_codec(meta["compressor"]) if meta.get("compressor") else None
        self.filters = [numcodecs.get_codec(f) for f in meta.get("filters") or []]

    def path(self, k: int) -> Path:
        """The file of chunk ``k`` (rows ``k * chunk_rows`` on)."""
        return self.dir / f"{k}.0"

    def read(self, k: int, rows: int) -> np.ndarray:
        """A new float32 [rows, n_vars] array: the first ``rows`` rows of chunk ``k`` (fill value if absent)."""
        try:
            raw: Any = self.path(k).read_bytes()
        except FileNotFoundError:  # never written, or all fill (zarr drops such chunks)
            return np.full((rows, self.n_vars), self.fill_value, dtype=np.float32)
        buf = self.compressor.decode(raw) if self.compressor is not None else raw
        for f in reversed(self.filters):
            buf = f.decode(buf)
        flat = np.frombuffer(memoryview(buf).cast("B"), dtype=self.dtype)
        if flat.size != self.chunk_rows * self.n_vars:
            raise ValueError(f"{self.path(k)}: chunk holds {flat.size} values, expected {self.chunk_rows * self.n_vars}")
        return flat.reshape(self.chunk_rows, self.n_vars)[:rows].astype(np.float32)

    def write(self, k: int, data: np.ndarray, *, fsync: bool) -> bytes:
        """Encode float [rows <= chunk_rows, n_vars] ``data`` as chunk ``k`` in the array's type (padded with the
        fill value, as zarr stores edge chunks) and write it in place, fsync'd if asked; returns the SHA-256 of the
        file's bytes (recorded with the chunk's progress, verified on ``--resume``)."""
        if data.shape[0] < self.chunk_rows:
            full = np.full((self.chunk_rows, self.n_vars), self.fill_value, dtype=self.dtype)
            full[: data.shape[0]] = data
            data = full
        buf: Any = np.ascontiguousarray(data, dtype=self.dtype)
        for f in self.filters:
            buf = f.encode(buf)
        payload = self.compressor.encode(buf) if self.compressor is not None else buf
        path = self.path(k)
        new_file = not path.exists()
        with open(path, "wb") as fh:
            fh.write(payload)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        if fsync and new_file:  # the new directory entry must be durable before the chunk's rows are claimed
            fsync_path(path.parent, directory=True)
        return hashlib.sha256(memoryview(payload).cast("B")).digest()
