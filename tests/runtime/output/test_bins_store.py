"""The bin store (hishrst_runtime.output.bins_store) and its chunked obs columns (output.chunked); float16 X."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ad = pytest.importorskip("anndata")
zarr = pytest.importorskip("zarr")

from hishrst_runtime.output.bins_store import bin_names, create_bin_store  # noqa: E402
from hishrst_runtime.output.chunked import ChunkedArray  # noqa: E402
from hishrst_runtime.output.encoding import ARRAY_ATTRS, XChunks  # noqa: E402
from hishrst_runtime.output.errors import OutputExistsError  # noqa: E402
from hishrst_runtime.output.store import OutputStore  # noqa: E402

GENES = ["A", "B", "C"]


@pytest.mark.parametrize("dtype, tail", [(np.int32, ()), (np.float64, (2,)), (object, ())])
def test_chunked_array_reads_back_whole(tmp_path: Path, dtype: object, tail: tuple[int, ...]) -> None:
    n = 1000
    full = (np.array([f"n{i}" for i in range(n)], dtype=object) if dtype is object
            else np.arange(n * int(np.prod(tail))).reshape(n, *tail).astype(dtype))
    arr = ChunkedArray(tmp_path / "a", n=n, dtype=dtype, tail=tail, chunk_len=128, attrs=ARRAY_ATTRS)
    for lo in range(0, n, 77):  # blocks that do not line up with the chunks
        arr.append(full[lo:lo + 77])
    arr.close()
    got = zarr.open_array(tmp_path / "a", mode="r", zarr_format=2)[...]
    assert got.shape == full.shape and list(got.ravel()) == list(full.ravel())
    assert len(list((tmp_path / "a").glob("[0-9]*"))) == 8  # ceil(1000 / 128) chunks


def test_chunked_array_counts_its_rows(tmp_path: Path) -> None:
    arr = ChunkedArray(tmp_path / "a", n=10, dtype=np.int32, chunk_len=4, attrs=ARRAY_ATTRS)
    arr.append(np.arange(6))
    with pytest.raises(ValueError, match="6 rows written"):
        arr.close()
    with pytest.raises(ValueError, match="more than the 10 rows"):
        arr.append(np.arange(5))


def _blocks(n: int, size: int = 100):
    for lo in range(0, n, size):
        r = np.arange(lo, min(n, lo + size))
        rc = np.stack([r // 50, r % 50], axis=1).astype(np.int32)
        yield rc, (rc[:, ::-1] + 0.5) * 16.0


@pytest.mark.parametrize("x_dtype", ["float32", "float16"])
def test_bin_store_round_trip(tmp_path: Path, x_dtype: str) -> None:
    n = 1234
    store = create_bin_store(tmp_path / "s.zarr", n_obs=n, blocks=_blocks(n), size_um=8.0, genes=GENES,
                             uns={"bins": {"size_um": 8.0, "mpp": 0.5}}, chunk_rows=100, x_dtype=x_dtype)
    values = np.random.default_rng(0).random((n, 3)).astype(np.float32)
    for lo in range(0, n, 300):
        store.write_rows(np.arange(lo, min(n, lo + 300)), values[lo:lo + 300])
    store.finalize()
    a = ad.read_zarr(tmp_path / "s.zarr")
    assert a.shape == (n, 3) and a.X.dtype == np.dtype(x_dtype)
    np.testing.assert_allclose(np.asarray(a.X, np.float32), values, rtol=1e-3 if x_dtype == "float16" else 0)
    rc = np.concatenate([b[0] for b in _blocks(n)])
    np.testing.assert_array_equal(np.stack([a.obs["array_row"], a.obs["array_col"]], axis=1), rc)
    assert a.obs["array_row"].dtype == np.int32 and list(a.obs_names[:2]) == bin_names(rc[:2], 8.0)
    assert a.obs_names[0] == "s_008um_00000_00000-1" and a.obs_names.is_unique
    np.testing.assert_array_equal(a.obsm["spatial"], (rc[:, ::-1] + 0.5) * 16.0)
    assert a.uns["bins"]["size_um"] == 8.0
    assert XChunks(tmp_path / "s.zarr" / "X").dtype == np.dtype(x_dtype)


def test_bin_store_resumes_and_refuses_an_existing_output(tmp_path: Path) -> None:
    n = 500
    store = create_bin_store(tmp_path / "s.zarr", n_obs=n, blocks=_blocks(n), size_um=8.0, genes=GENES, uns={},
                             chunk_rows=64, x_dtype="float16")
    store.write_rows(np.arange(200), np.ones((200, 3), np.float32))
    store.close()
    again = OutputStore.open_incomplete(tmp_path / "s.zarr", genes=GENES)
    assert again.done_mask()[:192].all() and not again.done_mask()[200:].any()  # whole chunks of 64 rows claimed
    again.write_rows(np.arange(192, n), np.full((n - 192, 3), 2, np.float32))
    again.finalize()
    x = np.asarray(ad.read_zarr(tmp_path / "s.zarr").X, np.float32)
    assert (x[:192] == 1).all() and (x[192:] == 2).all()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        create_bin_store(tmp_path / "s.zarr", n_obs=n, blocks=_blocks(n), size_um=8.0, genes=GENES, uns={})
