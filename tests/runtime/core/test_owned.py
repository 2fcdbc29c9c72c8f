"""The one ownership rule behind --overwrite, and the debris of killed runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hishrst_runtime.core.errors import OutputStateError
from hishrst_runtime.core.files import clean_stale_siblings, stale_siblings, temp_sibling
from hishrst_runtime.core.owned import OWNER_ATTR, ForeignOutputError, check_replaceable, mark_owned, owner_of


def _dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def test_user_folder_is_never_replaced(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "config.json").write_text("{}")  # looks like a run, is not one
    with pytest.raises(ForeignOutputError, match="never replaced"):
        check_replaceable(user, kind="fit-run", overwrite=True, what="a trained run")
    assert (user / "config.json").exists()


def test_marked_output_needs_overwrite_and_the_same_kind(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "x").write_text("1")
    mark_owned(out, "fit-run")
    with pytest.raises(OutputStateError, match="--overwrite"):
        check_replaceable(out, kind="fit-run", overwrite=False, what="a trained run")
    assert check_replaceable(out, kind="fit-run", overwrite=True, what="a trained run") is True
    with pytest.raises(ForeignOutputError, match="'fit-run', not 'bundle'"):
        check_replaceable(out, kind="bundle", overwrite=True, what="a bundle")


def test_missing_empty_and_overlapping(tmp_path):
    assert check_replaceable(tmp_path / "new", kind="cv", overwrite=False, what="x") is False
    (tmp_path / "empty").mkdir()
    assert check_replaceable(tmp_path / "empty", kind="cv", overwrite=False, what="x") is False
    data = tmp_path / "data"
    (data / "slide").mkdir(parents=True)
    with pytest.raises(ForeignOutputError, match="overlap the input"):
        check_replaceable(data, kind="ome-zarr", overwrite=True, what="x", inputs=[data / "slide"])


def test_zarr_stores_are_marked_in_their_attributes(tmp_path):
    store = tmp_path / "s.zarr"
    store.mkdir()
    (store / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"a": 1}}))
    mark_owned(store, "ome-zarr")
    meta = json.loads((store / "zarr.json").read_text())
    assert meta["attributes"]["a"] == 1 and meta["attributes"][OWNER_ATTR]["kind"] == "ome-zarr"
    assert sorted(os.listdir(store)) == ["zarr.json"]
    assert owner_of(store) == "ome-zarr"


def test_debris_of_dead_processes_only(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = _dead_pid()
    debris = tmp_path / f".run.partial-{dead}-abcd1234"
    debris.mkdir()
    mine = temp_sibling(out, "partial")
    mine.mkdir()
    assert stale_siblings(out, "partial") == [debris]
    assert clean_stale_siblings(out) == [debris]
    assert not debris.exists() and mine.exists()


def test_an_old_output_left_aside_by_a_killed_swap_is_put_back(tmp_path):
    out = tmp_path / "bundle"
    aside = tmp_path / f".bundle.old-{_dead_pid()}-abcd1234"
    aside.mkdir()
    (aside / "model.onnx").write_text("only copy")
    clean_stale_siblings(out)
    assert (out / "model.onnx").read_text() == "only copy"
