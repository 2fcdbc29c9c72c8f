"""Bad paths and a bad bundle give one-line errors, never tracebacks or silent garbage ("nothing silently
wrong", items 4 and 5): symbolic-link loops in a folder of slides (``--recursive``) and as a slide argument,
a lock path that is a directory, a slide name too long for the output's file names, and a bundle whose head
returns NaN (it fails the slide naming the bundle; no NaN row is written as if valid).

Torch-free: the tiny ONNX bundle (``tests/runtime/conftest.py``) on a small synthetic disc slide.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

ad = pytest.importorskip("anndata")

from hishrst_runtime.cli.run import run  # noqa: E402
from hishrst_runtime.output.store import OutputStore, partial_path  # noqa: E402
from hishrst_runtime.slides.convert import write_ome_zarr  # noqa: E402


def disc_image(side: int = 480) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    img = np.full((side, side, 3), 245, np.uint8)
    img[(xx - side / 2) ** 2 + (yy - side / 2) ** 2 < (side / 3) ** 2] = (200, 110, 170)
    return img


@pytest.fixture(scope="module")
def disc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ome_zarr(disc_image(), tmp_path_factory.mktemp("bad_paths") / "disc.ome.zarr", mpp=0.5, chunk=256)


def invoke(args: list[Any]) -> Result:
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("SLURM_ARRAY_")}
    r = CliRunner().invoke(run, [str(a) for a in args] + ["--no-progress", "--provider", "cpu"], env=env,
                           catch_exceptions=False)
    assert "Traceback" not in r.output, r.output
    return r


def reason_line(r: Result, needle: str) -> str:
    lines = [ln for ln in r.output.splitlines() if needle in ln]
    assert lines, r.output
    return lines[0]


# ------------------------------------------------------------------ 5. paths


def test_symlink_loops_in_a_folder_of_slides(disc: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    """A link to itself and a link back to a parent folder: the folder's slides still run, once each."""
    folder = tmp_path / "slides"
    shutil.copytree(disc, folder / "sub" / "disc.ome.zarr")
    (folder / "selfloop").symlink_to("selfloop")
    (folder / "sub" / "up").symlink_to("..")  # a cycle: slides/sub/up -> slides
    r = invoke([folder, "--recursive", "--bundle", tiny_bundle, "--out", tmp_path / "out"])
    assert r.exit_code == 0 and "1 ok, 0 skipped, 0 failed (of 1 slides)" in r.output, r.output


def test_a_slide_in_a_folder_that_is_a_symlink_loop_fails_that_slide(disc: Path, tiny_bundle: Path,
                                                                      tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    shutil.copytree(disc, folder / "disc.ome.zarr")
    (folder / "loop.ome.zarr").symlink_to("loop.ome.zarr")
    r = invoke([folder, "--bundle", tiny_bundle, "--out", tmp_path / "out"])
    assert r.exit_code == 1 and "1 ok, 0 skipped, 1 failed" in r.output, r.output
    assert "loop.ome.zarr" in reason_line(r, "symbolic-link loop")


def test_a_slide_argument_that_is_a_symlink_loop_fails_that_slide(disc: Path, tiny_bundle: Path,
                                                                  tmp_path: Path) -> None:
    loop = tmp_path / "loop.ome.zarr"
    loop.symlink_to(loop.name)
    r = invoke([loop, disc, "--bundle", tiny_bundle, "--out", tmp_path / "out"])
    assert r.exit_code == 1 and "1 ok, 0 skipped, 1 failed" in r.output, r.output
    line = reason_line(r, "symbolic-link loop")
    assert str(loop) in line and "real path" in line


def test_a_lock_path_that_is_a_directory_fails_that_slide(disc: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "disc.zarr.lock").mkdir(parents=True)
    r = invoke([disc, "--bundle", tiny_bundle, "--out", out])
    assert r.exit_code == 1 and "1 failed" in r.output, r.output
    line = reason_line(r, "disc.zarr.lock")
    assert "is a directory" in line and "remove it" in line
    assert (out / "disc.zarr.lock").is_dir()  # left as it was


@pytest.mark.parametrize("length", [250, 262])
def test_a_slide_name_too_long_for_the_output_is_one_line(length: int, disc: Path, tiny_bundle: Path,
                                                          tmp_path: Path) -> None:
    """250 characters: the slide exists, but ``<name>.zarr.partial.tmp-…`` would not fit in 255 bytes; 262: the
    slide itself cannot exist. Either way the slide fails with the fix; the other slide runs."""
    name = "a" * (length - len(".ome.zarr")) + ".ome.zarr"
    slide = tmp_path / name
    if length <= 255:
        shutil.copytree(disc, slide)
    r = invoke([slide, disc, "--bundle", tiny_bundle, "--out", tmp_path / "out"])
    assert r.exit_code == 1 and "1 ok, 0 skipped, 1 failed" in r.output, r.output
    line = reason_line(r, "output name is")
    assert "rename the slide" in line and "at most 215 bytes" in line
    assert OutputStore.status(tmp_path / "out" / "disc.zarr") == "complete"


# ------------------------------------------------------------------ 4. a bundle whose head returns NaN


def nan_bundle(root: Path) -> Path:
    """The tiny bundle with a head whose weights are NaN (as one trained on NaN data would be)."""
    import onnx
    from onnx import numpy_helper

    from hishrst_runtime.core.files import sha256_file
    from tests.runtime.conftest import build_tiny_bundle

    def edit(m: dict[str, Any]) -> None:
        model = onnx.load_model(str(root / "head.onnx"))  # as built, with its metadata
        for init in model.graph.initializer:
            if init.name == "a":
                init.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(init), np.nan), "a"))
        onnx.save_model(model, str(root / "head.onnx"))
        m["files"]["head"]["sha256"] = sha256_file(root / "head.onnx")

    return build_tiny_bundle(root, edit=edit)


