"""PyTorch → ONNX export of the encoder and the HisHRST head, each ending with a parity check.

* ``encoder.onnx``: ``tiles`` uint8 ``[B, S, S, 3]`` (RGB, NHWC) → ``features`` float32 ``[B, D]``.
  Scaling to [0, 1] and mean/std normalisation are inside the graph, so the runtime ships bytes.
  Dynamic batch, fixed spatial size. Attention is exported as plain MatMul/Softmax (timm's fused
  ``scaled_dot_product_attention`` is switched off during export).
* ``head.onnx``: ``features`` float32 ``[G, N, D]``, ``positions`` float32 ``[G, N, 2]`` (µm),
  ``mask`` float32 ``[G, N]`` (1 = spot, 0 = padding) → ``expression`` float32 ``[G, N, genes]``.
  Dynamic G and N.

fp16 (``precision="fp16"``): weights and activations in half precision, with LayerNorm, Softmax, GELU's
Erf, reductions and the whole position encoding (µm coordinates need fp32) kept in fp32; inputs and
outputs stay fp32/uint8. Models over 2 GB are written with ONNX external data (``<name>.onnx.data``).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
from torch import nn

__all__ = [
    "export_encoder_onnx",
    "export_head_onnx",
    "encoder_parity",
    "head_parity",
    "ENCODER_IO",
    "HEAD_IO",
    "PARITY_TOLERANCE",
]

Precision = Literal["fp32", "fp16"]
ENCODER_IO = {"inputs": ["tiles"], "outputs": ["features"]}
HEAD_IO = {"inputs": ["features", "positions", "mask"], "outputs": ["expression"]}

#: Parity thresholds. ``scaled_max_abs`` is max |ONNX − PyTorch| / max(1, max |PyTorch|);
#: ``min_gene_pcc`` is the smallest per-gene Pearson correlation between ONNX and PyTorch outputs.
PARITY_TOLERANCE: dict[str, dict[str, float]] = {
    "fp32": {"scaled_max_abs": 1e-4, "min_gene_pcc": 0.9999},
    "fp16": {"scaled_max_abs": 3e-2, "min_gene_pcc": 0.99},
}
_FP32_OPS = ["LayerNormalization", "Softmax", "Erf", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Sin", "Cos", "Exp"]
_TWO_GB = 2**31 - 1


class ParityError(RuntimeError):
    """An exported model disagrees with PyTorch beyond the stated tolerance."""


@contextlib.contextmanager
def _plain_attention(module: nn.Module) -> Iterator[None]:
    """Temporarily disable timm's fused attention (exported as plain MatMul/Softmax instead)."""
    saved = [(m, m.fused_attn) for m in module.modules() if hasattr(m, "fused_attn")]
    for m, _ in saved:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, v in saved:
            m.fused_attn = v


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.state_dict().values())


def _torch_export(module: nn.Module, args: tuple, path: Path, *, input_names: list[str], output_names: list[str],
                  dynamic_axes: dict[str, dict[int, str]], opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), input_names=input_names, output_names=output_names,
            dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False,
        )


