"""``benchmarks/gpu.py`` without a GPU: the skip logic, the timing and tiles/s arithmetic, the JSON records
and the RESULTS.md section, with fakes for torch.cuda, onnxruntime's providers, the step runners and the clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu  # noqa: E402

H100 = "NVIDIA H100 80GB HBM3"


class FakeGpuClock:
    """A clock for asynchronous GPU work: a call queues ``cost`` seconds, which pass only at ``sync``."""

    def __init__(self) -> None:
        self.now, self.pending, self.syncs = 1000.0, 0.0, 0

    def __call__(self) -> float:
        return self.now

    def queue(self, s: float) -> None:
        self.pending += s

    def sync(self) -> None:
        self.syncs += 1
        self.now += self.pending
        self.pending = 0.0


def _ctx(tmp_path: Path, clock: FakeGpuClock, **kw: Any) -> gpu.Ctx:
    args = {"work": tmp_path, "gpu": H100, "batch": 256, "warmup": 2, "min_time": 0.5, "min_iters": 3,
            "budget_s": 480.0, "slide_mm": 2.0, "clock": clock, "sync": clock.sync, "start": clock(), **kw}
    return gpu.Ctx(**args)


def _fake_runner(clock: FakeGpuClock, cost: float, label: str, released: list[str]) -> Any:
    def make(ctx: gpu.Ctx) -> tuple:
        return (lambda: clock.queue(cost)), label, (lambda: released.append(label))
    return make


# -------------------------------------------------------------------------------------- skip logic


def test_no_gpu_exits_0_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.jsonl"
    assert gpu.main(["--out", str(out), "--workdir", str(tmp_path)]) == []
    assert "no GPU: skipped (torch.cuda.is_available() is False" in capsys.readouterr().out
    assert not out.exists()  # a CPU run never replaces committed GPU results


def test_no_gpu_as_a_command() -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--out", os.devnull], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no GPU: skipped" in proc.stdout


def test_no_torch_is_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    assert gpu.gpu_status() == (None, "torch is not installed")


def test_gpu_name_from_nvidia_smi_else_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from hishrst_runtime.backends import base

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "torch name")
    monkeypatch.setattr(base, "gpu_name", lambda i=0: H100)
    assert gpu.gpu_status() == (H100, None)
    monkeypatch.setattr(base, "gpu_name", lambda i=0: None)
    assert gpu.gpu_status() == ("torch name", None)


def test_ort_step_skips_without_the_cuda_provider(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    ctx = _ctx(tmp_path, FakeGpuClock())
    with pytest.raises(gpu.Skip, match="no CUDAExecutionProvider"):
        gpu.ort_cuda_runner(ctx)
    rec = gpu.run_step("ort-cuda-fp16", ctx)
    assert rec["status"] == "skipped" and "CUDAExecutionProvider" in rec["reason"] and ctx.onnx is None  # no export


def test_tensorrt_step_skips_when_tensorrt_does_not_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    rec = gpu.run_step("tensorrt-fp16", _ctx(tmp_path, FakeGpuClock()))
    assert rec["status"] == "skipped" and "tensorrt does not import" in rec["reason"]


def test_budget_skips_a_step_that_would_not_fit(tmp_path: Path) -> None:
    clock = FakeGpuClock()
    ctx = _ctx(tmp_path, clock, budget_s=480.0)
    clock.now += 300.0  # 180 s left: TensorRT's build needs 200
    rec = gpu.run_step("tensorrt-fp16", ctx)
    assert rec["status"] == "skipped" and rec["reason"].startswith("time budget: 180 s left of 480 s")


# -------------------------------------------------------------------------------------- arithmetic


def test_time_steps_syncs_each_timed_call() -> None:
    clock = FakeGpuClock()
    calls = []
    ctx = gpu.Ctx(Path("."), H100, 256, 2, 0.5, 3, 480.0, 2.0, clock=clock, sync=clock.sync)

    def fn() -> None:
        calls.append(1)
        clock.queue(0.125)  # asynchronous: the time passes only at the sync

    t = gpu.time_steps(fn, ctx)
    assert len(calls) == 2 + 4 and t["warmup"] == 2 and t["iters"] == 4  # 4 × 0.125 s reach min_time 0.5
    assert t["seconds"] == 0.5 and t["median_s"] == 0.125 and t["min_s"] == 0.125
    assert clock.syncs == 1 + 4  # after the warm-up, and after every timed call


def test_throughput_arithmetic() -> None:
    t = {"warmup": 3, "iters": 4, "seconds": 0.5, "median_s": 0.125, "min_s": 0.1}
    r = gpu.throughput(256, t)
    assert r["tiles_per_s"] == 2048.0 and r["tiles"] == 1024 and r["batch_size"] == 256
    assert r["ms_per_batch_median"] == 125.0 and r["ms_per_batch_min"] == 100.0
    assert r["iters"] == 4 and r["warmup"] == 3 and r["seconds"] == 0.5


def test_e2e_step_rates_and_ratio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "run_e2e", lambda ctx: {"points": 1000, "slide_seconds": 0.5, "stream_seconds": 0.4})
    ctx = _ctx(tmp_path, FakeGpuClock())
    ctx.done["ort-cuda-fp16"] = {"tiles_per_s": 4000.0}
    r = gpu.e2e_step(ctx)
    assert r["tiles_per_s"] == 2000.0 and r["stream_tiles_per_s"] == 2500.0
    assert r["engine_only_tiles_per_s"] == 4000.0 and r["e2e_over_engine"] == 0.5


# -------------------------------------------------------------------------------- the whole script


def _fake_gpu_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, broken: bool = False,
                  budget: str = "480") -> tuple[list[dict], FakeGpuClock, list[str]]:
    clock, released = FakeGpuClock(), []
    monkeypatch.setattr(gpu, "gpu_status", lambda: (H100, None))
    monkeypatch.setitem(gpu.RUNNERS, "torch-eager-fp16", _fake_runner(clock, 0.125, "torch fake", released))
    monkeypatch.setitem(gpu.RUNNERS, "ort-cuda-fp16", _fake_runner(clock, 0.0625, "ort fake", released))

    def trt(ctx: gpu.Ctx) -> tuple:
        if broken:
            raise RuntimeError("engine build exploded")
        raise gpu.Skip("tensorrt does not import (fake)")

    monkeypatch.setitem(gpu.RUNNERS, "tensorrt-fp16", trt)

    def e2e(ctx: gpu.Ctx) -> dict:
        clock.now += 3.0
        return {"slide": "s.ome.zarr", "points": 1000, "slide_seconds": 0.5, "stream_seconds": 0.4, "engine": "cuda",
                "engine_line": "engine: cuda, 2 reader thread(s)"}

    monkeypatch.setattr(gpu, "run_e2e", e2e)
    out = tmp_path / "gpu.jsonl"
    gpu.main(["--out", str(out), "--workdir", str(tmp_path), "--quick", "--budget-s", budget],
             clock=clock, sync=clock.sync, isolate=False)
    return [json.loads(line) for line in out.read_text().splitlines()], clock, released


def test_records_of_a_fake_gpu_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    records, _, released = _fake_gpu_run(tmp_path, monkeypatch)
    by = {r["step"]: r for r in records}
    assert list(by) == ["torch-eager-fp16", "ort-cuda-fp16", "hishrst-run", "tensorrt-fp16"]
    for r in records:
        assert r["benchmark"] == "gpu" and r["kind"] == "step" and r["gpu_name"] == H100 and r["quick"] is True
        assert r["timestamp"] and r["command"].startswith("python") and "cpu_model" in r["machine"]
    torch_r, ort_r, e2e_r = by["torch-eager-fp16"], by["ort-cuda-fp16"], by["hishrst-run"]
    assert torch_r["status"] == ort_r["status"] == e2e_r["status"] == "ok"
    # --quick: 1 warm-up, then ≥ 2 calls and ≥ 0.5 s
    assert torch_r["iters"] == 4 and torch_r["tiles_per_s"] == 256 * 4 / 0.5 == 2048.0
    assert ort_r["iters"] == 8 and ort_r["tiles_per_s"] == 4096.0 and ort_r["ms_per_batch_median"] == 62.5
    assert torch_r["label"] == "torch fake" and torch_r["batch_size"] == 256 and torch_r["warmup"] == 1
    assert torch_r["step_wall_s"] == pytest.approx(0.625)  # warm-up + timed calls
    assert e2e_r["label"] == "hishrst-run (engine: cuda, 2 reader thread(s))"
    assert e2e_r["tiles_per_s"] == 2000.0 and e2e_r["e2e_over_engine"] == pytest.approx(2000 / 4096)
    assert by["tensorrt-fp16"]["status"] == "skipped" and "fake" in by["tensorrt-fp16"]["reason"]
    assert released == ["torch fake", "ort fake"]  # each engine is released after its step
    text = capsys.readouterr().out
    assert f"### gpu — {H100}" in text and f"GPU: {H100}" in text
    assert "| torch-eager-fp16 | torch fake | 256 | 2,048 |" in text
    assert "- tensorrt-fp16: tensorrt does not import (fake)" in text


def test_a_failed_step_is_recorded_the_others_run_and_the_exit_status_is_1(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _fake_gpu_run(tmp_path, monkeypatch, broken=True)
    assert e.value.code == 1
    records = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    by = {r["step"]: r for r in records}
    assert by["tensorrt-fp16"]["status"] == "failed"
    assert by["tensorrt-fp16"]["reason"] == "RuntimeError: engine build exploded"
    assert [by[s]["status"] for s in ("torch-eager-fp16", "ort-cuda-fp16", "hishrst-run")] == ["ok"] * 3
    assert "- tensorrt-fp16 (failed): RuntimeError: engine build exploded" in capsys.readouterr().out


def test_the_budget_runs_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records, _, _ = _fake_gpu_run(tmp_path, monkeypatch, budget="80")
    by = {r["step"]: r for r in records}
    assert by["torch-eager-fp16"]["status"] == "ok"  # needs 30 s; 79.4 s are left after it
    for s in ("ort-cuda-fp16", "hishrst-run", "tensorrt-fp16"):  # need 90, 90, 200 s
        assert by[s]["status"] == "skipped" and by[s]["reason"].startswith("time budget"), by[s]


def test_isolated_steps_run_in_a_torch_free_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``isolate`` (the default of ``main``), the ORT / TensorRT / hishrst-run steps export here, then
    measure in ``child_step`` through ``run_child`` (JSON arguments, the budget as timeout)."""
    import time

    import benchmarks._common as common

    onnx = tmp_path / "enc.onnx"
    onnx.write_bytes(b"x")
    exported: list[int] = []
    monkeypatch.setattr(gpu, "require_ort_cuda", lambda: None)
    monkeypatch.setattr(gpu, "export_onnx", lambda ctx: exported.append(1) or onnx)
    released: list[str] = []
    monkeypatch.setitem(gpu.RUNNERS, "ort-cuda-fp16",
                        lambda ctx: ((lambda: time.sleep(0.01)), f"ort on {ctx.onnx.name}", lambda: released.append("x")))
    seen: dict[str, Any] = {}

    def fake_run_child(target: str, kwargs: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        seen.update(target=target, timeout=timeout)
        module, func = target.split(":")
        assert module == "benchmarks.gpu"
        return getattr(gpu, func)(**json.loads(json.dumps(kwargs)))  # what the child gets: JSON

    monkeypatch.setattr(common, "run_child", fake_run_child)
    clock = FakeGpuClock()
    ctx = _ctx(tmp_path, clock, isolate=True, warmup=1, min_time=0.05, min_iters=2)
    rec = gpu.run_step("ort-cuda-fp16", ctx)
    assert rec["status"] == "ok" and rec["label"] == "ort on enc.onnx" and released == ["x"], rec
    assert 256 / 0.03 < rec["tiles_per_s"] <= 256 / 0.01 and rec["iters"] >= 2  # the child's own clock
    assert seen == {"target": "benchmarks.gpu:child_step", "timeout": 480.0} and exported == [1]
    assert clock.syncs == 0  # nothing synchronised here: the child's engines return host arrays

    def skipping(ctx: gpu.Ctx) -> tuple:
        raise gpu.Skip("not here")

    monkeypatch.setitem(gpu.RUNNERS, "ort-cuda-fp16", skipping)
    assert gpu.run_step("ort-cuda-fp16", ctx) == {"kind": "step", "step": "ort-cuda-fp16", "gpu_name": H100,
                                                  "status": "skipped", "reason": "not here"}
    assert exported == [1]  # the export is cached on the context


def test_isolated_tensorrt_step_checks_the_package_before_exporting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(gpu, "export_onnx", lambda ctx: pytest.fail("exported although TensorRT is missing"))
    rec = gpu.run_step("tensorrt-fp16", _ctx(tmp_path, FakeGpuClock(), isolate=True))
    assert rec["status"] == "skipped" and "tensorrt does not import" in rec["reason"]


def test_unknown_step_is_refused() -> None:
    with pytest.raises(SystemExit) as e:
        gpu.main(["--steps", "torch-eager-fp16,warp-drive"])
    assert e.value.code == 2
