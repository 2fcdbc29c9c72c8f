"""The engine registry (hishrst_runtime.backends.registry): one list of providers, lazy engine imports,
a clear error for unknown providers, the options dataclass, and that ``noop`` is not a provider."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest

from hishrst_runtime.backends import (
    ENGINES,
    PROVIDERS,
    BackendError,
    BackendOptions,
    Provider,
    load_backend,
    load_engine,
    resolve_provider,
)
from hishrst_runtime.backends.registry import engine_entry
from hishrst_runtime.core.errors import InputError

ROOT = Path(__file__).resolve().parents[3]
CHOICES = "choose one of auto, trt-native, tensorrt, cuda, cpu"


def test_registry_is_the_provider_list() -> None:
    assert tuple(ENGINES) == PROVIDERS == ("trt-native", "tensorrt", "cuda", "cpu")  # fastest first
    assert set(get_args(Provider)) == {"auto", *ENGINES}
    for name, entry in ENGINES.items():
        assert entry.provider == name and entry.summary and entry.runs in ("onnx", "engine")
        assert entry.module.startswith("hishrst_runtime.backends.")
        assert importlib.util.find_spec(entry.module) is not None, entry.module
    assert [p for p, e in ENGINES.items() if e.runs == "engine"] == ["trt-native"]
    with pytest.raises(TypeError):
        ENGINES["x"] = ENGINES["cpu"]  # type: ignore[index]  # read-only


def test_cli_choices_match_the_registry() -> None:
    """``--provider`` (jobs.options) offers exactly ``auto`` and the registered engines: no ``noop``."""
    from hishrst_runtime.jobs.options import PROVIDERS as RUN_CHOICES

    assert set(RUN_CHOICES) == {"auto", *ENGINES}


@pytest.mark.parametrize("name", ["noop", "rocm", "CPU", "", None])
def test_unknown_provider_lists_the_choices(name: Any) -> None:
    for call in (lambda: engine_entry(name), lambda: load_engine(name, "x.onnx"), lambda: resolve_provider(name)):
        with pytest.raises(BackendError) as info:
            call()
        msg = str(info.value)
        assert f"unknown provider {name!r}" in msg and CHOICES in msg and "\n" not in msg
    with pytest.raises(BackendError, match="unknown provider"):
        load_backend("x.onnx", provider=name)


def test_noop_is_not_a_provider_but_a_benchmark_engine() -> None:
    assert "noop" not in ENGINES and "noop" not in PROVIDERS
    with pytest.raises(BackendError, match=r"noop_engines"):
        engine_entry("noop")
    from hishrst_runtime.inference.engines import noop_engines  # the benchmarks' way in

    assert callable(noop_engines)


@pytest.mark.parametrize("kwargs", [{"threads": 0}, {"threads": 1.5}, {"device_id": -1}, {"device_id": True},
                                    {"max_batch": 0}])
def test_options_are_validated(kwargs: dict[str, Any]) -> None:
    (name,) = kwargs
    with pytest.raises(InputError, match=rf"backend option {name} must be an integer"):
        BackendOptions(**kwargs)


def test_options_defaults() -> None:
    o = BackendOptions()
    assert (o.device_id, o.threads, o.max_batch, o.fp16, o.engine_path, o.shapes) == (0, None, 64, False, None, None)


def test_load_engine_cpu(tiny_bundle: Path) -> None:
    pytest.importorskip("onnxruntime")
    with load_engine("cpu", tiny_bundle / "encoder.onnx", BackendOptions(threads=1)) as be:
        assert be.provider == "cpu" and be.threads == 1  # type: ignore[attr-defined]
        (out,) = be.run({"tiles": np.zeros((2, 8, 8, 3), np.uint8)})
    assert out.shape == (2, 4)


@pytest.mark.parametrize("provider", ["cpu", "cuda", "tensorrt"])
def test_onnx_engines_need_a_model_path(provider: str) -> None:
    with pytest.raises(BackendError, match=rf"provider '{provider}' needs the ONNX model path"):
        load_engine(provider, None)


def test_trt_native_needs_an_engine_not_an_onnx(tiny_bundle: Path) -> None:
    with pytest.raises(BackendError, match="engine_path"):
        load_engine("trt-native", tiny_bundle / "encoder.onnx")
    with pytest.raises(BackendError, match="engine_path"):
        load_engine("trt-native", None)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


ENGINE_PACKAGES = "('onnxruntime', 'tensorrt', 'cuda', 'cupy', 'torch', 'timm', 'onnx')"


def test_importing_backends_loads_no_engine() -> None:
    """Importing the package, reading the registry and resolving ``cpu`` import no engine package and no
    engine module; loading the CPU engine then imports onnxruntime and its own module only."""
    code = f"""
import sys
import hishrst_runtime.backends as b
from hishrst_runtime.backends.registry import engine_entry
assert b.resolve_provider("cpu") == "cpu" and engine_entry("tensorrt").module
loaded = [m for m in {ENGINE_PACKAGES} if m in sys.modules]
loaded += [e.module for e in b.ENGINES.values() if e.module in sys.modules]
print("LOADED", loaded)
sys.exit(1 if loaded else 0)
"""
    res = _python(code)
    assert res.returncode == 0 and res.stdout.split() == ["LOADED", "[]"], res.stdout + res.stderr


def test_loading_cpu_imports_only_its_engine(tiny_bundle: Path) -> None:
    pytest.importorskip("onnxruntime")
    code = f"""
import sys
from hishrst_runtime.backends import ENGINES, load_engine
load_engine("cpu", {str(tiny_bundle / "encoder.onnx")!r}).close()
assert "onnxruntime" in sys.modules and ENGINES["cpu"].module in sys.modules
loaded = [m for m in ('tensorrt', 'cuda', 'cupy', 'torch', 'timm') if m in sys.modules]
loaded += [ENGINES[p].module for p in ("trt-native", "tensorrt") if ENGINES[p].module in sys.modules]
print("LOADED", loaded)
sys.exit(1 if loaded else 0)
"""
    res = _python(code)
    assert res.returncode == 0 and res.stdout.split() == ["LOADED", "[]"], res.stdout + res.stderr
