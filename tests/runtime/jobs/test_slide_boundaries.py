"""What keeps the engine busy at slide boundaries (issue 19): a new output store is created on a thread while the
slide's first units stream, slides are prepared two ahead, and a slide's finishing queues behind the one finishing
instead of holding up the next slide.

A store that cannot be created fails its slide with the store's error and leaves nothing behind; outputs are the
same as before (``test_overlap.py`` compares runs with and without the overlap byte for byte).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hishrst_runtime.jobs import runner, slide_run
from hishrst_runtime.jobs.overlap import FINISH_QUEUE, Finisher
from hishrst_runtime.jobs.runner import run_slides
from hishrst_runtime.output.store import OutputNotWritableError, OutputStore, partial_path
from hishrst_runtime.slides.pyramid import write_ome_zarr
from tests.runtime.images import disc_image

pytest.importorskip("anndata")

RUN = {"pitch_um": 16.0, "batch_size": 4, "workers": 2, "progress": False, "echo": lambda s: None}


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("boundary_slides")
    return [write_ome_zarr(disc_image(side), folder / f"s{i}.ome.zarr", mpp=0.5, chunk=128)
            for i, side in enumerate((320, 256, 288))]


def test_the_first_units_are_encoded_while_the_store_is_created(slides: list[Path], tiny_bundle: Path,
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hishrst_runtime.bundle.manifest import load_bundle
    from hishrst_runtime.inference.engines import Engines, load_engines

    created: list[float] = []
    real_create = OutputStore.create

    def slow_create(*a: Any, **k: Any) -> OutputStore:
        time.sleep(0.5)  # a slow (network) filesystem
        store = real_create(*a, **k)
        created.append(time.perf_counter())
        return store

    class Clock:
        def __init__(self, inner: Any) -> None:
            self.inner, self.first = inner, None

        def run(self, feeds: Any) -> Any:
            self.first = self.first or time.perf_counter()
            return self.inner.run(feeds)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    monkeypatch.setattr(OutputStore, "create", staticmethod(slow_create))
    eng = load_engines(load_bundle(tiny_bundle), "cpu", cache_dir=None, threads=1)
    clock = Clock(eng.encoder)
    (res,) = run_slides(slides[:1], bundle_dir=tiny_bundle, out_dir=tmp_path / "out",
                        engines=Engines(clock, eng.head, "cpu"), **RUN)
    assert res.status == "ok", res.reason
    assert clock.first is not None and created and clock.first < created[0]  # encoding did not wait for the store
    assert OutputStore.status(tmp_path / "out" / "s0.zarr") == "complete"


def test_a_store_that_cannot_be_created_fails_its_slide_alone(slides: list[Path], tiny_bundle: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real_create = OutputStore.create

    def create(path: Any, *a: Any, **k: Any) -> OutputStore:
        if Path(path).name == "s1.zarr":
            raise OutputNotWritableError(f"{path}: cannot create the output (simulated); check the permissions")
        return real_create(path, *a, **k)

    monkeypatch.setattr(OutputStore, "create", staticmethod(create))
    out = tmp_path / "out"
    res = run_slides(slides, bundle_dir=tiny_bundle, out_dir=out, **RUN)
    assert [r.status for r in res] == ["ok", "failed", "ok"]
    assert "s1.zarr: cannot create the output (simulated)" in res[1].reason and "\n" not in res[1].reason
    assert not (out / "s1.zarr").exists() and not partial_path(out / "s1.zarr").exists()
    assert not list(out.glob("*.lock"))


def test_store_in_creation_waits_only_when_used() -> None:
    gate = threading.Event()

    class Fake:
        rows: list[int] = []

        def write_rows(self, rows: Any, values: Any) -> None:
            self.rows.append(len(rows))

    store = slide_run.StoreInCreation(lambda: (gate.wait(5), Fake())[1], n_obs=7)
    assert not store.done_mask().any() and store.done_mask().shape == (7,)  # no wait: a new store has no rows
    write = store.write_rows  # bound before the store exists (predict_into does this)
    threading.Timer(0.05, gate.set).start()
    write([1, 2], None)
    assert Fake.rows == [2] and isinstance(slide_run.created(store), Fake)


def test_finishing_queues_instead_of_holding_up_the_next_slide() -> None:
    fin = Finisher()
    gate = threading.Event()
    t0 = time.perf_counter()
    fin.submit(0, lambda: gate.wait(5) or "slide 0")  # finishing (slow)
    for i in range(1, 1 + FINISH_QUEUE):  # queue behind it: returns at once
        fin.submit(i, lambda i=i: f"slide {i}")
    assert time.perf_counter() - t0 < 1.0 and fin.busy
    threading.Timer(0.2, gate.set).start()
    fin.submit(1 + FINISH_QUEUE, lambda: "last")  # one too many: waits for slide 0
    assert time.perf_counter() - t0 >= 0.2
    results: dict[int, Any] = {}
    fin.collect(results)
    fin.shutdown()
    assert results == {0: True, **{i: f"slide {i}" for i in range(1, 1 + FINISH_QUEUE)}, 1 + FINISH_QUEUE: "last"}


def test_two_slides_are_prepared_ahead(slides: list[Path], tiny_bundle: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[tuple[str, int]] = []
    real_prepare = runner._Runner._prepare
    streaming = [0]

    def prepare(self: Any, item: Any) -> Any:
        started.append((Path(item.slide).name, streaming[0]))
        return real_prepare(self, item)

    real_run = slide_run.run_prepared

    def run(*a: Any, **k: Any) -> Any:
        streaming[0] += 1
        return real_run(*a, **k)

    monkeypatch.setattr(runner._Runner, "_prepare", prepare)
    monkeypatch.setattr(runner, "run_prepared", run)
    res = run_slides(slides, bundle_dir=tiny_bundle, out_dir=tmp_path / "out", **RUN)
    assert [r.status for r in res] == ["ok"] * 3
    # slides 1 and 2 are prepared before slide 0 starts streaming (0 slides streamed when they began)
    assert dict(started) == {"s0.ome.zarr": 0, "s1.ome.zarr": 0, "s2.ome.zarr": 0}
    assert runner.PREFETCH_SLIDES == 2
