"""DICOM whole slides (:mod:`hishrst_runtime.slides.dicom_slide`) read through wsidicom: exact pixels of a
synthetic tiled DICOM WSI folder (:mod:`tests.runtime.slides.dicom_fixture`), its pixel size, the registry
entry and its lazy sniff, the missing-extra message and one-line errors for damaged folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("wsidicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid  # noqa: E402

from hishrst_runtime.core.limits import RasterTooLargeError  # noqa: E402
from hishrst_runtime.slides.dicom_slide import DicomBoxes, is_dicom_folder, open_dicom_slide  # noqa: E402
from hishrst_runtime.slides.errors import ChunkDecodeError, SlideError, SlideExtraMissing  # noqa: E402
from hishrst_runtime.slides.formats import format_for_path, get_format, load_opener, scan_suffixes  # noqa: E402
from hishrst_runtime.slides.pooled import PooledBoxes  # noqa: E402
from tests.runtime.slides.dicom_fixture import pattern_image, pool2, write_dicom_wsi  # noqa: E402

H, W = 600, 700  # 3 x 3 tiles of 256 px at level 0 (partial edge tiles), 2 x 2 at level 1


@pytest.fixture
def image() -> np.ndarray:
    return pattern_image(H, W)


@pytest.fixture
def folder(tmp_path: Path, image: np.ndarray) -> Path:
    out = tmp_path / "slide"
    write_dicom_wsi(out, image, tile=256, levels=2, mpp=(0.25, 0.25))
    return out


def _one_line_naming(e: BaseException, folder: Path) -> str:
    msg = str(e)
    assert "\n" not in msg and str(folder) in msg, msg
    return msg


def test_reads_exact_pixels_at_every_level_and_across_tile_borders(folder: Path, image: np.ndarray) -> None:
    with open_dicom_slide(folder) as s:
        assert s.kind == "dicom" and s.shape0 == (H, W) and [lv.shape for lv in s.levels] == [(H, W), (300, 350)]
        lv0, lv1 = s.levels
        assert isinstance(lv0.source, DicomBoxes) and lv0.chunks == (256, 256) and lv1.downsample == 2.0
        np.testing.assert_array_equal(lv0.read_region(0, 0, W, H), image)
        box = lv0.read_region(250, 240, 520, 530)  # crosses two tile borders each way
        assert box.dtype == np.uint8 and box.flags.c_contiguous
        np.testing.assert_array_equal(box, image[240:530, 250:520])
        np.testing.assert_array_equal(lv0[590:700, 690:800], image[590:600, 690:700])  # clipped at the edge
        np.testing.assert_array_equal(lv1.read_region(100, 50, 300, 250), pool2(image)[50:250, 100:300])
        edge = np.asarray(lv0.read_chunk(2, 2))  # the bottom-right edge tile, cropped (not white padding)
        np.testing.assert_array_equal(edge, image[512:600, 512:700])
        assert s.thumbnail(max_side=100).shape == (86, 100, 3)
    with pytest.raises(ValueError, match="closed"):
        lv0.read_region(0, 0, 1, 1)


def test_pixel_size_is_the_written_spacing(tmp_path: Path, image: np.ndarray) -> None:
    write_dicom_wsi(tmp_path / "s", image, mpp=(0.25, 0.3))
    with open_dicom_slide(tmp_path / "s") as s:
        assert s.mpp_source == "metadata"
        assert s.levels[0].mpp_yx == pytest.approx((0.25, 0.3)) and s.mpp0 == pytest.approx(0.275)
        assert s.levels[1].mpp_yx == pytest.approx((0.5, 0.6))
    with open_dicom_slide(tmp_path / "s", mpp=0.5) as s:
        assert s.mpp_source == "override" and s.mpp0 == 0.5 and s.levels[1].mpp == 1.0


def test_implausible_spacing_asks_for_mpp(tmp_path: Path, image: np.ndarray) -> None:
    write_dicom_wsi(tmp_path / "s", image, mpp=(500.0, 500.0))
    with pytest.raises(SlideError, match="--mpp") as e:
        open_dicom_slide(tmp_path / "s")
    _one_line_naming(e.value, tmp_path / "s")
    with open_dicom_slide(tmp_path / "s", mpp=0.5) as s:
        assert s.mpp0 == 0.5


def test_the_registry_finds_dicom_folders(folder: Path, tmp_path: Path) -> None:
    fmt = format_for_path(folder)
    assert fmt is not None and fmt is get_format("dicom") and fmt.directory and fmt.extra == "dicom"
    assert load_opener(fmt) is open_dicom_slide and ".dcm" in scan_suffixes(directory=True)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.dcm").write_bytes(b"\0" * 200)  # a .dcm name without the DICM magic
    assert not is_dicom_folder(other) and not is_dicom_folder(folder / "level0.dcm")
    assert format_for_path(other) is None or format_for_path(other).name != "dicom"


def test_the_sniff_imports_neither_wsidicom_nor_pydicom(folder: Path) -> None:
    code = ("import sys; from pathlib import Path; from hishrst_runtime.slides.formats import format_for_path; "
            f"assert format_for_path(Path({str(folder)!r})).name == 'dicom'; "
            "assert 'wsidicom' not in sys.modules and 'pydicom' not in sys.modules, 'imported'")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_missing_extra_names_the_extra(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wsidicom", None)  # `import wsidicom` now raises ImportError
    with pytest.raises(SlideExtraMissing) as e:
        open_dicom_slide(folder)
    assert 'pip install "hishrst[dicom]"' in _one_line_naming(e.value, folder)


@pytest.mark.parametrize("damage, in_msg", [
    ("pixels", "level0.dcm"),  # pixel data cut in half: the last tile does not decode at open
    ("header", "level0.dcm"),  # cut inside the header: wsidicom skips the file, we do not
    ("garbage", "level0.dcm"),  # the DICM magic, then zeros
])
def test_a_damaged_file_is_a_one_line_error(folder: Path, damage: str, in_msg: str) -> None:
    f = folder / "level0.dcm"
    data = f.read_bytes()
    f.write_bytes({"pixels": data[: len(data) // 2], "header": data[:1000],
                   "garbage": data[:132] + b"\0" * 64}[damage])
    with pytest.raises(SlideError) as e:
        open_dicom_slide(folder)
    msg = _one_line_naming(e.value, folder)
    assert in_msg in msg and ("copy" in msg)
    if damage == "pixels":
        assert isinstance(e.value, ChunkDecodeError)


def test_folders_without_a_slide_are_one_line_errors(tmp_path: Path, image: np.ndarray) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no slide here\n")
    write_dicom_wsi(tmp_path / "nospacing", image, mpp=None)
    for path, what in [(empty, "no DICOM whole-slide image levels"), (tmp_path / "missing", "no such folder"),
                       (tmp_path / "nospacing", "no pixel spacing")]:
        with pytest.raises(SlideError, match=what) as e:
            open_dicom_slide(path)
        _one_line_naming(e.value, path)


def test_other_dicom_objects_in_the_folder_are_ignored(folder: Path, image: np.ndarray) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID, "OT"
    ds.save_as(folder / "screenshot.dcm", enforce_file_format=True)
    with open_dicom_slide(folder) as s:
        np.testing.assert_array_equal(s.levels[0].read_region(0, 0, 64, 64), image[:64, :64])


def test_jpeg_tiles_decode(tmp_path: Path, image: np.ndarray) -> None:
    write_dicom_wsi(tmp_path / "j", image, compression="jpeg")
    with open_dicom_slide(tmp_path / "j") as s:
        got = s.levels[0].read_region(200, 200, 600, 500)
        assert got.shape == (300, 400, 3)
        assert np.abs(got.astype(int) - image[200:500, 200:600]).mean() < 4  # lossy, quality 95, no subsampling


def test_a_single_level_slide_gets_pooled_levels(tmp_path: Path) -> None:
    big = pattern_image(1100, 1040)
    write_dicom_wsi(tmp_path / "one", big, tile=512, levels=1)
    with open_dicom_slide(tmp_path / "one") as s:
        assert len(s.levels) == 2 and isinstance(s.levels[1].source, PooledBoxes) and s.levels[1].computed and s.levels[1].shape == (550, 520)
        got = s.levels[1].read_region(0, 0, 520, 550).astype(int)
        assert np.abs(got - pool2(big).astype(int)).max() <= 1


def test_level_0_size_is_checked(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HISHRST_MAX_SLIDE_PIXELS", "1000")
    with pytest.raises(RasterTooLargeError) as e:
        open_dicom_slide(folder)
    _one_line_naming(e.value, folder)


def test_reader_threads_share_a_slide(folder: Path, image: np.ndarray) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    xs, ys = rng.integers(0, W, 32), rng.integers(0, H, 32)
    boxes = [(int(x), int(y), int(x) + 97, int(y) + 131) for x, y in zip(xs, ys)]
    with open_dicom_slide(folder) as s, ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda b: s.levels[0].read_region(*b), boxes))
    for (x0, y0, x1, y1), g in zip(boxes, got):
        np.testing.assert_array_equal(g, image[y0:y1, x0:x1])
