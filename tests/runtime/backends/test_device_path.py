"""The GPU engines' I/O binding and TensorRT profiles without a GPU: a fake ``onnxruntime`` module records every
binding call (uint8 upload, outputs bound to ``cuda``, the head fed the encoder's device value, host copies) and
computes stand-in outputs; the profile helpers and the over-profile errors are checked directly."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hishrst_runtime.backends.base import BackendError
from hishrst_runtime.backends.device import DeviceTensor, PinnedStaging, device_link
from hishrst_runtime.backends.profiles import batch_range, check_profile, run_batch_sizes

LOG: list[tuple[Any, ...]] = []
VALUES: list[Any] = []
_TYPES = {np.dtype(np.uint8): "tensor(uint8)", np.dtype(np.float32): "tensor(float)"}
# name -> (inputs [(name, type, shape)], outputs [name], compute)
MODELS: dict[str, Any] = {
    "encoder.onnx": ([("tiles", "tensor(uint8)", ["B", 4, 4, 3])], ["features", "tokens"],
                     lambda f: [f["tiles"].reshape(len(f["tiles"]), -1).mean(1, keepdims=True).astype(np.float32)
                                .repeat(2, 1), f["tiles"][:, ::2, ::2, :].astype(np.float32) / 255]),
    "head.onnx": ([("tokens", "tensor(float)", ["B", 2, 2, 3])], ["expression"],
                  lambda f: [np.repeat(f["tokens"].sum(-1, keepdims=True), 5, -1).astype(np.float32)]),
}


class FakeOrtValue:
    def __init__(self, arr: np.ndarray, device: str) -> None:
        self.arr, self.device = arr, device
        VALUES.append(self)

    @classmethod
    def ortvalue_from_shape_and_type(cls, shape: list[int], element_type: Any, device_type: str = "cpu",
                                     device_id: int = 0, memory_info: Any = None) -> FakeOrtValue:
        device = "cuda_pinned" if memory_info is not None else device_type
        LOG.append(("alloc", device, tuple(shape), np.dtype(element_type)))
        return cls(np.zeros(shape, dtype=element_type), device)

    def update_inplace(self, data: np.ndarray) -> None:
        LOG.append(("upload", self.device, data.dtype, data.shape, data.ctypes.data))
        self.arr[...] = data

    def numpy(self) -> np.ndarray:
        if self.device == "cuda_pinned":
            return self.arr  # host-accessible memory: a view
        LOG.append(("to_cpu", self.device, self.arr.shape))
        return self.arr.copy()

    def data_ptr(self) -> int:
        return self.arr.ctypes.data

    def shape(self) -> list[int]:
        return list(self.arr.shape)

    def data_type(self) -> str:
        return _TYPES[self.arr.dtype]


def _resolve(ptr: int, shape: list[int], dtype: Any) -> np.ndarray:
    """The array a raw device pointer + shape names (a row slice of a live fake value)."""
    for v in VALUES:
        base = v.arr.ctypes.data
        if base <= ptr < base + max(1, v.arr.nbytes):
            rows = (ptr - base) // (v.arr.nbytes // len(v.arr))
            return v.arr[rows:rows + shape[0]].astype(dtype, copy=False)
    raise AssertionError("unknown device pointer")


class FakeBinding:
    def __init__(self, session: FakeSession) -> None:
        self.session, self.inputs, self.outputs, self.results = session, {}, [], []

    def bind_ortvalue_input(self, name: str, value: FakeOrtValue) -> None:
        LOG.append(("bind_ortvalue_input", self.session.model, name, value))
        self.inputs[name] = value.arr

    def bind_input(self, name: str, device: str, device_id: int, dtype: Any, shape: list[int], ptr: int) -> None:
        LOG.append(("bind_input", self.session.model, name, device, tuple(shape)))
        self.inputs[name] = _resolve(ptr, shape, dtype)

    def bind_output(self, name: str, device: str = "cpu", device_id: int = 0) -> None:
        LOG.append(("bind_output", self.session.model, name, device))
        self.outputs.append(name)

    def get_outputs(self) -> list[FakeOrtValue]:
        return [FakeOrtValue(a, "cuda") for a in self.results]

    def copy_outputs_to_cpu(self) -> list[np.ndarray]:
        LOG.append(("copy_outputs_to_cpu", self.session.model))
        return [a.copy() for a in self.results]


class FakeSession:
    def __init__(self, path: str, sess_options: Any = None, providers: Any = None) -> None:
        self.model = Path(path).name
        self.ins, self.outs, self.fn = MODELS[self.model]
        self.providers = [p[0] if isinstance(p, tuple) else p for p in providers]
        self.provider_options = providers

    def get_inputs(self) -> list[Any]:
        return [types.SimpleNamespace(name=n, type=t, shape=s) for n, t, s in self.ins]

    def get_outputs(self) -> list[Any]:
        return [types.SimpleNamespace(name=n) for n in self.outs]

    def get_providers(self) -> list[str]:
        return self.providers

    def io_binding(self) -> FakeBinding:
        return FakeBinding(self)

    def run_with_iobinding(self, binding: FakeBinding) -> None:
        LOG.append(("run", self.model))
        binding.results = self.fn(binding.inputs)


class FakeEpDevice:
    ep_name = "CUDAExecutionProvider"
    device = types.SimpleNamespace(device_id=0)

    def memory_info(self, kind: str) -> Any:
        return ("pinned", kind)


def _fake_ort() -> types.ModuleType:
    ort = types.ModuleType("onnxruntime")
    ort.__version__ = "0.0-fake"
    ort.InferenceSession = FakeSession
    ort.OrtValue = FakeOrtValue
    ort.SessionOptions = lambda: types.SimpleNamespace(add_session_config_entry=lambda k, v: None)
    ort.GraphOptimizationLevel = types.SimpleNamespace(ORT_ENABLE_ALL=99)
    ort.ExecutionMode = types.SimpleNamespace(ORT_SEQUENTIAL=0)
    ort.get_available_providers = lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    ort.get_ep_devices = lambda: [FakeEpDevice()]
    ort.OrtDeviceMemoryType = types.SimpleNamespace(HOST_ACCESSIBLE="HOST_ACCESSIBLE")
    return ort


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setitem(sys.modules, "onnxruntime", _fake_ort())
    LOG.clear()
    VALUES.clear()
    paths = {}
    for name in MODELS:
        paths[name.split(".")[0]] = tmp_path / name
        paths[name.split(".")[0]].write_bytes(b"fake onnx")
    return paths


def _tiles(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)


def _cuda(path: Path) -> Any:
    from hishrst_runtime.backends.ort_cuda import OrtCudaBackend

    return OrtCudaBackend(path, threads=1)


# ------------------------------------------------------------------------------------- I/O binding


def test_encoder_uploads_uint8_and_keeps_tokens_on_the_device(models: dict[str, Path]) -> None:
    enc = _cuda(models["encoder"])
    out = enc.run_device({"tiles": _tiles(4)}, keep=("tokens",), fetch=())
    assert list(out) == ["tokens"] and isinstance(out["tokens"], DeviceTensor)
    tok = out["tokens"]
    assert tok.shape == (4, 2, 2, 3) and tok.dtype == np.float32 and tok.family == ("onnxruntime-cuda", 0)
    uploads = [e for e in LOG if e[0] == "upload"]
    assert [(e[1], e[2], e[3]) for e in uploads] == [("cuda", np.dtype(np.uint8), (4, 4, 4, 3))]  # uint8, on cuda
    bound = [e for e in LOG if e[0] == "bind_ortvalue_input"]
    assert bound[0][2] == "tiles" and bound[0][3].device == "cuda" and bound[0][3].arr.dtype == np.uint8
    assert {(e[2], e[3]) for e in LOG if e[0] == "bind_output"} == {("features", "cuda"), ("tokens", "cuda")}
    assert not [e for e in LOG if e[0] in ("to_cpu", "copy_outputs_to_cpu")]  # nothing came back to the host


def test_head_takes_the_device_tokens_and_only_its_output_is_copied(models: dict[str, Path]) -> None:
    enc, head = _cuda(models["encoder"]), _cuda(models["head"])
    assert device_link(enc, head)
    tiles = _tiles(4)
    tok = enc.run_device({"tiles": tiles}, keep=("tokens",), fetch=())["tokens"]
    LOG.clear()
    (expr,) = head.run({"tokens": tok})
    fed = [e for e in LOG if e[0] == "bind_ortvalue_input"]
    assert len(fed) == 1 and fed[0][1:3] == ("head.onnx", "tokens") and fed[0][3] is tok.value  # no round trip
    assert not [e for e in LOG if e[0] == "upload"]
    assert [e for e in LOG if e[0] in ("to_cpu", "copy_outputs_to_cpu")] == [("copy_outputs_to_cpu", "head.onnx")]
    host_tokens = enc.run({"tiles": tiles})[1]
    np.testing.assert_array_equal(expr, head.run({"tokens": host_tokens})[0])  # same as the host path


def test_device_row_slice_feeds_smaller_head_batches(models: dict[str, Path]) -> None:
    enc, head = _cuda(models["encoder"]), _cuda(models["head"])
    tiles = _tiles(6, seed=1)
    tok = enc.run_device({"tiles": tiles}, keep=("tokens",), fetch=())["tokens"]
    LOG.clear()
    part = head.run({"tokens": tok.slice(2, 5)})[0]
    assert [e for e in LOG if e[0] == "bind_input"] == [("bind_input", "head.onnx", "tokens", "cuda", (3, 2, 2, 3))]
    np.testing.assert_array_equal(part, head.run({"tokens": enc.run({"tiles": tiles})[1]})[0][2:5])
    np.testing.assert_array_equal(tok.slice(2, 5).to_host(), tok.to_host()[2:5])


def test_fetch_copies_only_the_named_output(models: dict[str, Path]) -> None:
    enc = _cuda(models["encoder"])
    out = enc.run_device({"tiles": _tiles(2)}, keep=("tokens",), fetch=("features",))
    assert isinstance(out["features"], np.ndarray) and out["features"].shape == (2, 2)
    assert [e for e in LOG if e[0] == "to_cpu"] == [("to_cpu", "cuda", (2, 2))]
    with pytest.raises(BackendError, match="no output"):
        enc.run_device({"tiles": _tiles(2)}, keep=("nope",))


def test_pinned_staging_and_device_inputs_are_reused(models: dict[str, Path]) -> None:
    enc = _cuda(models["encoder"])
    for n in (4, 4, 2, 4):  # full batches and a partial last batch
        enc.run({"tiles": _tiles(n, seed=n)})
    assert enc._staging.allocations == 1 and enc._staging.pinned == {"tiles": "onnxruntime"}
    pinned_ptrs = {e[4] for e in LOG if e[0] == "upload"}
    assert len(pinned_ptrs) == 1  # every upload reads the same pinned buffer
    device_allocs = [e for e in LOG if e[0] == "alloc" and e[1] == "cuda"]
    assert [e[2][0] for e in device_allocs] == [4, 2]  # one device value per batch size, then reused
    enc.close()
    assert enc._staging is None


def test_device_feed_checks(models: dict[str, Path]) -> None:
    enc, head = _cuda(models["encoder"]), _cuda(models["head"])
    tok = enc.run_device({"tiles": _tiles(2)}, keep=("tokens",), fetch=())["tokens"]
    other = DeviceTensor(tok.value, ("onnxruntime-cuda", 1), "tokens", tok.shape, tok.dtype)
    with pytest.raises(BackendError, match="lives on"):
        head.run({"tokens": other})
    feats = enc.run_device({"tiles": _tiles(2)}, keep=("features",), fetch=())["features"]
    with pytest.raises(BackendError, match="device input 'tokens'"):
        head.run({"tokens": feats})
    from hishrst_runtime.backends.noop import NoopBackend

    assert not device_link(enc, NoopBackend(lambda f: (1,)))


def test_staging_pins_with_cuda_host_register_else_pageable() -> None:
    registered: list[int] = []
    s = PinnedStaging(register=(lambda a: registered.append(a.ctypes.data) or a.ctypes.data, registered.remove))
    a = s.stage("tiles", _tiles(8))
    b = s.stage("tiles", _tiles(3))
    assert s.pinned == {"tiles": "cudaHostRegister"} and s.allocations == 1 and a.ctypes.data == b.ctypes.data
    assert s.stage("tiles", b) is not None and s.allocations == 1  # already staged: no copy, no allocation
    s.close()
    assert registered == []
    p = PinnedStaging(register=None)
    p.stage("tiles", _tiles(2))
    assert p.pinned == {"tiles": "pageable"}


# ------------------------------------------------------------------------------------- TensorRT profiles


def test_run_batch_sizes_and_ranges() -> None:
    assert run_batch_sizes(256) == (1, 256) and run_batch_sizes(1) == (1,)
    assert run_batch_sizes(256, total=1000) == (232, 256) and run_batch_sizes(256, total=512) == (256,)
    assert run_batch_sizes(256, total=100) == (100,)
    assert batch_range(run_batch_sizes(256)) == (1, 256, 256)
    assert batch_range(run_batch_sizes(256, total=1000)) == (232, 256, 256)
    assert batch_range((1, 256), cap=64) == (1, 64, 64)
    with pytest.raises(ValueError):
        batch_range(())


def test_over_profile_errors() -> None:
    prof = {"tiles": ((1, 224, 224, 3), (64, 224, 224, 3), (64, 224, 224, 3))}
    check_profile("enc", {"tiles": (64, 224, 224, 3)}, prof)
    with pytest.raises(BackendError, match=r"batch of 65 .* \(1\.\.64\); use --batch-size 64 or less"):
        check_profile("enc", {"tiles": (65, 224, 224, 3)}, prof)
    with pytest.raises(BackendError, match="shape .* is outside the TensorRT profile"):
        check_profile("enc", {"tiles": (8, 112, 112, 3)}, prof)


def _trt(path: Path, monkeypatch: pytest.MonkeyPatch, graph: dict[str, tuple], **kw: Any) -> Any:
    from hishrst_runtime.backends import ort_trt

    monkeypatch.setattr(ort_trt, "onnx_input_shapes", lambda p: graph)
    return ort_trt.OrtTensorrtBackend(path, threads=1, model_sha256="0" * 64, **kw)


@pytest.mark.parametrize(("key", "graph", "shape"), [
    ("encoder", {"tiles": (None, 4, 4, 3)}, "4x4x3"),
    ("head", {"tokens": (None, 2, 2, 3)}, "2x2x3"),  # sub-spot head: tokens [B, rows, cols, width]
])
def test_trt_provider_profile_from_run_batches(models: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, key: str, graph: dict, shape: str) -> None:
    lo, opt, hi = batch_range(run_batch_sizes(16, total=40))  # 16, 16, then 8
    be = _trt(models[key], monkeypatch, graph, cache_dir=tmp_path / "c", min_batch=lo, opt_batch=opt, max_batch=hi)
    name = next(iter(graph))
    o = be.provider_options
    assert (o["trt_profile_min_shapes"], o["trt_profile_opt_shapes"], o["trt_profile_max_shapes"]) == (
        f"{name}:8x{shape}", f"{name}:16x{shape}", f"{name}:16x{shape}")
    other = _trt(models[key], monkeypatch, graph, cache_dir=tmp_path / "c", max_batch=64)
    assert other.cache_dir != be.cache_dir  # engines for another profile never come from this cache
    dims = tuple(int(d) for d in shape.split("x"))
    feed = np.zeros((17, *dims), dtype=np.uint8 if key == "encoder" else np.float32)
    with pytest.raises(BackendError, match=r"batch of 17 .* \(8\.\.16\); use --batch-size 16 or less"):
        be.run({name: feed})
    assert not [e for e in LOG if e[0] == "run"]  # refused before TensorRT


def test_trt_provider_checks_device_feeds_against_the_profile(models: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    enc = _trt(models["encoder"], monkeypatch, {"tiles": (None, 4, 4, 3)}, cache_dir=tmp_path / "c", max_batch=8)
    head = _trt(models["head"], monkeypatch, {"tokens": (None, 2, 2, 3)}, cache_dir=tmp_path / "c", max_batch=4)
    assert device_link(enc, head) and device_link(enc, _cuda(models["head"]))  # TensorRT and CUDA share memory
    tok = enc.run_device({"tiles": _tiles(8)}, keep=("tokens",), fetch=())["tokens"]
    assert head.run({"tokens": tok.slice(0, 4)})[0].shape == (4, 2, 2, 5)
    with pytest.raises(BackendError, match="batch of 8"):
        head.run({"tokens": tok})


def test_native_engine_over_profile_error() -> None:
    from hishrst_runtime.backends.tensorrt_native import TensorRTNativeBackend

    be = TensorRTNativeBackend.__new__(TensorRTNativeBackend)
    be.engine_path, be.name = Path("encoder.plan"), "tensorrt-10.x"
    be.input_names, be.input_dtypes, be.input_shapes = ["tiles"], [np.dtype(np.uint8)], [(None, 4, 4, 3)]
    be.profile = {"tiles": ((1, 4, 4, 3), (32, 4, 4, 3), (32, 4, 4, 3))}
    be._context, be._mem = object(), types.SimpleNamespace(activate=lambda: None)
    with pytest.raises(BackendError, match=r"batch of 33 .* \(1\.\.32\)"):
        be.run({"tiles": _tiles(33)})


def test_bin_stages_keep_the_tokens_on_the_device(models: dict[str, Path]) -> None:
    """``hishrst-run --resolution``'s stages with two GPU engines of one device: the encoder's tokens stay on the
    GPU (one device value per unit), the head takes row slices of it, and the bins equal the host path's."""
    from types import SimpleNamespace

    from hishrst_runtime.core.timing import StageTimer
    from hishrst_runtime.inference.bin_stages import encode_tokens, head_bins

    enc, head = _cuda(models["encoder"]), _cuda(models["head"])
    assert device_link(enc, head)
    n, genes = 7, 5
    spec = SimpleNamespace(tokens=SimpleNamespace(grid=(2, 2)))
    plan = SimpleNamespace(batch_size=8, max_groups=3, timer=StageTimer(), prep=SimpleNamespace(name="slide"),
                           bundle=SimpleNamespace(spec=spec, root="bundle", genes=[f"G{i}" for i in range(genes)]))
    in_tissue = np.random.default_rng(2).random((n, 2, 2)) > 0.3
    layout = SimpleNamespace(lattice=SimpleNamespace(geometry=SimpleNamespace(margin=0, keep=2, grid=(2, 2))),
                             factor=1, in_tissue=in_tissue, tile_rows=lambda a, b: np.arange(int(in_tissue.sum())))
    tiles, unit = _tiles(n, seed=3), list(range(n))
    LOG.clear()
    tok = encode_tokens(plan, enc, tiles, on_device=True)
    assert isinstance(tok, DeviceTensor) and tok.shape == (n, 2, 2, 3)
    rows, values = head_bins(plan, layout, head, unit, tok)
    sliced = [e for e in LOG if e[0] in ("bind_input", "bind_ortvalue_input") and e[1] == "head.onnx"]
    assert len(sliced) == 3  # 7 tiles in head batches of 3: three device row slices, no host round trip
    copies = [e for e in LOG if e[0] in ("to_cpu", "copy_outputs_to_cpu")]
    assert copies == [("copy_outputs_to_cpu", "head.onnx")] * 3  # only the head's expression came to the host
    host_tok = encode_tokens(plan, enc, tiles)
    assert isinstance(host_tok, np.ndarray)
    want_rows, want = head_bins(plan, layout, head, unit, host_tok)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(values, want)
    assert values.shape == (int(in_tissue.sum()), genes)
