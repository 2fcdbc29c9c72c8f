"""Slides overlapped in one run (issue 19): the next slide prepared and its first units read ahead while the
current one streams, each slide finished (finalize, QC, formats, lock release) on a thread while the next streams.

Outputs are byte-identical with and without the overlap; a slide that fails to prepare fails alone; an
interrupt leaves the slide in flight resumable and the prefetched one untouched; the latency engine reports
how busy a multi-slide run kept it.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from hishrst_runtime.jobs import runner
from hishrst_runtime.jobs.interrupts import Interrupted
from hishrst_runtime.jobs.runner import run_slides
from hishrst_runtime.output.store import OutputStore, partial_path
from hishrst_runtime.slides.pyramid import write_ome_zarr
from tests.runtime.images import disc_image

ad = pytest.importorskip("anndata")

#: Small batches: several work units per slide, so units are read ahead and slides overlap.
RUN = {"pitch_um": 16.0, "batch_size": 4, "workers": 2, "progress": False, "echo": lambda s: None}


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four discs of mixed sizes."""
    folder = tmp_path_factory.mktemp("overlap_slides")
    return [write_ome_zarr(disc_image(side), folder / f"s{i}.ome.zarr", mpp=0.5, chunk=128)
            for i, side in enumerate((400, 320, 480, 256))]


def x_and_obs(store: Path) -> tuple[bytes, Any]:
    a = ad.read_zarr(store)
    return np.asarray(a.X).tobytes(), a.obs


