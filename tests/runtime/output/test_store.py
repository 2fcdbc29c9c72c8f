"""Tests for hishrst_runtime.output.store: the incremental, crash-safe AnnData zarr output store."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ad = pytest.importorskip("anndata")

from hishrst_runtime.output import encoding as out_encoding  # noqa: E402
from hishrst_runtime.output import layout as out_layout  # noqa: E402
from hishrst_runtime.output.store import (  # noqa: E402
    IncompleteOutputError,
    OutputExistsError,
    OutputMismatchError,
    OutputStore,
    SpatialImages,
    partial_path,
    write_h5ad,
)

REPO = Path(__file__).resolve().parents[3]
GENES = [f"GENE{i}" for i in range(6)]


def make_points(n: int = 300, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "obs_xy_px": rng.uniform(0, 4000, (n, 2)),
        "grid_index": rng.integers(0, 80, (n, 2)),
        "tissue_fraction": rng.uniform(0, 1, n).astype(np.float32),
    }


def expected_values(rows: np.ndarray, n_genes: int = len(GENES)) -> np.ndarray:
    """The deterministic 'prediction' for each row (what a model run would give)."""
    rows = np.asarray(rows, dtype=np.float64)[:, None]
    return (np.sin(rows * 0.37 + np.arange(n_genes)[None, :]) * 10 + rows / 7).astype(np.float32)


def spatial() -> SpatialImages:
    img = np.zeros((40, 50, 3), np.uint8)
    img[..., 0] = np.arange(50, dtype=np.uint8)[None, :]
    return SpatialImages("slide_A", img, lowres_scalef=0.0125, spot_diameter_fullres=110.0)


def create(path: Path, n: int = 300, **kw) -> OutputStore:
    kw.setdefault("chunk_rows", 32)
    kw.setdefault("uns", {"bundle_hash": "abc123", "mpp": 0.5, "pitch_um": 25.0})
    return OutputStore.create(path, **make_points(n), genes=GENES, spatial=spatial(), **kw)


def finished_adata(path: Path, n: int) -> "ad.AnnData":
    """A complete store of ``n`` rows at ``path``, read back with anndata."""
    store = create(path, n=n)
    write_all(store, np.arange(n))
    store.finalize()
    return ad.read_zarr(path)


def write_all(store: OutputStore, rows: np.ndarray, *, batch: int = 17, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    rows = rng.permutation(rows)
    for b in np.array_split(rows, max(1, len(rows) // batch)):
        store.write_rows(b, expected_values(b))


def test_roundtrip_random_order_and_status(tmp_path: Path) -> None:
    path = tmp_path / "slide.zarr"
    assert OutputStore.status(path) == "missing"
    pts = make_points(300)
    # a tiny buffer forces LRU eviction, partial-chunk flushes and read-back of flushed chunks
    store = create(path, max_buffer_bytes=3 * 32 * len(GENES) * 4)
    assert OutputStore.status(path) == "incomplete"
    assert not path.exists() and partial_path(path).is_dir()
    write_all(store, np.arange(300))
    assert OutputStore.status(path) == "incomplete"
    store.finalize({"timings": {"total_s": 1.25}, "skipped": None})
    assert OutputStore.status(path) == "complete"
    assert not partial_path(path).exists()

    a = ad.read_zarr(path)
    assert a.shape == (300, len(GENES))
    assert a.X.dtype == np.float32
    np.testing.assert_array_equal(a.X, expected_values(np.arange(300)))
    assert list(a.var_names) == GENES
    assert list(a.obs_names[:3]) == ["p0", "p1", "p2"]
    np.testing.assert_array_equal(a.obsm["spatial"], pts["obs_xy_px"])
    np.testing.assert_array_equal(a.obs["grid_row"].to_numpy(), pts["grid_index"][:, 0])
    np.testing.assert_array_equal(a.obs["grid_col"].to_numpy(), pts["grid_index"][:, 1])
    np.testing.assert_array_equal(a.obs["tissue_fraction"].to_numpy(), pts["tissue_fraction"])
    assert a.uns["bundle_hash"] == "abc123" and a.uns["mpp"] == 0.5
    assert a.uns["timings"]["total_s"] == 1.25 and "skipped" not in a.uns
    lib = a.uns["spatial"]["slide_A"]
    np.testing.assert_array_equal(lib["images"]["lowres"], spatial().lowres)
    sf = lib["scalefactors"]
    assert sf["tissue_lowres_scalef"] == 0.0125 and sf["tissue_hires_scalef"] == 0.0125
    assert sf["spot_diameter_fullres"] == 110.0
    # X is chunked by rows with AnnData's dense-array encoding
    zarray = json.loads((path / "X" / ".zarray").read_text())
    assert zarray["chunks"] == [32, len(GENES)] and zarray["zarr_format"] == 2
    assert json.loads((path / "X" / ".zattrs").read_text()) == {"encoding-type": "array", "encoding-version": "0.2.0"}
    assert not (path / out_layout.PROGRESS_DIR).exists()


def test_done_mask_tracks_durable_rows_only(tmp_path: Path) -> None:
    store = create(tmp_path / "s.zarr", n=100, flush_interval_s=1e9)
    store.write_rows(np.arange(32), expected_values(np.arange(32)))  # one full chunk -> the writer thread
    store.write_rows(np.array([40, 41]), expected_values(np.array([40, 41])))  # partial chunk -> buffered
    deadline = time.monotonic() + 30
    while not store.done_mask()[:32].all():  # written and claimed without a flush
        assert time.monotonic() < deadline, "the full chunk never reached disk"
        time.sleep(0.01)
    done = store.done_mask()
    assert done[:32].all() and not done[32:].any()
    assert (tmp_path / "s.zarr.partial" / "X" / "0.0").is_file()  # the chunk file that is fsync'd
    store.flush()
    assert store.done_mask()[[40, 41]].all() and store.done_mask().sum() == 34
    np.testing.assert_array_equal(store.missing_rows(), np.setdiff1d(np.arange(100), np.r_[0:32, 40, 41]))
    with pytest.raises(IncompleteOutputError, match="66 of 100 rows"):
        store.finalize()


def test_failed_background_write_keeps_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.zarr"
    store = create(path, n=64, flush_interval_s=1e9)
    real_write = out_encoding.XChunks.write
    calls = []

    def flaky_write(self, k, data, *, fsync):  # a full disk, once
        calls.append(k)
        if len(calls) == 1:
            raise OSError(28, "simulated: no space left on device")
        return real_write(self, k, data, fsync=fsync)

    monkeypatch.setattr(out_encoding.XChunks, "write", flaky_write)
    with pytest.raises(OSError, match="no space left"):  # from the next call (or this one, if done by then)
        store.write_rows(np.arange(32), expected_values(np.arange(32)))  # full chunk 0: its write fails
        store.flush()
    assert not store.done_mask()[:32].any()  # nothing claimed
    store.write_rows(np.arange(32, 64), expected_values(np.arange(32, 64)))
    store.flush()  # chunk 0 was kept in memory and is written now
    assert store.done_mask().all() and sorted(calls) == [0, 0, 1]
    store.finalize()
    np.testing.assert_array_equal(ad.read_zarr(path).X, expected_values(np.arange(64)))


def test_write_rows_validation(tmp_path: Path) -> None:
    store = create(tmp_path / "s.zarr", n=50)
    with pytest.raises(ValueError, match="shape"):
        store.write_rows(np.array([0, 1]), np.zeros((2, 3), np.float32))
    with pytest.raises(IndexError):
        store.write_rows(np.array([50]), np.zeros((1, len(GENES)), np.float32))
    with pytest.raises(ValueError, match="integer"):
        store.write_rows(np.array([0.5]), np.zeros((1, len(GENES)), np.float32))
    write_all(store, np.arange(50))
    store.finalize()
    with pytest.raises(RuntimeError, match="finalized"):
        store.write_rows(np.array([0]), np.zeros((1, len(GENES)), np.float32))


def test_create_validation(tmp_path: Path) -> None:
    pts = make_points(10)
    with pytest.raises(ValueError, match="unique"):
        OutputStore.create(tmp_path / "a.zarr", **pts, genes=["A", "A"], uns={})
    with pytest.raises(ValueError, match="obs_xy_px"):
        OutputStore.create(tmp_path / "a.zarr", **{**pts, "obs_xy_px": np.zeros((10, 3))}, genes=GENES, uns={})
    with pytest.raises(ValueError, match="uint8"):
        SpatialImages("x", np.zeros((4, 4, 3), np.float32), 0.1, 10.0)


def test_exists_and_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    for debris in ("s.zarr.partial.tmp-dead", "s.zarr.trash-1", "s.zarr.partial.trash-2"):  # a killed create
        (tmp_path / debris / "X").mkdir(parents=True)
    (tmp_path / "other.zarr.trash-3").mkdir()
    store = create(path, n=40)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.zarr.trash-3", "s.zarr.partial"]
    with pytest.raises(OutputExistsError, match="--resume"):  # an incomplete one exists
        create(path, n=40)
    write_all(store, np.arange(40))
    store.finalize()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        create(path, n=40)
    store = create(path, n=20, overwrite=True)
    assert OutputStore.status(path) == "incomplete"  # the old complete output is gone
    write_all(store, np.arange(20))
    store.finalize()
    assert ad.read_zarr(path).n_obs == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.zarr.trash-3", "s.zarr"]


def test_resume_refuses_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    with pytest.raises(FileNotFoundError, match="no incomplete output"):
        OutputStore.open_incomplete(path)
    run = {"bundle_hash": "abc123", "mpp": 0.25, "pitch_um": None, "level": 2, "names": ["a", "b"], "xs": [1.5, 2]}
    create(path, n=60, uns={"hishrst": run, "bundle_hash": "abc123"}).close()
    pts = make_points(60)
    ok = OutputStore.open_incomplete(path, genes=GENES, obs_xy_px=pts["obs_xy_px"], grid_index=pts["grid_index"],
                                     expected_uns={"bundle_hash": "abc123", "hishrst": run})
    assert ok.n_obs == 60 and not ok.done_mask().any()
    bad = [
        {"expected_uns": {"hishrst": {**run, "mpp": 0.5}}},
        {"expected_uns": {"hishrst": {**run, "pitch_um": 50.0}}},
        {"expected_uns": {"hishrst": {**run, "names": ["a", "c"]}}},
        {"genes": GENES[::-1]},
        {"obs_xy_px": pts["obs_xy_px"] + 1},
        {"obs_xy_px": pts["obs_xy_px"][:59]},
        {"grid_index": pts["grid_index"] + 1},
        {"expected_uns": {"bundle_hash": "other"}},
        {"expected_uns": {"not_there": 1}},
    ]
    for kw in bad:
        with pytest.raises(OutputMismatchError, match="--overwrite"):
            OutputStore.open_incomplete(path, **kw)


def test_resume_in_process_and_complete_refusal(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = create(path, n=100)
    write_all(store, np.arange(0, 100, 2))
    store.close()  # flushes: the even rows are durable
    store = OutputStore.open_incomplete(path, genes=GENES)
    missing = store.missing_rows()
    np.testing.assert_array_equal(missing, np.arange(1, 100, 2))
    write_all(store, missing)
    store.finalize()
    np.testing.assert_array_equal(ad.read_zarr(path).X, expected_values(np.arange(100)))
    with pytest.raises(OutputExistsError, match="already complete"):
        OutputStore.open_incomplete(path)


def test_torn_progress_records_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = create(path, n=100)
    write_all(store, np.arange(100))
    store.close()
    progress = partial_path(path) / out_layout.PROGRESS_DIR
    (progress / "chunk-00000001.bits").unlink()  # as if killed between unclaim and claim of chunk 1
    (progress / "chunk-00000002.bits").write_bytes(b"\x01")  # foreign / wrong size
    (progress / "junk.tmp").write_bytes(b"")
    store = OutputStore.open_incomplete(path)
    np.testing.assert_array_equal(store.missing_rows(), np.arange(32, 96))
    write_all(store, store.missing_rows())
    store.finalize()
    np.testing.assert_array_equal(ad.read_zarr(path).X, expected_values(np.arange(100)))


def test_crash_inside_finalize_before_publish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.zarr"
    store = create(path, n=50)
    write_all(store, np.arange(50))

    def failing_rename(src: object, dst: object) -> None:
        raise OSError("simulated crash before the publishing rename")

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated"):
        store.finalize({"t": 1.0})
    monkeypatch.undo()
    assert OutputStore.status(path) == "incomplete"  # marked complete inside, but not published
    store = OutputStore.open_incomplete(path, genes=GENES)
    assert store.done_mask().all()
    store.finalize({"t": 2.0})
    a = ad.read_zarr(path)
    assert a.uns["t"] == 2.0
    np.testing.assert_array_equal(a.X, expected_values(np.arange(50)))


RICH_UNS = {
    "s": "text", "b": True, "i": -3, "big": 2**62, "f": 1.5, "nan": float("nan"), "names": ["a", "bb", "ccc"],
    "xs": [1.5, 2.0], "ints": [1, 2, 3], "flags": [True, False], "empty": [], "nested": {"deep": {"x": 1}, "e": {}},
    "mixed": [1, "a"], "mask": np.eye(5, dtype=np.uint8), "f32": np.linspace(0, 1, 7, dtype=np.float32),
    "u": np.array(["x", "yy"]), "cplx": np.array([1 + 2j, 3j]),  # complex: written by AnnData itself
}


def zarr_nodes(root: Path) -> dict[str, tuple[str, dict, dict | None]]:
    """{path: (kind, attrs, array metadata without chunks)} of every zarr node under ``root``."""
    out = {}
    for meta in [*root.rglob(".zarray"), *root.rglob(".zgroup")]:
        attrs = json.loads((meta.parent / ".zattrs").read_text()) if (meta.parent / ".zattrs").exists() else {}
        arr = {k: v for k, v in json.loads(meta.read_text()).items() if k != "chunks"} if meta.name == ".zarray" else None
        out[str(meta.parent.relative_to(root))] = (meta.name, attrs, arr)
    return out


def test_direct_writer_matches_anndata_and_zarr(tmp_path: Path) -> None:
    """The store written by plain file I/O is what anndata.io.write_elem / zarr would have written."""
    import zarr

    path = tmp_path / "s.zarr"
    store = create(path, n=70, uns={"hishrst": RICH_UNS, "bundle_hash": "abc"})
    write_all(store, np.arange(70))
    store.finalize({"hishrst_run": {"timings": {"total_s": 2.5}, "resumed": False, "slide": "/x/y.zarr"}})
    a = ad.read_zarr(path)
    ref = tmp_path / "ref.zarr"
    ad.io.write_elem(zarr.open_group(ref, mode="w", zarr_format=2), "/", a)
    ours, theirs = zarr_nodes(path), zarr_nodes(ref)
    theirs.pop("raw", None)  # AnnData >= 0.12 writes raw=None as a 'null' element (left out on purpose)
    ours_root, theirs_root = ours.pop("."), theirs.pop(".")
    assert theirs_root[1].items() <= ours_root[1].items()  # + hishrst_status etc.
    assert ours == theirs
    g, h = zarr.open_group(path, mode="r"), zarr.open_group(ref, mode="r")
    for key, (kind, _, _) in ours.items():
        if kind == ".zarray":
            x, y = np.asarray(g[key][...]), np.asarray(h[key][...])
            assert x.dtype == y.dtype and x.shape == y.shape, key
            np.testing.assert_array_equal(x, y, err_msg=key)
    # .zmetadata is what zarr.consolidate_metadata writes for the same store
    again = tmp_path / "again.zarr"
    shutil.copytree(path, again)
    (again / ".zmetadata").unlink()
    zarr.consolidate_metadata(str(again), zarr_format=2)
    assert json.loads((path / ".zmetadata").read_text()) == json.loads((again / ".zmetadata").read_text())
    assert a.uns["hishrst"]["names"].tolist() == ["a", "bb", "ccc"] and a.uns["hishrst"]["big"] == 2**62
    np.testing.assert_array_equal(a.uns["hishrst"]["cplx"], RICH_UNS["cplx"])


def test_resume_store_written_through_zarr(tmp_path: Path) -> None:
    """Stores of earlier releases (X chunks written by zarr, any codec) are read back and finished alike."""
    import numcodecs
    import zarr

    path = tmp_path / "s.zarr"
    create(path, n=80).close()
    work = partial_path(path)
    g = zarr.open_group(work, mode="r+", zarr_format=2, use_consolidated=False)
    del g["X"]
    X = g.create_array("X", shape=(80, len(GENES)), chunks=(32, len(GENES)), dtype="float32", fill_value=0.0,
                       compressors=numcodecs.Zstd(level=3))
    X.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    X[0:32] = np.where(np.arange(32)[:, None] < 20, expected_values(np.arange(32)), 0)
    (work / out_layout.PROGRESS_DIR / "chunk-00000000.bits").write_bytes(np.packbits(np.arange(32) < 20).tobytes())
    store = OutputStore.open_incomplete(path, genes=GENES)
    np.testing.assert_array_equal(store.missing_rows(), np.arange(20, 80))
    write_all(store, store.missing_rows())  # chunk 0 is read back (zstd) and completed
    store.finalize()
    assert json.loads((path / "X" / ".zarray").read_text())["compressor"]["id"] == "zstd"
    np.testing.assert_array_equal(ad.read_zarr(path).X, expected_values(np.arange(80)))


def test_empty_slide(tmp_path: Path) -> None:
    path = tmp_path / "empty.zarr"
    store = OutputStore.create(path, **make_points(0), genes=GENES, uns={"note": "no tissue"})
    store.finalize()
    a = ad.read_zarr(path)
    assert a.shape == (0, len(GENES))


def test_write_h5ad_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = create(path, n=80)
    with pytest.raises(IncompleteOutputError):
        write_h5ad(path, tmp_path / "s.h5ad")
    write_all(store, np.arange(80))
    store.finalize()
    h5 = write_h5ad(path, tmp_path / "out" / "s.h5ad")
    a, b = ad.read_h5ad(h5), ad.read_zarr(path)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    assert list(a.var_names) == GENES
    np.testing.assert_array_equal(a.uns["spatial"]["slide_A"]["images"]["lowres"], spatial().lowres)
    assert [p.name for p in h5.parent.iterdir()] == ["s.h5ad"]  # no temp file left


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::PendingDeprecationWarning")
def test_scanpy_spatial_plot(tmp_path: Path) -> None:
    sc = pytest.importorskip("scanpy")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = finished_adata(tmp_path / "s.zarr", n=120)
    scalef = a.uns["spatial"]["slide_A"]["scalefactors"]["tissue_lowres_scalef"]
    want_xy = np.asarray(a.obsm["spatial"]) * scalef  # the spots in lowres-image pixels

    def by_xy(xy: np.ndarray) -> np.ndarray:
        return xy[np.lexsort((xy[:, 1], xy[:, 0]))]

    drawn = [(GENES[0], sc.pl.spatial(a, img_key="lowres", library_id="slide_A", color=GENES[0], show=False)),
             (GENES[1], sc.pl.spatial(a, color=GENES[1], show=False))]  # library and image found automatically
    for gene, axs in drawn:
        (ax,) = axs
        assert ax.get_title() == gene
        (im,) = ax.images  # the slide overview under the spots
        np.testing.assert_array_equal(np.asarray(im.get_array()), spatial().lowres)
        (spots,) = ax.collections
        assert len(spots.get_paths()) == a.n_obs
        centres = np.array([path.vertices[:-1].mean(axis=0) for path in spots.get_paths()])
        np.testing.assert_allclose(by_xy(centres), by_xy(want_xy), atol=0.05)  # each spot where it was predicted
        np.testing.assert_allclose(np.sort(np.asarray(spots.get_array())),  # coloured by that gene's values
                                   np.sort(np.asarray(a[:, gene].X).ravel()), rtol=1e-6)
    plt.close("all")


CHILD = """
import sys, time
import numpy as np
from hishrst_runtime.output.store import OutputStore
path, log, seed, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
GENES = {genes!r}
{expected_values}
# flush after every batch (fsync off: a SIGKILL does not lose the page cache) so kills land mid-flush too
store = OutputStore.open_incomplete(path, max_buffer_bytes=4 * 32 * 6 * 4, flush_interval_s=0.0, fsync=False)
rows = np.random.default_rng(seed).permutation(400)
with open(log, "a") as f:
    for b in np.array_split(rows, 40):
        f.write(" ".join(map(str, b)) + "\\n")  # intent first, then the write
        f.flush()
        store.write_rows(b, expected_values(b))
        if pause:
            time.sleep(pause)
