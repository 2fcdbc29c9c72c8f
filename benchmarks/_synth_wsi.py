"""Synthetic whole slides and a placeholder bundle at UNI geometry, for the feed-rate benchmarks (cached):

* :class:`SynthTissue` — a lazy ``(H, W, 3)`` uint8 image: a few tissue blobs (laid out in µm, so the
  same slide at another pixel size shows the same tissue) with an H&E-like texture on near-white glass;
* :func:`ensure_zarr` — it as a pyramidal OME-Zarr (``write_ome_zarr``), at a given µm / pixel;
* :func:`ensure_jpeg_tiff` — it as a single-level tiled TIFF with JPEG tiles (a scanner's 40× level
  without its pyramid; the runtime computes the coarser levels on the fly);
* :func:`ensure_placeholder_bundle` — a valid bundle directory with UNI's geometry (224-px tiles,
  1024 features) whose ONNX graphs are tiny stand-ins: for runs whose engines are injected
  (``run_slides(engines=...)``), so the bundle's models are validated but never run.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

#: Tissue blobs (centre x, centre y, half-axis x, half-axis y), in fractions of the slide's side.
_BLOBS = ((0.32, 0.36, 0.24, 0.28), (0.68, 0.62, 0.26, 0.22), (0.55, 0.25, 0.15, 0.12), (0.3, 0.75, 0.14, 0.15))
_TEXTURE = 509  # texture period, pixels (prime: does not line up with chunks or tiles)


def _texture(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(tissue, glass) textures, ``[_TEXTURE, _TEXTURE, 3]`` uint8: smoothed noise in H&E pinks and near-white."""
    rng = np.random.default_rng(seed)
    n = _TEXTURE
    noise = rng.standard_normal((n, n, 2)).astype(np.float32)
    for _ in range(2):  # a little spatial correlation (nuclei-sized structure), periodic
        noise = (noise + np.roll(noise, 1, 0) + np.roll(noise, 1, 1) + np.roll(noise, (1, 1), (0, 1))) / 2
    hema = np.clip(noise[..., 0], -2.5, 2.5)[..., None]  # purple (nuclei) vs pink (stroma)
    grain = noise[..., 1:2] * 6
    pink, purple = np.array([232, 150, 200], np.float32), np.array([120, 60, 150], np.float32)
    w = 1 / (1 + np.exp(-2 * (hema - 0.8)))
    tissue = pink * (1 - w) + purple * w + grain
    glass = 240 + rng.normal(0, 2, (n, n, 3)).astype(np.float32)
    return np.clip(tissue, 0, 255).astype(np.uint8), np.clip(glass, 0, 255).astype(np.uint8)


class SynthTissue:
    """A lazy synthetic slide of ``side_um`` × ``side_um`` µm at ``mpp`` µm / pixel (``[y0:y1, x0:x1]`` slicing)."""

    def __init__(self, side_um: float, mpp: float, *, seed: int = 0) -> None:
        side = int(round(side_um / mpp))
        self.shape, self.dtype, self.mpp, self.side_um = (side, side, 3), np.dtype(np.uint8), float(mpp), float(side_um)
        self._tissue, self._glass = _texture(seed)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        y0, y1, _ = key[0].indices(self.shape[0])
        x0, x1, _ = key[1].indices(self.shape[1])
        ys, xs = np.arange(y0, y1), np.arange(x0, x1)
        fy, fx = (ys + 0.5)[:, None] / self.shape[0], (xs + 0.5)[None, :] / self.shape[1]
        mask = np.zeros((len(ys), len(xs)), bool)
        for cx, cy, ax, ay in _BLOBS:
            mask |= ((fx - cx) / ax) ** 2 + ((fy - cy) / ay) ** 2 < 1
        ty, tx = ys % _TEXTURE, xs % _TEXTURE
        return np.where(mask[..., None], self._tissue[ty][:, tx], self._glass[ty][:, tx])


def _say(msg: str) -> None:
    print(f"[setup] {msg}", flush=True)


