"""Missing chunk files where there is tissue (hishrst_runtime.slides.integrity), issue 10 BAD #4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hishrst_runtime.slides.errors import MissingChunkError, SlideError
from hishrst_runtime.slides.integrity import check_missing_chunks, missing_chunks
from hishrst_runtime.slides.pyramid import write_ome_zarr
from hishrst_runtime.slides.reader import open_slide
from hishrst_runtime.slides.tissue import detect_tissue


def _tissue_image(h: int = 768, w: int = 768) -> np.ndarray:
    """White glass with a pink-purple 'tissue' block in the middle (chunks (2..3, 2..3) of 128 px)."""
    img = np.full((h, w, 3), 245, np.uint8)
    rng = np.random.default_rng(0)
    img[280:490, 280:490] = (rng.normal(0, 8, (210, 210, 3)) + [200, 110, 170]).clip(0, 255).astype(np.uint8)
    return img


def _chunk_file(slide, level: int, cy: int, cx: int) -> Path:  # noqa: ANN001
    reader = slide.levels[level]._direct
    return reader.root / reader._encode_key((0, cy, cx))


def _prepare(tmp_path: Path, n_levels: int):  # noqa: ANN202
    p = write_ome_zarr(_tissue_image(), tmp_path / f"s{n_levels}.zarr", mpp=0.5, chunk=128, n_levels=n_levels)
    return p


def _mask(slide) -> np.ndarray:  # noqa: ANN001
    return detect_tissue(slide.thumbnail(max_side=256))


@pytest.mark.parametrize("n_levels", [1, 2])
def test_missing_chunk_in_tissue_is_refused(tmp_path: Path, n_levels: int) -> None:
    p = _prepare(tmp_path, n_levels)
    with open_slide(p) as s:
        assert check_missing_chunks(s, 0, tissue=_mask(s)) == []
        gone = _chunk_file(s, 0, 2, 3)
        gone.unlink()
    before = sorted(q.relative_to(p) for q in p.rglob("*"))
    # The overview is read after the loss, as the pipeline does. On one level the overview is the damaged
    # level itself, whose read now refuses the lost chunk too (tests/runtime/slides/test_missing_data.py), so
    # it is read with missing chunks allowed here.
    with open_slide(p, allow_missing_chunks=True) as s:
        mask = _mask(s)
    with open_slide(p) as s:
        with pytest.raises(MissingChunkError, match=r"chunk \(2, 3\) of pyramid level 0.*--allow-missing-chunks") as ei:
            check_missing_chunks(s, 0, tissue=mask)
        msg = str(ei.value)
        assert str(gone) in msg and "\n" not in msg and isinstance(ei.value, SlideError)
        assert check_missing_chunks(s, 0, tissue=mask, allow_missing=True) == [(2, 3)]
    assert sorted(q.relative_to(p) for q in p.rglob("*")) == before  # the check never touches the store


def test_missing_background_chunks_stay_allowed(tmp_path: Path) -> None:
    """Background chunks a sparse writer left out (all fill value) are allowed. (Updated: the glass was 245,
    not the fill value 255, so deleting those chunks lost data; the rule now refuses that when it is read.)"""
    img = _tissue_image()
    img[img == 245] = 255  # glass at the fill value: zarr leaves these chunks out (write_empty_chunks=False)
    p = write_ome_zarr(img, tmp_path / "sparse.zarr", mpp=0.5, chunk=128, n_levels=1)
    with open_slide(p) as s:
        for cy, cx in ((0, 0), (5, 0), (0, 5), (5, 5)):  # corners: glass, no tissue next to them
            _chunk_file(s, 0, cy, cx).unlink(missing_ok=True)
        mask = _mask(s)
        assert mask.any()
        assert check_missing_chunks(s, 0, tissue=mask) == []
        found = missing_chunks(s, 0)
        assert found is not None and {(0, 0), (0, 5), (5, 0), (5, 5)} <= set(found[0])
        assert s.filled_chunks == []


def test_single_level_counts_neighbours(tmp_path: Path) -> None:
    """On a single-level slide the missing chunk is white in the overview too; its neighbours show tissue."""
    img = _tissue_image()
    img[256:384, 256:384] = 245  # make chunk (2, 2) plain glass so only its neighbours carry tissue
    p = write_ome_zarr(img, tmp_path / "n.zarr", mpp=0.5, chunk=128, n_levels=1)
    with open_slide(p, allow_missing_chunks=True) as s:  # the overview read refuses the loss itself otherwise
        _chunk_file(s, 0, 2, 2).unlink()
        mask = _mask(s)
        assert not mask[65:127, 65:127].any()  # the chunk itself shows no tissue in the overview (256 / 768 scale)
    with open_slide(p) as s:
        with pytest.raises(MissingChunkError, match=r"chunk \(2, 2\)"):
            check_missing_chunks(s, 0, tissue=_mask(s))


def test_unlistable_stores_are_not_checked(tmp_path: Path) -> None:
    p = _prepare(tmp_path, 1)
    with open_slide(p, allow_missing_chunks=True) as s:  # the overview read would refuse the lost chunk
        _chunk_file(s, 0, 1, 1).unlink()
        mask = _mask(s)
        s.levels[0]._array = type("Remote", (), {"store": object(), "path": "0"})()  # not a LocalStore
        assert missing_chunks(s, 0) is None
        assert check_missing_chunks(s, 0, tissue=mask) == []
