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
from hishrst_runtime.core.vocab import Precision
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
