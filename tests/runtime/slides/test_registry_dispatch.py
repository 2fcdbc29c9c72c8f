"""Dispatch through the slide-format registry, the ``BoxSource`` extension point and the one pixel-size resolver:
a format registered here (one module-level opener, one :func:`register_format`) is opened by ``open_slide``
with every option, builds plain ``Level`` s over its own box source, and decides its pixel size with
:func:`~hishrst_runtime.core.units.resolve_mpp`; OpenSlide goes the same way (a fake ``openslide`` module)."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hishrst_runtime.core.units import MppCandidate, PixelSizeError, check_mpp_option, resolve_mpp
from hishrst_runtime.slides import formats
from hishrst_runtime.slides.boxes import BoxSource
from hishrst_runtime.slides.errors import SlideError, SlidePixelSizeError
from hishrst_runtime.slides.level import Level
from hishrst_runtime.slides.reader import open_slide
from hishrst_runtime.slides.slide import Slide
from hishrst_runtime.slides.sources import parse_source

CALLS: list[dict[str, Any]] = []


class _Gradient:
    """A box source: pixel (y, x) = (y % 256, x % 256, 7)."""

    def read_box(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        y, x = np.mgrid[y0:y1, x0:x1]
        return np.stack([y % 256, x % 256, np.full_like(y, 7)], axis=-1).astype(np.uint8)


def open_fake(location: str, *, mpp: float | None, mpp_range: tuple[float, float] | None,
              allow_missing_chunks: bool) -> Slide:
    CALLS.append({"location": location, "mpp": mpp, "mpp_range": mpp_range, "allow": allow_missing_chunks})
    (my, mx), origin = resolve_mpp(location, override=mpp, candidates=[MppCandidate(0.25, "the fake header")],
                                   bounds=mpp_range, error=SlidePixelSizeError)
    lv = Level(index=0, mpp=0.5 * (my + mx), mpp_yx=(my, mx), downsample=1.0, shape=(300, 400), chunks=(128, 128),
               path="level 0", source=_Gradient(), store=location)
    return Slide(location, [lv], mpp_source="override" if origin == "override" else "metadata", kind="fake",
                 allow_missing_chunks=allow_missing_chunks)


@pytest.fixture
def fake_format() -> Any:
    fmt = formats.register_format(formats.SlideFormat(
        "fake", (".fakeslide",), f"{__name__}:open_fake", sniff=lambda p: p.read_bytes()[:4] == b"FAKE"))
    CALLS.clear()
    yield fmt
    formats._REGISTRY.pop("fake")


def test_a_registered_format_is_opened_with_every_option(tmp_path: Path, fake_format: Any) -> None:
    f = tmp_path / "a.fakeslide"
    f.write_bytes(b"FAKE slide")
    assert parse_source(f).kind == "fake" and parse_source(f).format is fake_format
    with open_slide(f, mpp=0.5, mpp_range=(0.1, 1.0), allow_missing_chunks=True) as s:
        assert CALLS == [{"location": str(f), "mpp": 0.5, "mpp_range": (0.1, 1.0), "allow": True}]
        assert s.kind == "fake" and s.mpp0 == 0.5 and s.mpp_source == "override" and s.allow_missing_chunks
        lv = s.levels[0]
        assert isinstance(lv.source, BoxSource) and isinstance(lv, BoxSource)  # a Level is a box source too
        box = lv.read_region(390, 290, 500, 500)  # clipped at the edge
        assert box.shape == (10, 10, 3) and box[0, 0].tolist() == [290 % 256, 390 % 256, 7]
        assert np.asarray(lv.read_chunk(2, 3)).shape == (300 - 256, 400 - 384, 3)
    with pytest.raises(ValueError, match="closed"):
        lv.read_region(0, 0, 1, 1)
    other = tmp_path / "b.bin"  # sniffed by content whatever its name
    other.write_bytes(b"FAKE")
    with open_slide(other) as s:
        assert s.kind == "fake" and s.mpp0 == 0.25 and s.mpp_source == "metadata"


def test_unknown_files_keep_their_errors(tmp_path: Path) -> None:
    notes = tmp_path / "slides.csv"
    notes.write_text("a,b\n")
    with pytest.raises(SlideError, match="not a slide .*--slides-from"):
        open_slide(notes)
    with pytest.raises(SlideError, match="local disk only"):
        open_slide("https://example.org/a/case.svs")


def _fake_openslide(props: dict[str, str]) -> types.ModuleType:
    class OpenSlide:
        level_dimensions = [(600, 400), (300, 200)]

        def __init__(self, path: str) -> None:
            self.properties = props

        @staticmethod
        def detect_format(path: str) -> str:
            return "fake"

        def read_region(self, loc: tuple[int, int], level: int, size: tuple[int, int]) -> Any:
            w, h = size
            rgba = np.zeros((h, w, 4), np.uint8)
            rgba[..., 0], rgba[..., 3] = level * 100 + 1, 255
            rgba[:, :1, 3] = 0  # a transparent column: over white
            return rgba

        def close(self) -> None:
            pass

    mod = types.ModuleType("openslide")
    mod.OpenSlide, mod.PROPERTY_NAME_MPP_X, mod.PROPERTY_NAME_MPP_Y = OpenSlide, "openslide.mpp-x", "openslide.mpp-y"
    return mod


def test_openslide_levels_read_through_their_box_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "s.mrxs"
    f.write_text("[GENERAL]\n")
    monkeypatch.setitem(sys.modules, "openslide", _fake_openslide({"openslide.mpp-x": "0.3", "openslide.mpp-y": "0.5"}))
    assert parse_source(f).kind == "openslide"
    with open_slide(f, allow_missing_chunks=True) as s:
        assert s.kind == "openslide" and s.mpp0 == pytest.approx(0.4) and s.mpp_source == "metadata"
        assert s.allow_missing_chunks and type(s.levels[1]) is Level and s.levels[1].downsample == 2.0
        box = s.levels[1].read_region(0, 0, 5, 4)
        assert box.shape == (4, 5, 3) and box[0, 0].tolist() == [255, 255, 255] and box[0, 1, 0] == 101
    monkeypatch.setitem(sys.modules, "openslide", _fake_openslide({"openslide.mpp-x": "900"}))
    with pytest.raises(SlidePixelSizeError, match="openslide.mpp-x/y give 900 .*outside the plausible.*--mpp") as ei:
        open_slide(f)
    assert str(ei.value).startswith(f"{f}: the file has no usable pixel size") and "\n" not in str(ei.value)
    with open_slide(f, mpp=0.5) as s:
        assert s.mpp0 == 0.5 and s.mpp_source == "override"


def test_the_one_resolver() -> None:
    where = "s.svs"
    assert resolve_mpp(where, override=0.5, candidates=[(0.25, "meta")]) == ((0.5, 0.5), "override")
    # first plausible candidate in order of trust; implausible ones count as absent unless strict
    assert resolve_mpp(where, candidates=[(None, "a"), (352.8, "dpi tags"), ((0.2, 0.3), "b")]) == ((0.2, 0.3), "b")
    with pytest.raises(PixelSizeError, match=r"s.svs: gone; dpi tags give 352.8 µm/pixel, outside .*; pass the pixel"):
        resolve_mpp(where, candidates=[(352.8, "dpi tags")], missing="gone")
    with pytest.raises(PixelSizeError, match="scale 352.8 µm/pixel is an implausible pixel size.*--mpp"):
        resolve_mpp(where, candidates=[(352.8, "scale")], strict=True)
    with pytest.raises(PixelSizeError, match="contradicts, so the pixel size is unknown"):
        resolve_mpp(where, candidates=[MppCandidate(0.5, "Aperio MPP", "it contradicts")])
    with pytest.raises(PixelSizeError, match="--mpp 0 is zero"):
        resolve_mpp(where, override=0)
    assert resolve_mpp(where, candidates=[(1e-3, "x")], bounds=(1e-4, 1.0)) == ((1e-3, 1e-3), "x")
    assert check_mpp_option(None) is None and check_mpp_option("0.5") == 0.5
    with pytest.raises(PixelSizeError, match="^--mpp: the pixel size -1.0 is negative"):
        check_mpp_option(-1.0)