def test_a_bundle_returning_nan_fails_the_slide_and_writes_no_nan(disc: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnx")
    bundle = nan_bundle(tmp_path / "nan_bundle")
    out = tmp_path / "out"
    r = invoke([disc, "--bundle", bundle, "--out", out])
    assert r.exit_code == 1 and "1 failed" in r.output, r.output
    line = reason_line(r, "non-finite")
    assert str(bundle) in line and "NonFiniteOutputError" in line
    assert " rows of a work unit" in line and "re-train" in line
    assert OutputStore.status(out / "disc.zarr") == "missing"  # nothing computed: no output at all
    assert not partial_path(out / "disc.zarr").exists()


def test_non_finite_rows_are_never_written(disc: Path, tiny_bundle: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A head that turns NaN mid-slide: the rows before stay (for --resume), no NaN reaches the store."""
    from hishrst_runtime.inference import pipeline, stages

    calls = []
    head_rows = stages.head_rows

    def later_nan(plan: Any, head: Any, unit: list[int], feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(1)
        if len(calls) == 3:
            real_head = head
            head = type("NanHead", (), {"run": lambda self, feeds: [real_head.run(feeds)[0] * np.nan]})()
        return head_rows(plan, head, unit, feats)

    monkeypatch.setattr(pipeline, "head_rows", later_nan)
    writes: list[np.ndarray] = []
    real = OutputStore.write_rows
    monkeypatch.setattr(OutputStore, "write_rows",
                        lambda self, rows, vals: (writes.append(vals), real(self, rows, vals)))
    out = tmp_path / "out"
    r = invoke([disc, "--bundle", tiny_bundle, "--out", out, "--pitch-um", "8", "--batch-size", "8"])
    assert r.exit_code == 1 and "non-finite" in r.output, r.output
    assert len(writes) == 2 and all(np.isfinite(v).all() for v in writes)
    assert OutputStore.status(out / "disc.zarr") == "incomplete"


# ------------------------------------------------------------------ 6. the report's filled chunks


def test_the_report_lists_chunks_read_as_fill(disc: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    import json

    slide = Path(shutil.copytree(disc, tmp_path / "in" / "holes.ome.zarr"))
    chunks = sorted(p for p in (slide / "0").rglob("*") if p.is_file() and p.name not in ("zarr.json", ".zarray"))
    chunks[0].unlink()
    out = tmp_path / "out"
    r = invoke([slide, "--bundle", tiny_bundle, "--out", out, "--allow-missing-chunks"])
    assert r.exit_code == 0, r.output
    entry = json.loads((out / "hishrst_run.json").read_text())["slides"][0]
    assert entry["filled_chunks"]["count"] >= 1 and len(entry["filled_chunks"]["first"]) == min(
        10, entry["filled_chunks"]["count"]), entry
    assert entry["chunks_recomputed"] == 0
    assert "read as fill" in (out / "summary.md").read_text()
