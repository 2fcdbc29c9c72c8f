"""hishrst export: ONNX graphs, parity with PyTorch, bundle manifest, failures and the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from click.testing import CliRunner
from hishrst_export import onnx_export
from hishrst_export.bundle import ExportError, export_bundle
from hishrst_export.cli import export as export_cmd
from hishrst_export.onnx_export import PARITY_TOLERANCE, ParityError
from hishrst_export.parity import compare

from hishrst_runtime.bundle.manifest import SCHEMA_VERSION, BundleError, load_bundle
from hishrst_runtime.core.owned import ForeignOutputError

QUIET = {"echo": lambda s: None}


def _snapshot(root: Path) -> dict[str, str]:
    """Relative path → SHA-256 of every file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


def _session(path: Path) -> Any:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _check(got: np.ndarray, want: np.ndarray, precision: str = "fp32") -> dict[str, float]:
    stats = compare(got, want)
    tol = PARITY_TOLERANCE[precision]
    assert stats["scaled_max_abs"] <= tol["scaled_max_abs"], stats
    assert stats["min_gene_pcc"] >= tol["min_gene_pcc"], stats
    return stats


# ------------------------------------------------------------------------------------- the bundle


def test_bundle_manifest_contents(small_bundle: Path, small_run: Path) -> None:
    b = load_bundle(small_bundle)
    m = b.manifest
    config = json.loads((small_run / "config.json").read_text())
    assert m["schema"] == "hishrst-bundle" and m["schema_version"] == SCHEMA_VERSION
    assert m["hishrst_version"] and m["exporter"]["onnx"] == onnx.__version__
    assert m["encoder"]["name"] == "test-vit" and m["encoder"]["input_size"] == 64 and m["encoder"]["feature_dim"] == 64
    norm = m["encoder"]["normalisation"]
    assert norm["in_graph"] and norm["scale"] == pytest.approx(1 / 255) and len(norm["mean"]) == len(norm["std"]) == 3
    assert m["encoder"]["input"] == {"name": "tiles", "dtype": "uint8", "layout": "NCHW", "channels": "RGB"}
    assert m["patch"]["size_um"] == config["patch"]["size_um"] and m["patch"]["train_mpp"] == config["patch"]["train_mpp"]
    assert m["position"]["mode"] == "relative" and m["position"]["units"] == "um" and "rel_n_freqs" in m["position"]
    assert set(m["position"]["invariant_to"]) == {"translation", "rotation", "reflection"}
    assert m["grouping"]["max_size"] == 50 and m["grouping"]["coords"] == "level0_px"
    assert m["genes"] == config["genes"]
    assert "log1p" in m["output"]["meaning"] and m["output"]["target_sum"] == 1e4
    assert m["onnx_opset"] == 17
    assert not m["license"]["gated"] and m["license"]["redistributable"]
    assert set(m["files"]) == {"encoder", "head"}
    for entry in m["files"].values():
        assert entry["precision"] == "fp32" and len(entry["sha256"]) == 64 and "external_data" not in entry
    assert sorted(p.name for p in small_bundle.iterdir()) == [".hishrst-output.json", "encoder.onnx", "head.onnx",
                                                               "manifest.json"]
    par = m["parity"]
    assert par["precision"] == "fp32" and "spots of" in par["real_tiles"]
    for part in ("encoder", "head"):
        assert set(par[part]) == {"random", "real"}
        for r in par[part].values():
            assert r["passed"] and r["tolerance"] == PARITY_TOLERANCE["fp32"]
            assert r["scaled_max_abs"] <= 1e-4 and r["min_gene_pcc"] >= 0.9999
    assert par["encoder"]["real"]["batch_sizes"] == [1, 7, 64]


