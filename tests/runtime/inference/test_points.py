"""``--points`` files: CSV (``x,y[,id]``), ``.h5ad`` (``obsm['spatial']``) and Space Ranger outs folders,
read torch-free into :class:`QueryPoints` in the file's order; bad files and out-of-slide points are
one-line :class:`InputError` naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.inference.points import QueryPoints, check_points_inside, read_points

SR_ROWS = [  # barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres
    ("AAAC-1", 1, 0, 0, 120, 80),
    ("AAAG-1", 0, 0, 2, 130, 90),
    ("AAAT-1", 1, 1, 1, 50, 300),
    ("AACA-1", 1, 2, 0, 10, 20),
]


def test_csv_keeps_order_and_uses_ids(tmp_path: Path) -> None:
    f = tmp_path / "pts.csv"
    f.write_text("id,Y,x,extra\ns3,10,5.5,a\ns1,2,30,b\n\ns2,7,1,c\n")
    pts = read_points(f)
    np.testing.assert_array_equal(pts.xy_px, [[5.5, 10], [30, 2], [1, 7]])
    assert pts.names == ["s3", "s1", "s2"] and pts.source == str(f) and len(pts) == 3


def test_csv_without_ids_has_no_names(tmp_path: Path) -> None:
    f = tmp_path / "pts.csv"
    f.write_text("x,y\n1,2\n3,4\n")
    assert read_points(f).names is None


@pytest.mark.parametrize("text, needle", [
    ("id,x\na,1\n", "missing column(s) y"),
    ("a,b\n1,2\n", "missing column(s) x, y"),
    ("", "empty"),
    ("x,y\n", "no points"),
    ("x,y\n1,abc\n", "line 2 has y='abc'"),
    ("x,y\n\n1,2\n1\n", "line 4 has 1 field"),  # the file's line numbers: header = line 1, blank lines count
    ("x,y,id\n1,2,a\n3,4,a\n", "duplicate id"),
    ("x,y\n1,nan\n", "without finite x, y (line 2)"),
])
def test_bad_csv_is_one_clear_line(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "bad.csv"
    f.write_text(text)
    with pytest.raises(InputError) as e:
        read_points(f)
    msg = str(e.value)
    assert str(f) in msg and needle in msg and "\n" not in msg, msg


def test_h5ad_obsm_spatial_and_obs_names(tmp_path: Path) -> None:
    ad = pytest.importorskip("anndata")
    import pandas as pd

    xy = np.array([[10.0, 20.0], [5.0, 1.0], [300.0, 40.0]])
    a = ad.AnnData(np.zeros((3, 1), np.float32), obs=pd.DataFrame(index=["c", "a", "b"]))
    a.obsm["spatial"] = xy
    a.write_h5ad(tmp_path / "a.h5ad")
    pts = read_points(tmp_path / "a.h5ad")
    np.testing.assert_array_equal(pts.xy_px, xy)
    assert pts.names == ["c", "a", "b"]
    del a.obsm["spatial"]
    a.write_h5ad(tmp_path / "none.h5ad")
    with pytest.raises(InputError, match=r"no obsm\['spatial'\]"):
        read_points(tmp_path / "none.h5ad")
    (tmp_path / "broken.h5ad").write_bytes(b"not hdf5")
    with pytest.raises(InputError, match="not a readable .h5ad"):
        read_points(tmp_path / "broken.h5ad")


def test_h5ad_whose_obs_names_do_not_match_the_points_is_refused(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    ad = pytest.importorskip("anndata")
    import pandas as pd

    a = ad.AnnData(np.zeros((3, 1), np.float32), obs=pd.DataFrame(index=["c", "a", "b"]))
    a.obsm["spatial"] = np.array([[10.0, 20.0], [5.0, 1.0], [300.0, 40.0]])
    f = tmp_path / "a.h5ad"
    a.write_h5ad(f)
    with h5py.File(f, "r+") as h:  # four points, three names: the names must not be dropped silently
        del h["obsm/spatial"]
        h["obsm/spatial"] = np.zeros((4, 2))
    with pytest.raises(InputError) as e:
        read_points(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}: the obs index has 3 names but obsm['spatial'] 4 rows") and "\n" not in msg


@pytest.mark.parametrize("name, header", [("tissue_positions.csv", True), ("tissue_positions_list.csv", False)])
def test_spaceranger_outs_in_tissue_spots(tmp_path: Path, name: str, header: bool) -> None:
    outs = tmp_path / "outs"
    (outs / "spatial").mkdir(parents=True)
    lines = (["barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"] if header else [])
    lines += [",".join(map(str, r)) for r in SR_ROWS]
    (outs / "spatial" / name).write_text("\n".join(lines) + "\n")
    for where in (outs, outs / "spatial"):
        pts = read_points(where)
        assert pts.names == ["AAAC-1", "AAAT-1", "AACA-1"]  # in-tissue only, in the file's order
        np.testing.assert_array_equal(pts.xy_px, [[80, 120], [300, 50], [20, 10]])  # (x, y) = (col, row)


def test_spaceranger_problems(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a Space Ranger outs folder"):
        read_points(tmp_path)
    (tmp_path / "spatial").mkdir()
    (tmp_path / "spatial" / "tissue_positions.csv").write_text("barcode,in_tissue,array_row\nA,1,0\n")
    with pytest.raises(InputError, match="missing column.*pxl_row_in_fullres"):
        read_points(tmp_path)
    (tmp_path / "spatial" / "tissue_positions.csv").write_text(
        "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\nA,0,0,0,1,1\n")
    with pytest.raises(InputError, match="no in-tissue spots"):
        read_points(tmp_path)
    with pytest.raises(InputError, match="no such points file"):
        read_points(tmp_path / "missing.csv")


def test_points_outside_the_slide_are_named() -> None:
    pts = QueryPoints(np.array([[1.0, 1.0], [-3.0, 5.0], [99.0, 10.0], [100.0, 10.0], [5.0, 60.0]]),
                      ["a", "b", "c", "d", "e"], "pts.csv")
    with pytest.raises(InputError) as e:
        check_points_inside(pts, shape0=(50, 100), slide="s.zarr")
    msg = str(e.value)
    assert msg.startswith("pts.csv: 3 of 5 point(s) lie outside the slide s.zarr (100 x 50")
    assert "'b' at (-3.0, 5.0)" in msg and "'d' at (100.0, 10.0)" in msg and "'c'" not in msg
    check_points_inside(QueryPoints(pts.xy_px[[0, 2]], None, "p"), shape0=(50, 100), slide="s")
    with pytest.raises(InputError, match=r"row 1 \(0-based\) at \(-3.0, 5.0\)"):
        check_points_inside(QueryPoints(pts.xy_px, None, "p"), shape0=(50, 100), slide="s")
    with pytest.raises(InputError, match=r"line 3 at \(-3.0, 5.0\)"):  # read from a CSV: the file's line
        check_points_inside(QueryPoints(pts.xy_px, None, "p", lines=[2, 3, 4, 5, 6]), shape0=(50, 100), slide="s")


def test_csv_points_outside_name_the_file_lines(tmp_path: Path) -> None:
    f = tmp_path / "pts.csv"
    f.write_text("x,y\n1,1\n\n-3,5\n")
    pts = read_points(f)
    assert pts.lines == [2, 4]
    with pytest.raises(InputError, match=r"line 4 at \(-3.0, 5.0\)"):
        check_points_inside(pts, shape0=(50, 100), slide="s")
