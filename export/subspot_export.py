"""PyTorch → ONNX export of the sub-spot head, with its parity check.

``head.onnx`` of a sub-spot bundle: ``tokens`` float32 ``[B, rows, cols, width]`` → ``expression`` float32
``[B, rows, cols, genes]`` (:data:`~hishrst_runtime.bundle.io_names.SUBSPOT_HEAD_IO`), dynamic batch, the
token grid fixed by the bundle's token geometry. fp16: as the spot head — the token standardisation, the
distance bias and the output softplus (whose exponential overflows half precision) stay in fp32.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hishrst_runtime.bundle.io_names import SUBSPOT_HEAD_IO
from hishrst_runtime.core.patches import to_tile_layout
from hishrst_runtime.core.vocab import DEFAULT_TILE_LAYOUT, Precision, TileLayout
from hishrst_export.onnx_export import _check, _session, _set_metadata, _to_fp16, _torch_export, _verdict

__all__ = ["export_subspot_head_onnx", "subspot_head_parity", "subspot_head_feeds"]

#: Head nodes kept in fp32 by the fp16 export (names of the TorchScript exporter; checked to exist).
SUBSPOT_FP32_PREFIXES = ("/attn/pair",)


def _fp32_nodes(path: Path) -> tuple[str, ...]:
    """The standardisation (``/Sub``, ``/Div``) and every softplus node of ``path``."""
    import onnx

    names = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node]
    return tuple(n for n in names if n in ("/Sub", "/Div") or "Softplus" in n)


def export_subspot_head_onnx(model: Any, out_path: str | Path, *, opset: int = 17, precision: Precision = "fp32",
                             metadata: Mapping[str, str] | None = None) -> Path:
    """Export a :class:`hishrst_train.subspot.SubspotHead` (tokens → per-token expression) to ``out_path``;
    ``metadata`` goes into the file's ``metadata_props`` (genes, manifest content hash)."""
    out_path = Path(out_path)
    rows, cols = model.grid
    dummy = torch.randn(2, rows, cols, model.config.width)
    with torch.no_grad():
        _torch_export(model.eval().cpu(), (dummy,), out_path, input_names=SUBSPOT_HEAD_IO["inputs"],
                      output_names=SUBSPOT_HEAD_IO["outputs"],
                      dynamic_axes={k: {0: "batch"} for k in SUBSPOT_HEAD_IO["inputs"] + SUBSPOT_HEAD_IO["outputs"]},
                      opset=opset)
    if precision == "fp16":
        _to_fp16(out_path, keep_fp32_prefixes=SUBSPOT_FP32_PREFIXES, keep_fp32_nodes=_fp32_nodes(out_path))
    if metadata:
        _set_metadata(out_path, metadata)
    _check(out_path)
    return out_path


def subspot_head_feeds(model: Any, encoder: Any, *, rng: np.random.Generator,
                       real_tiles: np.ndarray | None) -> dict[str, np.ndarray]:
    """Token inputs of the parity check: ``random`` (standard normal around the training statistics) and,
    given real tiles, ``real`` (their tokens from the encoder)."""
    rows, cols = model.grid
    w = model.config.width
    mean, std = model.feat_mean.numpy(), model.feat_std.numpy()
    feeds = {"random": (rng.standard_normal((3, rows, cols, w)) * std + mean).astype(np.float32)}
    if real_tiles is not None:
        with torch.no_grad():
            feeds["real"] = encoder.forward_tokens(torch.from_numpy(real_tiles[:16]))[1].numpy().astype(np.float32)
    return feeds


def subspot_head_parity(model: Any, onnx_path: str | Path, *, feeds: dict[str, np.ndarray],
                        precision: Precision = "fp32") -> dict[str, Any]:
    """ONNX Runtime (CPU) vs PyTorch on labelled token inputs; a :class:`~hishrst_export.onnx_export.ParityError`
    beyond the tolerance of ``precision``."""
    sess = _session(Path(onnx_path))
    report: dict[str, Any] = {}
    for label, tokens in feeds.items():
        with torch.no_grad():
            want = model.eval()(torch.from_numpy(tokens)).numpy()
        got = sess.run(None, {SUBSPOT_HEAD_IO["inputs"][0]: tokens})[0]
        g = want.shape[-1]
        report[label] = _verdict(f"{onnx_path} ({label} tokens)", got.reshape(-1, g), want.reshape(-1, g), precision)
        report[label].update(n_tokens=int(np.prod(tokens.shape[:3])), shape=[int(s) for s in tokens.shape])
    return report


def export_subspot_models(tmp: Path, model: Any, encoder: Any, *, precision: Precision, opset: int,
                          tiles: dict[str, np.ndarray], head_meta: Mapping[str, str], seed: int,
                          batch_sizes: tuple[int, ...], layout: TileLayout = DEFAULT_TILE_LAYOUT
                          ) -> tuple[Path, Path, dict[str, Any], dict[str, Any]]:
    """A sub-spot bundle's two graphs in ``tmp``: the encoder with its ``tokens`` output and the sub-spot head,
    each parity-checked against PyTorch (encoder: ``tiles``; head: random tokens and the real tiles' tokens).
    Returns both paths and both parity reports."""
    from hishrst_export.onnx_export import encoder_parity, export_encoder_onnx

    if tuple(model.grid) != tuple(encoder.spec.token_grid):
        raise ValueError(f"the head's token grid {tuple(model.grid)} is not the encoder's {encoder.spec.token_grid}")
    enc_path = export_encoder_onnx(encoder, tmp / "encoder.onnx", opset=opset, precision=precision, tokens=True,
                                   layout=layout)
    enc_report = encoder_parity(encoder, enc_path, tiles=tiles, precision=precision, batch_sizes=batch_sizes)
    head_path = export_subspot_head_onnx(model, tmp / "head.onnx", opset=opset, precision=precision, metadata=head_meta)
    feeds = subspot_head_feeds(model, encoder, rng=np.random.default_rng(seed), real_tiles=tiles.get("real"))
    return enc_path, head_path, enc_report, subspot_head_parity(model, head_path, feeds=feeds, precision=precision)


