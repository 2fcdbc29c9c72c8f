"""The latency engine (hishrst_runtime.backends.latency): sleeps batch / tiles_per_s per call with the GIL
released, returns zeros of the right shape, records busy time and span; not a provider."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from hishrst_runtime.backends import ENGINES, PROVIDERS, BackendError
from hishrst_runtime.backends.latency import LatencyBackend
from hishrst_runtime.backends.registry import engine_entry


class FakeClock:
    """A clock that only moves when the fake sleep is called."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def _tiles(n: int) -> dict[str, np.ndarray]:
    return {"tiles": np.zeros((n, 4, 4, 3), np.uint8)}


def _encoder(clock: FakeClock | None = None, **kw: object) -> LatencyBackend:
    extra = {"clock": clock, "sleep": clock.sleep} if clock is not None else {}
    return LatencyBackend(lambda f: (len(f["tiles"]), 7), **kw, **extra)  # type: ignore[arg-type]


def test_sleeps_batch_over_rate_and_returns_zeros() -> None:
    clock = FakeClock()
    eng = _encoder(clock, tiles_per_s=4000.0)
    (out,) = eng.run(_tiles(256))
    assert out.shape == (256, 7) and out.dtype == np.float32 and not out.any()
    assert clock.sleeps == [pytest.approx(256 / 4000)]
    assert eng.latency_s(256) == pytest.approx(0.064) and eng.latency_s(0) == 0.0


def test_fixed_overhead_per_call() -> None:
    clock = FakeClock()
    eng = _encoder(clock, tiles_per_s=1000.0, seconds_per_call=0.01)
    eng.run(_tiles(10))
    assert sum(clock.sleeps) == pytest.approx(0.01 + 10 / 1000)


def test_busy_span_and_fraction() -> None:
    clock = FakeClock()
    eng = _encoder(clock, tiles_per_s=100.0)
    eng.run(_tiles(10))  # busy 0.1 s
    clock.now += 0.3  # idle: the engine waits for tiles
    eng.run(_tiles(20))  # busy 0.2 s
    s = eng.stats(wall_s=1.0)
    assert s["calls"] == 2 and s["items"] == 30
    assert s["busy_s"] == pytest.approx(0.3) and s["requested_s"] == pytest.approx(0.3)
    assert s["span_s"] == pytest.approx(0.6) and s["busy_fraction"] == pytest.approx(0.5)
    assert s["busy_fraction_of_wall"] == pytest.approx(0.3) and s["wall_s"] == 1.0
    assert s["tiles_per_s_set"] == 100.0 and s["engine"] == "latency"


def test_reset_and_empty_stats() -> None:
    clock = FakeClock()
    eng = _encoder(clock, tiles_per_s=100.0)
    eng.run(_tiles(5))
    eng.reset()
    s = eng.stats()
    assert s["calls"] == 0 and s["busy_s"] == 0.0 and s["span_s"] == 0.0 and s["busy_fraction"] is None
    assert "busy_fraction_of_wall" not in s
    assert eng.stats(wall_s=0.0)["busy_fraction_of_wall"] is None


def test_early_wakeups_are_slept_up_to_the_deadline() -> None:
    clock = FakeClock()

    def short_sleep(s: float) -> None:  # wakes after half of what was asked
        clock.sleeps.append(s)
        clock.now += s / 2 if s > 1e-3 else s

    eng = LatencyBackend(lambda f: (1,), tiles_per_s=10.0, clock=clock, sleep=short_sleep)
    eng.run(_tiles(1))
    assert len(clock.sleeps) > 1 and eng.busy_s >= 0.1 - 2e-6


def test_no_rate_means_no_per_item_time() -> None:
    clock = FakeClock()
    eng = _encoder(clock)
    eng.run(_tiles(1000))
    assert clock.sleeps == [] and eng.busy_s == 0.0 and eng.calls == 1


@pytest.mark.parametrize("kw", [{"tiles_per_s": 0}, {"tiles_per_s": -5.0}, {"seconds_per_call": -1.0},
                                {"tiles_per_s": float("nan")}])
def test_rejects_bad_settings(kw: dict) -> None:
    with pytest.raises(ValueError):
        _encoder(**kw)


def test_real_sleep_releases_the_gil_and_is_accurate() -> None:
    """Two threads on one engine overlap their sleeps (GIL released); each call takes at least its latency."""
    eng = _encoder(tiles_per_s=1000.0)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=eng.run, args=(_tiles(100),)) for _ in range(2)]  # 0.1 s each
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    s = eng.stats()
    assert s["calls"] == 2 and s["busy_s"] >= 0.2 - 1e-6
    assert wall < 0.19, wall  # overlapped, not 0.2 s in a row
    assert s["span_s"] <= wall + 1e-6 and s["busy_fraction"] > 1.0  # two calls at once


def test_batch_of_head_inputs() -> None:
    """A head stand-in: the items are groups × points of its features."""
    clock = FakeClock()
    eng = LatencyBackend(lambda f: (*f["features"].shape[:2], 3), tiles_per_s=100.0,
                         batch_of=lambda f: int(np.prod(f["features"].shape[:2])), clock=clock, sleep=clock.sleep)
    (out,) = eng.run({"features": np.zeros((4, 5, 8), np.float32)})
    assert out.shape == (4, 5, 3) and clock.sleeps == [pytest.approx(0.2)] and eng.items == 20


def test_latency_is_not_a_provider() -> None:
    assert "latency" not in ENGINES and "latency" not in PROVIDERS
    with pytest.raises(BackendError):
        engine_entry("latency")
    eng = _encoder(tiles_per_s=1.0)
    assert eng.provider == "latency" and eng.name == "latency"
    eng.close()
    eng.close()  # idempotent
