"""The next slide's first units read ahead (:class:`hishrst_runtime.inference.pipeline.ReadAhead`) and the
``run_units`` hooks that use them: the same tiles as reading the unit then, units not taken dropped, a unit that
cannot be read failing when it is taken, and ``on_read_all`` called once every read is under way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hishrst_runtime.bundle.manifest import load_bundle
from hishrst_runtime.inference.pipeline import ReadAhead, UnitFinisher, prepare_slide, run_units
from hishrst_runtime.inference.stages import plan_units, read_tiles, work_units
from hishrst_runtime.slides.pyramid import write_ome_zarr
from tests.runtime.images import disc_image

BATCH = 4


@pytest.fixture(scope="module")
def prep(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Any:
    slide = write_ome_zarr(disc_image(480), tmp_path_factory.mktemp("ahead") / "d.ome.zarr", mpp=0.5, chunk=128)
    p = prepare_slide(slide, load_bundle(tiny_bundle), pitch_um=16.0)
    yield p
    p.close()


def test_read_ahead_gives_the_tiles_of_the_unit(prep: Any, tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    units = work_units(prep.groups, BATCH)
    assert len(units) > 6
    ahead = ReadAhead(prep, bundle, batch_size=BATCH, workers=2, max_bytes=1 << 30)
    assert ahead.take(units[0]) is None  # nothing before start()
    ahead.start()
    assert ahead.pending == 4  # max(2, 2 * workers) units, within max_bytes
    plan = plan_units(prep, bundle, batch_size=BATCH)
    for u in units[:4]:
        fut = ahead.take(u)
        assert fut is not None and np.array_equal(fut.result(), read_tiles(plan, u))
    assert ahead.take(units[4]) is None and ahead.pending == 0
    shared = ahead.share_cache(plan)  # the slide goes on with the chunks the read-ahead decoded
    assert shared.cache is not plan.cache and shared.cache.timer is plan.timer and shared.prep is plan.prep
    fresh = ReadAhead(prep, bundle, batch_size=BATCH, workers=1)
    assert fresh.share_cache(plan) is plan  # nothing read ahead: the slide's own cache
    small = ReadAhead(prep, bundle, batch_size=BATCH, workers=2, max_bytes=1)
    small.start()
    assert small.pending == 1  # at least one unit, however small the bound
    small.close()
    assert small.pending == 0 and small.take(units[0]) is None
    closed = ReadAhead(prep, bundle, batch_size=BATCH, workers=1)
    closed.close()
    closed.start()  # a no-op once closed (a slide dropped before its turn)
    assert closed.pending == 0


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_run_units_takes_read_ahead_units_and_says_when_all_reads_are_under_way(prep: Any, tiny_bundle: Path,
                                                                                  workers: int) -> None:
    bundle = load_bundle(tiny_bundle)
    plan = plan_units(prep, bundle, batch_size=BATCH)
    units = work_units(prep.groups, BATCH)
    ahead = ReadAhead(prep, bundle, batch_size=BATCH, workers=2)
    ahead.start()
    read_ahead = list(ahead._reads)
    calls: list[int] = []
    seen: list[tuple[int, ...]] = []
    with_ahead: dict[tuple[int, ...], np.ndarray] = {}

    def compute(unit: list[int], tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with_ahead[tuple(unit)] = tiles
        return np.arange(1), np.zeros((1, 1), np.float32)

    finish = UnitFinisher(plan, compute, lambda r, v: seen.append(tuple(r)), None, None)
    run_units(plan, lambda t: t, finish, units[1:], workers, ahead=ahead, on_read_all=lambda: calls.append(len(seen)))
    assert calls and len(calls) == 1  # once
    assert ahead.pending == 1 and tuple(units[0]) in read_ahead  # unit 0 was not asked for: left to close()
    for u in units[1:]:
        assert np.array_equal(with_ahead[tuple(u)], read_tiles(plan, u))
    ahead.close()


def test_a_unit_that_cannot_be_read_ahead_fails_when_taken(prep: Any, tiny_bundle: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import hishrst_runtime.inference.pipeline as pipeline

    bundle = load_bundle(tiny_bundle)
    units = work_units(prep.groups, BATCH)

    def broken(plan: Any, unit: list[int]) -> np.ndarray:
        raise OSError("chunk unreadable")

    monkeypatch.setattr(pipeline, "read_tiles", broken)
    ahead = ReadAhead(prep, bundle, batch_size=BATCH, workers=1)
    ahead.start()  # never raises itself
    fut = ahead.take(units[0])
    assert fut is not None
    with pytest.raises(OSError, match="chunk unreadable"):
        fut.result()
    ahead.close()
