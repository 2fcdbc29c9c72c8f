"""Outputs of ``fit`` / ``cv`` / ``synth`` / ``demo`` are hishrst's own: only a folder carrying hishrst's marker
(or a strictly recognised legacy one) is replaced, and only with ``--overwrite``; one command at a time
writes an output (a lock beside it); killed runs' debris is cleaned; a full disk is one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from hishrst_runtime.core.owned import OWNER_FILE, owner_of  # noqa: E402
from hishrst_train import cli  # noqa: E402
from tests.train.cli_helpers import FAST, invoke, one_line_error  # noqa: E402







def user_folder(path: Path) -> dict[str, str]:
    """A folder of the user's files that happens to hold a ``config.json``."""
    path.mkdir(parents=True)
    files = {"config.json": '{"learning_rate": 0.1}', "notes.txt": "my thesis", "model.safetensors": "mine"}
    for name, text in files.items():
        (path / name).write_text(text)
    return files


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ownership_cache")


@pytest.fixture(scope="module")
def run(small_section, tmp_path_factory, cache) -> Path:
    """A one-epoch run through the CLI, with killed runs' debris beside it beforehand."""
    out = tmp_path_factory.mktemp("own") / "run"
    pid = dead_pid()
    (out.parent / f".run.partial-{pid}-0badc0de").mkdir()
    (out.parent / f".run.partial-{pid}-0badc0de" / "config.json").write_text("{}")
    (out.parent / f".run.tmp-{pid}-0badc0de").write_text("half")
    r = invoke(cli.fit, [small_section, "--out", out, "--cache-dir", cache, *FAST])
    assert r.exit_code == 0, r.output
    return out


def test_fit_marks_its_run_and_cleans_debris(run):
    assert owner_of(run) == "fit-run"
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]  # debris and lock file gone


def test_overwrite_never_deletes_a_folder_hishrst_did_not_write(small_section, tmp_path):
    out = tmp_path / "mine"
    files = user_folder(out)
    r = invoke(cli.fit, [small_section, "--out", out, "--overwrite", *FAST])
    one_line_error(r, str(out), "never replaced")
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_legacy_run_is_recognised_only_when_it_is_a_real_run(run, small_section, tmp_path, cache):
    legacy = tmp_path / "legacy"
    shutil.copytree(run, legacy)
    (legacy / OWNER_FILE).unlink()  # written before the marker existed
    r = invoke(cli.fit, [small_section, "--out", legacy, *FAST])
    one_line_error(r, "already holds a trained run", "--overwrite")
    r = invoke(cli.fit, [small_section, "--out", legacy, "--overwrite", "--cache-dir", cache, *FAST])
    assert r.exit_code == 0, r.output
    assert owner_of(legacy) == "fit-run"
    fake = tmp_path / "fake"
    shutil.copytree(run, fake)
    (fake / OWNER_FILE).unlink()
    (fake / "model.safetensors").unlink()  # config.json alone is not enough
    r = invoke(cli.fit, [small_section, "--out", fake, "--overwrite", *FAST])
    one_line_error(r, str(fake), "never replaced")
    assert (fake / "config.json").is_file()


def test_a_locked_run_fails_at_once_naming_the_other_process(small_section, tmp_path):
    import socket

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        lock = tmp_path / ".run.lock"
        lock.write_text(json.dumps({"hostname": socket.gethostname(), "pid": holder.pid, "started": time.time(),
                                    "token": "x"}))
        t0 = time.perf_counter()
        r = invoke(cli.fit, [small_section, "--out", out, *FAST])
        one_line_error(r, str(out), f"pid {holder.pid}", "another `hishrst fit`")
        assert time.perf_counter() - t0 < 10 and not out.exists() and lock.is_file()
    finally:
        holder.kill()
        holder.wait()
    from hishrst_train.rundir import claim_output

    with claim_output(out, command="fit"):  # the holder is gone: its lock is stale and broken
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_disk_full_while_writing_a_run_is_one_line(small_section, tmp_path, cache, monkeypatch):
    import anndata as ad

    import hishrst_train.train as train

    def hdf5_full(*a, **k):  # h5py reports ENOSPC in its message, without an errno
        raise OSError("Can't write data (file write failed: errno = 28, error message = 'No space left on device')")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", hdf5_full)
    out = tmp_path / "r"
    r = invoke(cli.fit, [small_section, "--out", out, "--cache-dir", cache, *FAST[:5], *FAST[-3:]])  # recovery: writes h5ad
    one_line_error(r, str(out), "disk is full")
    monkeypatch.undo()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train, "atomic_write", full)
    r = invoke(cli.fit, [small_section, "--out", out, "--cache-dir", cache, *FAST])
    one_line_error(r, str(out), "No space left on device")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ cv, synth, demo


def test_cv_refuses_foreign_folders_and_duplicate_sections(small_section, tmp_path):
    out = tmp_path / "cv"
    files = user_folder(out)
    (out / "cv.json").write_text('{"status": "mine"}')
    files["cv.json"] = '{"status": "mine"}'
    other = tmp_path / "copy"
    shutil.copytree(small_section.parent, other, ignore=shutil.ignore_patterns("*.png"))
    r = invoke(cli.cv, [small_section, other / "outs", "--out", out, "--overwrite", *FAST[:5]])
    one_line_error(r, str(out), "never replaced")
    assert {p.name: p.read_text() for p in out.iterdir()} == files
    r = invoke(cli.cv, [small_section, other / "outs", "--out", tmp_path / "new", *FAST[:5]])
    one_line_error(r, "same content", "given twice")
    assert not (tmp_path / "new").exists()


def test_synth_refuses_to_replace_silently(tmp_path):
    out = tmp_path / "s"
    r = invoke(cli.synth, [out, "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert owner_of(out) == "synth" and (out / "outs" / "filtered_feature_bc_matrix.h5").is_file()
    before = (out / "truth.npz").read_bytes()
    r = invoke(cli.synth, [out, "--seed", "2"])
    one_line_error(r, str(out), "--overwrite")
    assert (out / "truth.npz").read_bytes() == before
    (out / OWNER_FILE).unlink()  # a legacy data set (truth.npz beside outs/) is still recognised
    r = invoke(cli.synth, [out, "--seed", "2", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert (out / "truth.npz").read_bytes() != before and owner_of(out) == "synth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    mine = tmp_path / "mine"
    files = user_folder(mine)
    r = invoke(cli.synth, [mine, "--overwrite"])
    one_line_error(r, str(mine), "never replaced")
    assert {p.name: p.read_text() for p in mine.iterdir()} == files


def test_demo_refuses_a_foreign_folder(tmp_path):
    from hishrst.cli import main

    out = tmp_path / "d"
    files = user_folder(out)
    r = CliRunner().invoke(main, ["demo", "--out", str(out), "--preset", "small", "--epochs", "1", "--overwrite"])
    one_line_error(r, str(out), "never replaced")
    assert {p.name: p.read_text() for p in out.iterdir()} == files
