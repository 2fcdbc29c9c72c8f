"""``--resume`` verifies the X chunks a partial output claims ("nothing silently wrong", item 1).

Every X chunk's SHA-256 is recorded with its progress bitmap when it is written; reopening a partial checks
each claimed chunk (file exists, checksum matches) and unclaims a chunk that fails, so its rows are computed
again and the finished X equals an uninterrupted run's byte for byte. Records written before checksums
(bitmap only) are trusted when their chunk file exists and decodes, with a warning.

Store-level cases here; the end-to-end case (a real run interrupted, a chunk deleted, ``--resume``) runs the
tiny torch-free bundle on a small synthetic slide.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest

ad = pytest.importorskip("anndata")

from hishrst_runtime.output import layout as out_layout  # noqa: E402
from hishrst_runtime.output.progress import DIGEST_BYTES  # noqa: E402
from hishrst_runtime.output.store import OutputStore, SpatialImages, partial_path  # noqa: E402
from tests.runtime.images import textured_disc  # noqa: E402

GENES = [f"GENE{i}" for i in range(6)]
N, CHUNK = 100, 32  # chunks 0..2 full, chunk 3 holds 4 rows



@pytest.fixture(autouse=True)
def _logs_reach_caplog(monkeypatch: pytest.MonkeyPatch) -> None:
    """An earlier in-process CLI run stops hishrst's loggers propagating (cli/logs.py); caplog needs them to."""
    monkeypatch.setattr(logging.getLogger("hishrst_runtime"), "propagate", True)


def values(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)[:, None]
    return (np.sin(rows * 0.37 + np.arange(len(GENES))[None, :]) * 10 + rows / 7).astype(np.float32)


def create(path: Path) -> OutputStore:
    rng = np.random.default_rng(0)
    img = np.zeros((40, 50, 3), np.uint8)
    return OutputStore.create(path, obs_xy_px=rng.uniform(0, 4000, (N, 2)), grid_index=rng.integers(0, 80, (N, 2)),
                              tissue_fraction=rng.uniform(0, 1, N).astype(np.float32), genes=GENES,
                              uns={"bundle_hash": "abc"}, chunk_rows=CHUNK,
                              spatial=SpatialImages("s", img, lowres_scalef=0.01, spot_diameter_fullres=100.0))


def partial_with_chunks(tmp_path: Path, rows: np.ndarray) -> Path:
    """A partial store with ``rows`` written and claimed; returns the final path."""
    path = tmp_path / "s.zarr"
    store = create(path)
    store.write_rows(rows, values(rows))
    store.close()
    return path


def finish(path: Path) -> OutputStore:
    store = OutputStore.open_incomplete(path)
    missing = store.missing_rows()
    store.write_rows(missing, values(missing))
    store.finalize()
    return store


def reference_x(tmp_path: Path) -> dict[str, bytes]:
    path = tmp_path / "ref" / "s.zarr"
    store = create(path)
    store.write_rows(np.arange(N), values(np.arange(N)))
    store.finalize()
    return {p.name: p.read_bytes() for p in (path / "X").iterdir() if not p.name.startswith(".")}


def x_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (path / "X").iterdir() if not p.name.startswith(".")}


def test_records_hold_the_chunk_checksum(tmp_path: Path) -> None:
    path = partial_with_chunks(tmp_path, np.arange(64))
    work = partial_path(path)
    for k in (0, 1):
        raw = (work / out_layout.PROGRESS_DIR / f"chunk-{k:08d}.bits").read_bytes()
        assert len(raw) == CHUNK // 8 + DIGEST_BYTES
        assert raw[-DIGEST_BYTES:] == hashlib.sha256((work / "X" / f"{k}.0").read_bytes()).digest()


