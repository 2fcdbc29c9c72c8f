"""PyTorch → ONNX export of the encoder and the HisHRST head, each followed by a parity check.

* ``encoder.onnx``: ``tiles`` uint8 ``[B, S, S, 3]`` (RGB, NHWC; ``[B, 3, S, S]`` with ``layout="NCHW"``) →
  ``features`` float32 ``[B, D]`` (and with
  ``tokens=True`` the patch tokens ``tokens`` float32 ``[B, rows, cols, width]``, sub-spot bundles).
  Scaling to [0, 1] and mean/std normalisation are inside the graph, so the runtime ships bytes.
  Dynamic batch, fixed spatial size ``S`` (the encoder's input size in pixels). Attention is exported
  as plain MatMul/Softmax (timm's fused ``scaled_dot_product_attention`` is switched off during
  export), which ONNX Runtime and TensorRT both handle.
* ``head.onnx``: ``features`` float32 ``[G, N, D]``, ``positions`` float32 ``[G, N, 2]`` (µm),
  ``mask`` float32 ``[G, N]`` (1 = spot, 0 = padding) → ``expression`` float32 ``[G, N, genes]``.
  Dynamic G (groups) and N (points per group). The signature is the same in every position mode:
  ``relative`` heads compute their translation/rotation/reflection-invariant distances inside the
  graph, and ``none`` heads keep ``positions`` as an input through a shape-only use (values ignored).

fp16 (``precision="fp16"``): weights and activations in half precision, with LayerNorm, Softmax,
GELU's Erf, reductions, the head's feature standardisation and the whole position encoding (µm
coordinates need fp32) kept in fp32; inputs and outputs stay uint8/fp32. The converter would round every
value passed between two fp32 nodes to fp16 and back, positions included; those round trips into the
position encoding are removed (:func:`_drop_fp16_round_trips`). The converter's inserted
Casts are topologically re-sorted so the graph passes the ONNX checker and TensorRT's parser.
Matrix products accumulate in fp32 on both ONNX Runtime CPU (fp16 kernels upcast) and TensorRT.

Large models: the TorchScript exporter writes models whose tensors exceed protobuf's 2 GiB limit as
*one external file per tensor* next to the output. Every export therefore goes through a scratch
directory and is re-saved by :func:`_save`, which writes a single ``<name>.onnx.data`` external-data
file when the tensors total more than :data:`EXTERNAL_DATA_THRESHOLD` bytes (e.g. UNI2-h fp32,
≈ 2.7 GB) and nothing else otherwise. :func:`external_data_files` lists what a model references.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from hishrst_runtime.bundle.io_names import ENCODER_IO, ENCODER_TOKENS_IO, HEAD_IO
from hishrst_runtime.core.errors import HishrstError
from hishrst_runtime.core.patches import shape_tile_layout, tile_batch_shape, to_tile_layout
from hishrst_runtime.core.vocab import DEFAULT_TILE_LAYOUT, TILE_LAYOUTS, Precision, TileLayout
from hishrst_export.parity import PARITY_TOLERANCE as _PARITY
from hishrst_export.parity import compare, passes
from hishrst_export.toposort import toposort as _toposort

if TYPE_CHECKING:
    from hishrst_train.encoders import EncoderModule
    from hishrst_train.model import HisHRST

__all__ = [
    "ENCODER_IO",
    "ENCODER_TOKENS_IO",
    "EXTERNAL_DATA_THRESHOLD",
    "HEAD_IO",
    "PARITY_TOLERANCE",
    "ParityError",
    "encoder_parity",
    "export_encoder_onnx",
    "export_head_onnx",
    "external_data_files",
    "head_parity",
]


#: Parity thresholds against PyTorch fp32 on the CPU (the ``onnx`` rows of
#: :data:`hishrst_export.parity.PARITY_TOLERANCE`; see there for the statistics and figures).
PARITY_TOLERANCE: dict[str, dict[str, float]] = _PARITY["onnx"]
#: Op types kept in fp32 by the fp16 conversion.
FP32_OPS = ("LayerNormalization", "Softmax", "Erf", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Sin", "Cos", "Exp")
#: Head nodes kept in fp32: the position encoding (µm × angular frequency needs fp32) and the
#: feature standardisation (division by small per-dimension std could overflow fp16).
HEAD_FP32_PREFIXES = ("/pos/",)
HEAD_FP32_NODES = ("/Sub", "/Div")
#: Tensors totalling more than this many bytes are written as ONNX external data (protobuf's hard
#: limit is 2 GiB for the whole file; 128 MiB are left for the graph itself).
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27


class ParityError(HishrstError, RuntimeError):
    """An exported model disagrees with PyTorch beyond the stated tolerance."""


def _iter_tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of a graph: initializers and Constant/attribute tensors, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _iter_tensors(a.g)
            for g in a.graphs:
                yield from _iter_tensors(g)


def _tensor_bytes(model: Any) -> int:
    """Serialized size of all tensors in ``model`` (bytes); each tensor is < 2 GiB, the sum may not be."""
    return sum(t.ByteSize() for t in _iter_tensors(model.graph))


def _save(model: Any, path: Path, *, threshold: int | None = None) -> None:
    """Save ``model`` to ``path``; tensors > ``threshold`` bytes in total go to ``<name>.onnx.data``.

    ``threshold`` defaults to :data:`EXTERNAL_DATA_THRESHOLD` (read at call time). A stale data file
    from an earlier save is removed first (``onnx`` appends to an existing one).
    """
    import onnx

    limit = EXTERNAL_DATA_THRESHOLD if threshold is None else threshold
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if _tensor_bytes(model) > limit:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _resave(raw: Path, path: Path) -> None:
    """Load ``raw`` (with whatever external-data layout its writer chose) and :func:`_save` it to ``path``."""
    import onnx

    _save(onnx.load(str(raw), load_external_data=True), path)


def external_data_files(onnx_path: str | Path) -> list[str]:
    """Locations (relative to the model's folder) of the external-data files ``onnx_path`` references."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    found: dict[str, None] = {}
    for t in _iter_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for kv in t.external_data:
                if kv.key == "location":
                    found[kv.value] = None
    return list(found)


def _torch_export(module: nn.Module, args: tuple, path: Path, *, input_names: list[str], output_names: list[str],
                  dynamic_axes: dict[str, dict[int, str]], opset: int) -> None:
    """TorchScript ONNX export into a scratch folder, then re-saved to ``path`` (see the module docstring)."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}-torch-") as scratch:
        raw = Path(scratch) / path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, str(raw), input_names=input_names, output_names=output_names,
                dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        _resave(raw, path)


def _to_fp16(path: Path, *, keep_fp32_prefixes: tuple[str, ...] = (), keep_fp32_nodes: tuple[str, ...] = ()) -> None:
    """Convert the fp32 ONNX file ``path`` to mixed fp16 in place (see the module docstring).

    Raises ``RuntimeError`` when a requested fp32 prefix or node name matches nothing (the model's
    node names changed, and the blocklist must follow).
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    names = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node]
    block = [n for n in names if n.startswith(keep_fp32_prefixes)] if keep_fp32_prefixes else []
    unmatched = [p for p in keep_fp32_prefixes if not any(n.startswith(p) for n in names)]
    unmatched += [p for p in keep_fp32_nodes if p not in names]
    if unmatched:
        raise RuntimeError(f"{path}: fp32 blocklist entries {unmatched} match no node; update HEAD_FP32_* in {__file__}")
    # a path (not a ModelProto) lets the converter run shape inference on models > 2 GiB
    model16 = convert_float_to_float16(str(path), keep_io_types=True, op_block_list=list(FP32_OPS),
                                       node_block_list=block + list(keep_fp32_nodes))
    _toposort(model16.graph)
    _save(model16, path)


