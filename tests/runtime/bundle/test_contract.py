"""Load-time checks of a bundle's models against its manifest (hishrst_runtime.bundle.contract via load_bundle).

Each check is exercised on a copy of the session's tiny bundle (``tests/runtime/conftest.py``; never
modified in place) or on a bundle built for the test, and must fail as one :class:`BundleError` (an
``InputError``) whose single-line message names the bundle's file and the offending field. Also the
ONNX reader (:mod:`hishrst_runtime.core.onnx_graph`) on damaged files. Skipped without ``onnx``.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hishrst_runtime.bundle.manifest import load_bundle
from hishrst_runtime.core.onnx_graph import OnnxFormatError, read_onnx_graph
from hishrst_runtime.bundle.spec import BundleError
from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.files import sha256_file

pytest.importorskip("onnx", reason="the test bundles are built with onnx.helper")

Edit = Callable[[dict[str, Any]], None]


def _copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the session bundle (the fixture itself is shared and read-only)."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def _edit(root: Path, fn: Edit) -> None:
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))  # NaN / Infinity are written as JSON's NaN / Infinity extensions


def _rehash(root: Path, key: str) -> None:
    """Record the current hash of ``files[key]`` (so a deliberately changed model passes the hash check)."""
    _edit(root, lambda m: m["files"][key].update(sha256=sha256_file(root / m["files"][key]["path"])))


def _load_error(root: Path, *names: str) -> str:
    """Load ``root``, expecting a one-line BundleError that names each of ``names``; return its message."""
    with pytest.raises(BundleError) as info:
        load_bundle(root)
    msg = str(info.value)
    assert isinstance(info.value, InputError) and isinstance(info.value, ValueError)
    assert "\n" not in msg, msg
    for name in names:
        assert name in msg, f"{name!r} not in {msg!r}"
    assert str(root) in msg, msg  # the path, not just a file name
    return msg


def test_tiny_bundle_passes_the_contract(tiny_bundle: Path) -> None:
    b = load_bundle(tiny_bundle)
    assert b.spec.genes == ("G0", "G1", "G2") and b.spec.encoder.input_size == 8


# ------------------------------------------------------------------------------------------ sizes and names


@pytest.mark.parametrize("genes", [["G0", "G1", "G2", "G3"], ["G0", "G1"]])
def test_genes_length_must_match_head_output(tiny_bundle: Path, tmp_path: Path, genes: list[str]) -> None:
    root = _copy(tiny_bundle, tmp_path)
    _edit(root, lambda m: m.update(genes=genes))
    msg = _load_error(root, "manifest.json", "files.head (head.onnx)", f"genes lists {len(genes)} names", "'expression'")
    assert "has 3 in dimension 2" in msg


def test_duplicate_gene_names(tiny_bundle: Path, tmp_path: Path) -> None:
    root = _copy(tiny_bundle, tmp_path)
    _edit(root, lambda m: m.update(genes=["G0", "G1", "G0"]))
    _load_error(root, "manifest.json", "genes", "duplicate names (G0)")


def test_many_duplicates_are_summarised(tmp_path: Path, make_tiny_bundle: Callable[..., Path]) -> None:
    root = make_tiny_bundle(tmp_path / "b", n_genes=14, edit=lambda m: m.update(genes=[f"G{i % 7}" for i in range(14)]))
    _load_error(root, "manifest.json: genes", "(7 in all)")


def test_encoder_input_size_must_match_onnx(tiny_bundle: Path, tmp_path: Path) -> None:
    root = _copy(tiny_bundle, tmp_path)
    _edit(root, lambda m: m["encoder"].update(input_size=16))
    _load_error(root, "manifest.json", "files.encoder (encoder.onnx)", "encoder.input_size is 16 px", "'tiles' has 8")


def test_feature_dim_must_match_onnx(tiny_bundle: Path, tmp_path: Path) -> None:
    root = _copy(tiny_bundle, tmp_path)
    _edit(root, lambda m: m["encoder"].update(feature_dim=5))
    _load_error(root, "manifest.json", "files.encoder (encoder.onnx)", "encoder.feature_dim is 5", "'features' has 4")


def test_matching_non_default_sizes_load(tmp_path: Path, make_tiny_bundle: Callable[..., Path]) -> None:
    b = load_bundle(make_tiny_bundle(tmp_path / "b", input_size=16, feature_dim=6, n_genes=5))
    assert (b.spec.encoder.input_size, b.spec.encoder.feature_dim, len(b.genes)) == (16, 6, 5)


def test_swapped_encoder_and_head_files(tiny_bundle: Path, tmp_path: Path) -> None:
    root = _copy(tiny_bundle, tmp_path)

    def swap(m: dict[str, Any]) -> None:
        m["files"]["encoder"], m["files"]["head"] = m["files"]["head"], m["files"]["encoder"]

    _edit(root, swap)
    msg = _load_error(root, "manifest.json", "files.encoder (head.onnx)", "holds the head graph")
    assert "swapped" in msg


def test_wrong_graph_for_the_role(tiny_bundle: Path, tmp_path: Path) -> None:
    """A model with neither role's tensors (here: the encoder renamed) is named as not a hishrst graph."""
    import onnx

    root = _copy(tiny_bundle, tmp_path)
    model = onnx.load(str(root / "encoder.onnx"))
    model.graph.input[0].name = "image"
    model.graph.node[0].input[0] = "image"
    onnx.save(model, str(root / "encoder.onnx"))
    _rehash(root, "encoder")
    _load_error(root, "manifest.json", "files.encoder (encoder.onnx)", "not a hishrst encoder graph", "'image'")


