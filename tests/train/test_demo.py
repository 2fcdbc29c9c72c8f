"""`hishrst demo` — the README's main-job command — on the small preset."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")


def test_demo_small_end_to_end(tmp_path):
    from click.testing import CliRunner

    from hishrst.cli import main

    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--preset", "small", "--epochs", "5"])
    assert r.exit_code == 0, r.output
    assert "hishrst demo summary" in r.output and "tiles/s" in r.output
    s = json.loads((tmp_path / "d" / "demo_summary.json").read_text())
    assert s["dense_points"] > 0 and s["run_tiles_per_s"] > 0
    assert (tmp_path / "d" / "predictions" / "slide.zarr").is_dir()
    # the unseen section (never trained on) was predicted at its measured spots and scored
    assert "unseen section" in r.output and s["unseen_spots"] > 0
    assert (tmp_path / "d" / "at_spots" / "slide.zarr").is_dir()
    assert 0 < s["unseen_section_mse"] and -1 <= s["unseen_section_pcc_mean"] <= 1
    assert 0 < s["baseline_ridge_mse"] and "ridge on the same embeddings" in r.output
    assert all(v <= 1e-4 for part in s["export_parity"].values() for v in part.values())
    png = tmp_path / "d" / s["png"].split("/")[-1]
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    # the sub-spot part: 8 µm bins of the unseen slide scored against the 8 µm truth, with its figure
    b = s["subspot"]
    assert b["bins"] > 10_000 and "sub-spot (8 µm bins" in r.output
    assert set(b["pcc_8um"]) == {"subspot", "interpolated_spots"} and all(-1 <= v <= 1 for v in b["pcc_8um"].values())
    fig = tmp_path / "d" / "demo_subspot.png"
    assert fig.is_file() and b["figure"]["rule"] and b["figure"]["gene"]
    assert (tmp_path / "d" / "predictions_8um" / "slide.zarr").is_dir()


@pytest.mark.slow
def test_demo_without_subspot_skips_it(tmp_path):
    from click.testing import CliRunner

    from hishrst.cli import main

    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--preset", "small", "--epochs", "2",
                                  "--no-subspot"])
    assert r.exit_code == 0, r.output
    assert "subspot" not in json.loads((tmp_path / "d" / "demo_summary.json").read_text())
    assert "1/7" in r.output and "8/9" not in r.output
