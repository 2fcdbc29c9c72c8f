"""Encoder tile layouts (``encoder.input.layout``: NHWC or NCHW) and the chunk codecs of the stores hishrst writes.

An NCHW bundle (the encoder graph takes ``[B, 3, S, S]`` channel planes) predicts exactly what the same model
as an NHWC bundle predicts, on planar and channel-last stores; a manifest whose layout disagrees with its
graph, or names no known layout, is refused at load time naming the field. ``write_ome_zarr`` / ``hishrst
convert --codec lz4`` writes blosc-lz4 chunks with a crc32c checksum: the same pixels as zstd, read by the
direct chunk reader, and a flipped bit is a one-line error naming the chunk file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from hishrst_runtime.bundle.manifest import load_bundle
from hishrst_runtime.bundle.spec import BundleError
from hishrst_runtime.core.patches import shape_tile_layout, tile_batch_shape, to_tile_layout
from hishrst_runtime.jobs.runner import run_slides
from hishrst_runtime.slides.chunks import DirectChunkReader
from hishrst_runtime.slides.errors import SlideError
from hishrst_runtime.slides.pyramid import write_ome_zarr
from hishrst_runtime.slides.reader import open_slide
from tests.runtime.images import disc_image

ad = pytest.importorskip("anndata")
pytest.importorskip("onnx", reason="the test bundles are built with onnx.helper")

RUN = {"pitch_um": 16.0, "batch_size": 4, "workers": 2, "progress": False, "echo": lambda s: None}


def test_layout_helpers() -> None:
    assert tile_batch_shape(5, 224, "NHWC") == (5, 224, 224, 3)
    assert tile_batch_shape(5, 224, "NCHW") == (5, 3, 224, 224)
    assert shape_tile_layout(["batch", 3, 224, 224]) == "NCHW"
    assert shape_tile_layout(["batch", 224, 224, 3]) == "NHWC"
    t = np.random.default_rng(0).integers(0, 256, (2, 6, 6, 3), dtype=np.uint8)
    assert to_tile_layout(t, "NHWC") is t
    planar = to_tile_layout(t, "NCHW")
    assert planar.shape == (2, 3, 6, 6) and planar.flags.c_contiguous
    np.testing.assert_array_equal(planar.transpose(0, 2, 3, 1), t)


@pytest.mark.parametrize("axes", ["cyx", "yxc"])
def test_nchw_bundle_predicts_what_the_nhwc_bundle_predicts(axes: str, tmp_path: Path,
                                                            make_tiny_bundle: Callable[..., Path]) -> None:
    slide = write_ome_zarr(disc_image(320), tmp_path / "s.ome.zarr", mpp=0.5, chunk=128, axes=axes)  # type: ignore[arg-type]
    outs = {}
    for layout in ("NHWC", "NCHW"):
        bundle = make_tiny_bundle(tmp_path / f"b-{layout}", layout=layout)
        assert load_bundle(bundle).spec.encoder.layout == layout
        (res,) = run_slides([slide], bundle_dir=bundle, out_dir=tmp_path / f"out-{layout}", **RUN)
        assert res.status == "ok", res.reason
        outs[layout] = ad.read_zarr(tmp_path / f"out-{layout}" / "s.zarr")
    a, b = outs["NHWC"], outs["NCHW"]
    assert a.n_obs > 10 and a.obs.equals(b.obs)
    # the same tiles (test_read_fast: bit for bit); the two graphs only sum the pixels in another order
    np.testing.assert_allclose(np.asarray(a.X), np.asarray(b.X), rtol=1e-5, atol=1e-6)


def _set_layout(root: Path, layout: str) -> None:
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    m["encoder"]["input"]["layout"] = layout
    path.write_text(json.dumps(m))


def test_layout_that_disagrees_with_the_graph_is_refused(tmp_path: Path, make_tiny_bundle: Callable[..., Path]) -> None:
    root = make_tiny_bundle(tmp_path / "b", input_size=8)
    _set_layout(root, "NCHW")  # the graph takes [B, 8, 8, 3]
    with pytest.raises(BundleError) as info:
        load_bundle(root)
    msg = str(info.value)
    assert "\n" not in msg and str(root) in msg and "encoder.onnx" in msg and "3 (RGB) channels" in msg, msg


def test_unknown_layout_is_refused(tmp_path: Path, make_tiny_bundle: Callable[..., Path]) -> None:
    root = make_tiny_bundle(tmp_path / "b")
    _set_layout(root, "NWHC")
    with pytest.raises(BundleError, match=r"encoder\.input\.layout.*NHWC, NCHW.*'NWHC'"):
        load_bundle(root)


# ------------------------------------------------------------------------------------------------ codecs


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_lz4_store_holds_the_same_pixels_and_reads_directly(version: str, tmp_path: Path) -> None:
    img = disc_image(300)
    paths = {c: write_ome_zarr(img, tmp_path / f"{c}.zarr", mpp=0.5, chunk=64, version=version, codec=c)  # type: ignore[arg-type]
             for c in ("zstd", "lz4")}
    arr = zarr.open_array(str(paths["lz4"] / "0"), mode="r")
    names = [type(c).__name__ for c in arr.metadata.codecs] if version == "0.5" else [arr.metadata.compressor.codec_id]
    assert names == (["BytesCodec", "BloscCodec", "Crc32cCodec"] if version == "0.5" else ["blosc"])
    assert DirectChunkReader.for_array(arr) is not None  # the fast path, not zarr's pipeline
    with open_slide(paths["zstd"]) as z, open_slide(paths["lz4"]) as q:
        for lz, lq in zip(z.levels, q.levels):
            np.testing.assert_array_equal(lz.read_region(0, 0, *lz.shape[::-1]), lq.read_region(0, 0, *lq.shape[::-1]))


def test_flipped_bit_in_an_lz4_chunk_names_the_file(tmp_path: Path) -> None:
    store = write_ome_zarr(disc_image(200), tmp_path / "s.zarr", mpp=0.5, chunk=64, n_levels=1, codec="lz4")
    chunk = store / "0" / "c" / "0" / "1" / "1"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    with open_slide(store) as s, pytest.raises(SlideError) as info:
        s.levels[0].read_region(0, 0, 200, 200)
    msg = str(info.value)
    assert "\n" not in msg and str(chunk) in msg, msg


def test_unknown_codec_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="codec must be one of zstd, lz4"):
        write_ome_zarr(disc_image(64), tmp_path / "s.zarr", mpp=0.5, codec="brotli")  # type: ignore[arg-type]


def test_graph_tile_layout_reads_the_tiles_input(tmp_path: Path, make_tiny_bundle: Callable[..., Path]) -> None:
    from hishrst_runtime.core.onnx_graph import OnnxFormatError, graph_tile_layout

    for layout in ("NHWC", "NCHW"):
        assert graph_tile_layout(make_tiny_bundle(tmp_path / layout, layout=layout) / "encoder.onnx") == layout
    with pytest.raises(OnnxFormatError, match="no 'tiles' input"):
        graph_tile_layout(tmp_path / "NHWC" / "head.onnx")
