"""The output store of a sub-spot run: one AnnData row per square bin, its obs table laid out chunk by chunk.

Same store as :class:`~hishrst_runtime.output.store.OutputStore` (crash-safe X chunks, progress records,
``.partial`` → publish, ``--resume``), with the obs of Visium HD's binned outputs instead of query points::

    obs/_index            s_008um_RRRRR_CCCCC-1 (Space Ranger's bin barcodes: bin size, row, column)
    obs/array_row, array_col   int32 lattice indices of the bin (row, column; bin (0, 0) at level-0 pixel (0, 0))
    obsm/spatial          float64 [bins, 2] level-0 pixel (x, y) of each bin's centre
    uns/bins              {size_um, pitch_um, origin_px, mpp, resolution}

The rows are known before anything is predicted (the bin lattice and the tissue mask), so the caller hands
them over as ``blocks``, an iterable of ``(rc int [m, 2] (row, col), xy float [m, 2] level-0 px)`` in row order,
and each obs column is written as it comes, one chunk at a time (:class:`~hishrst_runtime.output.chunked.
ChunkedArray`): memory stays flat whatever the number of bins.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.files import fsync_path, temp_sibling
from hishrst_runtime.output import encoding
from hishrst_runtime.output.chunked import ChunkedArray
from hishrst_runtime.output.content import SpatialImages
from hishrst_runtime.output.errors import writing
from hishrst_runtime.output.layout import FORMAT_VERSION, PROGRESS_DIR, STATUS_ATTR, partial_path, prepare_location
from hishrst_runtime.output.store import DEFAULT_MAX_BUFFER_BYTES, OutputStore

__all__ = ["BIN_OBS_COLUMNS", "bin_names", "create_bin_store"]

#: The obs columns of a bin store (int32 lattice indices), in order.
BIN_OBS_COLUMNS = ("array_row", "array_col")
_STRINGS = {"encoding-type": "string-array", "encoding-version": "0.2.0"}


def bin_names(rc: np.ndarray, size_um: float) -> list[str]:
    """Space Ranger's barcodes of bins ``rc`` ``[m, 2]`` (row, col) of side ``size_um`` µm: ``s_008um_00012_00345-1``."""
    tag = f"s_{int(round(size_um)):03d}um_"
    return [f"{tag}{r:05d}_{c:05d}-1" for r, c in np.asarray(rc).tolist()]


def _write_obs(tmp: Path, n_obs: int, blocks: Iterable[tuple[np.ndarray, np.ndarray]], size_um: float) -> None:
    """``obs`` (index and lattice columns) and ``obsm/spatial`` from ``blocks``, chunk by chunk."""
    encoding.write_group(tmp / "obs", {"column-order": list(BIN_OBS_COLUMNS), "_index": "_index",
                                       "encoding-type": "dataframe", "encoding-version": "0.2.0"})
    index = ChunkedArray(tmp / "obs" / "_index", n=n_obs, dtype=object, attrs=_STRINGS)
    cols = [ChunkedArray(tmp / "obs" / c, n=n_obs, dtype=np.int32, attrs=encoding.ARRAY_ATTRS) for c in BIN_OBS_COLUMNS]
    encoding.write_group(tmp / "obsm", encoding.DICT_ATTRS)
    spatial = ChunkedArray(tmp / "obsm" / "spatial", n=n_obs, dtype=np.float64, tail=(2,), attrs=encoding.ARRAY_ATTRS)
    for rc, xy in blocks:
        rc = np.asarray(rc)
        index.append(np.array(bin_names(rc, size_um), dtype=object))
        cols[0].append(rc[:, 0])
        cols[1].append(rc[:, 1])
        spatial.append(xy)
    for arr in (index, *cols, spatial):
        arr.close()


def _write_skeleton(work: Path, *, n_obs: int, blocks: Iterable[tuple[np.ndarray, np.ndarray]], size_um: float,
                    genes: Sequence[str], uns: Mapping[str, Any], chunk_rows: int, x_dtype: str, fsync: bool) -> None:
    """The new store ``work`` (``OUT.zarr.partial``), assembled in a hidden sibling and renamed (whole or absent)."""
    tmp = temp_sibling(work, "tmp")
    try:
        encoding.write_group(tmp, {"encoding-type": "anndata", "encoding-version": "0.1.0",
                                   STATUS_ATTR: "incomplete", "hishrst_format_version": FORMAT_VERSION})
        _write_obs(tmp, n_obs, blocks, size_um)
        encoding.write_dataframe(tmp / "var", np.array(list(genes), dtype=object), {})
        for name in ("layers", "obsp", "uns", "varm", "varp"):
            encoding.write_group(tmp / name, encoding.DICT_ATTRS)
        for key, value in uns.items():
            encoding.write_uns(tmp / "uns", key, value)
        encoding.write_x_metadata(tmp / "X", n_obs, len(genes), chunk_rows, x_dtype)
        (tmp / PROGRESS_DIR).mkdir()
        os.rename(tmp, work)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fsync:
        fsync_path(work.parent, directory=True)


def create_bin_store(
    path: str | os.PathLike[str], *, n_obs: int, blocks: Iterable[tuple[np.ndarray, np.ndarray]], size_um: float,
    genes: Sequence[str], uns: Mapping[str, Any], spatial: SpatialImages | None = None, chunk_rows: int = 1024,
    replace: bool = False, fsync: bool = True, max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
    x_dtype: str = encoding.DEFAULT_X_DTYPE,
) -> OutputStore:
    """A new, empty (incomplete) bin store for ``path`` (``OUT.zarr``) in ``OUT.zarr.partial``: ``n_obs`` bins
    whose (row, col) and level-0 pixel centres come in ``blocks`` (see the module docstring), bins of
    ``size_um`` µm, ``genes`` (X's columns), ``uns`` (JSON-able; ``uns['bins']`` belongs here), ``spatial``
    (thumbnail and scale factors), ``chunk_rows`` X rows per chunk, ``x_dtype`` ``float32`` / ``float16``.
    ``replace``, ``fsync``, ``max_buffer_bytes``: as :meth:`OutputStore.create` (an existing output without
    ``replace`` raises :class:`~hishrst_runtime.output.errors.OutputExistsError`). Fill it with
    :meth:`OutputStore.write_rows` and publish it with :meth:`OutputStore.finalize`."""
    final = Path(path)
    gene_list = [str(g) for g in genes]
    if not gene_list or len(set(gene_list)) != len(gene_list):
        raise ValueError(f"genes must be a non-empty list of unique names (got {len(gene_list)})")
    if x_dtype not in encoding.X_DTYPES:
        raise ValueError(f"x_dtype must be one of {', '.join(encoding.X_DTYPES)}, got {x_dtype!r}")
    uns_dict = encoding.to_uns(dict(uns), "uns")
    if spatial is not None:
        uns_dict["spatial"] = spatial.to_uns()
    with writing(final, "create the output"):
        prepare_location(final, overwrite=False, replace=replace)
        _write_skeleton(partial_path(final), n_obs=int(n_obs), blocks=blocks, size_um=size_um, genes=gene_list,
                        uns=uns_dict, chunk_rows=max(1, int(chunk_rows)), x_dtype=x_dtype, fsync=fsync)
        return OutputStore(final, fsync=fsync, max_buffer_bytes=max_buffer_bytes, flush_interval_s=60.0,
                           replace=replace)
