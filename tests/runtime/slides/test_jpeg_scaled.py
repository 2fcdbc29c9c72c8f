"""Computed levels of JPEG-tiled TIFFs decoded at reduced scale (issue #19, "Feed rate at UNI geometry").

A single-level JPEG TIFF's 2×, 4× and 8× levels are decoded at 1/2, 1/4, 1/8 scale
(:mod:`hishrst_runtime.slides.jpeg_scaled`) instead of as 2 × 2 means of the full decode. Checked here: the
fast path is taken (counters), its pixels agree with the pooled path within the documented tolerance
(full streams, abbreviated streams with JPEGTables, Aperio's RGB JPEG), right / bottom edge tiles and
damaged tiles go through the pooled path (the one-line integrity errors unchanged), non-JPEG tiles and
``HISHRST_JPEG_SCALED=0`` keep the pooled levels.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest

from hishrst_runtime.slides.cache import ChunkCache
from hishrst_runtime.slides.errors import ChunkDecodeError
from hishrst_runtime.slides.jpeg_scaled import ENV, ScaledJpegBoxes, ScaledJpegTiles, sof_frame
from hishrst_runtime.slides.pooled import PooledBoxes
from hishrst_runtime.slides.reader import open_slide

tifffile = pytest.importorskip("tifffile")
Image = pytest.importorskip("PIL.Image")

SHARED_SVS = Path(__file__).resolve().parents[4] / "shared" / "data" / "cmu_small_region.svs"
#: Agreement with the pooled path (grey levels): mean and 99th percentile of |difference|, and its maximum.
MEAN_TOL, P99_TOL, MAX_TOL = 1.0, 4, 48


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour ramps with mild noise: tissue-like JPEG statistics, no flat regions."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 16, size=(h, w, 3), dtype=np.uint8)
    img[..., 0] += np.linspace(90, 210, w).astype(np.uint8)[None, :]
    img[..., 1] += np.linspace(60, 210, h).astype(np.uint8)[:, None]
    wave = (120 + 60 * np.sin(np.arange(h + w, dtype=np.float32) / 37.0)).astype(np.uint8)
    img[..., 2] += wave[np.arange(h)[:, None] + np.arange(w)[None, :]]
    return img


def _segments(stream: bytes) -> list[tuple[int, bytes]]:
    """(marker, whole segment) of a JPEG stream after SOI; the last one runs from SOS to the end."""
    out, i = [], 2
    while stream[i + 1] != 0xDA:
        n = (stream[i + 2] << 8) | stream[i + 3]
        out.append((stream[i + 1], stream[i : i + 2 + n]))
        i += 2 + n
    return [*out, (0xDA, stream[i:])]


def _abbreviated(tile: np.ndarray, *, aperio: bool) -> tuple[bytes, bytes]:
    """(JPEGTables, abbreviated tile stream) of a Pillow-encoded tile. ``aperio``: RGB data without a colour
    transform, no Adobe / JFIF marker, component ids 0, 1, 2 (as Aperio writes; libjpeg would take it for YCbCr)."""
    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, "JPEG", quality=90, keep_rgb=aperio)
    segs = _segments(buf.getvalue())
    tables = b"\xff\xd8" + b"".join(s for m, s in segs if m in (0xDB, 0xC4)) + b"\xff\xd9"
    body = []
    for m, seg in segs:
        if m in (0xDB, 0xC4, 0xE0, 0xEE):
            continue
        seg = bytearray(seg)
        for k in range(3) if aperio else ():
            if m == 0xC0:
                seg[10 + 3 * k] = k
            elif m == 0xDA:
                seg[5 + 2 * k] = k
        body.append(bytes(seg))
    return tables, b"\xff\xd8" + b"".join(body)


def _abbreviated_tiff(path: Path, img: np.ndarray, tile: int, *, aperio: bool) -> Path:
    """A single-level TIFF of abbreviated JPEG tiles sharing one JPEGTables (YCbCr 4:2:0, or Aperio's RGB)."""
    h, w, _ = img.shape
    tiles, tables = [], b""
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            t = np.full((tile, tile, 3), 255, np.uint8)
            part = img[y : y + tile, x : x + tile]
            t[: part.shape[0], : part.shape[1]] = part
            tables, stream = _abbreviated(t, aperio=aperio)
            tiles.append(stream)
    colour = dict(subsampling=(1, 1), compressionargs={"outcolorspace": "RGB"}) if aperio else dict(subsampling=(2, 2))
    tifffile.imwrite(path, iter(tiles), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression="jpeg", jpegtables=tables, description='{"mpp": 0.25}', metadata=None, **colour)
    return path


@pytest.fixture(scope="module")
def jpeg_tif(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A 40× single-level TIFF as ``benchmarks.feed`` writes it (tifffile, full JFIF streams, YCbCr 4:2:0, 256-px
    tiles); 4133 rows (the bottom tiles' 37 rows are not whole 2 × 2 blocks), 4200 columns (the right tiles' 104 are)."""
    img = _image(4133, 4200)
    p = tmp_path_factory.mktemp("jpeg") / "40x.tif"
    tifffile.imwrite(p, img, tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                     description='{"mpp": 0.25}', metadata=None)
    return p, img


def _pooled_levels(path: Path, monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """Every computed level of ``path`` read the pooled way (``HISHRST_JPEG_SCALED=0``)."""
    with monkeypatch.context() as m:
        m.setenv(ENV, "0")
        with open_slide(path) as s:
            assert all(isinstance(lv.source, PooledBoxes) for lv in s.levels[1:])
            return [lv.read_region(0, 0, lv.shape[1], lv.shape[0]) for lv in s.levels[1:]]


def _assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape and got.dtype == np.uint8
    d = np.abs(got.astype(np.int16) - ref)
    assert d.mean() <= MEAN_TOL and np.percentile(d, 99) <= P99_TOL and d.max() <= MAX_TOL, (
        d.mean(), np.percentile(d, 99), d.max())


def test_scaled_levels_are_used_and_agree_with_pooling(jpeg_tif: tuple[Path, np.ndarray],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = jpeg_tif
    ref = _pooled_levels(path, monkeypatch)
    with open_slide(path) as s:
        assert [lv.shape for lv in s.levels] == [(4133, 4200), (2067, 2100), (1034, 1050), (517, 525)]
        assert [type(lv.source).__name__ for lv in s.levels] == ["NoneType"] + ["ScaledJpegBoxes"] * 3
        assert [lv.source.scale for lv in s.levels[1:]] == [2, 4, 8]
        assert s.levels[1].chunks == (512, 512) and s.levels[3].chunks == (512, 512)  # whole scaled tiles
        tiles: ScaledJpegTiles = s.levels[1].source.tiles
        for lv, r in zip(s.levels[1:], ref):
            _assert_close(lv.read_region(0, 0, lv.shape[1], lv.shape[0]), r)
        # 17 × 17 tiles per level; the 17 bottom ones go through the pooled path: at 2× once, at 4× twice (the
        # 4× and then the 2× level's), at 8× three times
        assert tiles.counts == {"scaled": 3 * 16 * 17, "fallback": 6 * 17}
        bottom = slice(16 * 128, 2067)  # the bottom tile row of the 2× level is exactly today's pixels
        np.testing.assert_array_equal(s.levels[1].read_region(0, bottom.start, 2100, bottom.stop), ref[0][bottom])


def test_chunk_reads_equal_box_reads_and_take_the_fast_path(jpeg_tif: tuple[Path, np.ndarray]) -> None:
    """The pipeline's primitive (``read_chunk`` through the chunk cache) gives the level's pixels, decoded scaled."""
    path, _ = jpeg_tif
    with open_slide(path) as s:
        lv = s.levels[1]
        tiles = lv.source.tiles
        cache = ChunkCache(lv)
        img = cache.patch(300, 700, 224)
        assert img.size == (224, 224) and tiles.counts["scaled"] > 0 and tiles.counts["fallback"] == 0
        np.testing.assert_array_equal(np.asarray(img), lv.read_region(300, 700, 524, 924))
        for cy, cx in ((0, 0), (1, 3), (4, 4)):  # (4, 4): the bottom-right chunk, partly pooled
            got = np.asarray(lv.read_chunk(cy, cx))
            y0, x0 = cy * 512, cx * 512
            np.testing.assert_array_equal(got, lv.read_region(x0, y0, x0 + 512, y0 + 512))


def test_reader_threads_read_the_same_pixels(jpeg_tif: tuple[Path, np.ndarray]) -> None:
    path, _ = jpeg_tif
    with open_slide(path) as s:
        lv = s.levels[1]
        want = [np.asarray(lv.read_chunk(cy, cx)) for cy in range(4) for cx in range(4)]
        got: dict[int, np.ndarray] = {}

        def work(k: int) -> None:
            for i in range(k, 16, 2):
                got[i] = np.asarray(lv.read_chunk(i // 4, i % 4))

        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(np.array_equal(got[i], want[i]) for i in range(16))


@pytest.mark.parametrize("aperio", [False, True], ids=["ycbcr-tables", "aperio-rgb-tables"])
def test_abbreviated_streams_with_jpegtables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aperio: bool) -> None:
    """Tiles without their own tables (JPEGTables spliced in) decode scaled; Aperio's RGB JPEG keeps its colours."""
    p = _abbreviated_tiff(tmp_path / "abbr.tif", _image(1100, 1060, seed=2), 128, aperio=aperio)
    with tifffile.TiffFile(p) as tif:
        page = tif.pages[0]
        assert page.jpegtables is not None and int(page.photometric) == (2 if aperio else 6) and not page.is_jfif
    (ref,) = _pooled_levels(p, monkeypatch)
    with open_slide(p) as s:
        lv = s.levels[1]
        assert isinstance(lv.source, ScaledJpegBoxes) and lv.source.tiles._jpegmode == ("RGB" if aperio else "")
        _assert_close(lv.read_region(0, 0, lv.shape[1], lv.shape[0]), ref)
        # 9 × 9 tiles, all scaled: the edge tiles' 76 rows / 36 columns inside the image are whole 2 × 2 blocks
        assert lv.source.tiles.counts == {"scaled": 81, "fallback": 0}


def test_truncated_tile_is_the_same_one_line_error(jpeg_tif: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    """A JPEG tile cut short is refused on the fast path too, with the pooled path's one-line error (or fill)."""
    src, _ = jpeg_tif
    p = tmp_path / "cut.tif"
    raw = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        index = 2 * 17 + 3  # tile (2, 3) of the 40× level
        off, cnt = tif.pages[0].dataoffsets[index], tif.pages[0].databytecounts[index]
    raw[off + cnt // 2 : off + cnt] = bytes(cnt - cnt // 2)  # its second half lost (zeros)
    p.write_bytes(bytes(raw))
    with open_slide(p) as s:
        lv = s.levels[1]  # 2× level: tile (2, 3) is level pixels [256:384, 384:512], in chunk (0, 0)
        with pytest.raises(ChunkDecodeError, match=rf"tile {index}\).*cut short") as ei:
            lv.read_chunk(0, 0)
        assert str(p) in str(ei.value) and "\n" not in str(ei.value)
        assert lv.source.tiles.counts["fallback"] >= 1
        np.asarray(lv.read_chunk(0, 1))  # the other tiles still read
    with open_slide(p, allow_missing_chunks=True) as s:
        block = s.levels[1].read_region(384, 256, 512, 384)
        assert (block == 255).all()  # white fill, counted
        assert len(s.filled_chunks) == 1 and "corrupt" in s.filled_chunks[0]


def test_non_jpeg_tiles_and_switch_off_keep_pooling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = _image(1100, 1060, seed=3)
    p = tmp_path / "zlib.tif"
    tifffile.imwrite(p, img, tile=(128, 128), photometric="rgb", compression="zlib", description='{"mpp": 0.25}',
                     metadata=None)
    with open_slide(p) as s:
        assert isinstance(s.levels[1].source, PooledBoxes)
    j = tmp_path / "jpeg.tif"
    tifffile.imwrite(j, img, tile=(128, 128), photometric="rgb", compression="jpeg", description='{"mpp": 0.25}',
                     metadata=None)
    monkeypatch.setenv(ENV, "off")
    with open_slide(j) as s:
        assert isinstance(s.levels[1].source, PooledBoxes)


def test_fallback_for_every_tile_is_exactly_pooling(jpeg_tif: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    """When no tile can be decoded scaled (here: Pillow's decoder refused), the level is exactly today's."""
    path, _ = jpeg_tif
    with open_slide(path) as s:
        monkeypatch.setattr(ScaledJpegTiles, "stream", lambda self, cy, cx: None)
        box = s.levels[1].read_region(500, 900, 1300, 1400)
    monkeypatch.undo()
    with monkeypatch.context() as m:
        m.setenv(ENV, "0")
        with open_slide(path) as s:
            np.testing.assert_array_equal(box, s.levels[1].read_region(500, 900, 1300, 1400))


def test_sof_frame() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(buf, "JPEG")
    assert sof_frame(buf.getvalue()) == (8, 24, 40, 3)
    assert sof_frame(b"\xff\xd8\xff\xd9") is None and sof_frame(b"\xff\xd8junk") is None


def test_real_svs_parity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared Aperio SVS (abbreviated RGB JPEG tiles, 240 px): scaled 2× / 4× levels within tolerance."""
    if not SHARED_SVS.is_file():
        pytest.skip(f"the shared SVS is missing ({SHARED_SVS}); see shared/README.md")
    ref = _pooled_levels(SHARED_SVS, monkeypatch)
    with open_slide(SHARED_SVS) as s:
        assert [type(lv.source).__name__ for lv in s.levels[1:]] == ["ScaledJpegBoxes"] * 2
        assert s.levels[1].chunks == (480, 480)
        for lv, r in zip(s.levels[1:], ref):
            _assert_close(lv.read_region(0, 0, lv.shape[1], lv.shape[0]), r)
        assert s.levels[1].source.tiles.counts["scaled"] == 2 * 12 * 10