@pytest.mark.parametrize("damage", ["delete", "flip_byte", "truncate"])
def test_a_damaged_claimed_chunk_is_recomputed(damage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = partial_with_chunks(tmp_path, np.arange(96))  # chunks 0, 1, 2 claimed
    chunk = partial_path(path) / "X" / "1.0"
    if damage == "delete":
        chunk.unlink()
    elif damage == "flip_byte":
        raw = bytearray(chunk.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        chunk.write_bytes(bytes(raw))
    else:
        chunk.write_bytes(chunk.read_bytes()[:-7])
    with caplog.at_level(logging.WARNING, logger="hishrst_runtime.output.resume"):
        store = OutputStore.open_incomplete(path)
    assert store.chunks_recomputed == [1]
    np.testing.assert_array_equal(store.missing_rows(), np.r_[32:64, 96:100])
    assert any("1.0" in r.getMessage() and "computed again" in r.getMessage() for r in caplog.records)
    assert not (partial_path(path) / out_layout.PROGRESS_DIR / "chunk-00000001.bits").exists()  # unclaimed
    missing = store.missing_rows()
    store.write_rows(missing, values(missing))
    store.finalize()
    assert x_files(path) == reference_x(tmp_path)


def test_intact_chunks_are_kept_and_nothing_is_recomputed(tmp_path: Path) -> None:
    path = partial_with_chunks(tmp_path, np.arange(64))
    store = finish(path)
    assert store.chunks_recomputed == []
    assert x_files(path) == reference_x(tmp_path)


def test_records_without_checksum_are_trusted_if_they_decode(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Partials of earlier releases: bitmap-only records are kept when the chunk exists and decodes (warned);
    a missing chunk is still recomputed."""
    path = partial_with_chunks(tmp_path, np.arange(96))
    progress = partial_path(path) / out_layout.PROGRESS_DIR
    for f in progress.glob("chunk-*.bits"):  # as an older release wrote them
        f.write_bytes(f.read_bytes()[:-DIGEST_BYTES])
    (partial_path(path) / "X" / "2.0").unlink()
    with caplog.at_level(logging.WARNING, logger="hishrst_runtime.output.resume"):
        store = OutputStore.open_incomplete(path)
    assert store.chunks_recomputed == [2]
    np.testing.assert_array_equal(store.missing_rows(), np.arange(64, 100))
    assert any("before chunk checksums" in r.getMessage() and "2 X chunk" in r.getMessage() for r in caplog.records)
    missing = store.missing_rows()
    store.write_rows(missing, values(missing))
    store.finalize()
    assert x_files(path) == reference_x(tmp_path)


# ------------------------------------------------------------------ end to end: hishrst-run --resume




@pytest.mark.parametrize("damage", ["delete", "flip_byte"])
def test_resume_recomputes_a_damaged_chunk_of_a_real_run(damage: str, tiny_bundle: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped mid-way, one claimed X chunk deleted or one byte flipped, then ``--resume``: the chunk is
    recomputed (counted in the run report) and X equals an uninterrupted run's, byte for byte."""
    import json
    import os

    from click.testing import CliRunner

    from hishrst_runtime.cli.run import run
    from hishrst_runtime.jobs import slide_run
    from hishrst_runtime.slides.convert import write_ome_zarr

    monkeypatch.setattr(slide_run, "MAX_CHUNK_ROWS", 16)
    slide = write_ome_zarr(textured_disc(), tmp_path / "disc.ome.zarr", mpp=0.5, chunk=256)
    env = {k: None for k in os.environ if k.startswith("SLURM_ARRAY_")}

    def invoke(out: Path, *flags: str) -> object:
        args = [str(slide), "--bundle", str(tiny_bundle), "--out", str(out), "--provider", "cpu", "--pitch-um", "8",
                "--batch-size", "16", "--no-progress", *flags]
        r = CliRunner().invoke(run, args, env=env, catch_exceptions=False)
        assert "Traceback" not in r.output, r.output
        return r

    assert invoke(tmp_path / "ref").exit_code == 0
    calls = []
    write_rows = OutputStore.write_rows

    def failing(self: OutputStore, rows: np.ndarray, vals: np.ndarray) -> None:
        calls.append(1)
        if len(calls) == 6:
            raise OSError(28, "No space left on device (simulated)")
        write_rows(self, rows, vals)

    monkeypatch.setattr(OutputStore, "write_rows", failing)
    assert invoke(tmp_path / "out").exit_code == 1
    monkeypatch.setattr(OutputStore, "write_rows", write_rows)
    work = partial_path(tmp_path / "out" / "disc.zarr")
    claimed = sorted(int(f.stem[6:]) for f in (work / out_layout.PROGRESS_DIR).glob("chunk-*.bits"))
    assert len(claimed) >= 2, claimed
    victim = work / "X" / f"{claimed[1]}.0"
    if damage == "delete":
        victim.unlink()
    else:
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        victim.write_bytes(bytes(raw))
    r = invoke(tmp_path / "out", "--resume")
    assert r.exit_code == 0, r.output
    assert x_files(tmp_path / "out" / "disc.zarr") == x_files(tmp_path / "ref" / "disc.zarr")
    entry = json.loads((tmp_path / "out" / "hishrst_run.json").read_text())["slides"][0]
    assert entry["status"] == "ok" and entry["resumed"] and entry["chunks_recomputed"] == 1
    assert entry["filled_chunks"] == {"count": 0, "first": []}
    assert "recomputed" in (tmp_path / "out" / "summary.md").read_text()
