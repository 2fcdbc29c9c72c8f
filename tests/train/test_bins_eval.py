"""Bin-level scoring of sub-spot maps (hishrst_train.bins_eval) and `hishrst evaluate --bins`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hishrst_train.bins_eval import BinWindow, choose_window, grid16_bin_map, interpolated_bin_map, score_maps


def _window(n: int = 8, mpp: float = 0.5) -> BinWindow:
    valid = np.ones((n, n), bool)
    valid[0, :3] = False
    return BinWindow(r0=4, c0=6, valid=valid, bin_px=8.0 / mpp, mpp=mpp)


def test_window_is_even_centred_and_marks_tissue() -> None:
    rr, cc = np.mgrid[10:30, 40:70]
    table = pd.DataFrame({"array_row": rr.ravel(), "array_col": cc.ravel(), "tissue_fraction": 1.0})
    table.loc[0, "tissue_fraction"] = 0.2
    w = choose_window(table, mpp=0.5, window_um=80.0)
    assert w.shape == (10, 10) and w.valid.sum() == 100
    kept = table[table["tissue_fraction"] >= 0.5]
    assert (w.r0, w.c0) == tuple(int(v) - 5 for v in np.round(kept[["array_row", "array_col"]].to_numpy().mean(0)))
    assert w.bin_px == 16.0 and w.tissue_mm2 == pytest.approx(100 * 64e-6)


def test_interpolation_is_exact_for_a_linear_field() -> None:
    w = _window()
    rng = np.random.default_rng(0)
    spots = rng.uniform(0, 400, (60, 2))
    field = lambda xy: np.stack([xy[:, 0] * 0.01, 3 - xy[:, 1] * 0.002], axis=1)  # noqa: E731
    out = interpolated_bin_map(field(spots), spots, w)
    centres = w.centres_px().reshape(-1, 2)
    inside = (centres.min(1) > 60) & (centres.max(1) < 340)
    np.testing.assert_allclose(out.reshape(-1, 2)[inside], field(centres)[inside], rtol=1e-5, atol=1e-5)
    assert np.isfinite(out).all()  # nearest spot outside the hull


def test_grid16_gives_each_bin_its_blocks_value_and_counts_passes() -> None:
    w = _window()
    calls = []

    def predict(centres: np.ndarray) -> np.ndarray:
        calls.append(len(centres))
        return centres[:, :1] * 1.0

    out, passes = grid16_bin_map(predict, w)
    assert passes == calls[0] == 16  # every 2×2 block has tissue
    assert out.shape == (8, 8, 1) and np.all(out[0::2, 0::2] == out[1::2, 1::2])
    np.testing.assert_allclose(out[0, 0, 0], w.centres_px(2)[0, 0, 0])


def test_perfect_maps_score_one_and_pooling_keeps_it() -> None:
    w = _window()
    rng = np.random.default_rng(1)
    truth = rng.gamma(2.0, 1.0, (8, 8, 5)).astype(np.float32)
    s = score_maps(truth, {"subspot": truth.copy(), "interpolated_spots": truth[::-1].copy()}, w, n_ssim_genes=3)
    assert s["8um"]["subspot"]["pcc_mean"] == pytest.approx(1.0)
    assert s["16um"]["subspot"]["pcc_mean"] == pytest.approx(1.0)
    assert s["8um"]["interpolated_spots"]["pcc_mean"] < 0.5
    assert s["n_bins"] == {"8um": 61, "16um": 14}


@pytest.mark.slow
def test_evaluate_bins_cli_end_to_end(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from hishrst.cli import main
    from hishrst_train.synth import make_synthetic_visium
    from hishrst_train.tasks import fit_run

    outs = make_synthetic_visium(tmp_path / "sec", preset="small", seed=2)
    for head in ("spot", "subspot"):
        fit_run([outs], out=tmp_path / head, task="full", encoder="test-vit-uni", allow_test_encoder=True, head=head,
                epochs=2, n_genes=30, progress=False)
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "subspot"), "--bins", str(tmp_path / "sec"), "--spot-run",
                                  str(tmp_path / "spot"), "--window-um", "400", "--allow-test-encoder"])
    assert r.exit_code == 0, r.output
    assert "encoder passes per mm²" in r.output
    folder = tmp_path / "subspot" / "eval_bins" / "sec"
    m = json.loads((folder / "metrics.json").read_text())
    assert set(m["8um"]) == {"subspot", "interpolated_spots", "spot_grid_16um"}
    assert m["cost"]["passes_per_mm2"]["spot_grid_16um"] > 10 * m["cost"]["passes_per_mm2"]["subspot"]
    assert (folder / "figure.png").stat().st_size > 10_000
    assert pd.read_csv(folder / "per_gene.csv").shape == (30, 7)