store.finalize({{"timings": {{"total_s": 1.0}}}})
"""


def start_writer(path: Path, log: Path, *, seed: int, pause: float) -> subprocess.Popen[bytes]:
    """Create the store here, then fill it in a subprocess (numpy + hishrst_runtime only: quick to start).

    The writer logs each batch's rows to ``log`` just before writing them.
    """
    create(path, n=400, fsync=False).close()
    log.write_text("")
    script = CHILD.format(genes=GENES, expected_values=textwrap.dedent(inspect.getsource(expected_values)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", script, str(path), str(log), str(seed), str(pause)], env=env)


def kill_when(proc: subprocess.Popen[bytes], log: Path, *, after_lines: int, delay: float) -> set[int]:
    """SIGKILL ``proc`` ``delay`` s after its log has ``after_lines`` lines; returns the rows it tried to write."""
    try:
        deadline = time.monotonic() + 60
        while len(log.read_text().splitlines()) < after_lines and proc.poll() is None:
            assert time.monotonic() < deadline, "writer subprocess made no progress"
            time.sleep(0.005)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    return {int(r) for line in log.read_text().splitlines() for r in line.split()}


def resume_and_finish(path: Path, attempted: set[int], *, expect_partial: bool) -> None:
    """``--resume``: compute exactly the rows that are not durably on disk, then finalize."""
    if OutputStore.status(path) == "complete":  # the kill came after the publishing rename
        return
    pts = make_points(400)
    store = OutputStore.open_incomplete(path, genes=GENES, obs_xy_px=pts["obs_xy_px"],
                                        expected_uns={"bundle_hash": "abc123"})
    done = store.done_mask()
    assert set(np.flatnonzero(done)) <= attempted  # nothing is claimed that was never written
    if expect_partial:
        assert 0 < done.sum() < 400
    missing = store.missing_rows()
    written: list[int] = []
    for b in np.array_split(missing, max(1, len(missing) // 23)):
        store.write_rows(b, expected_values(b))
        written.extend(b.tolist())
    assert sorted(written) == sorted(set(range(400)) - set(np.flatnonzero(done)))
    store.finalize({"timings": {"total_s": 1.0}})


def test_sigkill_then_resume_gives_identical_x(tmp_path: Path) -> None:
    # two writers run at once: one killed between slow batches, one at a random instant (maybe mid-flush)
    a_path, b_path = tmp_path / "a" / "crash.zarr", tmp_path / "b" / "crash.zarr"
    a_path.parent.mkdir()
    b_path.parent.mkdir()
    a = start_writer(a_path, tmp_path / "a.log", seed=3, pause=0.03)
    b = start_writer(b_path, tmp_path / "b.log", seed=4, pause=0.0)
    # b (fast) first: its kill comes ~0.1 s after its first batch, while a (slow) is still well under way
    attempted_b = kill_when(b, tmp_path / "b.log", after_lines=1,
                            delay=float(np.random.default_rng().uniform(0.0, 0.2)))
    attempted_a = kill_when(a, tmp_path / "a.log", after_lines=12, delay=0.0)
    assert a.returncode == -signal.SIGKILL
    resume_and_finish(a_path, attempted_a, expect_partial=True)
    resume_and_finish(b_path, attempted_b, expect_partial=False)

    # an uninterrupted run for reference
    ref_path = tmp_path / "ref.zarr"
    ref = create(ref_path, n=400, fsync=False)
    write_all(ref, np.arange(400))
    ref.finalize({"timings": {"total_s": 1.0}})
    want = ad.read_zarr(ref_path)
    for path in (a_path, b_path):
        assert OutputStore.status(path) == "complete"
        got = ad.read_zarr(path)
        np.testing.assert_array_equal(got.X, want.X)
        np.testing.assert_array_equal(got.X, expected_values(np.arange(400)))
        np.testing.assert_array_equal(got.obsm["spatial"], want.obsm["spatial"])
        assert got.obs.equals(want.obs) and list(got.var_names) == list(want.var_names)
        assert [p.name for p in path.parent.iterdir()] == ["crash.zarr"]  # no partial / temp / trash left


def test_obs_names_given_at_create_survive_finalize(tmp_path: Path) -> None:
    path = tmp_path / "named.zarr"
    names = [f"spot-{i:03d}" for i in range(40)][::-1]
    store = create(path, n=40, obs_names=names)
    write_all(store, np.arange(40))
    store.finalize()
    assert list(ad.read_zarr(path).obs_names) == names
    with pytest.raises(ValueError, match="unique names"):
        create(tmp_path / "dup.zarr", n=3, obs_names=["a", "a", "b"])
    with pytest.raises(ValueError, match="one per point"):
        create(tmp_path / "short.zarr", n=3, obs_names=["a"])