# ------------------------------------------------------------------------------------------ manifest values


@pytest.mark.parametrize("field", ["size_um", "train_mpp"])
@pytest.mark.parametrize("value", [0, -32.0, math.nan, math.inf, -math.inf, "32", True, None])
def test_patch_size_and_training_mpp_must_be_positive_finite(
    tiny_bundle: Path, tmp_path: Path, field: str, value: Any
) -> None:
    root = _copy(tiny_bundle, tmp_path)
    _edit(root, lambda m: m["patch"].update({field: value}))
    _load_error(root, "manifest.json", f"patch.{field}", "must be a positive finite number")


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["grouping"].update(max_size=math.nan), "grouping.max_size"),
    (lambda m: m["grouping"].update(max_size=math.inf), "grouping.max_size"),
    (lambda m: m["encoder"].update(input_size=8.5), "encoder.input_size"),
    (lambda m: m.update(max_batch=0), "max_batch"),
    (lambda m: m["patch"].update(pad_value=256), "patch.pad_value"),
    (lambda m: m["encoder"]["normalisation"].update(std=["one", 1, 1]), "encoder.normalisation.std"),
    (lambda m: m.update(onnx_opset="seventeen"), "onnx_opset"),
    (lambda m: m["position"].update(mode="polar"), "position.mode"),
])
def test_unusable_values_name_the_field(tiny_bundle: Path, tmp_path: Path, edit: Edit, field: str) -> None:
    root = _copy(tiny_bundle, tmp_path)
    _edit(root, edit)
    _load_error(root, "manifest.json", field)


# ------------------------------------------------------------------------------------------ external data


def test_unlisted_external_data_is_refused(tmp_path: Path, make_tiny_bundle: Callable[..., Path]) -> None:
    root = make_tiny_bundle(tmp_path / "b", external=True, edit=lambda m: m["files"]["encoder"].pop("external_data"))
    assert (root / "encoder.onnx.data").is_file()  # present next to the model, just not listed
    msg = _load_error(root, "manifest.json", "files.encoder (encoder.onnx)", "'encoder.onnx.data'", "external_data")
    assert "does not list" in msg


def test_listed_external_data_loads(tmp_path: Path, make_tiny_bundle: Callable[..., Path]) -> None:
    b = load_bundle(make_tiny_bundle(tmp_path / "b", external=True))
    assert b.external_data("encoder") == [(b.root / "encoder.onnx.data").resolve()]


def test_modified_external_data_fails_its_hash(tmp_path: Path, make_tiny_bundle: Callable[..., Path]) -> None:
    root = make_tiny_bundle(tmp_path / "b", external=True)
    data = root / "encoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF
    data.write_bytes(bytes(raw))
    msg = _load_error(root, "encoder.onnx.data", "files.encoder.external_data[0]", "does not match the manifest")
    assert "SHA-256" in msg
    b = load_bundle(root, verify_hashes=False)  # without hashing, the (same-sized) file passes
    assert b.external_data("encoder") == [data.resolve()] and data.read_bytes() == bytes(raw)