def _drop_fp16_round_trips(path: Path, *, prefixes: tuple[str, ...]) -> int:
    """Let the nodes named ``prefixes…`` (the position encoding) read fp32 values at full precision.

    The fp16 converter casts every value between two fp32-kept nodes (and the fp32 graph inputs) to fp16
    and back, which would round positions to fp16 (≈ 8 µm steps at 10 mm; sums of µm overflow). Each
    ``Cast(fp32 → fp16) → Cast(→ fp32)`` pair feeding such a node is bypassed; casts left unused are
    removed. Rewrites ``path`` in place; returns the number of bypassed inputs.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    graph = model.graph
    fp32 = {v.name for v in [*onnx.shape_inference.infer_shapes(model).graph.value_info, *graph.input]
            if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    producer = {o: n for n in graph.node for o in n.output}

    def cast_to(name: str, dtype: int) -> Any:
        n = producer.get(name)
        ok = n is not None and n.op_type == "Cast" and any(a.name == "to" and a.i == dtype for a in n.attribute)
        return n if ok else None

    bypassed = 0
    for node in graph.node:
        if not node.name.startswith(prefixes):
            continue
        for i, name in enumerate(node.input):
            back = cast_to(name, onnx.TensorProto.FLOAT)
            down = None if back is None else cast_to(back.input[0], onnx.TensorProto.FLOAT16)
            if down is not None and down.input[0] in fp32:
                node.input[i] = down.input[0]
                bypassed += 1
    while True:  # drop casts nobody reads any more
        used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Cast" and not set(n.output) & used]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    _save(model, path)
    return bypassed


def _check(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path), full_check=False)


def _declare_dims(path: Path, output: str, dims: tuple[int, ...]) -> None:
    """Declare the non-batch sizes of ``output`` in the ONNX file ``path`` (the exporter leaves a reshape's
    sizes symbolic, though shape inference knows them; static sizes are what engines and contracts read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    shape = next(o for o in model.graph.output if o.name == output).type.tensor_type.shape
    for dim, size in zip(shape.dim[1:], dims):
        dim.dim_value = int(size)
    onnx.save_model(model, str(path))


def export_encoder_onnx(encoder: EncoderModule, out_path: str | Path, *, opset: int = 17, precision: Precision = "fp32",
                        tokens: bool = False, layout: TileLayout = DEFAULT_TILE_LAYOUT) -> Path:
    """Export an encoder (``hishrst_train.encoders.EncoderModule``) taking uint8 RGB tiles in ``layout`` to ONNX:
    ``[B, S, S, 3]`` (``NHWC``) or ``[B, 3, S, S]`` (``NCHW``; :data:`~hishrst_runtime.core.vocab.TileLayout`).

    ``encoder.input_size`` (pixels) fixes the spatial size; the batch is dynamic. ``tokens=True`` adds the patch
    tokens of ``encoder.forward_tokens`` (:data:`ENCODER_TOKENS_IO`; float32 in fp16 too). Returns ``out_path``."""
    from hishrst_train.encoders.module import ChannelsFirst, EncoderTokens, plain_attention

    if layout not in TILE_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(TILE_LAYOUTS)}, got {layout!r}")
    out_path, io = Path(out_path), ENCODER_TOKENS_IO if tokens else ENCODER_IO
    s = int(encoder.input_size)
    dummy = torch.randint(0, 256, tile_batch_shape(2, s, layout), dtype=torch.uint8)
    encoder = encoder.eval().cpu()
    traced: nn.Module = EncoderTokens(encoder) if tokens else encoder
    traced = ChannelsFirst(traced) if layout == "NCHW" else traced
    with plain_attention(encoder), torch.inference_mode(False), torch.no_grad():
        _torch_export(traced, (dummy,), out_path, input_names=io["inputs"], output_names=io["outputs"],
                      dynamic_axes={k: {0: "batch"} for k in io["inputs"] + io["outputs"]}, opset=opset)
    if tokens:
        _declare_dims(out_path, "tokens", (*encoder.token_grid, encoder.spec.width))
    if precision == "fp16":
        _to_fp16(out_path)
    _check(out_path)
    return out_path


