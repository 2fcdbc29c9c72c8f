"""Tests of `hishrst convert` and the OME-Zarr pyramid writer (hishrst_runtime.slides.convert)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

from hishrst_runtime.cli.convert import convert_cmd  # noqa: E402
from hishrst_runtime.slides.convert import ConvertError, convert_slide, pyramid_shapes, write_ome_zarr
from hishrst_runtime.slides.reader import open_slide

SVS = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "cmu_small_region.svs"
REPO = Path(__file__).resolve().parents[3]


def _image(h: int = 200, w: int = 300, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _no_leftovers(directory: Path) -> None:
    assert not [p.name for p in directory.iterdir() if ".partial" in p.name or ".old" in p.name]


# ---------------------------------------------------------------------------- writer


def test_pyramid_shapes() -> None:
    assert pyramid_shapes(300, 420) == [(300, 420)]
    assert pyramid_shapes(4000, 3000) == [(4000, 3000), (2000, 1500), (1000, 750)]
    assert pyramid_shapes(301, 421, n_levels=3) == [(301, 421), (151, 211), (76, 106)]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_written_stores_validate(tmp_path: Path, version: str) -> None:
    models = pytest.importorskip(f"ome_zarr_models.v0{version[-1]}.image")
    p = write_ome_zarr(_image(), tmp_path / "s.zarr", mpp=0.5, chunk=64, n_levels=2, version=version)  # type: ignore[arg-type]
    (ms,) = models.Image.from_zarr(zarr.open_group(str(p), mode="r")).ome_attributes.multiscales  # spec-valid
    assert [d.path for d in ms.datasets] == ["0", "1"]  # and what it validated is the pyramid written, in µm
    assert [d.coordinateTransformations[0].scale for d in ms.datasets] == [[1.0, 0.5, 0.5], [1.0, 1.0, 1.0]]
    assert [(a.name, a.unit) for a in ms.axes] == [("c", None), ("y", "micrometer"), ("x", "micrometer")]
    if version == "0.5":
        assert zarr.open_array(str(p / "0"), mode="r").metadata.dimension_names == ("c", "y", "x")
    else:
        assert (p / ".zattrs").is_file() and (p / "0" / ".zarray").is_file()


def test_writer_streams_in_bands(tmp_path: Path) -> None:
    img = _image(300, 500)

    class Recorder:
        shape, dtype = img.shape, img.dtype
        reads: list[tuple[int, int]] = []

        def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
            ys, xs = key
            self.reads.append((ys.stop - ys.start, xs.stop - xs.start))
            return img[key]

    rec = Recorder()
    p = write_ome_zarr(rec, tmp_path / "s.zarr", mpp=1.0, chunk=32, n_levels=2, source_align_rows=48)
    assert max(h for h, _ in rec.reads) <= 48
    assert sum(h for h, _ in rec.reads) == 300  # every source row read exactly once
    np.testing.assert_array_equal(open_slide(p).levels[0].read_region(0, 0, 500, 300), img)


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="RGB"):
        write_ome_zarr(np.zeros((10, 10), np.uint8), tmp_path / "a.zarr", mpp=1.0)
    with pytest.raises(ConvertError, match="uint8"):
        write_ome_zarr(np.zeros((10, 10, 3), np.float32), tmp_path / "b.zarr", mpp=1.0)
    write_ome_zarr(np.zeros((10, 10, 3), np.uint8), tmp_path / "c.zarr", mpp=1.0)
    with pytest.raises(FileExistsError):
        write_ome_zarr(np.zeros((10, 10, 3), np.uint8), tmp_path / "c.zarr", mpp=1.0)


# ---------------------------------------------------------------------------- SVS


@pytest.mark.skipif(not SVS.is_file(), reason=f"shared test slide {SVS} is absent")
def test_convert_svs(tmp_path: Path) -> None:
    out = convert_slide(SVS, tmp_path / "cmu.zarr", progress=False)
    ref = tifffile.imread(SVS)  # level 0 of series 0 (2967 x 2220 x 3)
    with open_slide(out) as s:
        assert s.mpp0 == pytest.approx(0.499)
        assert s.shape0 == ref.shape[:2]
        assert len(s.levels) >= 2
        assert s.levels[1].shape == ((ref.shape[0] + 1) // 2, (ref.shape[1] + 1) // 2)
        assert s.levels[1].mpp == pytest.approx(0.998)
        np.testing.assert_array_equal(s.levels[0].read_region(0, 0, ref.shape[1], ref.shape[0]), ref)
    attrs = zarr.open_group(str(out), mode="r").attrs
    assert attrs["ome"]["version"] == "0.5"
    assert attrs["hishrst"]["mpp_source"] == "Aperio MPP"
    _no_leftovers(tmp_path)


# ---------------------------------------------------------------------------- TIFF / OME-TIFF


def test_tiff_without_pixel_size_fails_and_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "nopx.tif"
    tifffile.imwrite(src, _image(), tile=(64, 64), photometric="rgb")
    with pytest.raises(ConvertError, match="--mpp") as ei:
        convert_slide(src, tmp_path / "out.zarr", progress=False)
    assert str(src) in str(ei.value)
    assert not (tmp_path / "out.zarr").exists()
    _no_leftovers(tmp_path)
    out = convert_slide(src, tmp_path / "out.zarr", mpp=0.8, chunk=64, progress=False)
    assert open_slide(out).mpp0 == pytest.approx(0.8)


def test_overwrite(tmp_path: Path) -> None:
    src = tmp_path / "a.tif"
    img = _image()
    tifffile.imwrite(src, img, tile=(64, 64), photometric="rgb")
    out = convert_slide(src, tmp_path / "o.zarr", mpp=0.5, progress=False)
    with pytest.raises(ConvertError, match="--overwrite"):
        convert_slide(src, out, mpp=0.25, progress=False)
    assert open_slide(out).mpp0 == pytest.approx(0.5)
    convert_slide(src, out, mpp=0.25, overwrite=True, progress=False)
    assert open_slide(out).mpp0 == pytest.approx(0.25)
    _no_leftovers(tmp_path)


def test_interrupted_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "big.tif"
    tifffile.imwrite(src, _image(600, 500), tile=(64, 64), photometric="rgb")

    from hishrst_runtime.slides.level import Level

    calls = []
    original = Level.read_box

    def flaky(self: Level, *box: int) -> np.ndarray:  # convert reads level 0 of the direct reader
        calls.append(box)
        if len(calls) > 3:  # the user hits Ctrl-C half-way
            raise KeyboardInterrupt
        return original(self, *box)

    monkeypatch.setattr(Level, "read_box", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert_slide(src, tmp_path / "o.zarr", mpp=0.5, chunk=64, progress=False)
    assert not (tmp_path / "o.zarr").exists()
    _no_leftovers(tmp_path)


@pytest.mark.parametrize(("unit", "res", "mpp"), [("CENTIMETER", 1e4 / 0.25, 0.25), ("INCH", 25400 / 0.5, 0.5)])
def test_tiled_tiff_resolution_tags(tmp_path: Path, unit: str, res: float, mpp: float) -> None:
    src = tmp_path / "r.tif"
    img = _image(330, 250)
    tifffile.imwrite(src, img, tile=(48, 48), photometric="rgb", compression="zlib",
                     resolution=(res, res), resolutionunit=unit)
    out = convert_slide(src, tmp_path / "r.zarr", chunk=64, progress=False)
    with open_slide(out) as s:
        assert s.mpp0 == pytest.approx(mpp, rel=1e-4)
        np.testing.assert_array_equal(s.levels[0].read_region(0, 0, 250, 330), img)


def test_pyramidal_tiff_reads_level0(tmp_path: Path) -> None:
    src = tmp_path / "pyr.tif"
    img = _image(256, 320)
    with tifffile.TiffWriter(src) as tw:
        tw.write(img, tile=(64, 64), photometric="rgb", subifds=1, resolution=(1e4 / 0.4, 1e4 / 0.4),
                 resolutionunit="CENTIMETER")
        tw.write(img[::2, ::2], tile=(64, 64), photometric="rgb", subfiletype=1)
    out = convert_slide(src, tmp_path / "pyr.zarr", chunk=64, progress=False)
    with open_slide(out) as s:
        assert s.mpp0 == pytest.approx(0.4)
        np.testing.assert_array_equal(s.levels[0].read_region(0, 0, 320, 256), img)


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_ome_tiff_physical_size(tmp_path: Path, planar: str) -> None:
    src = tmp_path / "x.ome.tif"
    img = _image(200, 260)
    data, axes = (img, "YXS") if planar == "contig" else (img.transpose(2, 0, 1), "SYX")
    tifffile.imwrite(src, data, ome=True, photometric="rgb", planarconfig=planar, tile=(64, 64),
                     metadata={"axes": axes, "PhysicalSizeX": 300, "PhysicalSizeXUnit": "nm",
                               "PhysicalSizeY": 300, "PhysicalSizeYUnit": "nm"})
    out = convert_slide(src, tmp_path / "x.zarr", chunk=64, progress=False)
    with open_slide(out) as s:
        assert s.mpp0 == pytest.approx(0.3)
        np.testing.assert_array_equal(s.levels[0].read_region(0, 0, 260, 200), img)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_stripped_tiff(tmp_path: Path, compression: str | None) -> None:
    src = tmp_path / "s.tif"
    img = _image(211, 150)
    tifffile.imwrite(src, img, photometric="rgb", rowsperstrip=10, compression=compression)
    out = convert_slide(src, tmp_path / "s.zarr", mpp=1.0, chunk=64, progress=False)
    np.testing.assert_array_equal(open_slide(out).levels[0].read_region(0, 0, 150, 211), img)


def test_bad_sources(tmp_path: Path) -> None:
    gray = tmp_path / "gray.tif"
    tifffile.imwrite(gray, _image()[..., 0], tile=(64, 64))
    with pytest.raises(ConvertError, match="not an RGB") as ei:
        convert_slide(gray, tmp_path / "g.zarr", mpp=1.0, progress=False)
    assert str(gray) in str(ei.value)
    deep = tmp_path / "u16.tif"
    tifffile.imwrite(deep, _image().astype(np.uint16), photometric="rgb", tile=(64, 64))
    with pytest.raises(ConvertError, match="uint16"):
        convert_slide(deep, tmp_path / "d.zarr", mpp=1.0, progress=False)
    junk = tmp_path / "junk.svs"
    junk.write_text("not a tiff")
    with pytest.raises(ConvertError, match="not a readable"):
        convert_slide(junk, tmp_path / "j.zarr", mpp=1.0, progress=False)
    with pytest.raises(ConvertError, match="no such file"):
        convert_slide(tmp_path / "missing.svs", tmp_path / "m.zarr", progress=False)
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".zarr"]
    _no_leftovers(tmp_path)


# ---------------------------------------------------------------------------- CLI


def test_convert_cli(tmp_path: Path) -> None:
    src = tmp_path / "c.tif"
    tifffile.imwrite(src, _image(), tile=(64, 64), photometric="rgb")
    runner = CliRunner()
    res = runner.invoke(convert_cmd, ["--help"])
    assert res.exit_code == 0 and "--mpp" in res.output and "--overwrite" in res.output
    res = runner.invoke(convert_cmd, [str(src), str(tmp_path / "c.zarr"), "--no-progress"])
    assert res.exit_code != 0 and "--mpp" in res.output and str(src) in res.output
    res = runner.invoke(convert_cmd, [str(src), str(tmp_path / "c.zarr"), "--mpp", "0.5", "--chunk", "64"])
    assert res.exit_code == 0, res.output
    assert "1 levels" in res.output and "0.5 µm/px" in res.output
    res = runner.invoke(convert_cmd, [str(src), str(tmp_path / "c.zarr"), "--mpp", "0.5"])
    assert res.exit_code != 0 and "--overwrite" in res.output
    from hishrst.cli import main

    res = runner.invoke(main, ["convert", str(src), str(tmp_path / "c.zarr"), "--mpp", "0.6", "--overwrite",
                               "--no-progress"])
    assert res.exit_code == 0, res.output
    assert open_slide(tmp_path / "c.zarr").mpp0 == pytest.approx(0.6)


def test_runtime_modules_do_not_import_torch(tmp_path: Path) -> None:
    """Converting, opening and detecting tissue in a fresh interpreter loads neither torch nor timm."""
    lines = [
        "import sys, numpy as np, tifffile",
        "import hishrst_runtime.slides.reader as r, hishrst_runtime.slides.tissue as t",
        "from hishrst_runtime.slides.convert import convert_slide",
        f"p = {str(tmp_path)!r}",
        "tifffile.imwrite(p + '/t.tif', np.zeros((64, 64, 3), np.uint8), photometric='rgb', tile=(32, 32))",
        "s = r.open_slide(convert_slide(p + '/t.tif', p + '/t.zarr', mpp=1.0, progress=True))",
        "t.detect_tissue(s.thumbnail(max_side=32))",
        "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))",
    ]
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", "\n".join(lines)], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=env, check=False)
    assert (res.returncode, res.stdout.strip()) == (0, "[]"), res.stderr


# ---------------------------------------------------------------------------- faults (issue 10)


@pytest.mark.parametrize("kw", [{"tile": (64, 64), "compression": "zlib"}, {"tile": (64, 64)},
                                {"rowsperstrip": 16}, {"tile": (64, 64), "compression": "jpeg"}])
def test_truncated_tiff_is_a_clear_error(tmp_path: Path, kw: dict) -> None:
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, _image(600, 260), photometric="rgb", **kw)
    src = tmp_path / "cut.tif"
    src.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # an interrupted copy
    out = convert_slide(whole, tmp_path / "o.zarr", mpp=0.5, chunk=64, progress=False)  # an earlier complete output
    before = {q.relative_to(out): q.read_bytes() for q in out.rglob("*") if q.is_file()}
    with pytest.raises(ConvertError, match="truncated or corrupt") as ei:
        convert_slide(src, out, mpp=0.5, chunk=64, overwrite=True, progress=False)
    assert str(src) in str(ei.value) and "\n" not in str(ei.value)
    assert {q.relative_to(out): q.read_bytes() for q in out.rglob("*") if q.is_file()} == before
    _no_leftovers(tmp_path)


def test_implausible_pixel_sizes(tmp_path: Path) -> None:
    src = tmp_path / "dpi.tif"  # a 72 dpi placeholder: 352.8 µm/px
    tifffile.imwrite(src, _image(), tile=(64, 64), photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(ConvertError, match=r"TIFF resolution tags give 352.8 µm/pixel, outside the plausible") as ei:
        convert_slide(src, tmp_path / "o.zarr", progress=False)
    assert str(src) in str(ei.value) and "--mpp" in str(ei.value)
    with pytest.raises(ConvertError, match="--mpp 1e-06 µm/pixel is an implausible pixel size") as ei:
        convert_slide(src, tmp_path / "o.zarr", mpp=1e-6, progress=False)
    assert str(src) in str(ei.value)
    assert not (tmp_path / "o.zarr").exists()
    out = convert_slide(src, tmp_path / "o.zarr", mpp=0.5, chunk=64, progress=False)
    assert open_slide(out).mpp0 == pytest.approx(0.5)