def subspot_contract(model: Any, config: Any) -> dict[str, Any]:
    """The manifest sections a sub-spot bundle adds or replaces: ``head`` (kind, inputs, aggregation),
    ``tokens`` (geometry and width), ``position`` (relative distances between a tile's tokens) and ``output``."""
    c = model.config
    return {
        "head": {"kind": "subspot", "inputs": list(SUBSPOT_HEAD_IO["inputs"]),
                 "aggregation": (config.head or {}).get("aggregation")},
        "tokens": {**dict(config.tokens or {}), "width": int(c.width)},
        "position": {"mode": "relative", "units": "um", "frame": "pairwise distances between a tile's tokens",
                     "invariant_to": ["translation", "rotation", "reflection"], "rel_n_freqs": c.rel_n_freqs,
                     "rel_min_wavelength_um": c.rel_min_wavelength_um, "rel_max_wavelength_um": c.rel_max_wavelength_um},
    }


def export_subspot_bundle_models(tmp: Path, model: Any, encoder: Any, *, precision: str, opset: int,
                                 tiles: dict[str, np.ndarray], head_meta: Mapping[str, str], seed: int,
                                 batch_sizes: tuple[int, ...], real_status: str, trt_info: dict[str, Any] | None,
                                 max_batch: int, layout: TileLayout = DEFAULT_TILE_LAYOUT
                                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``hishrst export`` of a sub-spot run: both graphs, parity, TensorRT engines when asked (the head's profile
    covers batches of 1…``max_batch`` token tiles); the manifest's ``files`` and ``parity``."""
    from hishrst_export.bundle import ExportError
    from hishrst_export.manifest import file_entry

    if precision == "int8":
        raise ExportError("--precision int8: sub-spot bundles are exported in fp32 or fp16 (the int8 gate scores "
                          "spot predictions); nothing was written")
    enc_path, head_path, enc_report, head_report = export_subspot_models(
        tmp, model, encoder, precision=precision, opset=opset, tiles=tiles, head_meta=head_meta, seed=seed,  # type: ignore[arg-type]
        batch_sizes=batch_sizes, layout=layout)
    files = {"encoder": file_entry(enc_path, precision), "head": file_entry(head_path, precision)}
    if trt_info is not None:
        files.update(_subspot_engines(tmp, enc_path, head_path, model=model, tiles=tiles, precision=precision,
                                      max_batch=max_batch, trt_info=trt_info, layout=layout))
    parity = {"reference": "PyTorch fp32 (CPU) vs ONNX Runtime CPU; for fp16 the figures are the accuracy cost of "
                           "half precision", "precision": precision, "seed": seed, "real_tiles": real_status,
              "encoder": enc_report, "head": head_report}
    return files, parity


def _subspot_engines(tmp: Path, enc_path: Path, head_path: Path, *, model: Any, tiles: dict[str, np.ndarray],
                     precision: str, max_batch: int, trt_info: dict[str, Any], layout: str) -> dict[str, Any]:
    """TensorRT engines of both graphs (the vendors' documented builder, :mod:`hishrst_export.tensorrt`)."""
    from hishrst_export.bundle import ExportError
    from hishrst_export.tensorrt import (EngineParityError, TensorRTBuildError, TensorRTUnavailable, build_engine,
                                         engine_parity)
    from hishrst_runtime.bundle.manifest import sha256_file

    rows, cols = model.grid
    tail = (rows, cols, int(model.config.width))
    shapes = {"tokens": ((1, *tail), (min(8, max_batch), *tail), (max_batch, *tail))}
    sample_tokens = np.random.default_rng(0).standard_normal((2, *tail)).astype(np.float32)
    entries: dict[str, Any] = {}
    try:
        for key, path, shp, sample in (("encoder", enc_path, None, {"tiles": to_tile_layout(tiles["random"][:4], layout)}),
                                       ("head", head_path, shapes, {"tokens": sample_tokens})):
            eng = build_engine(path, out_path=tmp / f"{key}.plan", precision=precision,  # type: ignore[arg-type]
                               max_batch=max_batch, shapes=shp, timing_cache=tmp / "timing.cache")
            entries[f"{key}_trt"] = {"path": eng.name, "sha256": sha256_file(eng), "bytes": eng.stat().st_size,
                                     "format": "tensorrt", "precision": precision, "gpu": trt_info.get("gpu"),
                                     "tensorrt_version": trt_info.get("version"),
                                     "parity_vs_onnxruntime": engine_parity(eng, path, sample)}
    except (TensorRTUnavailable, TensorRTBuildError, EngineParityError) as e:
        raise ExportError(f"--tensorrt: {e}") from e
    finally:
        (tmp / "timing.cache").unlink(missing_ok=True)
    return entries
