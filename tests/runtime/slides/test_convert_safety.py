"""`hishrst convert` never loses data and never runs away: the output is refused before anything is touched
when it overlaps the input or holds something hishrst did not convert; absurd declared sizes and too
little free space are refused before writing; a full disk is a one-line error leaving nothing behind;
the debris of a killed run is cleaned (issue "Nothing silently wrong")."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

from hishrst.cli import main
from hishrst_runtime.core.errors import OutputStateError
from hishrst_runtime.core.limits import RasterTooLargeError
from hishrst_runtime.core.owned import OWNER_ATTR, owner_of
from hishrst_runtime.slides import convert as convert_mod
from hishrst_runtime.slides.convert import ConvertError, convert_slide, estimate_output_bytes
from hishrst_runtime.slides.reader import open_slide

MPP_ARGS = ["--mpp", "0.5", "--chunk", "64", "--no-progress"]


def _slide(path: Path, h: int = 200, w: int = 300) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb")
    return path


def _huge_tiff(path: Path, h: int, w: int, tile: int = 4096) -> Path:
    """A TIFF declaring ``h × w`` RGB pixels with all tiles but the first absent (about a MB on disk)."""
    n = -(-h // tile) * -(-w // tile)
    first = np.zeros((tile, tile, 3), np.uint8)  # tifffile needs one real tile to learn the layout
    tifffile.imwrite(path, (first if i == 0 else None for i in range(n)), shape=(h, w, 3), dtype="uint8",
                     tile=(tile, tile), compression="zlib", photometric="rgb", resolution=(20000, 20000),
                     resolutionunit="CENTIMETER")
    return path


def _convert(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["convert", *args])
    return res.exit_code, res.output


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ------------------------------------------------------------------ 1. the output overlaps the input


def test_overwrite_onto_the_folder_holding_the_slide_is_refused(tmp_path: Path) -> None:
    src = _slide(tmp_path / "data" / "slide.tif")
    before = src.read_bytes()
    for out in (tmp_path / "data", tmp_path, src):
        code, output = _convert(str(src), str(out), *MPP_ARGS, "--overwrite")
        assert code == 1, output
        assert "overlap the input" in output and str(src) in output
        assert len(output.strip().splitlines()) == 1 and "Traceback" not in output
    assert src.read_bytes() == before
    assert _entries(tmp_path / "data") == ["slide.tif"]


# ------------------------------------------------------------------ 2. a folder hishrst did not write


def test_overwrite_never_deletes_a_folder_of_user_files(tmp_path: Path) -> None:
    src = _slide(tmp_path / "slide.tif")
    mine = tmp_path / "mydir"
    mine.mkdir()
    (mine / "thesis.docx").write_text("years of work")
    (mine / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    code, output = _convert(str(src), str(mine), *MPP_ARGS, "--overwrite")
    assert code == 1 and "never replaced" in output and "no hishrst marker" in output, output
    assert _entries(mine) == ["thesis.docx", "zarr.json"]
    with pytest.raises(ConvertError) as ei:
        convert_slide(src, mine, mpp=0.5, overwrite=True, progress=False)
    assert isinstance(ei.value, OutputStateError)
    assert _entries(tmp_path) == ["mydir", "slide.tif"]  # no debris either


def test_converted_stores_are_marked_and_replaced_only_with_overwrite(tmp_path: Path) -> None:
    src = _slide(tmp_path / "slide.tif")
    out = convert_slide(src, tmp_path / "s.zarr", mpp=0.5, chunk=64, progress=False)
    assert owner_of(out) == "ome-zarr"
    with open_slide(out) as s:  # the marker does not disturb readers
        assert s.mpp0 == pytest.approx(0.5)
    with warnings.catch_warnings():  # zarr warns that the marker file is not a zarr node when listing members
        warnings.simplefilter("ignore")
        assert sorted(zarr.open_group(str(out), mode="r").array_keys()) == ["0"]
    with pytest.raises(ConvertError, match="--overwrite"):
        convert_slide(src, out, mpp=0.25, progress=False)
    convert_slide(src, out, mpp=0.25, overwrite=True, progress=False)
    assert open_slide(out).mpp0 == pytest.approx(0.25) and owner_of(out) == "ome-zarr"


def _unmark(store: Path) -> None:
    """Remove the ownership marker (root attribute) as a store converted before it existed lacks it."""
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"][OWNER_ATTR]
    (store / "zarr.json").write_text(json.dumps(meta))


def test_stores_converted_before_the_marker_are_still_replaceable(tmp_path: Path) -> None:
    """A store an older hishrst converted (no marker, but its root ``hishrst`` attribute) is recognised."""
    src = _slide(tmp_path / "slide.tif")
    out = convert_slide(src, tmp_path / "old.zarr", mpp=0.5, chunk=64, progress=False)
    _unmark(out)
    with pytest.raises(ConvertError, match="--overwrite"):
        convert_slide(src, out, mpp=0.25, progress=False)
    convert_slide(src, out, mpp=0.25, overwrite=True, progress=False)
    assert owner_of(out) == "ome-zarr" and open_slide(out).mpp0 == pytest.approx(0.25)
    # another tool's OME-Zarr (no hishrst attribute) is never replaced
    other = tmp_path / "other.zarr"
    shutil.copytree(out, other)
    _unmark(other)
    meta = json.loads((other / "zarr.json").read_text())
    del meta["attributes"]["hishrst"]
    (other / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ConvertError, match="never replaced"):
        convert_slide(src, other, mpp=0.25, overwrite=True, progress=False)


# ------------------------------------------------------------------ 3. declared size, free space, full disk


def test_absurd_declared_size_is_refused_before_writing(tmp_path: Path) -> None:
    src = _huge_tiff(tmp_path / "huge.tif", 10**6, 10**6)
    assert src.stat().st_size < 2_000_000
    code, output = _convert(str(src), str(tmp_path / "huge.zarr"), "--no-progress")
    assert code == 1 and "slide limit" in output and str(src) in output and "HISHRST_MAX_SLIDE_PIXELS" in output
    assert len(output.strip().splitlines()) == 1, output
    assert _entries(tmp_path) == ["huge.tif"]
    with pytest.raises(RasterTooLargeError):
        convert_slide(src, tmp_path / "huge.zarr", progress=False)


def test_estimate_rule() -> None:
    # uncompressed RGB (3 B/px) × 4/3 for the pyramid ÷ the assumed compression ratio 2 = 2 bytes per pixel
    assert estimate_output_bytes(1000, 3000) == 6_000_000
    assert estimate_output_bytes(1000, 3000, compression=4.0) == 3_000_000
    with pytest.raises(ConvertError, match="HISHRST_CONVERT_COMPRESSION"):
        estimate_output_bytes(10, 10, compression=0.0)


def test_too_little_free_space_is_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _huge_tiff(tmp_path / "big.tif", 50_000, 40_000)  # 2·10⁹ px: a real slide size, 4 GB estimated
    free = 10**9
    real = shutil.disk_usage
    monkeypatch.setattr(convert_mod.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=free))
    code, output = _convert(str(src), str(tmp_path / "out" / "big.zarr"), "--no-progress")
    assert code == 1 and len(output.strip().splitlines()) == 1, output
    assert "4.0 GB" in output and "1.0 GB" in output and "--assume-compression" in output
    assert _entries(tmp_path) == ["big.tif"]  # not even the parent folder was created
    # the override: a mostly-background slide compresses far better than the assumed ratio
    small = _slide(tmp_path / "small.tif")  # 60,000 px: 120 kB estimated
    free = 100_000
    with pytest.raises(ConvertError, match="free"):
        convert_slide(small, tmp_path / "s.zarr", mpp=0.5, progress=False)
    code, output = _convert(str(small), str(tmp_path / "s.zarr"), *MPP_ARGS, "--assume-compression", "4")
    assert code == 0, output
    monkeypatch.setenv("HISHRST_CONVERT_COMPRESSION", "4")
    assert convert_slide(small, tmp_path / "t.zarr", mpp=0.5, progress=False).is_dir()


@pytest.mark.parametrize("overwrite", [False, True])
def test_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  overwrite: bool) -> None:
    import zarr.storage._local as local

    src = _slide(tmp_path / "slide.tif", 400, 300)
    out = tmp_path / "s.zarr"
    if overwrite:
        convert_slide(src, out, mpp=0.25, chunk=64, progress=False)
    writes = []
    real_put = local._put

    def put(path, value, exclusive=False):  # type: ignore[no-untyped-def]
        writes.append(path)
        if len(writes) > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", put)
    code, output = _convert(str(src), str(out), *MPP_ARGS, *(["--overwrite"] if overwrite else []))
    assert code == 1 and len(output.strip().splitlines()) == 1 and "Traceback" not in output, output
    assert "disk" in output and "full" in output and str(tmp_path) in output
    assert len(writes) > 5
    assert _entries(tmp_path) == (["s.zarr", "slide.tif"] if overwrite else ["slide.tif"])
    if overwrite:  # the earlier output is untouched
        monkeypatch.setattr(local, "_put", real_put)
        assert open_slide(out).mpp0 == pytest.approx(0.25)


# ------------------------------------------------------------------ 4. debris of a killed run


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_debris_of_a_killed_run_is_cleaned(tmp_path: Path) -> None:
    src = _slide(tmp_path / "slide.tif")
    dead = _dead_pid()
    partial = tmp_path / f".s.zarr.partial-{dead}-0123abcd"
    (partial / "0").mkdir(parents=True)
    (partial / "0" / "c").write_bytes(b"x" * 1000)
    tmp_file = tmp_path / f".s.zarr.tmp-{dead}-0123abcd"
    tmp_file.write_bytes(b"half")
    live = tmp_path / f".s.zarr.partial-{os.getppid()}-0123abcd"  # a running conversion's: kept
    live.mkdir()
    unrelated = tmp_path / ".s.zarr.partial-notes"
    unrelated.write_text("mine")
    convert_slide(src, tmp_path / "s.zarr", mpp=0.5, progress=False)
    assert _entries(tmp_path) == sorted([live.name, unrelated.name, "s.zarr", "slide.tif"])


def test_a_run_killed_mid_swap_gets_its_old_store_back(tmp_path: Path) -> None:
    """Killed between swap_in's two renames: the old store is only in ``.s.zarr.old-PID-…``; it is restored,
    never deleted as debris."""
    src = _slide(tmp_path / "slide.tif")
    out = convert_slide(src, tmp_path / "s.zarr", mpp=0.25, progress=False)
    dead = _dead_pid()
    os.rename(out, tmp_path / f".s.zarr.old-{dead}-0123abcd")
    with pytest.raises(ConvertError, match="--overwrite"):
        convert_slide(src, out, mpp=0.5, progress=False)
    assert _entries(tmp_path) == ["s.zarr", "slide.tif"]
    assert open_slide(out).mpp0 == pytest.approx(0.25)


# ---------------------------------------------------------------- missing and corrupt tiles: the reader's rule

_TILE = 64


def _tissue_tiff(path: Path, *, levels: int = 1) -> Path:
    """A tiled JPEG TIFF: glass (white) with a textured tissue block over tiles (1..2, 1..2) of 64 px, optionally a
    SubIFD pyramid of 2x levels, with a JSON pixel size of 0.5 µm/pixel."""
    img = np.full((256, 256, 3), 255, np.uint8)
    rng = np.random.default_rng(0)
    img[70:190, 70:190] = (rng.normal(0, 12, (120, 120, 3)) + [200, 110, 170]).clip(0, 255).astype(np.uint8)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(_TILE, _TILE), compression="jpeg", photometric="rgb", subifds=levels - 1,
                 description='{"mpp": 0.5}', metadata=None)
        for k in range(1, levels):
            tw.write(img[:: 2**k, :: 2**k], tile=(_TILE, _TILE), compression="jpeg", photometric="rgb",
                     subfiletype=1, metadata=None)
    return path


def _patch_tile(path: Path, index: int, *, tag: str | None = None, cut: bool = False) -> None:
    """Zero entry ``index`` of the first page's ``tag`` (TileByteCounts / TileOffsets), or (``cut``) zero the
    second half of that tile's JPEG bytes (a file cut short: libjpeg only warns)."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        if cut:
            at, size = page.dataoffsets[index] + page.databytecounts[index] // 2, page.databytecounts[index] // 2
        else:
            t = page.tags[tag]
            size = t.valuebytecount // t.count
            at = t.valueoffset + index * size
    raw = bytearray(path.read_bytes())
    raw[at : at + size] = bytes(size)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("tag", ["TileByteCounts", "TileOffsets"])
