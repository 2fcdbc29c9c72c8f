"""``hishrst export --precision int8``: static int8 (QDQ) quantisation of the encoder, and its accuracy gate.

Scheme (ONNX Runtime ``quantize_static``, :data:`QUANT_FORMAT` QDQ): the inputs of every MatMul, Gemm and
Conv (:data:`QUANTIZED_OPS`, attention's Q·Kᵀ and A·V included) pass through QuantizeLinear/DequantizeLinear
pairs; LayerNorm, Softmax, GELU, residual adds and the in-graph normalisation stay float32, and so does the
head (tiny next to a ViT, and its position encoding needs fp32). ONNX Runtime's CPU provider fuses the
pairs into integer kernels. Weights: int8, symmetric, one scale per output channel (``per_channel``).
Activations: uint8, asymmetric, one scale per tensor, ranges from MinMax calibration over up to
:data:`N_CALIBRATION` tiles. Why uint8 activations (U8S8): it is the native layout of ONNX Runtime's x86
integer GEMM (MLAS: ``vpdpbusd`` multiplies unsigned × signed bytes on AVX-VNNI / AVX512-VNNI); asymmetric
uint8 also spends the whole 8-bit range on the post-LayerNorm / post-GELU activations, which are far from
zero-centred. (On pre-VNNI AVX2 CPUs U8S8 can saturate: the gate below would catch it.)

Calibration tiles are cut from the run's training sections exactly as training cut them
(:func:`hishrst_train.features.cut_patches_for`: the section's µm/px, the run's patch size in µm, the
encoder's input size), at a seeded random choice of training spots. A disjoint *held-out* set of spots
(:data:`N_HELDOUT`) feeds the gate: the int8 encoder is compared with the fp32 encoder graph (ONNX Runtime
CPU) by the cosine similarity of each tile's embedding, and the run's fp32 head (PyTorch) is run on both
sets of embeddings (spots grouped per section as the runtime groups them) to compare each gene's
predictions across the held-out spots (Pearson correlation, :func:`hishrst_export.parity.compare`).
:data:`INT8_GATE` holds the thresholds; a bundle that misses any is refused (:class:`QuantizationGateError`,
with the figures) and nothing is written. The figures go into the manifest's ``encoder.quantization``,
which the content hash covers (:mod:`hishrst_runtime.bundle.integrity`).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_export.bundle import ExportError
from hishrst_export.parity import compare
from hishrst_runtime.core.grouping import group_points, pad_groups, safe_index
from hishrst_runtime.core.onnx_graph import graph_tile_layout

__all__ = ["INT8_GATE", "N_CALIBRATION", "N_HELDOUT", "QUANTIZED_OPS", "QuantizationGateError", "TileSets",
           "embedding_cosine", "int8_gate", "quantize_bundle_encoder", "quantize_encoder", "training_tiles"]

#: Op types whose inputs are quantised; everything else (LayerNorm, Softmax, GELU, Add, …) stays float.
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
QUANT_FORMAT = "QDQ"
#: Calibration tiles (training spots), held-out gate tiles (other training spots), and the fewest
#: held-out tiles a gate may rest on.
N_CALIBRATION = 256
N_HELDOUT = 128
MIN_HELDOUT = 16
#: Tiles per calibration / inference batch.
BATCH = 8
#: The accuracy gate, int8 vs the fp32 encoder on held-out tiles. ``cosine_*``: cosine similarity of each
#: tile's embedding (mean over tiles, worst tile); ``gene_pcc_*``: Pearson correlation, across the held-out
#: spots, of each gene's prediction by the fp32 head on int8 vs fp32 embeddings (mean over genes, worst gene).
#: Why these values: cosine ≥ 0.99 bounds the error vector to ~14 % of the embedding's length (|a − b|² =
#: 2 − 2 cos); the head's predictions are what users get, and PCC ≥ 0.98 leaves quantisation ≤ 4 % (1 − r²) of a
#: gene's spatial variation — small next to how far any H&E → expression model is from the measured expression
#: (per-gene PCC of a few tenths). The floors on the worst tile / gene catch a minority of tiles (e.g. an unseen
#: stain) or genes that quantisation wrecks while the means pass. Measured: test encoder cosine 0.9999 / 0.9999,
#: gene PCC 0.995 / 0.980 (300 genes); scrambled weight scales fail (tests/export/test_int8.py).
INT8_GATE: dict[str, float] = {"cosine_mean": 0.99, "cosine_min": 0.95, "gene_pcc_mean": 0.98, "gene_pcc_min": 0.90}


class QuantizationGateError(ExportError):
    """The int8 encoder disagrees with the fp32 encoder beyond :data:`INT8_GATE`."""


@dataclass(frozen=True)
class TileSets:
    """Training tiles for int8: ``calibration`` uint8 ``[n, S, S, 3]``; ``heldout``: per section, (tiles,
    spot positions in µm) of other spots; ``source``: where they came from, in words."""

    calibration: np.ndarray
    heldout: list[tuple[np.ndarray, np.ndarray]]
    source: str

    @property
    def n_heldout(self) -> int:
        return int(sum(len(t) for t, _ in self.heldout))


def _sections(config: Any, data: str | Path | None) -> list[dict[str, Any]]:
    """The run's training sections (``data`` replaces the first one's path, as ``--data`` does)."""
    secs = [dict(s) for s in (config.sections or [{"data": config.data, "image": config.image}])]
    if data is not None and secs:
        secs[0].update(data=str(data), image=None)
    return secs


def _open(sec: dict[str, Any], config: Any) -> tuple[Any, np.ndarray, float]:
    """(full-resolution image, spot centres in level-0 px, µm/px) of one training section."""
    from hishrst_train.data import open_fullres_image
    from hishrst_train.tasks import load_section

    adata = load_section(str(sec["data"]), image=sec.get("image"), mpp=config.mpp_override)
    mpp = float(adata.uns["hishrst"].get("mpp") or sec.get("mpp") or config.patch["train_mpp"])
    return open_fullres_image(adata.uns["hishrst"]["fullres_image"]), np.asarray(adata.obsm["spatial"], float), mpp


def training_tiles(config: Any, encoder: Any, *, data: str | Path | None = None, seed: int = 0,
                   n_calibration: int = N_CALIBRATION, n_heldout: int = N_HELDOUT) -> TileSets:
    """Calibration and held-out tiles cut from the run's training sections (see the module docstring).

    A random third of the spots (at most ``n_heldout``) is held out; up to ``n_calibration`` of the rest
    calibrate. Raises :class:`ExportError` when no section can be read or too few spots remain."""
    from hishrst_train.features import cut_patches_for

    opened, problems = [], []
    for sec in _sections(config, data):
        try:
            opened.append(_open(sec, config))
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"{sec.get('data')!r} ({type(e).__name__}: {e})")
    total = sum(len(xy) for _, xy, _ in opened)
    if total < 2 * MIN_HELDOUT:
        why = f"cannot read {'; '.join(problems)}" if problems else f"only {total} training spots"
        raise ExportError(f"--precision int8: no calibration tiles: {why}; int8 needs at least {2 * MIN_HELDOUT} "
                          "training spots to calibrate and check on — pass the training section with --data")
    rng = np.random.default_rng(seed)
    order = rng.permutation([(i, j) for i, (_, xy, _) in enumerate(opened) for j in range(len(xy))])
    k = min(n_heldout, max(MIN_HELDOUT, total // 3))
    held, calib = order[:k], order[k : k + n_calibration]
    size, patch_um = int(encoder.input_size), float(config.patch["size_um"])
    cal, heldout = [], []
    for i, (img, xy, mpp) in enumerate(opened):
        for picked, sink in ((calib, cal), (held, heldout)):
            idx = np.sort(picked[picked[:, 0] == i, 1])
            if len(idx):
                tiles = cut_patches_for(img, xy[idx], mpp=mpp, patch_um=patch_um, input_size=size)
                sink.append(tiles if sink is cal else (tiles, xy[idx] * mpp))
    for img, _, _ in opened:
        getattr(img, "close", lambda: None)()
    source = f"{len(calib)} calibration + {k} held-out spots of {len(opened)} training section(s)"
    return TileSets(np.concatenate(cal), heldout, source + (f"; unreadable: {'; '.join(problems)}" if problems else ""))


def _reader(tiles: np.ndarray, batch: int, layout: str = "NHWC") -> Any:
    """An ONNX Runtime ``CalibrationDataReader`` over NHWC ``tiles`` in batches of ``batch``, fed in ``layout``."""
    from onnxruntime.quantization import CalibrationDataReader

    from hishrst_runtime.core.patches import to_tile_layout

    class _Tiles(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(
                {"tiles": to_tile_layout(tiles[i : i + batch], layout)} for i in range(0, len(tiles), batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    return _Tiles()


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Silence ``logging.warning`` calls on the root logger without letting them install a handler."""
    root, null = logging.getLogger(), logging.NullHandler()
    level = root.level
    root.addHandler(null)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        root.removeHandler(null)


