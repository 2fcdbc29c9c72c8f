"""The training stage end to end on the synthetic `small` preset with the test encoder."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

pytest.importorskip("torch")

from hishrst_train.evaluate import evaluate_run  # noqa: E402
from hishrst_train.tasks import fit_run, load_section  # noqa: E402

#: The random test encoder, allowed on purpose (fit refuses it otherwise).
TEST_ENCODER = {"encoder": "test-vit", "allow_test_encoder": True}

@pytest.fixture(scope="module")
def section(small_section):
    return small_section


@pytest.fixture(scope="module")
def runs(small_run, small_section, tmp_path_factory):
    """The shared image run (conftest) and a position-only run trained identically but without image features."""
    from tests.conftest import SMALL_RUN_EPOCHS, torch_threads

    root = tmp_path_factory.mktemp("runs")
    with torch_threads(1):
        fit_run(small_section, out=root / "pos", epochs=SMALL_RUN_EPOCHS, progress=False, **TEST_ENCODER,
                      cache_dir=root / "cache", image_features=False)
    summary = json.loads((small_run / "config.json").read_text())["summary"]
    return small_run, summary, root / "pos"


def test_recovery_beats_mean_and_position_only_baselines(runs):
    run, _, pos = runs
    with_image = evaluate_run(run, ssim=False, ari=False)
    position_only = evaluate_run(pos, ssim=False, ari=False)
    m, p = with_image["model"], position_only["model"]
    # The mean-expression baseline is constant per gene: its PCC is undefined, scored 0 and counted.
    assert with_image["baseline_mean"]["n_constant"] == m["n_genes"]
    assert with_image["baseline_mean"]["pcc_mean_constant_as_zero"] == 0.0
    assert m["pcc_mean_constant_as_zero"] > 0.05
    assert m["pcc_mean_constant_as_zero"] > p["pcc_mean_constant_as_zero"] + 0.01, (m, p)


def test_run_directory_contents_and_leakage_rule(runs, section):
    run, summary, _ = runs
    for name in ("model.safetensors", "config.json", "predictions.h5ad", "split.json", "history.json"):
        assert (run / name).is_file()
    split = json.loads((run / "split.json").read_text())
    assert not set(split["train"]) & set(split["heldout"])
    assert not set(split["validation"]) & (set(split["heldout"]) | set(split["train"]))
    pred = ad.read_h5ad(run / "predictions.h5ad")
    assert set(pred.obs_names) == set(split["heldout"])  # scored on held-out spots only
    # Gene selection saw the training spots only.
    from hishrst_train.preprocess import select_hvgs

    adata = load_section(section)
    mask = adata.obs_names.isin(split["train"] + split["validation"])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["genes"] == list(select_hvgs(adata, n_top=1000, train_mask=mask))
    assert cfg["patch"]["size_um"] == 64.0 and cfg["grouping"]["max_size"] == 50
    assert summary["n_train"] + summary["n_val"] + summary["n_heldout"] == adata.n_obs
    assert summary["n_val"] > 0 and 1 <= summary["best_epoch"] <= summary["epochs_run"]


def test_evaluate_writes_metrics_and_ssim_ari(runs):
    run, _, _ = runs
    s = evaluate_run(run)
    assert (run / "metrics.json").is_file()
    lines = (run / "per_gene_metrics.csv").read_text().splitlines()
    assert lines[0].startswith("gene,pcc,mse,mae,constant,ssim")
    assert -1 <= s["ari_prediction"] <= 1 and 0 < s["model"]["ssim_mean"] <= 1


def test_generation_task_dense_grid(section, tmp_path):
    from tests.conftest import torch_threads

    with torch_threads(1):
        s = fit_run(section, out=tmp_path / "gen", task="generation", epochs=3, progress=False, cache_dir=tmp_path / "c",
                    **TEST_ENCODER)
    dense = ad.read_h5ad(tmp_path / "gen" / "dense.h5ad")
    assert dense.n_obs == s["n_dense"] and 3.0 < dense.n_obs / s["n_spots"] < 4.0
    assert np.all(np.asarray(dense.X) >= 0)
    # Positions come from the fitted array→pixel affine: measured spots land on their pixels.
    adata = load_section(section)
    A = np.asarray(dense.uns["array_to_pixel_affine"])
    rc = adata.obs[["array_row", "array_col"]].to_numpy(float)
    np.testing.assert_allclose(rc @ A[:, :2].T + A[:, 2], adata.obsm["spatial"], atol=1.0)
    with pytest.raises(ValueError, match="generation run has no held-out"):
        evaluate_run(tmp_path / "gen")


def test_fit_errors_clearly(tmp_path):
    with pytest.raises(ValueError, match="task"):
        fit_run(tmp_path, out=tmp_path / "r", task="upscale")  # type: ignore[arg-type]
    (tmp_path / "x.h5ad").touch()
    with pytest.raises(ValueError, match="--image"):
        fit_run(tmp_path / "x.h5ad", out=tmp_path / "r")


def test_cli_help_lists_commands_without_importing_torch():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from hishrst.cli import main\n"
        "r = CliRunner().invoke(main, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "for c in ('synth', 'fit', 'evaluate', 'export', 'run', 'convert', 'demo'): assert c in r.output\n"
        "r = CliRunner().invoke(main, ['run', '--help'])\n"
        "assert r.exit_code == 0 and '--bundle' in r.output, r.output\n"
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'torch imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr  # every check ran


@pytest.mark.parametrize("cmd", ["synth", "fit", "evaluate", "cv", "export", "convert", "demo"])
def test_every_subcommand_has_help(cmd):
    from click.testing import CliRunner

    from hishrst.cli import main

    r = CliRunner().invoke(main, [cmd, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output


def test_early_stopping_keeps_the_best_validation_epoch():
    from hishrst_runtime.core.grouping import group_points
    from hishrst_train.model import HisHRSTConfig
    from hishrst_train.train import TrainConfig, train_model

    rng = np.random.default_rng(0)
    n = 300
    feats = rng.standard_normal((n, 16)).astype(np.float32)
    xy = rng.random((n, 2)) * 3000
    y = rng.random((n, 8)).astype(np.float32)  # pure noise: validation error can only get worse
    tr, va = np.arange(0, 240), np.arange(240, n)
    hist: dict = {}
    train_model(feats, xy, y, groups=[tr[g] for g in group_points(xy[tr])], val_groups=[va[g] for g in group_points(xy[va])],
                model_config=HisHRSTConfig(feature_dim=16, n_genes=8), train_config=TrainConfig(epochs=200, patience=3),
                history_out=hist, progress=False)
    assert len(hist["train_mse"]) < 200  # stopped early
    best = hist["best_epoch"][0]
    assert hist["val_mse"][best - 1] == min(hist["val_mse"])
    assert len(hist["train_mse"]) == best + 3
