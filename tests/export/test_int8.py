"""hishrst export --precision int8: static QDQ quantisation of the encoder, its accuracy gate, the manifest
record (covered by the content hash), the CPU runtime, and the refusals (failed gate, TensorRT)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from click.testing import CliRunner  # noqa: E402
from hishrst_export import quantize  # noqa: E402
from hishrst_export.bundle import ExportError, export_bundle  # noqa: E402
from hishrst_export.cli import export as export_cmd  # noqa: E402
from hishrst_export.parity import compare  # noqa: E402

from hishrst_runtime.bundle.integrity import content_sha256  # noqa: E402
from hishrst_runtime.bundle.manifest import BundleError, load_bundle  # noqa: E402
from hishrst_runtime.core.vocab import PRECISIONS, TENSORRT_PRECISIONS  # noqa: E402

QUIET = {"echo": lambda s: None}


@pytest.fixture(scope="module")
def int8_bundle(small_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8_bundle") / "bundle"
    export_bundle(small_run, out=out, precision="int8", **QUIET)
    return out


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


def test_int8_bundle_is_a_gated_qdq_encoder_with_an_fp32_head(int8_bundle: Path) -> None:
    b = load_bundle(int8_bundle)
    m = b.manifest
    assert "int8" in PRECISIONS and "int8" not in TENSORRT_PRECISIONS
    assert b.spec.precision == "int8" and b.spec.file("encoder").int8 and not b.spec.file("head").int8
    assert m["files"]["encoder"]["precision"] == "int8" and m["files"]["head"]["precision"] == "fp32"
    enc = onnx.load(str(int8_bundle / "encoder.onnx"))
    ops = {n.op_type for n in enc.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "LayerNormalization", "Softmax"} <= ops
    int8_weights = [t for t in enc.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert int8_weights, "no int8 weight tensors"
    q = m["encoder"]["quantization"]
    assert q["format"] == "QDQ" and q["quantized_ops"] == list(quantize.QUANTIZED_OPS)
    assert q["calibration"]["tiles"] >= quantize.MIN_HELDOUT and "training section" in q["calibration"]["source"]
    gate = q["gate"]
    assert gate["passed"] and gate["thresholds"] == quantize.INT8_GATE and gate["n_tiles"] >= quantize.MIN_HELDOUT
    for key, floor in quantize.INT8_GATE.items():
        assert floor <= gate[key] <= 1.0 + 1e-9, (key, gate[key])
    assert m["parity"]["encoder"]["real"]["passed"]  # the fp32 graph was parity-checked before quantisation


def test_the_content_hash_covers_the_gate_figures(int8_bundle: Path, tmp_path: Path) -> None:
    m = json.loads((int8_bundle / "manifest.json").read_text())
    assert m["integrity"]["content_sha256"] == content_sha256(m)
    edited = json.loads(json.dumps(m))
    edited["encoder"]["quantization"]["gate"]["cosine_min"] = 1.0
    assert content_sha256(edited) != content_sha256(m)
    b = shutil.copytree(int8_bundle, tmp_path / "edited")
    (b / "manifest.json").write_text(json.dumps(edited, indent=2))
    with pytest.raises(BundleError, match=r"content hash .* does not match integrity\.content_sha256"):
        load_bundle(b)


def test_int8_runs_through_the_cpu_engine_and_tracks_fp32(int8_bundle: Path, small_bundle: Path,
                                                          small_section: Path, tmp_path: Path) -> None:
    import anndata as ad

    from hishrst_runtime.jobs.runner import run_slides
    from hishrst_runtime.slides.convert import write_ome_zarr
    from hishrst_train.data import image_mpp, open_fullres_image

    tif = next(small_section.parent.glob("image.tif*"))
    with open_fullres_image(tif) as im:
        slide = write_ome_zarr(np.asarray(im), tmp_path / "s.ome.zarr", mpp=float(image_mpp(tif)), n_levels=2)
    xy = _spots(small_section)
    outs = {}
    for name, bundle in (("int8", int8_bundle), ("fp32", small_bundle)):
        res = run_slides([slide], bundle_dir=bundle, out_dir=tmp_path / name, provider="cpu", progress=False,
                         points_px={str(slide): xy}, min_tissue=0, echo=lambda s: None)[0]
        assert res.status == "ok", res
        outs[name] = np.asarray(ad.read_zarr(res.output).X)
    stats = compare(outs["int8"], outs["fp32"])
    assert stats["nonfinite"] == 0
    assert stats["mean_gene_pcc"] >= quantize.INT8_GATE["gene_pcc_mean"], stats


def _spots(section: Path) -> np.ndarray:
    from hishrst_train.tasks import load_section

    return np.asarray(load_section(str(section)).obsm["spatial"], dtype=np.float64)[::2]


def _corrupt_scales(original: Any) -> Any:
    """A ``quantize_encoder`` whose per-channel weight scales are scrambled (a broken quantisation)."""
    from onnx import numpy_helper

    def broken(fp32: Path, out: Path, calibration: np.ndarray, **kw: Any) -> Path:
        original(fp32, out, calibration, **kw)
        model = onnx.load(str(out))
        rng = np.random.default_rng(0)
        for t in model.graph.initializer:
            if t.name.endswith("_scale") and len(t.dims) == 1 and t.dims[0] > 1:
                a = numpy_helper.to_array(t)
                t.CopyFrom(numpy_helper.from_array((a * rng.uniform(0.1, 10, a.shape)).astype(a.dtype), t.name))
        onnx.save(model, str(out))
        return Path(out)

    return broken


def test_a_broken_quantisation_is_refused_with_the_figures(small_run: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantize, "quantize_encoder", _corrupt_scales(quantize.quantize_encoder))
    out = tmp_path / "b"
    with pytest.raises(quantize.QuantizationGateError, match=r"fails the accuracy gate .*cosine_mean \d\.\d{4} "
                                                             r"\(≥ 0\.99\).*gene_pcc_min .*nothing was written") as e:
        export_bundle(small_run, out=out, precision="int8", **QUIET)
    assert isinstance(e.value, ExportError) and "\n" not in str(e.value)
    assert not out.exists() and _siblings(out) == []


def test_failed_gate_via_the_cli_is_one_line_and_writes_nothing(small_run: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(quantize.INT8_GATE, "cosine_min", 1.5)  # unreachable
    out = tmp_path / "b"
    res = CliRunner().invoke(export_cmd, [str(small_run), "--out", str(out), "--precision", "int8"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1 and "cosine_min" in errors[0] and "(≥ 1.5)" in errors[0] and "failed: cosine_min" in errors[0]
    assert not out.exists() and _siblings(out) == []


def test_int8_with_tensorrt_is_refused_before_anything(small_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    with pytest.raises(ExportError, match=r"--precision int8 --tensorrt: TensorRT engines are built in fp32, fp16 only"):
        export_bundle(small_run, out=out, precision="int8", tensorrt=True, **QUIET)
    res = CliRunner().invoke(export_cmd, [str(small_run), "--out", str(out), "--precision", "int8", "--tensorrt"])
    assert res.exit_code != 0 and "TensorRT engines are built in" in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_int8_without_readable_training_tiles_is_refused(small_run: Path, tmp_path: Path) -> None:
    run = shutil.copytree(small_run, tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    for sec in cfg["sections"]:
        sec["data"] = str(tmp_path / "gone" / "outs")
    cfg["data"] = str(tmp_path / "gone" / "outs")
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=r"--precision int8: no calibration tiles: cannot read .*pass the training "
                                          r"section with --data"):
        export_bundle(run, out=tmp_path / "b", precision="int8", **QUIET)
    assert not (tmp_path / "b").exists()


def test_embedding_cosine() -> None:
    a = np.array([[1.0, 0.0], [1.0, 1.0], [np.nan, 1.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 1.0]])
    np.testing.assert_allclose(quantize.embedding_cosine(a, b), [1.0, -1.0, 0.0])
