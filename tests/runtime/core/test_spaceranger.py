"""The one Space Ranger spot-table parser (training's Visium reader and hishrst-run --points use it)."""

from __future__ import annotations

import numpy as np
import pytest

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.spaceranger import find_spot_table, read_spot_table

ROWS = ["AAA-1,1,0,0,100.5,200", "CCC-1,0,0,2,110,220.25", "GGG-1,1,1,1,120,240"]
HEADER = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"


@pytest.mark.parametrize(("name", "header"), [("tissue_positions.csv", True), ("tissue_positions_list.csv", False),
                                              ("tissue_positions.csv", False)])
def test_header_is_recognised_whatever_the_file_name(tmp_path, name, header):
    spatial = tmp_path / "outs" / "spatial"
    spatial.mkdir(parents=True)
    (spatial / name).write_text("\n".join(([HEADER] if header else []) + ROWS) + "\n")
    path = find_spot_table(tmp_path / "outs")
    assert path == spatial / name
    t = read_spot_table(path)
    assert list(t.barcodes) == ["AAA-1", "CCC-1", "GGG-1"]
    assert t.in_tissue.tolist() == [True, False, True]
    np.testing.assert_array_equal(t.xy_px, [[200, 100.5], [220.25, 110], [240, 120]])  # (x, y) = (col, row)
    np.testing.assert_array_equal(t.array_rc, [[0, 0], [0, 2], [1, 1]])
    assert t.lines.tolist() == ([2, 3, 4] if header else [1, 2, 3])


def test_reordered_header_columns(tmp_path):
    p = tmp_path / "tissue_positions.csv"
    p.write_text("in_tissue,barcode,array_row,array_col,pxl_col_in_fullres,pxl_row_in_fullres\n1,AAA-1,3,4,50,60\n")
    t = read_spot_table(p)
    assert list(t.barcodes) == ["AAA-1"] and t.xy_px.tolist() == [[50.0, 60.0]] and t.array_rc.tolist() == [[3, 4]]


@pytest.mark.parametrize(("text", "needle"), [
    (HEADER.replace(",array_col", "") + "\nAAA-1,1,0,100,200\n", "missing column(s) array_col"),
    ("AAA-1,1,0,0,100\n", "line 1 has 5 field(s)"),
    ("AAA-1,1,0,0,abc,200\n", "line 1: pxl_row_in_fullres 'abc' is not a number"),
    ("AAA-1,1,0,0,nan,200\n", "is not finite"),
])
def test_malformed_tables_name_the_file_and_line(tmp_path, text, needle):
    p = tmp_path / "tissue_positions.csv"
    p.write_text(text)
    with pytest.raises(InputError, match="tissue_positions.csv") as e:
        read_spot_table(p)
    assert needle in str(e.value)


def test_no_table(tmp_path):
    assert find_spot_table(tmp_path) is None