def test_onnx_graphs_pass_checker_and_have_the_contracted_io(small_bundle: Path) -> None:
    enc_path, head_path = small_bundle / "encoder.onnx", small_bundle / "head.onnx"
    onnx.checker.check_model(str(enc_path), full_check=True)
    onnx.checker.check_model(str(head_path), full_check=True)
    enc = onnx.load(str(enc_path))
    (inp,), (outp,) = enc.graph.input, enc.graph.output
    assert inp.name == "tiles" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 64]  # dynamic batch, fixed size, NCHW
    assert outp.name == "features" and outp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ops = {n.op_type for n in enc.graph.node}
    assert {"Softmax", "MatMul", "LayerNormalization"} <= ops  # plain attention, no fused SDPA
    assert all(n.domain in ("", "ai.onnx") for n in enc.graph.node)
    head = onnx.load(str(head_path))
    assert [i.name for i in head.graph.input] == ["features", "positions", "mask"]
    for vi in (*head.graph.input, *head.graph.output):
        d = vi.type.tensor_type.shape.dim
        assert d[0].dim_param and d[1].dim_param  # dynamic G and N


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_ort_matches_pytorch_at_batch_sizes(small_bundle: Path, small_run: Path, batch: int) -> None:
    from hishrst_train.encoders import load_encoder
    from hishrst_train.train import load_checkpoint

    rng = np.random.default_rng(batch)
    encoder = load_encoder("test-vit")
    tiles = rng.integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)
    got = _session(small_bundle / "encoder.onnx").run(None, {"tiles": np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))})[0]
    with torch.no_grad():
        want = encoder(torch.from_numpy(tiles)).numpy()
    assert got.shape == (batch, 64)
    assert np.abs(got - want).max() <= PARITY_TOLERANCE["fp32"]["scaled_max_abs"] * max(1.0, np.abs(want).max())
    if batch > 2:
        _check(got, want)

    model, config = load_checkpoint(small_run)
    n = {1: 50, 7: 13, 64: 3}[batch]  # G groups of n points, the last group partly padded
    feats = rng.standard_normal((batch, n, 64)).astype(np.float32)
    pos = (rng.random((batch, n, 2)) * 3000).astype(np.float32)
    mask = np.ones((batch, n), np.float32)
    mask[-1, n // 2 + 1:] = 0
    got = _session(small_bundle / "head.onnx").run(None, {"features": feats, "positions": pos, "mask": mask})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(feats), torch.from_numpy(pos), torch.from_numpy(mask)).numpy()
    assert got.shape == (batch, n, len(config["genes"]))
    valid = mask > 0
    _check(got[valid], want[valid])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _edit(root: Path, fn: Any) -> None:
    m = json.loads((root / "manifest.json").read_text())
    fn(m)
    (root / "manifest.json").write_text(json.dumps(m))