def session_tile_layout(sess: Any) -> str:
    """The tile layout of an encoder ONNX Runtime session (its ``tiles`` input ``[?, 3, S, S]`` is ``NCHW``)."""
    return shape_tile_layout(next(i.shape for i in sess.get_inputs() if i.name == "tiles"))


def _set_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    """Set ``metadata_props`` entries of the ONNX file ``path`` in place (external data left untouched)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    kept = {p.key: p.value for p in model.metadata_props if p.key not in metadata}
    onnx.helper.set_model_props(model, {**kept, **metadata})
    onnx.save_model(model, str(path))


def export_head_onnx(model: HisHRST, out_path: str | Path, *, opset: int = 17, precision: Precision = "fp32",
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Export a :class:`hishrst_train.model.HisHRST` head (features, positions in µm, mask → expression).

    ``metadata``: ``metadata_props`` to record in the file (export passes the genes and the manifest
    content hash, :func:`hishrst_export.manifest.head_metadata_for`)."""
    out_path = Path(out_path)
    d = model.config.feature_dim
    args = (torch.randn(2, 5, d), torch.rand(2, 5, 2) * 1000, torch.ones(2, 5))
    gn = {0: "groups", 1: "points"}
    with torch.no_grad():
        _torch_export(model.eval().cpu(), args, out_path, input_names=HEAD_IO["inputs"], output_names=HEAD_IO["outputs"],
                      dynamic_axes={k: gn for k in HEAD_IO["inputs"] + HEAD_IO["outputs"]}, opset=opset)
    if precision == "fp16":
        prefixes = () if model.config.position_mode == "none" else HEAD_FP32_PREFIXES  # "none": no /pos/ nodes
        _to_fp16(out_path, keep_fp32_prefixes=prefixes, keep_fp32_nodes=HEAD_FP32_NODES)
        if prefixes:
            _drop_fp16_round_trips(out_path, prefixes=prefixes)
    if metadata:
        _set_metadata(out_path, metadata)
    _check(out_path)
    return out_path


