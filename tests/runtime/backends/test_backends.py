"""Inference backends: CPU correctness, I/O introspection, provider resolution, GPU fallback detection,
TensorRT cache keys, and the torch/tensorrt-free import guarantee.

Tiny ONNX models are built with ``onnx.helper`` in ``tmp_path``. Tests that expect *no* GPU are
skipped on GPU machines; ``@pytest.mark.gpu`` tests are skipped (with a reason) without one.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from hishrst_runtime.backends import (  # noqa: E402
    Backend,
    BackendError,
    available_providers,
    load_backend,
    provider_report,
    resolve_provider,
)
from hishrst_runtime.backends.ort_cpu import OrtCpuBackend  # noqa: E402
from hishrst_runtime.backends.ort_trt import profile_shapes, trt_cache_dir  # noqa: E402
from hishrst_runtime.backends.tensorrt_native import check_engine_compat  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]


def _gpu_present() -> bool:
    return shutil.which("nvidia-smi") is not None or "CUDAExecutionProvider" in ort.get_available_providers()


requires_gpu = pytest.mark.skipif(not _gpu_present(), reason="needs an NVIDIA GPU (no nvidia-smi, no CUDA in onnxruntime)")
requires_no_gpu = pytest.mark.skipif(_gpu_present(), reason="checks the behaviour of a machine without a GPU")


# ----------------------------------------------------------------------------- tiny models


def make_encoder_like(path: Path, *, size: int = 8) -> Path:
    """uint8 tiles [B, S, S, 3] -> Cast -> ReduceMean over H, W -> features float32 [B, 3]."""
    x = helper.make_tensor_value_info("tiles", TensorProto.UINT8, ["B", size, size, 3])
    y = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["B", 3])
    nodes = [
        helper.make_node("Cast", ["tiles"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["xf"], ["features"], axes=[1, 2], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "encoder_like", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_head_like(path: Path, *, dim: int = 4) -> Path:
    """features [G,N,D], positions [G,N,2], mask [G,N] -> (features + sum(positions)) * mask[..., None]."""
    f = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["G", "N", dim])
    p = helper.make_tensor_value_info("positions", TensorProto.FLOAT, ["G", "N", 2])
    m = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["G", "N"])
    y = helper.make_tensor_value_info("expression", TensorProto.FLOAT, ["G", "N", dim])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [-1])
    nodes = [
        helper.make_node("ReduceSum", ["positions", "axes"], ["psum"], keepdims=1),
        helper.make_node("Add", ["features", "psum"], ["h"]),
        helper.make_node("Unsqueeze", ["mask", "axes"], ["m3"]),
        helper.make_node("Mul", ["h", "m3"], ["expression"]),
    ]
    graph = helper.make_graph(nodes, "head_like", [f, p, m], [y], initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def encoder_ref(tiles: np.ndarray) -> np.ndarray:
    return tiles.astype(np.float32).mean(axis=(1, 2))


def head_feeds(rng: np.random.Generator, g: int = 3, n: int = 5, d: int = 4) -> dict[str, np.ndarray]:
    mask = np.ones((g, n), np.float32)
    mask[1, 3:] = 0
    return {
        "features": rng.standard_normal((g, n, d)).astype(np.float32),
        "positions": (rng.random((g, n, 2)) * 1000).astype(np.float32),
        "mask": mask,
    }


def head_ref(feeds: dict[str, np.ndarray]) -> np.ndarray:
    return (feeds["features"] + feeds["positions"].sum(-1, keepdims=True)) * feeds["mask"][..., None]


@pytest.fixture()
def encoder_onnx(tmp_path: Path) -> Path:
    return make_encoder_like(tmp_path / "encoder.onnx")


@pytest.fixture()
def head_onnx(tmp_path: Path) -> Path:
    return make_head_like(tmp_path / "head.onnx")


# ----------------------------------------------------------------------------- CPU backend


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_cpu_backend_matches_numpy(encoder_onnx: Path, batch: int) -> None:
    rng = np.random.default_rng(batch)
    tiles = rng.integers(0, 256, (batch, 8, 8, 3), dtype=np.uint8)
    with load_backend(encoder_onnx, provider="cpu") as be:
        (out,) = be.run({"tiles": tiles})
    assert out.shape == (batch, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, encoder_ref(tiles), rtol=1e-5, atol=1e-4)


def test_cpu_backend_io_introspection(encoder_onnx: Path, head_onnx: Path) -> None:
    enc = load_backend(encoder_onnx, provider="cpu")
    assert isinstance(enc, Backend)
    assert enc.provider == "cpu" and enc.name.startswith("onnxruntime-cpu")
    assert enc.input_names == ["tiles"] and enc.output_names == ["features"]
    assert enc.input_dtypes == [np.dtype(np.uint8)]
    assert enc.input_shapes == [(None, 8, 8, 3)]
    head = load_backend(head_onnx, provider="cpu")
    assert head.input_names == ["features", "positions", "mask"]
    assert head.input_dtypes == [np.dtype(np.float32)] * 3
    assert head.input_shapes == [(None, None, 4), (None, None, 2), (None, None)]
    assert "tiles" in repr(enc)
    enc.close()
    enc.close()  # idempotent
    with pytest.raises(BackendError, match="closed"):
        enc.run({"tiles": np.zeros((1, 8, 8, 3), np.uint8)})


def test_cpu_backend_three_input_model_with_mask(head_onnx: Path) -> None:
    feeds = head_feeds(np.random.default_rng(0))
    with OrtCpuBackend(head_onnx) as be:
        (out,) = be.run(feeds)
    np.testing.assert_allclose(out, head_ref(feeds), rtol=1e-5, atol=1e-4)
    assert np.all(out[1, 3:] == 0)


def test_feed_validation(encoder_onnx: Path, head_onnx: Path) -> None:
    enc = OrtCpuBackend(encoder_onnx)
    with pytest.raises(BackendError, match="missing"):
        enc.run({})
    with pytest.raises(BackendError, match="unknown"):
        enc.run({"tiles": np.zeros((1, 8, 8, 3), np.uint8), "extra": np.zeros(1)})
    with pytest.raises(BackendError, match="uint8"):
        enc.run({"tiles": np.zeros((1, 8, 8, 3), np.float32)})  # float -> uint8 would truncate: refused
    with pytest.raises(BackendError, match="shape"):
        enc.run({"tiles": np.zeros((1, 9, 8, 3), np.uint8)})
    head = OrtCpuBackend(head_onnx)
    feeds = {k: v.astype(np.float64) for k, v in head_feeds(np.random.default_rng(1)).items()}
    (out,) = head.run(feeds)  # float64 -> float32 is a same-kind cast: accepted
    assert out.dtype == np.float32


def test_cpu_threads_option(encoder_onnx: Path) -> None:
    from hishrst_runtime.backends.base import default_threads

    assert OrtCpuBackend(encoder_onnx, threads=1).threads == 1
    assert OrtCpuBackend(encoder_onnx).threads == default_threads() >= 1
    # Idle intra-op threads sleep instead of spinning (two sessions and the readers share the cores).
    from hishrst_runtime.backends.base import ort_session_options

    assert ort_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert ort_session_options(spin=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_missing_or_broken_model(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="not found"):
        load_backend(tmp_path / "nope.onnx", provider="cpu")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(BackendError, match=r"bad\.onnx"):
        load_backend(bad, provider="cpu")


# ----------------------------------------------------------------------------- provider resolution


def test_available_providers_always_has_cpu() -> None:
    avail = available_providers()
    assert avail[-1] == "cpu"
    report = provider_report()
    assert report["cpu"] is None and set(report) == {"cpu", "cuda", "tensorrt", "trt-native"}


def test_unknown_provider_raises(encoder_onnx: Path) -> None:
    with pytest.raises(BackendError, match="unknown provider"):
        resolve_provider("rocm")  # type: ignore[arg-type]


@requires_no_gpu
def test_auto_resolves_to_cpu_without_gpu(encoder_onnx: Path) -> None:
    assert resolve_provider("auto") == "cpu"
    assert resolve_provider("auto", engine_available=True) == "cpu"
    assert available_providers() == ["cpu"]
    be = load_backend(encoder_onnx, provider="auto", engine_path=encoder_onnx.with_suffix(".engine"))
    assert be.provider == "cpu"


@requires_no_gpu
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_provider_request_raises_without_gpu(encoder_onnx: Path, provider: str) -> None:
    with pytest.raises(BackendError) as info:
        resolve_provider(provider)  # type: ignore[arg-type]
    msg = str(info.value)
    assert f"'{provider}' is not available" in msg
    assert "onnxruntime-gpu" in msg and "hishrst[gpu]" in msg  # the reason and the fix
    with pytest.raises(BackendError, match="not available"):
        load_backend(encoder_onnx, provider=provider)  # type: ignore[arg-type]


@requires_no_gpu
def test_trt_native_request_raises_without_gpu(encoder_onnx: Path) -> None:
    with pytest.raises(BackendError, match="trt-native"):
        load_backend(encoder_onnx, provider="trt-native", engine_path=encoder_onnx)


@requires_no_gpu
@pytest.mark.parametrize("cls_name", ["OrtCudaBackend", "OrtTensorrtBackend"])
def test_silent_cpu_fallback_is_refused(encoder_onnx: Path, tmp_path: Path, cls_name: str) -> None:
    """Constructing a GPU backend directly: onnxruntime creates a CPU session; we must refuse it."""
    from hishrst_runtime.backends import ort_cuda, ort_trt

    cls = getattr(ort_cuda, cls_name, None) or getattr(ort_trt, cls_name)
    kwargs = {"cache_dir": tmp_path / "cache"} if cls_name == "OrtTensorrtBackend" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # onnxruntime: "provider not in available provider names"
        with pytest.raises(BackendError) as info:
            cls(encoder_onnx, **kwargs)
    msg = str(info.value)
    assert "fell back to CPUExecutionProvider" in msg and "hishrst[gpu]" in msg


def test_trt_native_needs_engine_path(encoder_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hishrst_runtime.backends as backends

    monkeypatch.setattr(backends, "resolve_provider", lambda *a, **k: "trt-native")
    with pytest.raises(BackendError, match="engine_path"):
        backends.load_backend(encoder_onnx, provider="trt-native")
    with pytest.raises(BackendError, match="engine_path"):
        backends.load_backend(None, provider="trt-native")
    if importlib.util.find_spec("tensorrt") is None:  # the engine given as the only path reaches the backend
        plan = encoder_onnx.with_suffix(".plan")
        plan.write_bytes(b"engine")
        with pytest.raises(BackendError, match="TensorRT Python package is not installed"):
            backends.load_backend(plan, provider="trt-native")


# ----------------------------------------------------------------------------- TensorRT cache key and profile


def test_trt_cache_dir_key(encoder_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hishrst_runtime.bundle.manifest import sha256_file

    root = tmp_path / "cache"
    a = trt_cache_dir(encoder_onnx, cache_dir=root)
    assert a.parent == root and a.name.startswith("encoder-")
    assert trt_cache_dir(encoder_onnx, cache_dir=root) == a  # deterministic
    assert trt_cache_dir(encoder_onnx, cache_dir=root, model_sha256=sha256_file(encoder_onnx)) == a
    assert trt_cache_dir(encoder_onnx, cache_dir=root, fp16=True) != a
    make_encoder_like(encoder_onnx, size=16)  # the model changes -> a new cache directory
    b = trt_cache_dir(encoder_onnx, cache_dir=root)
    assert b != a and b.parent == root
    monkeypatch.setenv("HISHRST_CACHE_DIR", str(tmp_path / "env"))
    assert trt_cache_dir(encoder_onnx).parent == tmp_path / "env" / "trt"
    monkeypatch.delenv("HISHRST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert trt_cache_dir(encoder_onnx).parent == tmp_path / "xdg" / "hishrst" / "trt"


def test_trt_cache_key_tracks_versions(encoder_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hishrst_runtime.backends import ort_trt

    a = trt_cache_dir(encoder_onnx, cache_dir=tmp_path)
    monkeypatch.setattr(ort_trt, "tensorrt_version", lambda: "99.0.0")
    b = trt_cache_dir(encoder_onnx, cache_dir=tmp_path)
    monkeypatch.setattr(ort_trt, "gpu_name", lambda device_id=0: "Some Other GPU")
    c = trt_cache_dir(encoder_onnx, cache_dir=tmp_path)
    assert len({a, b, c}) == 3


def test_profile_shapes() -> None:
    enc = {"tiles": (None, 224, 224, 3)}
    assert profile_shapes(enc, max_batch=32) == {"tiles": ((1, 224, 224, 3), (32, 224, 224, 3), (32, 224, 224, 3))}
    assert profile_shapes(enc, max_batch=32, opt_batch=8)["tiles"][1] == (8, 224, 224, 3)
    assert profile_shapes({"x": (4, 2)}) == {}  # static inputs need no profile
    head = {"features": (None, None, 4), "mask": (None, None)}
    assert profile_shapes(head) is None  # dynamic N needs explicit ranges
    shapes = {"features": ((1, 1, 4), (8, 50, 4), (64, 64, 4)), "mask": ((1, 1), (8, 50), (64, 64))}
    assert profile_shapes(head, shapes=shapes) == {k: tuple(tuple(s) for s in v) for k, v in shapes.items()}
    with pytest.raises(ValueError, match="dimension 2"):
        profile_shapes(head, shapes={**shapes, "features": ((1, 1, 5), (8, 50, 5), (64, 64, 5))})
    with pytest.raises(ValueError, match="min_batch"):
        profile_shapes(enc, min_batch=8, max_batch=4)


def test_engine_compat_check(tmp_path: Path) -> None:
    eng = tmp_path / "encoder.plan"
    ok = {"gpu": "NVIDIA H100 80GB HBM3", "tensorrt_version": "10.9.0.34"}
    check_engine_compat(eng, ok, trt_version="10.9.0.34", gpu="NVIDIA H100 80GB HBM3")
    with pytest.raises(BackendError, match="NVIDIA A100") as info:
        check_engine_compat(eng, ok, trt_version="10.9.0.34", gpu="NVIDIA A100-SXM4-80GB")
    assert "Rebuild" in str(info.value)
    with pytest.raises(BackendError, match=r"TensorRT 10\.9\.0\.34 \(this machine has TensorRT 10\.13"):
        check_engine_compat(eng, ok, trt_version="10.13.0.35", gpu="NVIDIA H100 80GB HBM3")
    with pytest.raises(BackendError, match="no NVIDIA GPU"):
        check_engine_compat(eng, ok, trt_version="10.9.0.34", gpu=None)


# ----------------------------------------------------------------------------- import hygiene


def test_import_leaves_torch_timm_tensorrt_unloaded() -> None:
    code = (
        "import sys\n"
        "import hishrst_runtime.backends\n"
        "import hishrst_runtime.backends.ort_cpu, hishrst_runtime.backends.ort_cuda\n"
        "import hishrst_runtime.backends.ort_trt, hishrst_runtime.backends.tensorrt_native\n"
        "bad = [m for m in ('torch', 'timm', 'tensorrt') if m in sys.modules]\n"
        "print('LOADED', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and res.stdout.split() == ["LOADED", "[]"], res.stdout + res.stderr  # ran to the end


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_backends_match_cpu(encoder_onnx: Path, head_onnx: Path, tmp_path: Path, provider: str) -> None:
    if provider not in available_providers():
        pytest.skip(f"{provider}: {provider_report()[provider]}")
    rng = np.random.default_rng(0)
    cpu = load_backend(encoder_onnx, provider="cpu")
    shapes = {"features": ((1, 1, 4), (3, 5, 4), (8, 16, 4)), "positions": ((1, 1, 2), (3, 5, 2), (8, 16, 2)),
              "mask": ((1, 1), (3, 5), (8, 16))}
    with load_backend(encoder_onnx, provider=provider, cache_dir=tmp_path / "c") as gpu:
        assert gpu.provider == provider
        for batch in (1, 7, 64):
            tiles = rng.integers(0, 256, (batch, 8, 8, 3), dtype=np.uint8)
            np.testing.assert_allclose(gpu.run({"tiles": tiles})[0], cpu.run({"tiles": tiles})[0], rtol=1e-3, atol=1e-3)
    feeds = head_feeds(rng)
    with load_backend(head_onnx, provider=provider, cache_dir=tmp_path / "c", shapes=shapes) as gpu:
        np.testing.assert_allclose(gpu.run(feeds)[0], head_ref(feeds), rtol=1e-3, atol=1e-2)
    if provider == "tensorrt":
        assert any((tmp_path / "c").rglob("key.json"))