def quantize_encoder(fp32_path: str | Path, out_path: str | Path, calibration: np.ndarray, *,
                     batch: int = BATCH) -> Path:
    """Write the static int8 QDQ quantisation of the encoder ``fp32_path`` to ``out_path`` (see the module
    docstring), calibrated on ``calibration`` (uint8 tiles). Large models get one ``.data`` file."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from hishrst_export.onnx_export import _resave, external_data_files

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=f".{out_path.stem}-int8-") as scratch:
        raw = Path(scratch) / out_path.name
        with contextlib.redirect_stdout(None), _quiet_root_logger():  # progress prints; "consider pre-processing"
            quantize_static(str(fp32_path), str(raw), _reader(calibration, batch, graph_tile_layout(fp32_path)),
                            quant_format=getattr(QuantFormat, QUANT_FORMAT), op_types_to_quantize=list(QUANTIZED_OPS),
                            per_channel=True, reduce_range=False, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            use_external_data_format=bool(external_data_files(fp32_path)),
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        _resave(raw, out_path)
    return out_path


def _features(path: Path, tiles: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """Features of NHWC ``tiles`` from the encoder graph ``path`` (fed in its own layout)."""
    from hishrst_export.onnx_export import _session, session_tile_layout
    from hishrst_runtime.core.patches import to_tile_layout

    sess = _session(path)
    fed = to_tile_layout(tiles, session_tile_layout(sess))
    return np.concatenate([sess.run(None, {"tiles": fed[i : i + batch]})[0] for i in range(0, len(fed), batch)])


def embedding_cosine(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``got`` with the same row of ``want`` (NaN/inf rows: 0)."""
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    cos = (g * w).sum(1) / np.maximum(np.linalg.norm(g, axis=1) * np.linalg.norm(w, axis=1), 1e-30)
    return np.where(np.isfinite(cos), cos, 0.0)