def test_convert_refuses_a_tile_without_bytes_in_tissue(tmp_path: Path, tag: str) -> None:
    """Before: tifffile read the tile as black and the store silently held a black square."""
    src = _tissue_tiff(tmp_path / "s.tif")
    _patch_tile(src, 1 * 4 + 1, tag=tag)  # tile (1, 1): tissue
    out = tmp_path / "s.zarr"
    with pytest.raises(ConvertError, match=r"tile 5\).*no data.*restore the tile") as ei:
        convert_slide(src, out, chunk=64, progress=False)
    msg = str(ei.value)
    assert str(src) in msg and "\n" not in msg and "--allow-missing-chunks" not in msg
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".s.zarr")]


def test_convert_reads_a_tile_without_bytes_over_background_as_white(tmp_path: Path) -> None:
    """The reader's rule, not a blanket refusal: where the coarser stored level is glass, an empty tile is glass."""
    src = _tissue_tiff(tmp_path / "b.tif", levels=2)
    _patch_tile(src, 0, tag="TileByteCounts")  # tile (0, 0): glass
    out = convert_slide(src, tmp_path / "b.zarr", chunk=64, progress=False)
    stored = np.asarray(zarr.open_group(out, mode="r")["0"][:, :_TILE, :_TILE])
    assert (stored == 255).all()  # white, not black


def test_convert_refuses_a_truncated_jpeg_tile(tmp_path: Path) -> None:
    """Before: the tile cut short decoded (libjpeg only warns) and the store held its damaged pixels."""
    src = _tissue_tiff(tmp_path / "c.tif")
    _patch_tile(src, 5, cut=True)
    out = tmp_path / "c.zarr"
    with pytest.raises(ConvertError, match=r"tile 5\).*cut short") as ei:
        convert_slide(src, out, chunk=64, progress=False)
    assert str(src) in str(ei.value) and "\n" not in str(ei.value) and not out.exists()


def test_convert_of_an_intact_tiff_equals_the_direct_reader(tmp_path: Path) -> None:
    src = _tissue_tiff(tmp_path / "ok.tif", levels=2)
    out = convert_slide(src, tmp_path / "ok.zarr", chunk=64, progress=False)
    stored = np.asarray(zarr.open_group(out, mode="r")["0"][:]).transpose(1, 2, 0)  # c, y, x -> y, x, c
    with open_slide(src) as direct:
        np.testing.assert_array_equal(stored, direct.levels[0].read_region(0, 0, 256, 256))
