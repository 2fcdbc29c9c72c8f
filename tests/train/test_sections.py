"""Several sections: fit on a mix, `--task full`, `evaluate --on` unseen sections, leave-one-section-out CV."""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from hishrst_train.evaluate import evaluate_on, evaluate_run  # noqa: E402
from hishrst_train.tasks import fit_run  # noqa: E402

FAST = dict(epochs=2, progress=False, position_mode="relative", encoder="test-vit", allow_test_encoder=True)


@pytest.fixture(scope="module")
def sections(small_section, tmp_path_factory):
    """Two small synthetic sections (seeds 0 and 1) and a shared feature cache."""
    from hishrst_train.synth import make_synthetic_visium

    root = tmp_path_factory.mktemp("sections")
    other = make_synthetic_visium(root / "other", preset="small", seed=1)
    return small_section, other, root / "cache"


@pytest.fixture(autouse=True)
def _quiet():
    from tests.conftest import torch_threads

    with torch_threads(1), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="only .* genes available")
        yield


def test_parse_section_syntax(sections, tmp_path):
    from hishrst_train.data.sections import parse_section, resolve_sections, section_names

    a, b, _ = sections
    h5 = tmp_path / "s.h5ad"
    h5.touch()
    img = a.parent / "image.tif"
    spec = parse_section(f"{h5}:{img}")
    assert (spec.kind, spec.data, spec.image) == ("h5ad", h5, img)
    assert [s.kind for s in resolve_sections([a, b])] == ["visium", "visium"]
    assert section_names(resolve_sections([a, a.parent])) == [a.parent.name, f"{a.parent.name}-2"]
    with pytest.raises(ValueError, match="single DATA"):
        resolve_sections([a, b], image=img)


def test_two_sections_recovery(sections, tmp_path):
    a, b, cache = sections
    s = fit_run([a, b], out=tmp_path / "r", n_genes=60, cache_dir=cache, **FAST)
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["schema_version"] == 5 and [x["name"] for x in cfg["sections"]] == [a.parent.name, b.parent.name]
    assert cfg["position"]["mode"] == "relative" and len(cfg["genes"]) == 60 and s["n_sections"] == 2
    assert cfg["preprocessing"]["hvg_batch"] == "section"
    split = json.loads((tmp_path / "r" / "split.json").read_text())
    train, heldout = set(split["train"]) | set(split["validation"]), set(split["heldout"])
    assert not train & heldout and len(train | heldout) == s["n_spots"]
    assert {k.split(":")[0] for k in heldout} == {a.parent.name, b.parent.name}
    pred = ad.read_h5ad(tmp_path / "r" / "predictions.h5ad")
    assert set(pred.obs_names) == heldout and set(pred.obs["section"]) == {a.parent.name, b.parent.name}
    m = evaluate_run(tmp_path / "r", ari=False)
    assert "baseline_train_mean" in m and 0 < m["model"]["ssim_mean"] <= 1


def test_groups_never_span_sections(sections):
    from hishrst_train.targets import build_targets, training_groups
    from hishrst_train.tasks import open_sections

    a, b, _ = sections
    secs = open_sections([a, b])
    t = build_targets(secs, task="full", seed=0, n_genes=1000)
    _, groups, val_groups = training_groups(secs, t, seed=0, val_frac=0.1, max_group=50)
    for g in groups + val_groups:
        assert len(np.unique(np.searchsorted(t.offsets, g, side="right"))) == 1
    # validation takes whole groups: as dense as training groups (a random sample grouped among itself is not)
    xy = np.concatenate([s.xy for s in secs])

    def spacing(gs):
        return np.median([np.sort(np.linalg.norm(xy[g][:, None] - xy[g][None], axis=-1), axis=1)[:, 1].mean()
                          for g in gs if len(g) > 1])

    assert val_groups and spacing(val_groups) < 1.3 * spacing(groups)


def test_full_run_then_evaluate_on_unseen_section(sections, tmp_path):
    a, b, cache = sections
    run = tmp_path / "full"
    s = fit_run(a, out=run, task="full", cache_dir=cache, **FAST)
    assert s["n_val"] > 0 and s["n_train"] + s["n_val"] == s["n_spots"]
    assert not (run / "predictions.h5ad").exists()
    with pytest.raises(ValueError, match="--on"):
        evaluate_run(run)
    with pytest.raises(ValueError, match="trained on this section"):
        evaluate_on(run, [a], progress=False)
    m = evaluate_on(run, [b], cache_dir=cache, progress=False)
    folder = run / "eval" / b.parent.name
    assert (folder / "metrics.json").is_file() and (folder / "per_gene_metrics.csv").is_file()
    assert not (run / "metrics.json").exists()  # the run's own metrics are never written by --on
    assert m["n_heldout_spots"] == ad.read_h5ad(folder / "predictions.h5ad").n_obs
    assert {"baseline_train_mean", "baseline_mean", "ari_prediction"} <= set(m) and "warning" not in m
    assert "mse_train_mean" in (folder / "per_gene_metrics.csv").read_text().splitlines()[0]


def test_cv_leave_one_section_out(sections, tmp_path):
    from hishrst_train.cli import cv

    a, b, cache = sections
    out = tmp_path / "cv"
    args = [a, b, "--out", out, "--epochs", "1", "--no-progress", "--device", "cpu", "--cache-dir", cache, "--no-ari",
            "--encoder", "test-vit", "--allow-test-encoder"]
    r = CliRunner().invoke(cv, [str(x) for x in args])
    assert r.exit_code == 0, r.output
    lines = (out / "cv_metrics.csv").read_text().splitlines()
    assert lines[0].startswith("fold,heldout,n_spots,pcc_mean") and len(lines) == 4 and lines[-1].startswith("mean")
    assert "mean" in r.stdout and (out / f"fold0-{a.parent.name}" / "eval" / a.parent.name / "metrics.json").is_file()
    r = CliRunner().invoke(cv, [str(x) for x in args])
    assert r.exit_code == 1 and "--overwrite" in r.stderr
    assert json.loads((out / "cv.json").read_text())["status"] == "complete"


def test_interrupted_cv_can_be_redone_with_overwrite(sections, tmp_path, monkeypatch):
    """A cross-validation killed after its first fold is still recognised as one: --overwrite redoes it."""
    import hishrst_train.evaluate as evaluate_mod
    from hishrst_train.cli import cv

    a, b, cache = sections
    out = tmp_path / "cv"
    args = [a, b, "--out", out, "--epochs", "1", "--no-progress", "--device", "cpu", "--cache-dir", cache, "--no-ari",
            "--encoder", "test-vit", "--allow-test-encoder"]

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_mod, "evaluate_on", interrupted)
    CliRunner().invoke(cv, [str(x) for x in args])
    assert json.loads((out / "cv.json").read_text())["status"] == "running"
    monkeypatch.undo()
    r = CliRunner().invoke(cv, [str(x) for x in args])
    assert r.exit_code == 1 and "--overwrite" in r.stderr  # refused without it, but as a cv folder
    r = CliRunner().invoke(cv, [str(x) for x in [*args, "--overwrite"]])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "cv.json").read_text())["status"] == "complete"


def test_runconfig_reads_version_2(small_run):
    from hishrst_train.runconfig import RunConfig

    d = json.loads((small_run / "config.json").read_text())
    d["schema_version"] = 2
    d.pop("sections")
    cfg = RunConfig.from_dict(d)
    assert cfg.schema_version == 5 and cfg.sections[0]["data"] == d["data"]
