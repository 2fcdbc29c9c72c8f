"""One rule for chunks and tiles with no usable data (issue "Nothing silently wrong"; the rule:
hishrst_runtime.slides.integrity): TIFF tiles with byte count 0, remote chunks answering 404, valid sparse
local stores, corrupt JPEG tiles. Each case read wrong pixels without a word (or refused a valid store) before."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.slides.errors import ChunkDecodeError, MissingChunkError
from hishrst_runtime.slides.integrity import check_missing_chunks, missing_chunks
from hishrst_runtime.slides.pyramid import write_ome_zarr
from hishrst_runtime.slides.reader import open_slide
from hishrst_runtime.slides.tissue import detect_tissue

TILE = 64


def _sparse_store(img: np.ndarray, path: Path, *, n_levels: int) -> Path:
    """An OME-Zarr store as other tools write it with zarr's default ``write_empty_chunks=False``: chunks that
    are all fill value (glass) are absent. (hishrst's own stores write every chunk.)"""
    import zarr

    out = write_ome_zarr(img, path, mpp=0.5, chunk=TILE, n_levels=n_levels)
    for level in range(n_levels):
        arr = zarr.open_array(str(out / str(level)), mode="r")
        for f in sorted((out / str(level) / "c").rglob("*")):
            if not f.is_file():
                continue
            idx = [int(part) for part in f.relative_to(out / str(level) / "c").parts]
            box = tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, arr.chunks))
            if np.all(arr[box] == arr.fill_value):
                f.unlink()
    return out


def _tissue(h: int = 256, w: int = 256, glass: int = 255) -> np.ndarray:
    """Glass (``glass``) with a pink-purple textured 'tissue' block over tiles (1..2, 1..2) of 64 px."""
    img = np.full((h, w, 3), glass, np.uint8)
    rng = np.random.default_rng(0)
    img[70:190, 70:190] = (rng.normal(0, 12, (120, 120, 3)) + [200, 110, 170]).clip(0, 255).astype(np.uint8)
    return img


def _jpeg_tiff(path: Path, img: np.ndarray, *, levels: int = 1) -> Path:
    """A tiled JPEG TIFF (SubIFD pyramid of 2x levels when ``levels`` > 1) with a JSON pixel size."""
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(TILE, TILE), compression="jpeg", photometric="rgb", subifds=levels - 1,
                 description='{"mpp": 0.5}', metadata=None)
        for k in range(1, levels):
            tw.write(img[:: 2**k, :: 2**k], tile=(TILE, TILE), compression="jpeg", photometric="rgb",
                     subfiletype=1, metadata=None)
    return path


def _zero_tile(path: Path, index: int, *, tag: str = "TileByteCounts") -> None:
    """Set entry ``index`` of the first page's TileByteCounts (or TileOffsets) to 0 in the file's bytes."""
    with tifffile.TiffFile(path) as tif:
        t = tif.pages[0].tags[tag]
        size = t.valuebytecount // t.count
        at = t.valueoffset + index * size
    raw = bytearray(path.read_bytes())
    raw[at : at + size] = bytes(size)
    path.write_bytes(bytes(raw))


def _read_all(slide) -> None:  # noqa: ANN001
    for lv in slide.levels:
        lv.read_region(0, 0, lv.shape[1], lv.shape[0])


# ------------------------------------------------------------------------- case 1: TIFF tile byte count 0


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("tag", ["TileByteCounts", "TileOffsets"])
def test_tiff_tile_without_bytes_in_tissue_is_an_error(tmp_path: Path, levels: int, tag: str) -> None:
    p = _jpeg_tiff(tmp_path / "s.tif", _tissue(), levels=levels)
    _zero_tile(p, 1 * 4 + 1, tag=tag)  # tile (1, 1): tissue
    with open_slide(p) as s:
        with pytest.raises(MissingChunkError, match=r"tile 5\).*chunk \(1, 1\) of pyramid level 0.*--allow-missing-chunks") as ei:
            s.thumbnail(max_side=256)  # the overview of level 0
        assert str(p) in str(ei.value) and "\n" not in str(ei.value) and isinstance(ei.value, InputError)
        with pytest.raises(MissingChunkError):
            s.levels[0].read_chunk(1, 1)
    with open_slide(p, allow_missing_chunks=True) as s:
        assert (np.asarray(s.levels[0].read_chunk(1, 1)) == 255).all()  # white fill, not black
        _read_all(s)
        assert len(s.filled_chunks) == 1 and "tile 5" in s.filled_chunks[0] and "level 0" in s.filled_chunks[0]


def test_tiff_tile_without_bytes_in_background_is_background(tmp_path: Path) -> None:
    """With a coarser stored level that is white there, an empty tile is legitimate background."""
    p = _jpeg_tiff(tmp_path / "b.tif", _tissue(), levels=2)
    _zero_tile(p, 0)  # tile (0, 0): glass
    with open_slide(p) as s:
        assert (np.asarray(s.levels[0].read_chunk(0, 0)) == 255).all()
        _read_all(s)
        assert s.filled_chunks == []