def assert_same_outputs(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        xa, obs_a = x_and_obs(a / f"{name}.zarr")
        xb, obs_b = x_and_obs(b / f"{name}.zarr")
        assert xa == xb, name
        assert obs_a.equals(obs_b), name


def test_outputs_are_identical_with_and_without_the_overlap(slides: list[Path], tiny_bundle: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from hishrst_runtime.inference import pipeline

    taken: list[tuple[int, ...]] = []
    finished_on: list[str] = []
    real_take, real_finalize = pipeline.ReadAhead.take, OutputStore.finalize

    def take(self: Any, unit: list[int]) -> Any:
        fut = real_take(self, unit)
        if fut is not None:
            taken.append(tuple(unit))
        return fut

    def finalize(self: Any, *a: Any, **k: Any) -> Any:
        finished_on.append(threading.current_thread().name)
        return real_finalize(self, *a, **k)

    monkeypatch.setattr(pipeline.ReadAhead, "take", take)
    monkeypatch.setattr(OutputStore, "finalize", finalize)
    res = run_slides(slides, bundle_dir=tiny_bundle, out_dir=tmp_path / "on", **RUN)
    assert [r.status for r in res] == ["ok"] * 4 and [r.slide for r in res] == [str(s) for s in slides]
    assert taken  # later slides started on tiles read while the one before streamed
    assert finished_on and all(n.startswith("hishrst-finish") for n in finished_on)
    monkeypatch.setattr(runner._Runner, "overlap", False)
    finished_on.clear()
    off = run_slides(slides, bundle_dir=tiny_bundle, out_dir=tmp_path / "off", **RUN)
    assert [r.status for r in off] == ["ok"] * 4
    assert finished_on == ["MainThread"] * 4
    assert_same_outputs(tmp_path / "on", tmp_path / "off", [f"s{i}" for i in range(4)])
    assert [r.points for r in res] == [r.points for r in off]
    assert all(r.qc is not None for r in res)  # the QC thumbnail, written on the finishing thread
    assert not list((tmp_path / "on").glob("*.lock"))


def test_a_slide_that_fails_to_prepare_fails_alone(slides: list[Path], tiny_bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "in" / "bad.ome.zarr"
    bad.mkdir(parents=True)  # a folder, but no slide: fails in (background) preparation
    order = [slides[0], bad, slides[1], slides[2]]
    res = run_slides(order, bundle_dir=tiny_bundle, out_dir=tmp_path / "out", **RUN)
    assert [r.status for r in res] == ["ok", "failed", "ok", "ok"]
    assert "bad.ome.zarr" in res[1].reason and "\n" not in res[1].reason
    assert OutputStore.status(tmp_path / "out" / "bad.zarr") == "missing"
    assert not partial_path(tmp_path / "out" / "bad.zarr").exists()
    for name in ("s0", "s1", "s2"):
        assert OutputStore.status(tmp_path / "out" / f"{name}.zarr") == "complete"
    assert not list((tmp_path / "out").glob("*.lock"))


class StopAt:
    """An encoder wrapper that raises :class:`Interrupted` (as the SIGTERM handler does, in the main thread)
    on its ``n``-th call."""

    def __init__(self, inner: Any, n: int) -> None:
        self.inner, self.n, self.calls = inner, n, 0

    def run(self, feeds: Any) -> Any:
        self.calls += 1
        if self.calls == self.n:
            raise Interrupted(signal.SIGTERM)
        return self.inner.run(feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_an_interrupt_leaves_the_slide_in_flight_resumable_and_the_next_untouched(
        slides: list[Path], tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hishrst_runtime.bundle.manifest import load_bundle
    from hishrst_runtime.inference.engines import Engines, load_engines
    from hishrst_runtime.jobs import slide_run

    monkeypatch.setattr(slide_run, "MAX_CHUNK_ROWS", 8)  # rows become durable chunk by chunk

    def stopping_at(n: int) -> Engines:  # run_slides closes its engines: fresh ones per run
        eng = load_engines(load_bundle(tiny_bundle), "cpu", cache_dir=None, threads=1)
        return Engines(StopAt(eng.encoder, n), eng.head, "cpu")

    probe = stopping_at(0)  # never stops: counts the calls of the first two slides
    run_slides(slides[:2], bundle_dir=tiny_bundle, out_dir=tmp_path / "p", engines=probe, **RUN)
    calls_s0_s1 = probe.encoder.calls
    probe = stopping_at(0)
    run_slides(slides[:1], bundle_dir=tiny_bundle, out_dir=tmp_path / "p1", engines=probe, **RUN)
    calls_s0 = probe.encoder.calls
    assert calls_s0_s1 - calls_s0 >= 4
    engines = stopping_at((calls_s0 + calls_s0_s1) // 2)  # half-way through the second slide
    out = tmp_path / "out"
    with pytest.raises(Interrupted) as e:
        run_slides(slides[:3], bundle_dir=tiny_bundle, out_dir=out,
                   engines=engines, resume=True, **RUN)
    got = {Path(r.slide).name: r.status for r in e.value.results}
    assert got == {"s0.ome.zarr": "ok", "s1.ome.zarr": "interrupted"}
    assert OutputStore.status(out / "s0.zarr") == "complete"
    assert OutputStore.status(out / "s1.zarr") == "incomplete"
    assert OutputStore.open_incomplete(out / "s1.zarr").done_mask().any()  # rows kept for --resume
    # the prefetched slide (prepared, units perhaps read ahead) has no output at all
    assert not (out / "s2.zarr").exists() and not partial_path(out / "s2.zarr").exists()
    assert not list(out.glob("*.lock")) and not list(out.glob("s2*"))
    again = run_slides(slides[:3], bundle_dir=tiny_bundle, out_dir=out, resume=True, **RUN)
    assert [r.status for r in again] == ["skipped", "ok", "ok"] and again[1].resumed
    clean = run_slides(slides[:3], bundle_dir=tiny_bundle, out_dir=tmp_path / "clean", **RUN)
    assert [r.status for r in clean] == ["ok"] * 3
    assert_same_outputs(out, tmp_path / "clean", ["s0", "s1", "s2"])


def test_the_latency_engine_reports_how_busy_a_multi_slide_run_kept_it(slides: list[Path], tiny_bundle: Path,
                                                                       tmp_path: Path) -> None:
    import time

    from hishrst_runtime.backends.latency import LatencyBackend
    from hishrst_runtime.backends.noop import NoopBackend
    from hishrst_runtime.bundle.manifest import load_bundle
    from hishrst_runtime.inference.engines import Engines

    spec = load_bundle(tiny_bundle).spec
    d, g = spec.encoder.feature_dim, len(spec.genes)
    enc = LatencyBackend(lambda f: (len(f["tiles"]), d), tiles_per_s=2000.0)
    engines = Engines(enc, NoopBackend(lambda f: (*f["features"].shape[:2], g)), "latency")
    t0 = time.perf_counter()
    res = run_slides(slides, bundle_dir=tiny_bundle, out_dir=tmp_path / "out", engines=engines, **RUN)
    wall = time.perf_counter() - t0
    st = enc.stats(wall_s=wall)
    assert [r.status for r in res] == ["ok"] * 4
    assert st["items"] == sum(r.computed for r in res) and st["calls"] >= len(slides)
    assert 0 < st["busy_s"] <= st["span_s"] <= wall
    assert 0 < st["busy_fraction_of_wall"] <= st["busy_fraction"] <= 1.0
    assert st["busy_s"] >= 0.99 * st["requested_s"]
