"""hishrst_runtime.bundle.manifest: validation errors, path containment, hashes and schema upgrades (torch-free).

The bundles are the tiny ONNX bundle of ``tests/runtime/conftest.py`` (skipped without ``onnx``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from hishrst_runtime.bundle.manifest import (
    SCHEMA_VERSION,
    SUPPORTED_SCHEMA_VERSIONS,
    Bundle,
    BundleError,
    load_bundle,
    upgrade_manifest,
)
from tests.runtime.conftest import build_tiny_bundle, tiny_manifest


def _base_manifest() -> dict[str, Any]:
    return tiny_manifest(n_genes=2)


def _fake_bundle(root: Path, *, external: bool = False) -> Path:
    """The tiny ONNX bundle (``tests/runtime/conftest.py``), its encoder weights optionally external."""
    pytest.importorskip("onnx", reason="the test bundle is built with onnx.helper")
    return build_tiny_bundle(root, external=external, n_genes=2)


def _tamper(path: Path) -> None:
    """Change a file's bytes while keeping it loadable (an ONNX model gets a doc string)."""
    if path.suffix != ".onnx":
        with open(path, "r+b") as f:
            f.write(b"X")
        return
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    model.doc_string = "tampered"
    onnx.save(model, str(path))


def _edit(root: Path, fn: Any) -> None:
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


@pytest.fixture()
def bundle_dir(tmp_path: Path) -> Path:
    return _fake_bundle(tmp_path / "b", external=True)


def test_valid_bundle_loads(bundle_dir: Path) -> None:
    b = load_bundle(bundle_dir)
    assert isinstance(b, Bundle)
    assert b.manifest["schema_version"] == SCHEMA_VERSION == b.source_schema_version
    assert b.genes == ["G0", "G1"] and b.patch_um == 32.0 and b.train_mpp == 0.5 and b.max_group_size == 8
    assert b.path("encoder") == (bundle_dir / "encoder.onnx").resolve()
    assert b.external_data("encoder") == [(bundle_dir / "encoder.onnx.data").resolve()]
    assert b.external_data("head") == []
    assert len(b.sha256) == 64
    with pytest.raises(BundleError, match="no 'encoder_trt' file"):
        b.path("encoder_trt")


@pytest.mark.parametrize("name", ["encoder.onnx", "head.onnx", "encoder.onnx.data"])
def test_tampered_file_is_named(bundle_dir: Path, name: str) -> None:
    _tamper(bundle_dir / name)
    with pytest.raises(BundleError, match=rf"{name}: SHA-256 .* does not match the manifest"):
        load_bundle(bundle_dir)
    b = load_bundle(bundle_dir, verify_hashes=False)  # presence-only check still passes, on the same files
    files = {b.path("encoder"), b.path("head"), *b.external_data("encoder")}
    assert (bundle_dir / name).resolve() in files and b.genes == ["G0", "G1"]


@pytest.mark.parametrize("name", ["head.onnx", "encoder.onnx.data"])
def test_missing_file_is_named(bundle_dir: Path, name: str) -> None:
    (bundle_dir / name).unlink()
    with pytest.raises(BundleError, match=rf"{name}: listed in the manifest .* but missing"):
        load_bundle(bundle_dir, verify_hashes=False)


@pytest.mark.parametrize("bad", ["../outside.onnx", "sub/../../outside.onnx", "/etc/passwd", "C:/x.onnx", "a\\b.onnx", ""])
def test_paths_leaving_the_bundle_are_refused(bundle_dir: Path, bad: str) -> None:
    _edit(bundle_dir, lambda m: m["files"]["head"].update(path=bad))
    with pytest.raises(BundleError, match=r"manifest\.json: files\.head\.path"):
        load_bundle(bundle_dir)


def test_external_data_path_leaving_the_bundle_is_refused(bundle_dir: Path) -> None:
    _edit(bundle_dir, lambda m: m["files"]["encoder"]["external_data"][0].update(path="../x.data"))
    with pytest.raises(BundleError, match=r"manifest\.json: files\.encoder\.external_data\[0\]\.path = '\.\./x\.data' points outside"):
        load_bundle(bundle_dir)


def test_symlink_escaping_the_bundle_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((bundle_dir / "head.onnx").read_bytes())
    (bundle_dir / "head.onnx").unlink()
    os.symlink(outside, bundle_dir / "head.onnx")
    with pytest.raises(BundleError, match=r"manifest\.json: files\.head\.path = 'head\.onnx' resolves to .*outside the bundle"):
        load_bundle(bundle_dir)