def test_real_bundle_validation_errors(small_bundle: Path, tmp_path: Path) -> None:
    b = _copy(small_bundle, tmp_path / "tampered")
    data = bytearray((b / "head.onnx").read_bytes())
    data[-10] ^= 0xFF
    (b / "head.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"head\.onnx: SHA-256 .* does not match"):
        load_bundle(b)

    b = _copy(small_bundle, tmp_path / "missing")
    (b / "encoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"encoder\.onnx: listed in the manifest as files\.encoder but missing"):
        load_bundle(b)

    for i, bad in enumerate(["../head.onnx", str((small_bundle / "head.onnx").resolve())]):
        b = _copy(small_bundle, tmp_path / f"path{i}")
        _edit(b, lambda m, bad=bad: m["files"]["head"].update(path=bad))
        with pytest.raises(BundleError, match=r"manifest\.json: files\.head\.path = .* points outside the bundle"):
            load_bundle(b)

    b = _copy(small_bundle, tmp_path / "symlink")
    (b / "head.onnx").unlink()
    (b / "head.onnx").symlink_to(small_bundle / "head.onnx")  # same bytes, but outside this bundle
    with pytest.raises(BundleError, match=r"manifest\.json: files\.head\.path = 'head\.onnx' resolves to .* outside"):
        load_bundle(b)

    b = _copy(small_bundle, tmp_path / "future")
    _edit(b, lambda m: m.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(BundleError, match=rf"manifest\.json: schema_version {SCHEMA_VERSION + 1} was written by a newer hishrst"):
        load_bundle(b)


# ------------------------------------------------------------------------------------- exports


def test_fp16_gated_export_via_cli(small_run: Path, small_bundle: Path, small_section: Path, tmp_path: Path) -> None:
    """fp16 through the CLI, with the run marked as using a gated encoder and its section moved (--data)."""
    run = _copy(small_run, tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    cfg["encoder"].update(gated=True, license="CC-BY-NC-ND-4.0")
    cfg["data"] = str(tmp_path / "moved" / "outs")
    (run / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "bundle16"
    res = CliRunner().invoke(export_cmd, [str(run), "--out", str(out), "--precision", "fp16", "--data", str(small_section)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    text = res.output
    assert "NOTICE (CC-BY-NC-ND-4.0)" in text and "LICENCE" in text and "redistribution" in text
    assert "parity (fp16" in text and "fp16 accuracy cost vs PyTorch fp32" in text
    for part, label in (("encoder", "random"), ("encoder", "real"), ("head", "random"), ("head", "real")):
        assert any(line.split()[:2] == [part, label] and "max|Δ|" in line and "min PCC" in line for line in text.splitlines())
    m = load_bundle(out).manifest
    assert m["license"] == {"gated": True, "redistributable": False, "notice": m["license"]["notice"]}
    assert m["encoder"]["gated"] and "CC-BY-NC-ND" in m["license"]["notice"]
    assert {f["precision"] for f in m["files"].values()} == {"fp16"}
    assert (out / "encoder.onnx").stat().st_size < 0.7 * (small_bundle / "encoder.onnx").stat().st_size  # fp16 weights
    tol = PARITY_TOLERANCE["fp16"]
    for part in ("encoder", "head"):
        for r in m["parity"][part].values():
            assert r["passed"] and r["tolerance"] == tol
            assert r["scaled_max_abs"] <= tol["scaled_max_abs"] and r["min_gene_pcc"] >= tol["min_gene_pcc"]
            assert r["scaled_max_abs"] > 1e-6  # it really is half precision
    fp16_inits = [t for t in onnx.load(str(out / "head.onnx")).graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert fp16_inits


def test_existing_out_without_overwrite_errors(small_run: Path, small_bundle: Path, tmp_path: Path) -> None:
    out = _copy(small_bundle, tmp_path / "bundle")
    before = _snapshot(out)
    res = CliRunner().invoke(export_cmd, [str(small_run), "--out", str(out)])
    assert res.exit_code != 0 and "already holds a hishrst model bundle" in res.output and "--overwrite" in res.output
    assert _snapshot(out) == before
    other = tmp_path / "not_a_bundle"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ForeignOutputError, match="is not a hishrst model bundle written by hishrst"):
        export_bundle(small_run, out=other, overwrite=True, **QUIET)
    assert (other / "precious.txt").read_text() == "keep me"


def test_tensorrt_unavailable_fails_cleanly(small_run: Path, small_bundle: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # "not installed", whatever this machine has
    out = _copy(small_bundle, tmp_path / "bundle")
    before = _snapshot(out)
    for extra in ([], ["--overwrite"]):
        res = CliRunner().invoke(export_cmd, [str(small_run), "--out", str(out), "--tensorrt", *extra])
        assert res.exit_code != 0
        assert "--tensorrt" in res.output and "TensorRT" in res.output and "Nothing was written" in res.output
        assert _snapshot(out) == before
        assert _siblings(out) == []
    res = CliRunner().invoke(export_cmd, [str(small_run), "--out", str(tmp_path / "new"), "--tensorrt"])
    assert res.exit_code != 0 and not (tmp_path / "new").exists()


def _corrupt_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make export_encoder_onnx write a model whose largest weight is scaled by 1.5 (a broken export)."""
    original = onnx_export.export_encoder_onnx

    def broken(encoder: Any, out_path: Any, **kw: Any) -> Path:
        path = original(encoder, out_path, **kw)
        model = onnx.load(str(path))
        t = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        arr = onnx.numpy_helper.to_array(t) * 1.5
        t.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), t.name))
        onnx.save(model, str(path))
        return path

    monkeypatch.setattr(onnx_export, "export_encoder_onnx", broken)


def test_broken_export_fails_parity_and_writes_nothing(small_run: Path, small_bundle: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _corrupt_encoder(monkeypatch)
    out = tmp_path / "fresh"
    with pytest.raises(ParityError, match=r"encoder\.onnx \(random tiles\): ONNX Runtime disagrees with PyTorch"):
        export_bundle(small_run, out=out, **QUIET)
    assert not out.exists() and _siblings(out) == []
    # through the CLI, over an existing bundle with --overwrite: non-zero exit, the old bundle survives
    existing = _copy(small_bundle, tmp_path / "existing")
    before = _snapshot(existing)
    res = CliRunner().invoke(export_cmd, [str(small_run), "--out", str(existing), "--overwrite"])
    assert res.exit_code != 0 and "parity check failed, no bundle written" in res.output
    assert _snapshot(existing) == before and _siblings(existing) == []


def test_external_data_is_listed_hashed_and_verified(small_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a 0-byte threshold every model takes the > 2 GB path: one .onnx.data per model, in the manifest."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    run = _copy(small_run, tmp_path / "run")  # also: the training section has moved away
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"] = str(tmp_path / "moved" / "outs")
    (run / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "ext"
    notes: list[str] = []
    m = export_bundle(run, out=out, echo=notes.append)
    assert any("real-tile parity check skipped" in n and "--data" in n for n in notes)
    assert set(m["parity"]["encoder"]) == set(m["parity"]["head"]) == {"random"}
    assert m["parity"]["real_tiles"].startswith("unavailable")
    assert sorted(p.name for p in out.iterdir()) == [".hishrst-output.json",
        "encoder.onnx", "encoder.onnx.data", "head.onnx", "head.onnx.data", "manifest.json"]
    for key in ("encoder", "head"):
        (ext,) = m["files"][key]["external_data"]
        assert ext["path"] == f"{key}.onnx.data" and ext["sha256"] == hashlib.sha256((out / ext["path"]).read_bytes()).hexdigest()
        assert (out / ext["path"]).stat().st_size > (out / f"{key}.onnx").stat().st_size
    b = load_bundle(out)
    assert b.external_data("encoder") == [(out / "encoder.onnx.data").resolve()]
    with open(out / "encoder.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    with pytest.raises(BundleError, match=r"encoder\.onnx\.data: SHA-256 .* files\.encoder\.external_data\[0\]"):
        load_bundle(out)
    (out / "head.onnx.data").unlink()
    with pytest.raises(BundleError, match=r"head\.onnx\.data: listed in the manifest"):
        load_bundle(out, verify_hashes=False)


def test_both_tile_layouts_compute_the_same_features(small_run: Path, small_bundle: Path, tmp_path: Path) -> None:
    """NCHW is the default (the graph takes ``[B, 3, S, S]``); ``--tile-layout NHWC`` takes ``[B, S, S, 3]``: the
    manifest says which, parity passed, and both compute the same features on the same tiles (int8's calibration and
    gate feed each graph in its own layout); the CLI passes the option through."""
    out = tmp_path / "nhwc"
    result = CliRunner().invoke(export_cmd, [str(small_run), "--out", str(out), "--tile-layout", "NHWC"])
    assert result.exit_code == 0, result.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["encoder"]["input"]["layout"] == "NHWC" and m["parity"]["encoder"]["random"]["passed"]
    assert load_bundle(out).spec.encoder.layout == "NHWC" and load_bundle(small_bundle).spec.encoder.layout == "NCHW"
    dims = [d.dim_value or d.dim_param for d in onnx.load(str(out / "encoder.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [64, 64, 3]
    tiles = np.random.default_rng(3).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    want = _session(out / "encoder.onnx").run(None, {"tiles": tiles})[0]
    got = _session(small_bundle / "encoder.onnx").run(None, {"tiles": np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    from hishrst_export import quantize
    from hishrst_runtime.core.onnx_graph import graph_tile_layout

    for bundle in (out, small_bundle):
        assert graph_tile_layout(bundle / "encoder.onnx") == load_bundle(bundle).spec.encoder.layout
        np.testing.assert_allclose(quantize._features(bundle / "encoder.onnx", tiles), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ExportError, match="tile-layout"):
        export_bundle(small_run, out=tmp_path / "x", tile_layout="CHWN", **QUIET)  # type: ignore[arg-type]


def test_export_rejects_bad_arguments(small_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="precision"):
        export_bundle(small_run, out=tmp_path / "x", precision="int4", **QUIET)  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="max-batch"):
        export_bundle(small_run, out=tmp_path / "x", max_batch=0, **QUIET)
    with pytest.raises(ExportError, match="not a finished `hishrst fit` run"):
        export_bundle(tmp_path / "run", out=tmp_path / "x", **QUIET)
    assert not (tmp_path / "x").exists()


def test_weights_that_differ_from_the_run_are_refused(small_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from hishrst_train.encoders import load_encoder

    sd = {k: v.clone().contiguous() for k, v in load_encoder("test-vit").backbone.state_dict().items()}
    sd["cls_token"] += 0.5
    save_file(sd, str(tmp_path / "other.safetensors"))
    with pytest.raises(ExportError, match=r"config\.json: the encoder weights differ from those the run was trained with"):
        export_bundle(small_run, out=tmp_path / "x", weights=tmp_path / "other.safetensors", **QUIET)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------- ONNX helpers


def _tiny_model() -> Any:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 256)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((256, 4)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_resave_consolidates_per_tensor_external_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The TorchScript exporter writes > 2 GiB models as one file per tensor; the bundle gets one .data file."""
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    onnx.save_model(_tiny_model(), str(raw_dir / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert sorted(p.name for p in raw_dir.iterdir()) == ["m.onnx", "w1", "w2"]
    x = np.ones((3, 8), np.float32)
    want = _session(raw_dir / "m.onnx").run(None, {"x": x})[0]

    out = tmp_path / "out"
    out.mkdir()
    onnx_export._resave(raw_dir / "m.onnx", out / "m.onnx")  # small: inline
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx"] and onnx_export.external_data_files(out / "m.onnx") == []
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1000)  # now "large" (12 kB of weights)
    onnx_export._resave(raw_dir / "m.onnx", out / "m.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert onnx_export.external_data_files(out / "m.onnx") == ["m.onnx.data"]
    onnx.checker.check_model(str(out / "m.onnx"))
    np.testing.assert_array_equal(_session(out / "m.onnx").run(None, {"x": x})[0], want)
    onnx_export._save(onnx.load(str(out / "m.onnx")), out / "m.onnx")  # re-save: the stale .data is replaced
    assert (out / "m.onnx.data").stat().st_size == 4 * (8 * 256 + 256 * 4)


def test_torch_export_leaves_only_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    with torch.no_grad():
        onnx_export._torch_export(module, (torch.randn(2, 8),), tmp_path / "m.onnx", input_names=["x"],
                                  output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset=17)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # scratch folder removed
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(_session(tmp_path / "m.onnx").run(None, {"x": x})[0],
                                   module(torch.from_numpy(x)).numpy(), atol=1e-5)


def test_toposort_restores_a_valid_order() -> None:
    model = _tiny_model()
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    onnx_export._toposort(model.graph)
    onnx.checker.check_model(model)
    assert [n.name for n in model.graph.node] == ["mm1", "relu", "mm2"]


def test_fp16_blocklist_that_matches_nothing_is_an_error(tmp_path: Path) -> None:
    onnx.save(_tiny_model(), str(tmp_path / "m.onnx"))
    with pytest.raises(RuntimeError, match=r"fp32 blocklist entries \['/nope'\] match no node"):
        onnx_export._to_fp16(tmp_path / "m.onnx", keep_fp32_nodes=("/nope",))
