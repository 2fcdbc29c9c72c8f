"""``hishrst fit / evaluate / synth`` failures: one line naming the file, problem and fix; exit 1; no traceback;
inputs and earlier runs unchanged; no partial run folders left behind."""

from __future__ import annotations

import errno
import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

pytest.importorskip("torch")

from hishrst_train import cli  # noqa: E402

FAST = ["--epochs", "1", "--no-progress", "--device", "cpu", "--encoder", "test-vit", "--allow-test-encoder"]


def invoke(cmd, args) -> Result:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CliRunner().invoke(cmd, [str(a) for a in args])


def assert_one_line_error(r: Result, *needles: str) -> str:
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature_cache")


@pytest.fixture(scope="module")
def run(small_section, tmp_path_factory, cache) -> Path:
    """A one-epoch recovery run made through the CLI."""
    from tests.conftest import torch_threads

    out = tmp_path_factory.mktemp("cli") / "run"
    with torch_threads(1):
        r = invoke(cli.fit, [small_section, "--out", out, "--cache-dir", cache, *FAST])
    assert r.exit_code == 0, r.output
    return out


def test_unknown_encoder_is_a_usage_error(small_section, tmp_path):
    r = invoke(cli.fit, [small_section, "--out", tmp_path / "r", "--encoder", "nope"])
    assert r.exit_code == 2 and "nope" in r.output and not (tmp_path / "r").exists()


def test_existing_run_refused_without_overwrite(run, small_section):
    before, inputs = tree_digest(run), tree_digest(small_section.parent)
    r = invoke(cli.fit, [small_section, "--out", run, *FAST])
    assert_one_line_error(r, str(run), "--overwrite")
    assert tree_digest(run) == before and tree_digest(small_section.parent) == inputs


def test_failed_fit_keeps_old_run_and_leaves_no_partial(run, small_section, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    before = tree_digest(run)
    r = invoke(cli.fit, [small_section, "--out", run, "--overwrite", "--weights", bad, *FAST])
    assert_one_line_error(r, str(bad))  # WeightsError wrapping the SafetensorError
    assert tree_digest(run) == before
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")]  # no hidden partial sibling
    r = invoke(cli.fit, [small_section, "--out", tmp_path / "new", "--weights", bad, *FAST])
    assert_one_line_error(r, str(bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_disk_full_while_writing_names_the_run_and_leaves_nothing(small_section, tmp_path, cache, monkeypatch):
    import hishrst_train.tasks as tasks

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tasks, "atomic_write", full)
    out = tmp_path / "r"
    r = invoke(cli.fit, [small_section, "--out", out, "--cache-dir", cache, *FAST])
    assert_one_line_error(r, str(out), "No space left")
    assert list(tmp_path.iterdir()) == []


def test_permission_denied_names_the_file(small_section, tmp_path, cache, monkeypatch):
    import hishrst_train.train as train

    def denied(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(train, "atomic_write", denied)
    r = invoke(cli.fit, [small_section, "--out", tmp_path / "r", "--cache-dir", cache, *FAST])
    assert_one_line_error(r, "model.safetensors", "Permission denied")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_weights_of_a_run_is_one_line(run, tmp_path, small_section):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 20)
    r = invoke(cli.evaluate, [broken, "--on", small_section, "--no-progress", "--device", "cpu", "--allow-test-encoder"])
    assert_one_line_error(r, str(broken / "model.safetensors"))


def test_corrupt_predictions_is_one_line(run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "predictions.h5ad").write_bytes(b"garbage")
    r = invoke(cli.evaluate, [broken, "--allow-test-encoder"])
    assert_one_line_error(r, str(broken / "predictions.h5ad"))


def test_image_option_is_used_and_recorded(small_section, tmp_path, cache):
    from hishrst_train.synth import make_synthetic_visium

    other = make_synthetic_visium(tmp_path / "other", preset="small", seed=3).parent / "image.tif"
    out = tmp_path / "r"
    r = invoke(cli.fit, [small_section, "--out", out, "--image", other, "--cache-dir", tmp_path / "c", *FAST])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["image"] == str(other.resolve()) and cfg["sections"][0]["fullres_image"] == str(other)
    sidecars = list((tmp_path / "c").rglob("*.json"))  # the features were cut from OTHER, not outs' own image
    assert [json.loads(p.read_text())["image_key"] for p in sidecars] == [str(other)]
    r = invoke(cli.fit, [small_section, small_section, "--out", tmp_path / "r2", "--image", other, *FAST])
    assert_one_line_error(r, "--image", "PATH.h5ad:IMAGE")


def test_h5ad_without_image_and_missing_data(tmp_path):
    (tmp_path / "x.h5ad").write_bytes(b"")
    r = invoke(cli.fit, [tmp_path / "x.h5ad", "--out", tmp_path / "r", *FAST])
    assert_one_line_error(r, str(tmp_path / "x.h5ad"), ":IMAGE")
    r = invoke(cli.fit, [tmp_path / "nope", "--out", tmp_path / "r", *FAST])
    assert_one_line_error(r, str(tmp_path / "nope"), "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5ad"]


def test_cuda_without_gpu_is_one_line(small_section, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = invoke(cli.fit, [small_section, "--out", tmp_path / "r", "--epochs", "1", "--device", "cuda"])
    assert_one_line_error(r, "--device cuda", "--device cpu")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_fit_on_cuda(small_section, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    r = invoke(cli.fit, [small_section, "--out", tmp_path / "r", "--epochs", "2", "--no-progress", "--device", "cuda",
                         "--encoder", "test-vit", "--allow-test-encoder"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "config.json").read_text())["summary"]["device"] == "cuda"


def test_fit_without_torch_names_the_train_extra(small_section, tmp_path):
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # simulate a base install without the [train] extra\n"
        "from click.testing import CliRunner\n"
        "from hishrst_train.cli import fit\n"
        f"r = CliRunner().invoke(fit, [{str(small_section)!r}, '--out', {str(tmp_path / 'r')!r}])\n"
        "print(r.exit_code); print(r.stderr, end='')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    code_line, *err = p.stdout.splitlines()
    assert code_line == "1" and len(err) == 1, p.stdout + p.stderr
    assert 'pip install "hishrst[train]"' in err[0] and "torch" in err[0]
    assert not (tmp_path / "r").exists()


def test_synth_several_sections(tmp_path):
    r = invoke(cli.synth, [tmp_path / "s", "--sections", "2", "--seed", "5"])
    assert r.exit_code == 0, r.output
    outs = sorted(tmp_path.rglob("filtered_feature_bc_matrix.h5"))
    assert len(outs) == 2
