"""TensorRT engine build (``hishrst_export.tensorrt``): clear errors without TensorRT/GPU, argument
checks, fp16 detection, the parity comparison, and (``@pytest.mark.gpu``) real builds + native runs."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from hishrst_export.tensorrt import (  # noqa: E402
    TensorRTUnavailable,
    build_engine,
    engine_parity,
    onnx_has_fp16,
    tensorrt_info,
)
from hishrst_export.parity import compare  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402
from tests.runtime.backends.test_backends import encoder_ref, head_feeds, head_ref, make_encoder_like, make_head_like  # noqa: E402

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_GPU = shutil.which("nvidia-smi") is not None
requires_trt_gpu = pytest.mark.skipif(not (HAS_TRT and HAS_GPU), reason="needs TensorRT (pip install tensorrt) and an NVIDIA GPU")
requires_no_trt = pytest.mark.skipif(HAS_TRT, reason="checks the behaviour of a machine without TensorRT")

HEAD_SHAPES = {
    "features": ((1, 1, 4), (3, 5, 4), (8, 16, 4)),
    "positions": ((1, 1, 2), (3, 5, 2), (8, 16, 2)),
    "mask": ((1, 1), (3, 5), (8, 16)),
}


@pytest.fixture()
def encoder_onnx(tmp_path: Path) -> Path:
    return make_encoder_like(tmp_path / "encoder.onnx")


@requires_no_trt
def test_build_engine_without_tensorrt(encoder_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "encoder.plan"
    with pytest.raises(TensorRTUnavailable) as info:
        build_engine(encoder_onnx, out_path=out, timing_cache=tmp_path / "timing.cache")
    msg = str(info.value)
    assert "TensorRT" in msg and "pip install" in msg and "GPU" in msg
    assert not out.exists() and not (tmp_path / "timing.cache").exists()  # nothing touched


@requires_no_trt
def test_info_and_parity_without_tensorrt(encoder_onnx: Path) -> None:
    with pytest.raises(TensorRTUnavailable, match="not installed"):
        tensorrt_info()
    with pytest.raises(TensorRTUnavailable):
        engine_parity(encoder_onnx.with_suffix(".plan"), encoder_onnx, {"tiles": np.zeros((1, 8, 8, 3), np.uint8)})


def test_build_engine_argument_checks(encoder_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="precision"):
        build_engine(encoder_onnx, precision="int8")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        build_engine(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="max_batch"):
        build_engine(encoder_onnx, min_batch=8, max_batch=4)
    head = make_head_like(tmp_path / "head.onnx")
    with pytest.raises(ValueError, match="shapes="):
        build_engine(head)  # [G, N, *] inputs need explicit ranges


def test_onnx_has_fp16(encoder_onnx: Path, tmp_path: Path) -> None:
    assert not onnx_has_fp16(encoder_onnx)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)]
    model = helper.make_model(helper.make_graph(nodes, "half", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "half.onnx"))
    assert onnx_has_fp16(tmp_path / "half.onnx")


def test_parity_comparison() -> None:
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    same = compare(w, w)
    assert same["scaled_max_abs"] == 0 and same["pcc"] == 1 and same["nonfinite"] == 0 and same["compared"] == 12
    g = w.copy()
    g[2] = 1e6  # garbage in a padded row is ignored when masked out
    valid = np.array([True, True, False])
    assert compare(g, w, valid=valid)["scaled_max_abs"] == 0
    assert compare(g, w)["scaled_max_abs"] > 1
    g = w.copy()
    g[0, 0] = np.nan
    bad = compare(g, w)
    assert bad["nonfinite"] == 1 and bad["pcc"] == 0


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@requires_trt_gpu
def test_build_and_run_encoder_engine(encoder_onnx: Path, tmp_path: Path) -> None:
    from hishrst_runtime.backends import BackendError, load_backend

    info = tensorrt_info()
    cache = tmp_path / "timing.cache"
    eng = build_engine(encoder_onnx, out_path=tmp_path / "encoder.plan", max_batch=64, timing_cache=cache, workspace_gb=1)
    assert eng.is_file() and cache.is_file()
    expected = {"gpu": info["gpu"], "tensorrt_version": info["tensorrt_version"]}
    rng = np.random.default_rng(0)
    with load_backend(None, provider="trt-native", engine_path=eng, expected=expected) as be:
        assert be.input_names == ["tiles"] and be.input_dtypes == [np.dtype(np.uint8)]
        for batch in (1, 7, 64):
            tiles = rng.integers(0, 256, (batch, 8, 8, 3), dtype=np.uint8)
            np.testing.assert_allclose(be.run({"tiles": tiles})[0], encoder_ref(tiles), rtol=1e-3, atol=1e-2)
        with pytest.raises(BackendError, match="profile"):
            be.run({"tiles": np.zeros((65, 8, 8, 3), np.uint8)})
    report = engine_parity(eng, encoder_onnx, {"tiles": rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)})
    assert report["passed"] and report["precision"] == "fp32"
    with pytest.raises(BackendError, match="Rebuild"):
        load_backend(None, provider="trt-native", engine_path=eng, expected={**expected, "gpu": "Some Other GPU"})


@pytest.mark.gpu
@requires_trt_gpu
def test_build_and_run_head_engine(tmp_path: Path) -> None:
    from hishrst_runtime.backends.tensorrt_native import TensorRTNativeBackend

    head = make_head_like(tmp_path / "head.onnx")
    eng = build_engine(head, out_path=tmp_path / "head.plan", shapes=HEAD_SHAPES, workspace_gb=1)
    feeds = head_feeds(np.random.default_rng(1))
    with TensorRTNativeBackend(eng) as be:
        np.testing.assert_allclose(be.run(feeds)[0], head_ref(feeds), rtol=1e-3, atol=1e-2)
    assert engine_parity(eng, head, feeds)["passed"]


@pytest.mark.gpu
@requires_trt_gpu
def test_build_fp16_engine(encoder_onnx: Path, tmp_path: Path) -> None:
    from hishrst_export.tensorrt import TensorRTBuildError

    if not tensorrt_info()["fp16_builder_flag"]:
        with pytest.raises(TensorRTBuildError, match="fp16 ONNX"):
            build_engine(encoder_onnx, precision="fp16")
        return
    eng = build_engine(encoder_onnx, out_path=tmp_path / "e16.plan", precision="fp16", max_batch=8, workspace_gb=1)
    tiles = np.random.default_rng(2).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    assert engine_parity(eng, encoder_onnx, {"tiles": tiles}, precision="fp16")["passed"]


# ----------------------------------------------------------------------------- native backend control flow (fake TensorRT)


class _FakeMem:
    """Host byte arrays standing in for device buffers; pointers are dictionary keys."""

    stream_handle = 7

    def __init__(self) -> None:
        self.bufs: dict[int, np.ndarray] = {}
        self.activated_in: set[str] = set()

    def activate(self) -> None:
        import threading

        self.activated_in.add(threading.current_thread().name)

    def malloc(self, nbytes: int) -> int:
        ptr = 4096 * (len(self.bufs) + 1)
        self.bufs[ptr] = np.zeros(nbytes, np.uint8)
        return ptr

    def ptr(self, buf: int) -> int:
        return buf

    def h2d(self, buf: int, host: np.ndarray) -> None:
        self.bufs[buf][: host.nbytes] = host.reshape(-1).view(np.uint8)

    def d2h(self, host: np.ndarray, buf: int) -> None:
        host.reshape(-1).view(np.uint8)[:] = self.bufs[buf][: host.nbytes]

    def synchronize(self) -> None: ...

    def free(self, buf: int) -> None:
        del self.bufs[buf]

    def close(self) -> None: ...


def _fake_tensorrt(mem: _FakeMem) -> object:
    """Just enough of the TensorRT 10 runtime API for an 'encoder' engine: mean over H, W of uint8 tiles."""
    import types

    profile = {"tiles": ((1, 8, 8, 3), (4, 8, 8, 3), (16, 8, 8, 3))}

    class Context:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addr: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            lo, _, hi = profile[name]
            if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self.shapes[name] if name == "tiles" else (self.shapes["tiles"][0], 3)

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addr[name] = ptr
            return True

        def execute_async_v3(self, stream: int) -> bool:
            shape = self.shapes["tiles"]
            n = int(np.prod(shape))
            tiles = mem.bufs[self.addr["tiles"]][:n].reshape(shape)
            out = encoder_ref(tiles)
            mem.bufs[self.addr["features"]][: out.nbytes] = out.reshape(-1).view(np.uint8)
            return stream == mem.stream_handle

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i: int) -> str:
            return ["tiles", "features"][i]

        def get_tensor_mode(self, name: str) -> str:
            return "in" if name == "tiles" else "out"

        def get_tensor_dtype(self, name: str) -> type:
            return np.uint8 if name == "tiles" else np.float32

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (-1, 8, 8, 3) if name == "tiles" else (-1, 3)

        def get_tensor_profile_shape(self, name: str, index: int) -> tuple[tuple[int, ...], ...]:
            return profile[name]

        def create_execution_context(self) -> Context:
            return Context()

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.9.0.34"  # type: ignore[attr-defined]
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, sev: None})  # type: ignore[attr-defined]
    trt.TensorIOMode = type("TensorIOMode", (), {"INPUT": "in", "OUTPUT": "out"})  # type: ignore[attr-defined]
    trt.Runtime = type("Runtime", (), {  # type: ignore[attr-defined]
        "__init__": lambda self, logger: None,
        "deserialize_cuda_engine": lambda self, data: Engine() if data == b"ENGINE" else None,
    })
    trt.nptype = lambda dt: dt  # type: ignore[attr-defined]
    return trt


def test_native_backend_control_flow_with_fake_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Profile reading, buffer sizing, per-call shapes and copies; the real API is exercised by the GPU tests."""
    import sys

    from hishrst_runtime.backends import BackendError
    from hishrst_runtime.backends import tensorrt_native as tn

    mem = _FakeMem()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(mem))
    monkeypatch.setattr(tn, "_cuda_memory", lambda device_id: mem)
    monkeypatch.setattr(tn, "gpu_name", lambda device_id=0: "Fake GPU")
    eng = tmp_path / "encoder.plan"
    eng.write_bytes(b"ENGINE")
    expected = {"gpu": "Fake GPU", "tensorrt_version": "10.9.0.34"}
    be = tn.TensorRTNativeBackend(eng, expected=expected)
    assert be.input_names == ["tiles"] and be.output_names == ["features"] and be.max_batch == 16
    assert be.input_shapes == [(None, 8, 8, 3)] and be.input_dtypes == [np.dtype(np.uint8)]
    assert sorted(b.nbytes for b in mem.bufs.values()) == [16 * 3 * 4, 16 * 8 * 8 * 3]  # sized for max batch
    rng = np.random.default_rng(0)
    for batch in (1, 7, 16):
        tiles = rng.integers(0, 256, (batch, 8, 8, 3), dtype=np.uint8)
        np.testing.assert_allclose(be.run({"tiles": tiles})[0], encoder_ref(tiles), rtol=1e-6)
    with pytest.raises(BackendError, match=r"outside the TensorRT profile \(1\.\.16\)"):
        be.run({"tiles": np.zeros((17, 8, 8, 3), np.uint8)})
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="other") as pool:  # the runtime calls the head from its own thread
        pool.submit(be.run, {"tiles": tiles}).result()
    assert any(name.startswith("other") for name in mem.activated_in)  # the device is made current there too
    be.close()
    assert mem.bufs == {}
    with pytest.raises(BackendError, match="GPU 'Other GPU'"):
        tn.TensorRTNativeBackend(eng, expected={**expected, "gpu": "Other GPU"})
    eng.write_bytes(b"garbage")
    with pytest.raises(BackendError, match="deserialize"):
        tn.TensorRTNativeBackend(eng, expected=expected)
