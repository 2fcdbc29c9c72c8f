"""Sub-spot bundles (issue #17): ``head.kind`` and ``tokens`` in the manifest, their models' contract at load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hishrst_runtime.bundle.manifest import SCHEMA_NAME, load_bundle
from hishrst_runtime.bundle.spec import BundleError, build_spec
from hishrst_runtime.core.tokens import TokenGeometry
from tests.runtime.conftest import tiny_encoder_model, tiny_manifest
from tests.runtime.subspot_bundle import build_subspot_bundle, subspot_encoder_model, subspot_head_model

pytest.importorskip("onnx")


def test_a_subspot_bundle_loads_with_its_geometry(tmp_path: Path) -> None:
    spec = load_bundle(build_subspot_bundle(tmp_path / "b")).spec
    assert spec.head_kind == "subspot" and spec.subspot
    assert spec.tokens == TokenGeometry(grid=(8, 8), input_size=32, pitch_um=8.0, margin=2)
    assert spec.patch.size_um == spec.tokens.tile_um == 64.0 and spec.token_width is None


def test_bundles_without_a_head_kind_are_spot_bundles(tiny_bundle: Path) -> None:
    spec = load_bundle(tiny_bundle).spec
    assert spec.head_kind == "spot" and not spec.subspot and spec.tokens is None
    m = {"schema": SCHEMA_NAME, "schema_version": 1, **tiny_manifest()}
    m["head"] = {"inputs": ["features", "positions", "mask"], "max_group_size": 8}  # what export writes today
    assert build_spec(m).head_kind == "spot"


def _manifest(**changes: Any) -> dict[str, Any]:
    m = {"schema": SCHEMA_NAME, "schema_version": 2, **tiny_manifest(input_size=32, feature_dim=3)}
    m.update(head={"kind": "subspot"}, tokens={"grid": [8, 8], "input_size": 32, "pitch_um": 8.0, "margin": 2})
    m["patch"]["size_um"] = 64.0
    m.update(changes)
    return m


@pytest.mark.parametrize("changes, words", [
    ({"tokens": None}, "tokens is missing"),
    ({"tokens": {"grid": [8, 8]}}, "tokens is not a token geometry"),
    ({"tokens": {"grid": [8, 8], "input_size": 64, "pitch_um": 8.0}}, "tokens.input_size is 64 px"),
    ({"tokens": {"grid": [8, 8], "input_size": 32, "pitch_um": 16.0}}, "patch.size_um is 64.0 µm"),
    ({"head": {"kind": "pixel"}}, "head.kind must be one of spot, subspot"),
])
def test_bad_subspot_manifests_name_the_field(changes: dict[str, Any], words: str) -> None:
    m = _manifest(**changes)
    if m.get("tokens") is None:
        m.pop("tokens")
    with pytest.raises(BundleError, match=words) as info:
        build_spec(m, path="/b/manifest.json")
    assert str(info.value).startswith("/b/manifest.json: ") and "\n" not in str(info.value)


def test_a_spot_encoder_in_a_subspot_bundle_is_named(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="is a spot encoder graph.*head.kind subspot"):
        load_bundle(build_subspot_bundle(tmp_path / "b", models={"encoder": tiny_encoder_model(input_size=32,
                                                                                               feature_dim=3)}))


def test_a_subspot_encoder_in_a_spot_bundle_is_named(tmp_path: Path) -> None:
    def spot(m: dict[str, Any]) -> None:
        m["head"] = {"kind": "spot"}

    with pytest.raises(BundleError, match="is a subspot encoder graph.*head.kind spot"):
        load_bundle(build_subspot_bundle(tmp_path / "b", edit=spot))


def test_the_token_grid_and_genes_are_checked(tmp_path: Path) -> None:
    def grid4(m: dict[str, Any]) -> None:
        m["tokens"].update(grid=[4, 4], margin=1)
        m["patch"]["size_um"] = 32.0

    with pytest.raises(BundleError, match=r"tokens.grid is 4×4 in the manifest, but tensor 'tokens' has 8"):
        load_bundle(build_subspot_bundle(tmp_path / "g", edit=grid4))
    with pytest.raises(BundleError, match="genes lists 5 names in the manifest, but tensor 'expression' has 4"):
        load_bundle(build_subspot_bundle(tmp_path / "n", models={"head": subspot_head_model(n_genes=4)}))


def test_token_widths_must_agree(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="encoder outputs tokens 3 wide but the head takes tokens 2 wide"):
        load_bundle(build_subspot_bundle(tmp_path / "w", models={"head": subspot_head_model(width=2)}))

    def width(m: dict[str, Any]) -> None:
        m["tokens"]["width"] = 4

    with pytest.raises(BundleError, match="tokens.width is 4 in the manifest"):
        load_bundle(build_subspot_bundle(tmp_path / "m", edit=width))


def test_encoder_and_head_swapped(tmp_path: Path) -> None:
    root = build_subspot_bundle(tmp_path / "b")
    m = json.loads((root / "manifest.json").read_text())
    m["files"]["encoder"], m["files"]["head"] = m["files"]["head"], m["files"]["encoder"]
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="swapped"):
        load_bundle(root)


def test_the_token_geometry_is_sealed(tmp_path: Path) -> None:
    root = build_subspot_bundle(tmp_path / "b")
    m = json.loads((root / "manifest.json").read_text())
    m["tokens"]["margin"] = 1  # a different tile stride: every bin moves
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="content hash"):
        load_bundle(root)


def test_models_build_from_the_helpers() -> None:
    assert subspot_encoder_model().graph.output[1].name == "tokens"