def _to_fp16(path: Path, *, keep_fp32_prefixes: tuple[str, ...] = ()) -> None:
    """Convert an fp32 ONNX file to fp16 in place, keeping sensitive ops and I/O types in fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    block_nodes = [n.name for n in model.graph.node if n.name.startswith(keep_fp32_prefixes)] if keep_fp32_prefixes else []
    model16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=_FP32_OPS, node_block_list=block_nodes)
    _save(model16, path)


def _save(model: Any, path: Path) -> None:
    import onnx

    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if model.ByteSize() > _TWO_GB:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    else:
        onnx.save_model(model, str(path))


def _check(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path), full_check=False)


def export_encoder_onnx(encoder: nn.Module, out_path: str | Path, *, opset: int = 17, precision: Precision = "fp32") -> Path:
    """Export an encoder taking uint8 NHWC tiles (``hishrst_train.encoders.EncoderModule``) to ONNX."""
    out_path = Path(out_path)
    size = int(encoder.input_size)
    dummy = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    encoder = encoder.eval().cpu()
    with _plain_attention(encoder), torch.inference_mode(False), torch.no_grad():
        _torch_export(encoder, (dummy,), out_path, input_names=ENCODER_IO["inputs"], output_names=ENCODER_IO["outputs"],
                      dynamic_axes={"tiles": {0: "batch"}, "features": {0: "batch"}}, opset=opset)
    if precision == "fp16":
        _to_fp16(out_path)
    _check(out_path)
    return out_path


def export_head_onnx(model: nn.Module, out_path: str | Path, *, opset: int = 17, precision: Precision = "fp32") -> Path:
    """Export a :class:`hishrst_train.model.HisHRST` head (features, positions, mask → expression)."""
    out_path = Path(out_path)
    d = model.config.feature_dim
    args = (torch.randn(2, 5, d), torch.rand(2, 5, 2) * 1000, torch.ones(2, 5))
    gn = {0: "groups", 1: "points"}
    with torch.no_grad():
        _torch_export(model.eval().cpu(), args, out_path, input_names=HEAD_IO["inputs"], output_names=HEAD_IO["outputs"],
                      dynamic_axes={k: gn for k in HEAD_IO["inputs"] + HEAD_IO["outputs"]}, opset=opset)
    if precision == "fp16":
        _to_fp16(out_path, keep_fp32_prefixes=("/pos/",))
    _check(out_path)
    return out_path


def _compare(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    err = float(np.abs(got64 - want64).max()) if got64.size else 0.0
    scale = max(1.0, float(np.abs(want64).max()) if want64.size else 1.0)
    flat_g = got64.reshape(-1, got64.shape[-1])
    flat_w = want64.reshape(-1, want64.shape[-1])
    gc, wc = flat_g - flat_g.mean(0), flat_w - flat_w.mean(0)
    denom = np.sqrt((gc**2).sum(0) * (wc**2).sum(0))
    ok = denom > 1e-12
    pcc = (gc * wc).sum(0)[ok] / denom[ok]
    return {
        "max_abs": err,
        "scaled_max_abs": err / scale,
        "min_gene_pcc": float(pcc.min()) if pcc.size else 1.0,
        "mean_gene_pcc": float(pcc.mean()) if pcc.size else 1.0,
    }


def _verdict(name: str, stats: dict[str, float], precision: Precision) -> dict[str, Any]:
    tol = PARITY_TOLERANCE[precision]
    passed = stats["scaled_max_abs"] <= tol["scaled_max_abs"] and stats["min_gene_pcc"] >= tol["min_gene_pcc"]
    out = {**stats, "tolerance": tol, "passed": bool(passed)}
    if not passed:
        raise ParityError(
            f"{name}: ONNX Runtime disagrees with PyTorch beyond the {precision} tolerance "
            f"(scaled max abs {stats['scaled_max_abs']:.3g} vs ≤ {tol['scaled_max_abs']:g}, "
            f"min per-output PCC {stats['min_gene_pcc']:.6f} vs ≥ {tol['min_gene_pcc']:g})"
        )
    return out


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def encoder_parity(encoder: nn.Module, onnx_path: str | Path, *, tiles: dict[str, np.ndarray],
                   precision: Precision = "fp32", batch_sizes: tuple[int, ...] = (1, 7)) -> dict[str, Any]:
    """Run ONNX Runtime (CPU) vs PyTorch on sets of uint8 tiles; raise :class:`ParityError` on failure.

    ``tiles`` maps a label (e.g. ``"random"``, ``"real"``) to ``[B, S, S, 3]`` uint8 arrays; each set is
    also run in chunks of every size in ``batch_sizes`` to exercise the dynamic batch dimension.
    """
    sess = _session(Path(onnx_path))
    report: dict[str, Any] = {}
    encoder = encoder.eval().cpu()
    for label, t in tiles.items():
        with torch.no_grad():
            want = encoder(torch.from_numpy(t)).numpy()
        got_parts = []
        for bs in batch_sizes:
            got_parts.append(np.concatenate([sess.run(None, {"tiles": t[i : i + bs]})[0] for i in range(0, len(t), bs)]))
        stats = [_compare(g, want) for g in got_parts]
        worst = max(stats, key=lambda s: s["scaled_max_abs"])
        worst["min_gene_pcc"] = min(s["min_gene_pcc"] for s in stats)
        report[label] = _verdict(f"{onnx_path} ({label} tiles)", worst, precision)
        report[label]["n_tiles"] = int(len(t))
    return report


def head_parity(model: nn.Module, onnx_path: str | Path, *, feeds: dict[str, dict[str, np.ndarray]],
                precision: Precision = "fp32") -> dict[str, Any]:
    """Run ONNX Runtime (CPU) vs PyTorch on labelled head inputs; per-gene PCC over real points."""
    sess = _session(Path(onnx_path))
    report: dict[str, Any] = {}
    for label, f in feeds.items():
        with torch.no_grad():
            want = model.eval()(*(torch.from_numpy(f[k]) for k in HEAD_IO["inputs"])).numpy()
        got = sess.run(None, {k: f[k] for k in HEAD_IO["inputs"]})[0]
        valid = f["mask"] > 0
        report[label] = _verdict(f"{onnx_path} ({label} inputs)", _compare(got[valid], want[valid]), precision)
        report[label]["n_points"] = int(valid.sum())
    return report
