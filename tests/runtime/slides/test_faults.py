"""Slide faults of issue 10: checksums (BAD #5), pixel-size bounds (BAD #6), thumbnail memory (BAD #7),
and the POOR slide cases (corrupt chunk on the zarr path, zero-size arrays, absurd shapes, bad scales)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from PIL import Image

from hishrst_runtime.slides.chunks import DirectChunkReader
from hishrst_runtime.slides.errors import ChunkDecodeError, SlideError
from hishrst_runtime.slides.pyramid import write_ome_zarr
from hishrst_runtime.slides.reader import open_slide


def _image(h: int = 200, w: int = 260, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = (rng.normal(180, 25, (h, w, 3))).clip(0, 255).astype(np.uint8)  # compressible, like a slide
    img[:, : w // 3] = 250
    return img


def _hand_store(path: Path, shape: tuple[int, ...], scale: list[float], *, unit: str = "micrometer",
                data: np.ndarray | None = None) -> Path:
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    arr = root.create_array("0", shape=shape, chunks=tuple(min(s, 64) if s else 1 for s in shape), dtype="uint8",
                            fill_value=255)
    if data is not None:
        arr[:] = data
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": unit},
            {"name": "x", "type": "space", "unit": unit}]
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]}]}
    return path


# ---------------------------------------------------------------------------- BAD #5 checksums


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_written_chunks_carry_checksums(tmp_path: Path, version: str) -> None:
    p = write_ome_zarr(_image(), tmp_path / "s.zarr", mpp=0.5, chunk=64, n_levels=2, version=version)  # type: ignore[arg-type]
    for level in ("0", "1"):
        arr = zarr.open_array(str(p / level), mode="r")
        if version == "0.5":
            assert [type(c).__name__ for c in arr.metadata.codecs] == ["BytesCodec", "ZstdCodec"]
            assert arr.metadata.codecs[1].checksum is True
        else:
            assert arr.metadata.compressor.checksum is True
    with open_slide(p) as s:
        assert s.levels[0]._direct is not None  # checksummed stores keep the fast path


def test_every_single_bit_flip_is_detected(tmp_path: Path) -> None:
    """Flip single bits of one chunk file (every 3rd bit, all byte positions): the direct reader raises
    ChunkDecodeError or returns the exact pixels."""
    img = _image(32, 32)
    p = write_ome_zarr(img, tmp_path / "b.zarr", mpp=0.5, chunk=16, n_levels=1)
    with open_slide(p) as s:
        reader: DirectChunkReader = s.levels[0]._direct
        path = reader.root / reader._encode_key((0, 0, 1))
        good = reader.read((0, 0, 1)).copy()
        raw = path.read_bytes()
        detected = 0
        bits = range(0, len(raw) * 8, 3)
        for bit in bits:
            bad = bytearray(raw)
            bad[bit // 8] ^= 1 << (bit % 8)
            path.write_bytes(bytes(bad))
            try:
                got = reader.read((0, 0, 1))
            except ChunkDecodeError as e:
                assert str(path) in str(e)
                detected += 1
            else:
                np.testing.assert_array_equal(got, good)  # e.g. a frame-header bit that changes nothing
        path.write_bytes(raw)
    assert detected > 0.95 * len(bits)


def test_crc32c_codec_of_other_writers_is_verified(tmp_path: Path) -> None:
    from zarr.codecs import Crc32cCodec, ZstdCodec

    img = _image(64, 64).transpose(2, 0, 1)
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="w", zarr_format=3)
    root.create_array("0", data=img, chunks=(3, 32, 32), compressors=[ZstdCodec(), Crc32cCodec()])
    axes = [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space", "unit": "micrometer"} for a in "yx"]
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.5, 0.5]}]}]}]}
    with open_slide(tmp_path / "c.zarr") as s:
        reader = s.levels[0]._direct
        assert reader is not None
        np.testing.assert_array_equal(np.asarray(s.levels[0].read_chunk(1, 1)), img.transpose(1, 2, 0)[32:, 32:])
        f = reader.root / reader._encode_key((0, 1, 1))
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        f.write_bytes(bytes(raw))
        with pytest.raises(ChunkDecodeError, match="c.zarr"):
            s.levels[0].read_chunk(1, 1)


def test_corrupt_chunk_on_the_zarr_path_names_the_chunk(tmp_path: Path) -> None:
    p = write_ome_zarr(_image(300, 420), tmp_path / "z.zarr", mpp=0.5, chunk=64, n_levels=1)
    f = p / "0" / "c" / "0" / "1" / "2"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 8
    f.write_bytes(bytes(raw))
    with open_slide(p) as s:
        with pytest.raises(ChunkDecodeError, match="checksum") as ei:
            s.thumbnail(max_side=64)  # reads through zarr-python, not the direct reader
        assert str(f) in str(ei.value) and "\n" not in str(ei.value)
        s.levels[0]._direct = None  # no direct reader: the store, level and chunk-grid position are named
        with pytest.raises(ChunkDecodeError, match=r"z.zarr/0: a chunk in chunk-grid row\(s\) 1") as ei:
            s.levels[0].read_region(0, 64, 420, 128)
        assert "\n" not in str(ei.value)


# ---------------------------------------------------------------------------- BAD #6 pixel-size bounds


@pytest.mark.parametrize("mpp", [1e-6, 1e6])
def test_implausible_mpp_override_names_the_slide(tmp_path: Path, mpp: float) -> None:
    p = write_ome_zarr(_image(), tmp_path / "s.zarr", mpp=0.5, chunk=64, n_levels=1)
    with pytest.raises(SlideError, match="--mpp .* implausible pixel size") as ei:
        open_slide(p, mpp=mpp)
    assert str(p) in str(ei.value) and "no tissue" not in str(ei.value)
    assert open_slide(p, mpp=mpp, mpp_range=(1e-7, 1e7)).mpp0 == pytest.approx(mpp)


def test_env_range_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write_ome_zarr(_image(), tmp_path / "s.zarr", mpp=0.5, chunk=64, n_levels=1)
    monkeypatch.setenv("HISHRST_MPP_RANGE", "0.001,100")
    assert open_slide(p, mpp=0.01).mpp0 == pytest.approx(0.01)


@pytest.mark.parametrize(("unit", "value"), [("meter", 0.5), ("nanometer", 0.5)])
def test_implausible_metadata_pixel_size(tmp_path: Path, unit: str, value: float) -> None:
    p = _hand_store(tmp_path / "u.zarr", (3, 64, 64), [1.0, value, value], unit=unit)
    with pytest.raises(SlideError, match=f"unit '{unit}'.*implausible pixel size") as ei:
        open_slide(p)
    assert str(p) in str(ei.value)
    assert open_slide(p, mpp=0.5).mpp0 == pytest.approx(0.5)  # --mpp is the way out


@pytest.mark.parametrize(("scale", "word"), [([1.0, 0.0, 0.5], "zero"), ([1.0, 0.5, -0.5], "negative")])
def test_zero_and_negative_scales_are_named(tmp_path: Path, scale: list[float], word: str) -> None:
    p = _hand_store(tmp_path / "neg.zarr", (3, 64, 64), scale)
    with pytest.raises(SlideError, match=f"scale of pyramid level '0' on the [yx] axis is .*{word}") as ei:
        open_slide(p)
    assert str(p) in str(ei.value)


def test_zero_size_and_absurd_shapes(tmp_path: Path) -> None:
    p = _hand_store(tmp_path / "empty.zarr", (3, 0, 64), [1.0, 0.5, 0.5])
    with pytest.raises(SlideError, match=r"level '0' is empty \(0 x 64 pixels\)") as ei:
        open_slide(p)
    assert str(p) in str(ei.value)
    p2 = _hand_store(tmp_path / "huge.zarr", (3, 10**6, 10**6), [1.0, 0.5, 0.5])  # nothing is written
    with pytest.raises(SlideError, match="more than any glass slide") as ei:
        open_slide(p2)
    assert str(p2) in str(ei.value)


# ---------------------------------------------------------------------------- BAD #7 thumbnail memory


def _old_thumbnail(slide: Any, max_side: int) -> np.ndarray:
    """The thumbnail algorithm before the fix (whole-level strips), as the reference for its pixels."""
    big = [lv for lv in slide.levels if max(lv.shape) >= max_side]
    lv = big[-1] if big else slide.levels[0]
    h, w = lv.shape
    scale = min(1.0, max_side / max(h, w))
    oh, ow = max(1, round(h * scale)), max(1, round(w * scale))
    step = max(1, int(max(h, w) // (2 * max_side)))
    if step == 1:
        img = lv.read_region(0, 0, w, h)
    else:
        ch = max(lv.chunks[0], step)
        ch -= ch % step
        img = np.concatenate([lv.read_region(0, y0, w, min(y0 + ch, h))[::step, ::step] for y0 in range(0, h, ch)])
    if img.shape[:2] != (oh, ow):
        img = np.asarray(Image.fromarray(img).resize((ow, oh), Image.BILINEAR))
    return img


@pytest.mark.parametrize(("shape", "chunk", "max_side"), [((1000, 700), 64, 50), ((333, 1001), 48, 60),
                                                          ((517, 515), 100, 100), ((300, 420), 64, 1024)])
def test_thumbnail_pixels_unchanged(tmp_path: Path, shape: tuple[int, int], chunk: int, max_side: int) -> None:
    p = write_ome_zarr(_image(*shape, seed=3), tmp_path / "t.zarr", mpp=0.5, chunk=chunk, n_levels=1)
    with open_slide(p) as s:
        np.testing.assert_array_equal(s.thumbnail(max_side=max_side), _old_thumbnail(s, max_side))


@pytest.mark.parametrize("shape", [(80000, 64), (64, 80000)])
def test_thumbnail_memory_is_independent_of_level_size(tmp_path: Path, shape: tuple[int, int]) -> None:
    """A 14.6 MiB single-level store (tall or wide): the overview's peak allocation is a few blocks
    (≤ 128 × 4096 px each, with zarr's copies), far below the level — the old strips kept it all."""
    img = np.full(shape + (3,), 230, np.uint8)
    p = write_ome_zarr(img, tmp_path / "tall.zarr", mpp=0.5, chunk=128, n_levels=1)
    with open_slide(p) as s:
        s.thumbnail(max_side=16)  # warm up zarr's own caches
        tracemalloc.start()
        try:
            t = s.thumbnail(max_side=16)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert max(t.shape[:2]) == 16
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB for a {img.nbytes / 2**20:.1f} MiB level"