def _predict(model: Any, feats: np.ndarray, pos_um: np.ndarray, max_size: int) -> np.ndarray:
    """The fp32 head's predictions ``[n, genes]`` for spots with features ``feats`` at ``pos_um``."""
    import torch

    index, mask = pad_groups(group_points(pos_um, max_size=max_size))
    safe = safe_index(index)
    with torch.no_grad():
        out = model.eval()(torch.from_numpy(feats[safe].astype(np.float32)),
                           torch.from_numpy(pos_um[safe].astype(np.float32)), torch.from_numpy(mask)).numpy()
    rows = np.empty((len(feats), out.shape[-1]), out.dtype)
    rows[index[mask > 0]] = out[mask > 0]
    return rows


def int8_gate(fp32_path: str | Path, int8_path: str | Path, model: Any, heldout: list[tuple[np.ndarray, np.ndarray]],
              *, max_size: int) -> dict[str, Any]:
    """Compare the int8 encoder with the fp32 one on ``heldout`` tiles (see the module docstring): the
    figures, thresholds and ``passed``; raises :class:`QuantizationGateError` with the figures on failure."""
    cos, pred32, pred8 = [], [], []
    for tiles, pos in heldout:
        f32, f8 = _features(Path(fp32_path), tiles), _features(Path(int8_path), tiles)
        cos.append(embedding_cosine(f8, f32))
        pred32.append(_predict(model, f32, pos, max_size))
        pred8.append(_predict(model, f8, pos, max_size))
    c = np.concatenate(cos)
    genes = compare(np.concatenate(pred8), np.concatenate(pred32))
    figures = {"cosine_mean": float(c.mean()), "cosine_min": float(c.min()),
               "gene_pcc_mean": float(genes["mean_gene_pcc"]), "gene_pcc_min": float(genes["min_gene_pcc"])}
    gate = dict(INT8_GATE)  # read at call time
    failed = [k for k, floor in gate.items() if not figures[k] >= floor]  # NaN fails
    report = {**figures, "thresholds": gate, "n_tiles": int(len(c)), "n_genes": int(pred32[0].shape[1]),
              "prediction_scaled_max_abs": float(genes["scaled_max_abs"]), "nonfinite": int(genes["nonfinite"]),
              "passed": not failed and not genes["nonfinite"]}
    if not report["passed"]:
        got = ", ".join(f"{k} {figures[k]:.4f} (≥ {gate[k]:g})" for k in gate)
        raise QuantizationGateError(
            f"{int8_path}: the int8 encoder fails the accuracy gate on {len(c)} held-out training tiles ({got}; "
            f"failed: {', '.join(failed) or 'non-finite predictions'}); nothing was written — export with "
            "--precision fp32 (or fp16), or report the encoder")
    return report


