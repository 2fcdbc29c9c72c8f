"""Tests of ``hishrst features``: per-slide encoder embeddings as TRIDENT-style HDF5 files.

Torch-free tests run the tiny bundle (``tiny_bundle``: 8-px tiles → 4 features, 32 µm patches at 0.5 µm/px)
over small synthetic OME-Zarr discs; one test compares against the training feature extractor
(``hishrst_train.features.extract_features``) with the PyTorch ``test-vit`` encoder of ``small_bundle``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

h5py = pytest.importorskip("h5py")

from hishrst_runtime.cli.features import features  # noqa: E402
from hishrst_runtime.core.owned import OWNER_ATTR  # noqa: E402
from hishrst_runtime.core.patches import cut_patch, patch_origins, patch_side_px, resize_image  # noqa: E402
from hishrst_runtime.slides.convert import write_ome_zarr  # noqa: E402
from tests.runtime.images import disc_image  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
SIDE = 640




@pytest.fixture(scope="module")
def disc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("feat_slides")
    return write_ome_zarr(disc_image(), d / "s0.ome.zarr", mpp=0.5, chunk=256)


def invoke(args: list[Any]) -> Result:
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("SLURM_ARRAY_")}
    return CliRunner().invoke(features, [str(a) for a in args], env=env, catch_exceptions=False)


def read(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        return {"features": f["features"][:], "coords": f["coords"][:], "center": f["coords_center"][:],
                "attrs": dict(f.attrs), "coords_attrs": dict(f["coords"].attrs),
                "names": f["obs_names"].asstr()[:].tolist() if "obs_names" in f else None}


COMMON = ["--pitch-um", "12", "--provider", "cpu", "--batch-size", "16", "--no-progress"]


def test_layout_and_attributes(disc: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    from hishrst_runtime.bundle.manifest import load_bundle

    out = tmp_path / "out"
    r = invoke([disc, "--bundle", tiny_bundle, "--out", out, *COMMON])
    assert r.exit_code == 0, r.output
    h5 = out / "s0.h5"
    assert h5.is_file() and not (out / "s0.h5.partial").exists() and not (out / "s0.h5.lock").exists()
    got = read(h5)
    n = len(got["features"])
    assert n > 100 and got["features"].shape == (n, 4) and got["features"].dtype == np.float32
    assert got["coords"].shape == (n, 2) and got["coords"].dtype == np.int64
    assert got["center"].shape == (n, 2) and got["center"].dtype == np.float64
    assert np.isfinite(got["features"]).all() and np.abs(got["features"]).sum(axis=1).min() > 0  # every row written
    side0 = patch_side_px(32.0, 0.5)
    np.testing.assert_array_equal(got["coords"], patch_origins(got["center"], side0))
    a, ca = got["attrs"], got["coords_attrs"]
    bundle = load_bundle(tiny_bundle)
    assert a["encoder"] == bundle.spec.encoder.name and a["feature_dim"] == 4 and a["patch_size_um"] == 32.0
    assert a["patch_size_level0"] == side0 == 64 and a["patch_size_px"] == 8 and a["mpp"] == 0.5
    assert a["bundle_sha256"] == bundle.sha256 and a["hishrst_version"] and a["points"] == "grid"
    assert json.loads(a[OWNER_ATTR])["kind"] == "features"
    assert ca["patch_size_level0"] == 64 and ca["patch_size"] == 8 and ca["level0_magnification"] == 20.0
    assert ca["overlap"] == 0 and ca["name"] == "s0.ome.zarr"


def test_features_equal_the_encoder_onnx_on_the_same_tiles(disc: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    import onnxruntime as ort
    from PIL import Image

    points = tmp_path / "pts.csv"
    xy = np.array([[320.5, 320.0], [200.0, 250.25], [400.0, 410.0], [330.0, 200.0], [250.0, 420.0]])
    points.write_text("id,x,y\n" + "".join(f"p{i},{x},{y}\n" for i, (x, y) in enumerate(xy)))
    out = tmp_path / "out"
    r = invoke([disc, "--bundle", tiny_bundle, "--out", out, "--points", points, "--provider", "cpu",
                "--batch-size", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    got = read(out / "s0.h5")
    assert got["names"] == [f"p{i}" for i in range(5)] and got["attrs"]["points"] == "explicit"
    np.testing.assert_array_equal(got["center"], xy)  # the file's order, not the groups'
    img = disc_image()
    tiles = np.stack([np.asarray(resize_image(Image.fromarray(cut_patch(img, c, 64)), 8)) for c in xy])
    sess = ort.InferenceSession(str(tiny_bundle / "encoder.onnx"), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"tiles": tiles})[0]
    np.testing.assert_allclose(got["features"], want, rtol=0, atol=1e-6)


CHILD = textwrap.dedent("""
    import os, signal, sys
    from hishrst_runtime.output import features_h5
    nth, seen, real = int(sys.argv[1]), [0], features_h5.FeaturesFile.write_rows
    def write_rows(self, rows, values):
        seen[0] += 1
        if seen[0] == nth:
            self.h5.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, rows, values)
    features_h5.FeaturesFile.write_rows = write_rows
    from hishrst_runtime.cli.features import features
    features.main(sys.argv[2:], prog_name="hishrst features")