def test_symlink_inside_the_bundle_is_allowed(bundle_dir: Path) -> None:
    (bundle_dir / "models").mkdir()
    (bundle_dir / "head.onnx").rename(bundle_dir / "models" / "head.onnx")
    os.symlink(bundle_dir / "models" / "head.onnx", bundle_dir / "head.onnx")
    b = load_bundle(bundle_dir)  # hashes verified through the link
    assert b.path("head") == (bundle_dir / "models" / "head.onnx").resolve()
    assert b.path("encoder") == (bundle_dir / "encoder.onnx").resolve() and b.genes == ["G0", "G1"]


@pytest.mark.parametrize("version, match", [
    (SCHEMA_VERSION + 98, "written by a newer hishrst"),
    (-1, "is not supported"),
    ("1", "must be an integer"),
    (True, "must be an integer"),
    (None, "must be an integer"),
])
def test_unknown_schema_versions_are_refused(bundle_dir: Path, version: Any, match: str) -> None:
    _edit(bundle_dir, lambda m: m.update(schema_version=version))
    with pytest.raises(BundleError, match=rf"manifest\.json: schema_version .*{match}"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.pop("genes"), "missing required field"),
    (lambda m: m["patch"].pop("train_mpp"), r"patch\.train_mpp"),
    (lambda m: m.update(genes=[]), "non-empty list"),
    (lambda m: m["files"].pop("head"), "at least 'encoder' and 'head'"),
    (lambda m: m["files"]["head"].pop("sha256"), r"files\.head must have"),
    (lambda m: m["files"]["head"].update(sha256="abc"), "64-digit hex"),
    (lambda m: m["files"]["encoder"]["external_data"][0].pop("sha256"), r"external_data\[0\] must have"),
    (lambda m: m["files"]["encoder"].update(external_data="encoder.onnx.data"), "must be a list"),
    (lambda m: m.update(schema="something-else"), "not a hishrst bundle manifest"),
])
def test_malformed_manifests_name_the_manifest(bundle_dir: Path, edit: Any, match: str) -> None:
    _edit(bundle_dir, edit)
    with pytest.raises(BundleError, match=rf"manifest\.json.*{match}"):
        load_bundle(bundle_dir)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a directory"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match=r"manifest\.json: missing"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path)


# ------------------------------------------------------------------------------------------ upgrades


def _as_schema_0(root: Path) -> None:
    """Rewrite a current manifest in the pre-release (schema 0) layout."""

    def down(m: dict[str, Any]) -> None:
        m["schema_version"] = 0
        m["grouping"].pop("coords")
        m["output"].pop("target_sum")
        for entry in m["files"].values():
            if "external_data" in entry:
                entry["external_data_sha256"] = [x["sha256"] for x in entry["external_data"]]
                entry["external_data"] = [x["path"] for x in entry["external_data"]]

    _edit(root, down)


def test_schema_0_is_upgraded_in_memory(bundle_dir: Path) -> None:
    assert 0 in SUPPORTED_SCHEMA_VERSIONS
    _as_schema_0(bundle_dir)
    on_disk = (bundle_dir / "manifest.json").read_text()
    b = load_bundle(bundle_dir)
    assert b.source_schema_version == 0
    assert b.manifest["schema_version"] == SCHEMA_VERSION
    assert b.manifest["grouping"]["coords"] == "level0_px"
    assert b.manifest["output"]["target_sum"] == 1e4
    assert b.manifest["files"]["encoder"]["external_data"][0]["path"] == "encoder.onnx.data"
    assert "external_data_sha256" not in b.manifest["files"]["encoder"]
    assert (bundle_dir / "manifest.json").read_text() == on_disk  # upgrades never rewrite the file


def test_schema_0_external_data_hashes_are_still_verified(bundle_dir: Path) -> None:
    _as_schema_0(bundle_dir)
    (bundle_dir / "encoder.onnx.data").write_bytes(b"\1" * 1000)
    with pytest.raises(BundleError, match=r"encoder\.onnx\.data: SHA-256"):
        load_bundle(bundle_dir)


def test_schema_0_with_inconsistent_lists_fails_clearly(bundle_dir: Path) -> None:
    _as_schema_0(bundle_dir)
    _edit(bundle_dir, lambda m: m["files"]["encoder"].update(external_data_sha256=[]))
    with pytest.raises(BundleError, match=r"manifest\.json: cannot upgrade schema 0 → 1: .*different lengths"):
        load_bundle(bundle_dir)


def test_upgrade_manifest_does_not_mutate_its_input() -> None:
    m = {"schema": "hishrst-bundle", "schema_version": 0, **_base_manifest()}
    m["grouping"].pop("coords")
    before = json.dumps(m, sort_keys=True)
    up = upgrade_manifest(m)
    assert json.dumps(m, sort_keys=True) == before
    assert up["schema_version"] == SCHEMA_VERSION and up["grouping"]["coords"] == "level0_px"