def test_external_data_outside_the_bundle_is_refused(tmp_path: Path, make_tiny_bundle: Callable[..., Path]) -> None:
    import onnx

    root = make_tiny_bundle(tmp_path / "b", external=True, edit=lambda m: m["files"]["encoder"].pop("external_data"))
    shutil.copy(root / "encoder.onnx.data", tmp_path / "outside.data")
    model = onnx.load(str(root / "encoder.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    onnx.save(model, str(root / "encoder.onnx"))
    _rehash(root, "encoder")
    _load_error(root, "manifest.json", "files.encoder (encoder.onnx)", "'../outside.data'", "outside the bundle")


# ------------------------------------------------------------------------------------------ damaged models


@pytest.mark.parametrize("content", [b"", b"this is not an ONNX model\n" * 4, b"\x3a\xff\xff\xff\xff\x0f"])
def test_damaged_model_is_named(tiny_bundle: Path, tmp_path: Path, content: bytes) -> None:
    root = _copy(tiny_bundle, tmp_path)
    (root / "head.onnx").write_bytes(content)
    _rehash(root, "head")
    with pytest.raises(BundleError) as info:
        load_bundle(root)
    assert isinstance(info.value.__cause__, OnnxFormatError)  # chained with `from e`
    msg = str(info.value)
    assert "\n" not in msg and "files.head (head.onnx)" in msg and "is not a valid ONNX model" in msg


def test_truncated_model_is_named(tiny_bundle: Path, tmp_path: Path) -> None:
    root = _copy(tiny_bundle, tmp_path)
    raw = (root / "encoder.onnx").read_bytes()
    (root / "encoder.onnx").write_bytes(raw[: len(raw) // 2])
    _rehash(root, "encoder")
    _load_error(root, "files.encoder (encoder.onnx)", "is not a valid ONNX model")


def test_read_onnx_graph_reads_the_tiny_models(tiny_bundle: Path, tmp_path: Path,
                                               make_tiny_bundle: Callable[..., Path]) -> None:
    enc = read_onnx_graph(tiny_bundle / "encoder.onnx")
    assert [(t.name, t.elem_type, t.shape) for t in enc.inputs] == [("tiles", 2, (None, 8, 8, 3))]
    assert enc.output("features") is not None and enc.output("features").shape == (None, 4)  # type: ignore[union-attr]
    assert enc.external_data == () and enc.input("nope") is None
    head = read_onnx_graph(tiny_bundle / "head.onnx")
    assert [t.name for t in head.inputs] == ["features", "positions", "mask"]  # initializers are not inputs
    ext = read_onnx_graph(make_tiny_bundle(tmp_path / "b", external=True) / "encoder.onnx")
    assert ext.external_data == ("encoder.onnx.data",)


@pytest.mark.parametrize("content, match", [
    (b"", "empty"),
    (b"this is not an ONNX model", "wire type|past the end|varint|no graph"),
    (b"\x08\x08", "no graph"),  # a valid ModelProto field (ir_version 8) but no graph
    (b"\x3a\x80\x80", "varint"),  # graph field whose length varint is cut off
    (b"\x3a\x7f\x00", "past the end"),  # graph field claiming 127 bytes with 1 present
])
def test_read_onnx_graph_on_garbage(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(OnnxFormatError, match=match) as info:
        read_onnx_graph(path)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_read_onnx_graph_on_every_truncation(tiny_bundle: Path, tmp_path: Path) -> None:
    """Every prefix of a model either parses or raises OnnxFormatError — never IndexError & co.; cuts
    inside the graph (the bulk of the file) always raise."""
    raw = (tiny_bundle / "head.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    failures = 0
    for n in range(len(raw)):
        path.write_bytes(raw[:n])
        try:
            read_onnx_graph(path)
        except OnnxFormatError:
            failures += 1
    assert failures >= len(raw) * 3 // 4
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(OnnxFormatError):
        read_onnx_graph(path)


def test_read_onnx_graph_missing_file_is_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_onnx_graph(tmp_path / "nope.onnx")