""")


def test_resume_after_kill_gives_the_same_file(disc: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    args = [disc, "--bundle", tiny_bundle, *COMMON]
    assert invoke([*args, "--out", tmp_path / "ref"]).exit_code == 0
    ref = read(tmp_path / "ref" / "s0.h5")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, "3", *map(str, [*args, "--out", out])], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert (out / "s0.h5.partial").exists() and not (out / "s0.h5").exists()
    r = invoke([*args, "--out", out])  # an incomplete slide is refused without --resume
    assert r.exit_code == 1 and "--resume" in r.output and not (out / "s0.h5").exists()
    r = invoke([*args, "--out", out, "--resume"])
    assert r.exit_code == 0, r.output
    got = read(out / "s0.h5")
    assert not (out / "s0.h5.partial").exists()
    assert got["features"].tobytes() == ref["features"].tobytes()
    np.testing.assert_array_equal(got["coords"], ref["coords"])
    np.testing.assert_array_equal(got["center"], ref["center"])
    assert got["coords_attrs"] == ref["coords_attrs"]
    assert {k: v for k, v in got["attrs"].items() if k != "slide"} == \
        {k: v for k, v in ref["attrs"].items() if k != "slide"}


def test_complete_skipped_overwrite_replaces_foreign_never(disc: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [disc, "--bundle", tiny_bundle, "--out", out, *COMMON]
    assert invoke(args).exit_code == 0
    h5 = out / "s0.h5"
    before = h5.stat().st_mtime_ns
    r = invoke(args)
    assert r.exit_code == 0 and "skipped" in r.output and h5.stat().st_mtime_ns == before
    r = invoke([*args, "--overwrite"])
    assert r.exit_code == 0 and "1 ok" in r.output and h5.stat().st_mtime_ns != before
    with h5py.File(h5, "w") as f:  # a file hishrst did not write (no owner mark)
        f["features"] = np.zeros((2, 2), np.float32)
    for extra in ([], ["--overwrite"], ["--resume"]):
        r = invoke([*args, *extra])
        assert r.exit_code == 1 and "not written by hishrst" in r.output, r.output
        with h5py.File(h5, "r") as f:
            assert f["features"].shape == (2, 2) and OWNER_ATTR not in f.attrs
    h5.write_text("not hdf5")
    r = invoke([*args, "--overwrite"])
    assert r.exit_code == 1 and h5.read_text() == "not hdf5"


def test_every_option_has_help_and_the_command_is_registered() -> None:
    import click

    from hishrst.cli import main

    cmd = main.get_command(click.Context(main), "features")
    assert cmd is features
    missing = [p.opts[-1] for p in cmd.params if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not missing
    assert "features" in CliRunner().invoke(main, ["--help"]).output


def test_output_inside_an_input_is_refused(disc: Path, tiny_bundle: Path) -> None:
    r = invoke([disc, "--bundle", tiny_bundle, "--out", disc / "feats", *COMMON])
    assert r.exit_code == 1 and "nothing was written" in r.output
    assert not (disc / "feats").exists()


def test_features_match_the_training_extractor(small_bundle: Path, small_section: Path, tmp_path: Path) -> None:
    """``hishrst features`` at given points equals ``hishrst_train.features.extract_features`` (PyTorch)."""
    torch = pytest.importorskip("torch")
    from hishrst_runtime.bundle.manifest import load_bundle
    from hishrst_train.data import image_mpp, open_fullres_image
    from hishrst_train.encoders import load_encoder
    from hishrst_train.features import extract_features

    tif = next(small_section.parent.glob("image.tif*"))
    with open_fullres_image(tif) as im:
        img, mpp = np.asarray(im), float(image_mpp(tif))
    slide = write_ome_zarr(img, tmp_path / "section.ome.zarr", mpp=mpp, chunk=256)
    rng = np.random.default_rng(0)
    xy = rng.uniform(200, min(img.shape[:2]) - 200, (24, 2)).round(1)
    points = tmp_path / "pts.csv"
    points.write_text("x,y\n" + "".join(f"{x},{y}\n" for x, y in xy))
    r = invoke([slide, "--bundle", small_bundle, "--out", tmp_path / "out", "--points", points, "--provider", "cpu",
                "--batch-size", "8", "--no-progress"])
    assert r.exit_code == 0, r.output
    got = read(tmp_path / "out" / "section.h5")
    bundle = load_bundle(small_bundle)
    assert got["attrs"]["level"] == 0  # the training resolution is level 0 of this slide
    torch.set_num_threads(1)
    want = extract_features(img, xy, encoder=load_encoder(bundle.spec.encoder.name).eval(), mpp=mpp,
                            patch_um=bundle.patch_um, batch_size=8, progress=False, num_workers=0)
    assert got["features"].shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    assert float(np.abs(got["features"] - want).max()) <= 1e-4 * scale