def quantize_bundle_encoder(enc_path: Path, model: Any, config: Any, encoder: Any, *, contract: dict[str, Any],
                            precision: str, data: str | Path | None, seed: int, echo: Callable[[str], None]
                            ) -> dict[str, str]:
    """Quantise the bundle's parity-checked fp32 ``enc_path`` in place and gate it. Records the scheme and the
    gate's figures as ``contract["encoder"]["quantization"]`` (covered by the content hash) and returns the
    head's ``metadata_props`` for the updated contract."""
    from hishrst_export.manifest import head_metadata_for
    from hishrst_export.onnx_export import external_data_files

    tiles = training_tiles(config, encoder, data=data, seed=seed)
    echo(f"int8: calibrating on {len(tiles.calibration)} training tiles ({tiles.source})")
    with tempfile.TemporaryDirectory(dir=enc_path.parent, prefix=f".{enc_path.stem}-fp32-") as scratch:
        fp32 = Path(scratch) / enc_path.name  # moved with its external data, which keeps its relative path
        for name in (enc_path.name, *external_data_files(enc_path)):
            (enc_path.parent / name).rename(Path(scratch) / name)
        quantize_encoder(fp32, enc_path, tiles.calibration)
        gate = int8_gate(fp32, enc_path, model, tiles.heldout, max_size=int(config.grouping["max_size"]))
    contract["encoder"]["quantization"] = _record(tiles, gate, seed)
    return head_metadata_for(contract, precision)


def _record(tiles: TileSets, gate: dict[str, Any], seed: int) -> dict[str, Any]:
    """The manifest's ``encoder.quantization``: scheme, calibration and the gate's figures."""
    import onnxruntime

    return {
        "format": QUANT_FORMAT, "tool": f"onnxruntime {onnxruntime.__version__} quantize_static",
        "quantized_ops": list(QUANTIZED_OPS), "weights": "int8, symmetric, per output channel",
        "activations": "uint8, asymmetric, per tensor", "float_ops": "all others (LayerNorm, Softmax, GELU, Add, …)",
        "calibration": {"method": "MinMax", "tiles": int(len(tiles.calibration)), "seed": int(seed),
                        "source": tiles.source},
        "gate": {"reference": "fp32 encoder graph (ONNX Runtime CPU) on held-out training spots; fp32 head (PyTorch)",
                 **gate},
    }
