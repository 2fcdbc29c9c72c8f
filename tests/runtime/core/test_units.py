"""The one pixel-size parser and unit table (hishrst_runtime.core.units), and the grid-size bound it protects."""

from __future__ import annotations

import pytest

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.geometry import query_grid
from hishrst_runtime.core.units import (
    DEFAULT_MPP_RANGE,
    PixelSizeError,
    aperio_mpp,
    check_mpp,
    is_plausible_mpp,
    json_description_mpp,
    mpp_range,
    ome_physical_size_um,
    tiff_resolution_mpp,
    unit_to_um,
)


@pytest.mark.parametrize(("unit", "factor"), [
    ("micrometer", 1.0), ("µm", 1.0), ("μm", 1.0), ("um", 1.0), ("Micrometer", 1.0), ("micron", 1.0),
    ("nanometer", 1e-3), ("nm", 1e-3), ("millimeter", 1e3), ("mm", 1e3), ("centimeter", 1e4), ("cm", 1e4),
    ("inch", 25400.0), ("meter", 1e6), ("angstrom", 1e-4), ("Å", 1e-4),
])
def test_unit_table(unit: str, factor: float) -> None:
    assert unit_to_um(unit) == pytest.approx(factor)


def test_unknown_units_are_none() -> None:
    assert unit_to_um("parsec") is None and unit_to_um(None) is None and unit_to_um("") is None


def test_check_mpp_names_source_and_problem() -> None:
    assert check_mpp(0.5, where="s.zarr", source="--mpp", fix="f") == 0.5
    for value, word in ((0.0, "zero"), (-1.0, "negative"), (float("nan"), "not finite")):
        with pytest.raises(PixelSizeError, match=f"s.zarr: --mpp .* is {word}"):
            check_mpp(value, where="s.zarr", source="--mpp", fix="f")
    for value in (1e-6, 1e6, 0.049, 50.1):
        with pytest.raises(PixelSizeError, match="s.zarr: --mpp .* implausible pixel size.*HISHRST_MPP_RANGE") as ei:
            check_mpp(value, where="s.zarr", source="--mpp", fix="pass e.g. --mpp 0.5")
        assert "\n" not in str(ei.value) and isinstance(ei.value, InputError) and isinstance(ei.value, ValueError)
    assert check_mpp(1e-3, where="x", source="--mpp", fix="f", bounds=(1e-4, 1.0)) == 1e-3


def test_mpp_range_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    assert mpp_range() == DEFAULT_MPP_RANGE == (0.05, 50.0)
    monkeypatch.setenv("HISHRST_MPP_RANGE", "0.001,1000")
    assert mpp_range() == (0.001, 1000.0)
    assert is_plausible_mpp(500.0) and check_mpp(1e-2, where="x", source="--mpp", fix="f") == 1e-2
    monkeypatch.setenv("HISHRST_MPP_RANGE", "lots")
    with pytest.raises(PixelSizeError, match="HISHRST_MPP_RANGE='lots'"):
        mpp_range()
    with pytest.raises(PixelSizeError, match="LO < HI"):
        mpp_range((5.0, 1.0))


def test_ome_aperio_and_json_parsers() -> None:
    ome = ('<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image><Pixels PhysicalSizeX="300" '
           'PhysicalSizeXUnit="nm" PhysicalSizeY="0.3"/></Image></OME>')
    assert ome_physical_size_um(ome) == pytest.approx(0.3)
    assert ome_physical_size_um("<broken") is None
    assert ome_physical_size_um('<OME><Pixels PhysicalSizeX="-1"/></OME>') is None
    assert aperio_mpp("Aperio Image Library v10 |AppMag = 20|MPP = 0.499|Left = 25") == pytest.approx(0.499)
    assert aperio_mpp("Aperio |MPP = -2") is None and aperio_mpp("") is None
    assert json_description_mpp('{"mpp": 0.74, "generator": "x"}') == pytest.approx(0.74)
    assert json_description_mpp("not json") is None and json_description_mpp("[1]") is None


@pytest.mark.parametrize(("xres", "yres", "unit", "expected"), [
    ((40000, 1), (40000, 1), 3, 0.25),  # centimetre
    ((50800, 1), None, 2, 0.5),  # inch, y defaults to x
    ((40000, 1), (40000, 1), None, None),  # missing ResolutionUnit: no pixel size (one documented rule)
    ((40000, 1), (40000, 1), 1, None),  # "no absolute unit"
    ((0, 1), (0, 1), 3, None),
    (None, None, 3, None),
])
def test_tiff_resolution(xres: object, yres: object, unit: object, expected: float | None) -> None:
    got = tiff_resolution_mpp(xres, yres, unit)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_query_grid_refuses_huge_grids_before_allocating() -> None:
    assert len(query_grid(0, 0, 1000, 1000, pitch_um=100)) > 0
    # a 1e-6 µm/px slide mistaken for 1e6 µm/px: a 100k px slide is 1e11 µm wide
    with pytest.raises(InputError, match="more than the limit of 50,000,000.*--mpp") as ei:
        query_grid(0, 0, 1e11, 1e11, pitch_um=100)
    assert "\n" not in str(ei.value)
    with pytest.raises(InputError, match="limit of 10"):
        query_grid(0, 0, 1000, 1000, pitch_um=100, max_points=10)