# ------------------------------------------------------------------------- case 2: remote chunk 404


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture()
def www(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    pytest.importorskip("fsspec")
    pytest.importorskip("aiohttp")
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("n_levels", [1, 2])
def test_remote_chunk_404_in_tissue_is_an_error(www: tuple[str, Path], n_levels: int) -> None:
    base, root = www
    local = write_ome_zarr(_tissue(), root / "r.zarr", mpp=0.5, chunk=TILE, n_levels=n_levels)
    (local / "0" / "c" / "0" / "1" / "2").unlink()  # chunk (1, 2): tissue
    with open_slide(f"{base}/r.zarr") as s:
        with pytest.raises(MissingChunkError, match=r"r\.zarr/0/c/0/1/2: chunk \(1, 2\) of pyramid level 0") as ei:
            s.levels[0].read_region(0, 0, 256, 256)
        assert "--allow-missing-chunks" in str(ei.value) and "\n" not in str(ei.value)
    with open_slide(f"{base}/r.zarr", allow_missing_chunks=True) as s:
        assert (s.levels[0].read_region(128, 64, 192, 128) == 255).all()
        assert len(s.filled_chunks) == 1 and "r.zarr/0/c/0/1/2" in s.filled_chunks[0]


def test_remote_sparse_store_reads_like_local(www: tuple[str, Path]) -> None:
    """A valid sparse store (background chunks left out, 404 over HTTP) is read without error or count."""
    base, root = www
    local = _sparse_store(_tissue(), root / "sp.zarr", n_levels=2)
    assert not (local / "0" / "c" / "0" / "0" / "0").exists()  # the glass chunk is left out
    with open_slide(f"{base}/sp.zarr") as remote, open_slide(local) as ref:
        for a, b in zip(remote.levels, ref.levels):
            np.testing.assert_array_equal(a.read_region(0, 0, a.shape[1], a.shape[0]),
                                          b.read_region(0, 0, b.shape[1], b.shape[0]))
        assert remote.filled_chunks == [] and ref.filled_chunks == []


# ------------------------------------------------------------------------- case 3: valid sparse local store


@pytest.mark.parametrize("n_levels", [1, 2])
def test_valid_sparse_local_store_is_accepted(tmp_path: Path, n_levels: int) -> None:
    img = _tissue(256, 384)
    p = _sparse_store(img, tmp_path / "sparse.zarr", n_levels=n_levels)
    with open_slide(p) as s:
        found = missing_chunks(s, 0)
        assert found is not None and (0, 0) in found[0] and (1, 3) in found[0]  # (1, 3) touches the tissue
        mask = detect_tissue(s.thumbnail(max_side=128))
        assert mask.any()
        assert check_missing_chunks(s, 0, tissue=mask) == []  # was refused: chunks next to tissue
        np.testing.assert_array_equal(s.levels[0].read_region(0, 0, 384, 256), img)
        assert s.filled_chunks == []


def test_hishrst_stores_write_every_chunk(tmp_path: Path) -> None:
    """In a store hishrst wrote, glass chunks exist too: an absent chunk there is lost data, never background."""
    p = write_ome_zarr(_tissue(), tmp_path / "full.zarr", mpp=0.5, chunk=TILE, n_levels=1)
    assert (p / "0" / "c" / "0" / "0" / "0").is_file()  # all glass, written anyway


def test_lost_chunk_of_multilevel_store_is_an_error_at_read(tmp_path: Path) -> None:
    p = write_ome_zarr(_tissue(), tmp_path / "m.zarr", mpp=0.5, chunk=TILE, n_levels=2)
    (p / "0" / "c" / "0" / "2" / "2").unlink()
    with open_slide(p) as s:
        s.thumbnail(max_side=128)  # read from level 1, which is intact
        with pytest.raises(MissingChunkError, match=r"chunk \(2, 2\) of pyramid level 0 .* next coarser level"):
            s.levels[0].read_chunk(2, 2)


# ------------------------------------------------------------------------- case 4: corrupt JPEG tiles


def test_truncated_jpeg_tile_is_an_error(tmp_path: Path) -> None:
    p = _jpeg_tiff(tmp_path / "c.tif", _tissue())
    with tifffile.TiffFile(p) as tif:
        off, cnt = tif.pages[0].dataoffsets[5], tif.pages[0].databytecounts[5]
    raw = bytearray(p.read_bytes())
    raw[off + cnt // 2 : off + cnt] = bytes(cnt - cnt // 2)  # the second half of tile 5 lost (zeros)
    p.write_bytes(bytes(raw))
    with tifffile.TiffFile(p) as tif:  # libjpeg only warns: tifffile decodes it without a word
        page = tif.pages[0]
        page.decode(bytes(raw[off : off + cnt]), 5, jpegtables=page.jpegtables, _fullsize=True)
    with open_slide(p) as s:
        with pytest.raises(ChunkDecodeError, match=r"tile 5\).*cut short") as ei:
            s.levels[0].read_chunk(1, 1)
        assert str(p) in str(ei.value) and "\n" not in str(ei.value)
    with open_slide(p, allow_missing_chunks=True) as s:
        assert (np.asarray(s.levels[0].read_chunk(1, 1)) == 255).all()
        assert len(s.filled_chunks) == 1 and "corrupt" in s.filled_chunks[0]