def _build(final: Path, build: Any) -> Path:
    """``build(tmp)`` into a temporary sibling renamed to ``final`` (kept if it exists)."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        build(tmp)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    _say(f"{final.name} in {time.perf_counter() - t0:.1f} s")
    return final


def ensure_zarr(work: Path, *, side_um: float, mpp: float, seed: int = 0, codec: str | None = None) -> Path:
    """The synthetic slide as a pyramidal OME-Zarr (``write_ome_zarr`` defaults: 512-px chunks; chunks compressed
    with ``codec``, default the writer's default)."""
    from hishrst_runtime.core.vocab import DEFAULT_CHUNK_CODEC
    from hishrst_runtime.slides.pyramid import write_ome_zarr

    codec = codec or DEFAULT_CHUNK_CODEC
    img = SynthTissue(side_um, mpp, seed=seed)
    tag = "" if codec == "zstd" else f"-{codec}"  # zstd stores keep the names of the stores already built
    final = work / "feed" / f"synth-{side_um / 1000:g}mm-{mpp:g}mpp-s{seed}{tag}.ome.zarr"
    return _build(final, lambda tmp: write_ome_zarr(img, tmp, mpp=mpp, codec=codec))


def ensure_jpeg_tiff(work: Path, *, side_um: float, mpp: float, tile: int = 256, quality: int = 85) -> Path:
    """The synthetic slide as a single-level tiled TIFF with JPEG tiles (pixel size in the resolution tags)."""
    import tifffile

    img = SynthTissue(side_um, mpp)
    h, w, _ = img.shape
    final = work / "feed" / f"synth-{side_um / 1000:g}mm-{mpp:g}mpp-jpeg.tif"

    def tiles() -> Any:
        for y in range(0, h, tile):
            band = img[y : y + tile, 0:w]
            band = np.pad(band, ((0, tile - band.shape[0]), (0, (-w) % tile), (0, 0)), constant_values=240)
            for x in range(0, band.shape[1], tile):
                yield band[:, x : x + tile]

    def write(tmp: Path) -> None:
        px_per_cm = 1e4 / mpp
        tifffile.imwrite(tmp, tiles(), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                         compression="jpeg", compressionargs={"level": quality}, bigtiff=h * w * 3 > 2**31,
                         resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")

    return _build(final, write)


# ------------------------------------------------------------------------------------ placeholder bundle


def _placeholder_models(input_size: int, feature_dim: int, n_genes: int, layout: str = "NHWC") -> tuple[Any, Any]:
    """Tiny (encoder, head) ONNX graphs with the bundle contract's tensors and sizes (tiles in ``layout``)."""
    from onnx import TensorProto, helper, numpy_helper

    from hishrst_runtime.core.patches import tile_batch_shape

    f32 = TensorProto.FLOAT
    enc = helper.make_graph(
        [helper.make_node("Cast", ["tiles"], ["xf"], to=f32),
         helper.make_node("ReduceMean", ["xf"], ["m"], axes=[2, 3] if layout == "NCHW" else [1, 2], keepdims=0),
         helper.make_node("MatMul", ["m", "w"], ["features"])],
        "placeholder_encoder",
        [helper.make_tensor_value_info("tiles", TensorProto.UINT8, ["batch", *tile_batch_shape(1, input_size, layout)[1:]])],
        [helper.make_tensor_value_info("features", f32, ["batch", feature_dim])],
        initializer=[numpy_helper.from_array(np.zeros((3, feature_dim), np.float32), "w")])
    head = helper.make_graph(
        [helper.make_node("MatMul", ["features", "a"], ["fa"]), helper.make_node("MatMul", ["positions", "b"], ["pb"]),
         helper.make_node("Add", ["fa", "pb"], ["h"]), helper.make_node("Unsqueeze", ["mask", "axes"], ["m3"]),
         helper.make_node("Mul", ["h", "m3"], ["expression"])],
        "placeholder_head",
        [helper.make_tensor_value_info("features", f32, ["groups", "points", feature_dim]),
         helper.make_tensor_value_info("positions", f32, ["groups", "points", 2]),
         helper.make_tensor_value_info("mask", f32, ["groups", "points"])],
        [helper.make_tensor_value_info("expression", f32, ["groups", "points", n_genes])],
        initializer=[numpy_helper.from_array(np.zeros((feature_dim, n_genes), np.float32), "a"),
                     numpy_helper.from_array(np.zeros((2, n_genes), np.float32), "b"),
                     numpy_helper.from_array(np.array([-1], np.int64), "axes")])
    opset = [helper.make_opsetid("", 17)]
    return (helper.make_model(enc, opset_imports=opset, ir_version=8),
            helper.make_model(head, opset_imports=opset, ir_version=8))


def placeholder_manifest(patch_um: float, *, input_size: int, feature_dim: int, n_genes: int,
                         layout: str = "NHWC") -> dict[str, Any]:
    """A bundle manifest with UNI's geometry (``patch_um`` µm at 0.5 µm/px → ``input_size`` px; tiles in ``layout``)
    and no files."""
    enc = {"name": "placeholder-uni-geometry", "fingerprint": "none", "input_size": input_size,
           "feature_dim": feature_dim, "input": {"name": "tiles", "dtype": "uint8", "layout": layout, "channels": "RGB"},
           "normalisation": {"scale": 1 / 255, "mean": [0.0] * 3, "std": [1.0] * 3, "in_graph": True},
           "gated": False, "license": "MIT"}
    return {"hishrst_version": "bench", "encoder": enc, "genes": [f"G{i}" for i in range(n_genes)], "files": {},
            "onnx_opset": 17, "patch": {"size_um": patch_um, "train_mpp": 0.5, "resize": "bilinear", "pad_value": 255},
            "position": {"mode": "continuous", "units": "um"}, "max_batch": 64,
            "grouping": {"method": "kd-median-v1", "max_size": 8, "coords": "level0_px"},
            "output": {"name": "expression", "meaning": "log1p of counts per 10k", "target_sum": 1e4, "dtype": "float32"},
            "license": {"gated": False, "redistributable": True, "notice": None}}


def ensure_placeholder_bundle(work: Path, patch_um: float, *, input_size: int = 224, feature_dim: int = 1024,
                              n_genes: int = 1000, encoder: Path | None = None, precision: str = "fp32",
                              layout: str = "NHWC") -> Path:
    """A loadable bundle directory of :func:`placeholder_manifest` with the graphs of :func:`_placeholder_models`
    (tiles in ``layout``); ``encoder``: a real encoder ONNX (single file, e.g. the UNI architecture's export, in
    ``layout``) to use instead, of ``precision`` (``fp32`` / ``fp16``), hard-linked (or copied) into the bundle."""
    import onnx

    from hishrst_runtime.bundle.integrity import META_GENES, META_N_GENES, head_metadata
    from hishrst_runtime.bundle.manifest import write_manifest
    from hishrst_runtime.core.files import sha256_file

    if encoder is not None:  # the given graph's own layout and feature width
        from hishrst_runtime.core.onnx_graph import graph_tile_layout, read_onnx_graph

        layout = graph_tile_layout(encoder)
        feats = read_onnx_graph(encoder).output("features")
        feature_dim = int(feats.shape[1] or feature_dim) if feats is not None else feature_dim

    def build(root: Path) -> None:
        root.mkdir(parents=True)
        m = placeholder_manifest(patch_um, input_size=input_size, feature_dim=feature_dim, n_genes=n_genes, layout=layout)
        enc, head = _placeholder_models(input_size, feature_dim, n_genes, layout)
        onnx.helper.set_model_props(head, {k: v for k, v in head_metadata(m).items() if k in (META_GENES, META_N_GENES)})
        for key, model in (("encoder", enc), ("head", head)):
            path = root / f"{key}.onnx"
            if key == "encoder" and encoder is not None:
                _link_or_copy(Path(encoder), path)
            else:
                onnx.save_model(model, str(path))
            m["files"][key] = {"path": path.name, "sha256": sha256_file(path), "format": "onnx",
                               "precision": precision if key == "encoder" and encoder is not None else "fp32"}
        write_manifest(root, m)

    tag = ("" if encoder is None else f"-{Path(encoder).stem}") + ("" if layout == "NHWC" else f"-{layout.lower()}")
    tag += "" if feature_dim == 1024 else f"-d{feature_dim}"
    return _build(work / "feed" / f"bundle-uni-geometry-{patch_um:g}um-g{n_genes}{tag}", build)


def _link_or_copy(src: Path, dst: Path) -> None:
    if Path(str(src) + ".data").exists():
        raise ValueError(f"{src}: an ONNX file with external data; pass a single-file model")
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
