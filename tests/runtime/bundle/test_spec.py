"""hishrst_runtime.bundle.spec: position modes and the typed view's value checks (no onnx needed, except
for the one end-to-end load)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, get_args

import pytest

from hishrst_runtime.bundle.manifest import SCHEMA_NAME, load_bundle, upgrade_manifest, write_manifest
from hishrst_runtime.bundle.spec import (
    POSITION_MODES,
    UM_POSITION_MODES,
    BundleError,
    PositionMode,
    build_spec,
)
from hishrst_runtime.core.errors import InputError
from tests.runtime.conftest import tiny_manifest


def _manifest(**position: Any) -> dict[str, Any]:
    m = {"schema": SCHEMA_NAME, "schema_version": 1, **tiny_manifest()}
    m["position"] = position
    return m


def test_position_modes() -> None:
    assert POSITION_MODES == get_args(PositionMode) and set(POSITION_MODES) == {"continuous", "grid", "relative", "none"}
    assert set(UM_POSITION_MODES) == set(POSITION_MODES) - {"grid"}


@pytest.mark.parametrize("mode, units, feeds_um", [
    ("continuous", "um", True), ("relative", "um", True), ("none", "um", True), ("grid", "array", False),
])
def test_every_mode_builds_with_its_default_units(mode: str, units: str, feeds_um: bool) -> None:
    pos = build_spec(_manifest(mode=mode)).position
    assert (pos.mode, pos.units, pos.feeds_um) == (mode, units, feeds_um)
    assert pos.pos_n_freqs is None and pos.min_wavelength_um is None


def test_position_fields_are_read() -> None:
    pos = build_spec(_manifest(mode="relative", units="um", pos_n_freqs=16, min_wavelength_um=25,
                               max_wavelength_um=2000.0, rel_min_wavelength_um=25.0)).position  # unknown keys ignored
    assert (pos.pos_n_freqs, pos.min_wavelength_um, pos.max_wavelength_um) == (16, 25.0, 2000.0)


@pytest.mark.parametrize("mode", ["polar", "Continuous", "", 3, None])
def test_unknown_mode_names_the_manifest_and_the_choices(mode: Any) -> None:
    with pytest.raises(BundleError) as info:
        build_spec(_manifest(mode=mode), path="/b/manifest.json")
    msg = str(info.value)
    assert isinstance(info.value, InputError) and "\n" not in msg
    assert msg.startswith("/b/manifest.json: position.mode")
    if isinstance(mode, str) and mode:
        assert ", ".join(POSITION_MODES) in msg


@pytest.mark.parametrize("field, value", [
    ("pos_n_freqs", -1), ("pos_n_freqs", 2.5), ("min_wavelength_um", 0), ("max_wavelength_um", math.nan),
    ("max_wavelength_um", "far"),
])
def test_bad_position_values_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(BundleError, match=rf"manifest\.json: position\.{field} must be"):
        build_spec(_manifest(mode="continuous", **{field: value}))


def test_older_manifests_keep_loading() -> None:
    """A pre-release (schema 0) manifest with a continuous (or grid) position section still builds."""
    for mode in ("continuous", "grid"):
        m = _manifest(mode=mode)
        m["schema_version"] = 0
        m["grouping"].pop("coords")
        m["output"].pop("target_sum")
        assert build_spec(upgrade_manifest(m)).position.mode == mode


@pytest.mark.parametrize("mode", ["relative", "none"])
def test_new_modes_load_end_to_end(tiny_bundle: Path, tmp_path: Path, mode: str) -> None:
    pytest.importorskip("onnx", reason="the test bundle is built with onnx.helper")
    root = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    m["position"]["mode"] = mode
    write_manifest(root, m)  # re-sealed: an edit by hand would break the content hash
    spec = load_bundle(root).spec
    assert spec.position.mode == mode and spec.position.feeds_um


def test_pad_value_and_normalisation_defaults() -> None:
    m = _manifest(mode="continuous")
    m["patch"].pop("pad_value")
    m["encoder"]["normalisation"] = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    spec = build_spec(m)
    assert spec.patch.pad_value == 255
    assert spec.encoder.normalisation is not None and spec.encoder.normalisation.scale == pytest.approx(1 / 255)
    assert spec.encoder.normalisation.std == (0.25, 0.25, 0.25)