def _verdict(name: str, got: np.ndarray, want: np.ndarray, precision: Precision) -> dict[str, Any]:
    """Compare ``got`` (ONNX Runtime) with ``want`` (PyTorch); the report, or :class:`ParityError`."""
    try:
        stats = compare(got, want)
    except ValueError as e:
        raise ParityError(f"{name}: ONNX {e} (PyTorch's); the export is broken — report it") from e
    tol = PARITY_TOLERANCE[precision]
    if stats["nonfinite"]:
        raise ParityError(
            f"{name}: {stats['nonfinite_reference']} non-finite values (NaN/inf) in PyTorch's reference output and "
            f"{stats['nonfinite_output']} in ONNX Runtime's; a model that predicts NaN/inf cannot pass parity — "
            "check the run's training data and loss for NaN and re-fit it"
        )
    if not passes(stats, tol):
        raise ParityError(
            f"{name}: ONNX Runtime disagrees with PyTorch beyond the {precision} tolerance "
            f"(scaled max abs {stats['scaled_max_abs']:.3g} vs ≤ {tol['scaled_max_abs']:g}, "
            f"min per-output PCC {stats['min_gene_pcc']:.6f} vs ≥ {tol['min_gene_pcc']:g}); the export is "
            "broken or the model is numerically unstable at this precision — try --precision fp32, or report it"
        )
    return {**stats, "tolerance": dict(tol), "passed": True}


def _session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def encoder_parity(encoder: EncoderModule, onnx_path: str | Path, *, tiles: dict[str, np.ndarray],
                   precision: Precision = "fp32", batch_sizes: tuple[int, ...] = (1, 7)) -> dict[str, Any]:
    """Run ONNX Runtime (CPU) vs PyTorch on sets of uint8 tiles; raise :class:`ParityError` on failure.

    ``tiles`` maps a label (e.g. ``"random"``, ``"real"``) to ``[B, S, S, 3]`` uint8 arrays (NHWC, as PyTorch's
    encoder takes them; fed to the graph in its own layout, :func:`session_tile_layout`); each set is
    run through ONNX Runtime in chunks of every size in ``batch_sizes`` (exercising the dynamic batch)
    and the worst chunking is reported. A token encoder's ``tokens`` output (compared with
    ``encoder.forward_tokens``, per channel) is reported under ``report[label]["tokens"]``.
    """
    sess = _session(Path(onnx_path))
    outputs, layout = [o.name for o in sess.get_outputs()], session_tile_layout(sess)
    report: dict[str, Any] = {}
    encoder = encoder.eval().cpu()
    for label, t in tiles.items():
        with torch.no_grad():
            want = encoder.forward_tokens(torch.from_numpy(t)) if len(outputs) > 1 else (encoder(torch.from_numpy(t)),)
        fed = to_tile_layout(t, layout)
        chunked = [[np.concatenate(o) for o in zip(*(sess.run(None, {"tiles": fed[i : i + bs]})
                                                     for i in range(0, len(t), bs)))] for bs in batch_sizes]
        for k, out in enumerate(outputs):
            name = f"{onnx_path} ({label} tiles{', ' + out if k else ''})"
            reports = [_verdict(name, got[k], want[k].numpy(), precision) for got in chunked]
            worst = max(reports, key=lambda s: s["scaled_max_abs"])
            worst["min_gene_pcc"] = min(s["min_gene_pcc"] for s in reports)
            if k:
                report[label][out] = worst
            else:
                report[label] = {**worst, "n_tiles": len(t), "batch_sizes": [int(b) for b in batch_sizes]}
    return report


def head_parity(model: HisHRST, onnx_path: str | Path, *, feeds: dict[str, dict[str, np.ndarray]],
                precision: Precision = "fp32") -> dict[str, Any]:
    """Run ONNX Runtime (CPU) vs PyTorch on labelled head inputs; errors and per-gene PCC over real points."""
    sess = _session(Path(onnx_path))
    report: dict[str, Any] = {}
    for label, f in feeds.items():
        with torch.no_grad():
            want = model.eval()(*(torch.from_numpy(f[k]) for k in HEAD_IO["inputs"])).numpy()
        got = sess.run(None, {k: f[k] for k in HEAD_IO["inputs"]})[0]
        valid = f["mask"] > 0
        report[label] = _verdict(f"{onnx_path} ({label} inputs)", got[valid], want[valid], precision)
        report[label].update(n_points=int(valid.sum()), shape=[int(s) for s in f["mask"].shape])
    return report
