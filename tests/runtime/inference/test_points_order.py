"""``--points`` in any order ("nothing silently wrong", item 2): points are computed in neighbour-group order
and their rows go to their file-order positions with every X chunk written once (not rewritten per few rows
when the file order is unrelated to position); many points warn, and a large CSV is parsed lean.

Torch-free: the tiny ONNX bundle on a small textured synthetic slide.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

ad = pytest.importorskip("anndata")

from hishrst_runtime.cli.run import run  # noqa: E402
from hishrst_runtime.inference import points as points_mod  # noqa: E402
from hishrst_runtime.output import encoding  # noqa: E402
from hishrst_runtime.slides.convert import write_ome_zarr  # noqa: E402
from tests.runtime.images import textured_disc  # noqa: E402



@pytest.fixture(autouse=True)
def _logs_reach_caplog(monkeypatch: pytest.MonkeyPatch) -> None:
    """An earlier in-process CLI run stops hishrst's loggers propagating (cli/logs.py); caplog needs them to."""
    monkeypatch.setattr(logging.getLogger("hishrst_runtime"), "propagate", True)




@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ome_zarr(textured_disc(), tmp_path_factory.mktemp("points_order") / "disc.ome.zarr", mpp=0.5,
                          chunk=256)


def write_csv(path: Path, xy: np.ndarray, ids: list[str]) -> Path:
    path.write_text("id,x,y\n" + "".join(f"{i},{x:.2f},{y:.2f}\n" for i, (x, y) in zip(ids, xy)))
    return path


def invoke(args: list[Any]) -> Any:
    env = {k: None for k in os.environ if k.startswith("SLURM_ARRAY_")}
    r = CliRunner().invoke(run, [str(a) for a in args] + ["--no-progress", "--provider", "cpu"], env=env,
                           catch_exceptions=False)
    assert "Traceback" not in r.output, r.output
    return r


@pytest.mark.parametrize("order", ["random", "sorted"])
def test_every_x_chunk_is_written_once_whatever_the_file_order(order: str, slide: Path, tiny_bundle: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hishrst_runtime.jobs import slide_run

    monkeypatch.setattr(slide_run, "MAX_CHUNK_ROWS", 16)
    monkeypatch.setattr(slide_run, "OUTPUT_BUFFER_BYTES", 2048)  # a few chunks: the bound that forced rewrites
    rng = np.random.default_rng(1)
    r = np.sqrt(rng.uniform(0, 1, 600)) * 140
    t = rng.uniform(0, 2 * np.pi, 600)
    xy = np.stack([240 + r * np.cos(t), 240 + r * np.sin(t)], axis=1)
    if order == "sorted":
        xy = xy[np.lexsort((xy[:, 0], xy[:, 1]))]
    ids = [f"pt{i}" for i in range(len(xy))]
    pts = write_csv(tmp_path / "points.csv", xy, ids)
    writes: Counter[int] = Counter()
    real = encoding.XChunks.write

    def counting(self: Any, k: int, data: np.ndarray, *, fsync: bool) -> bytes:
        writes[k] += 1
        return real(self, k, data, fsync=fsync)

    monkeypatch.setattr(encoding.XChunks, "write", counting)
    res = invoke([slide, "--bundle", tiny_bundle, "--out", tmp_path / "out", "--points", pts, "--batch-size", "16"])
    assert res.exit_code == 0, res.output
    a = ad.read_zarr(tmp_path / "out" / "disc.zarr")
    assert list(a.obs_names) == ids  # rows keep the file's order
    np.testing.assert_allclose(a.obsm["spatial"], np.round(xy, 2))
    assert np.isfinite(a.X).all() and len(np.unique(a.X[:, 0])) > len(ids) // 2  # each row its own value
    assert sorted(writes) == list(range(-(-len(ids) // 16))) and set(writes.values()) == {1}, writes


def test_many_points_warn_and_parse_lean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(points_mod, "MANY_POINTS", 1000)
    n = 1500
    xy = np.random.default_rng(0).uniform(0, 1000, (n, 2))
    csv = tmp_path / "many.csv"
    csv.write_text("x,y\n" + "".join(f"{x},{y}\n" for x, y in xy))
    with caplog.at_level(logging.WARNING, logger="hishrst_runtime.inference.points"):
        got = points_mod.read_points(csv)
    np.testing.assert_array_equal(got.xy_px, xy)
    assert got.names is None and got.lines is not None and got.lines[0] == 2 and got.lines[-1] == n + 1
    assert any("1,500 points" in r.getMessage() and "1,000" in r.getMessage() for r in caplog.records), caplog.text
    assert got.lines == range(2, n + 2)  # lean: a range when no line is blank, not a list of Python ints
