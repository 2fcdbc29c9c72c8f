"""Device-resident values and pinned host staging for the onnxruntime GPU engines (torch-free).

Both are optional capabilities on top of the numpy-in / numpy-out :class:`~hishrst_runtime.backends.base.Backend`
protocol; nothing here imports onnxruntime or cuda-python at module level.

* :class:`DeviceTensor`: an output that an onnxruntime CUDA/TensorRT session left on the GPU
  (``IOBinding.bind_output(name, "cuda", device_id)`` then ``IOBinding.get_outputs()``, see
  https://onnxruntime.ai/docs/performance/tune-performance/iobinding.html and
  https://onnxruntime.ai/docs/api/python/api_summary.html#iobinding). Another engine of the same
  :attr:`~DeviceTensor.family` (``("onnxruntime-cuda", device_id)``: the CUDA and the TensorRT execution
  providers share CUDA device memory) takes it as a feed with ``bind_ortvalue_input`` (whole tensor) or
  ``bind_input(name, "cuda", device_id, dtype, shape, buffer_ptr)`` (a row slice: the same memory at an offset),
  so the value never makes a host round trip. :func:`device_link` says whether two engines can do that.
* :class:`PinnedStaging`: one reusable page-locked host buffer per input, sized to the largest batch seen (the
  max batch after the first full batch), into which each batch is copied before the host-to-device copy. Pinned
  memory comes from onnxruntime's own allocator where the build exposes it
  (``OrtValue.ortvalue_from_shape_and_type(..., memory_info=ep_device.memory_info(OrtDeviceMemoryType.HOST_ACCESSIBLE))``,
  onnxruntime >= 1.23, used only when its ``numpy()`` is a view of that memory), else from CUDA's
  ``cudaHostRegister`` on a numpy buffer (cuda-python; CUDA runtime API "Memory Management"), else the buffer
  stays pageable (still reused; logged once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hishrst_runtime.backends.base import BackendError

__all__ = ["DeviceTensor", "PinnedStaging", "device_link"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceTensor:
    """An engine output kept on the GPU: opaque; feed it to an engine of the same ``family`` (``run`` /
    ``run_device`` of :class:`~hishrst_runtime.backends.ort_cuda.OrtCudaBackend`) or copy it with :meth:`to_host`.

    ``value``: the onnxruntime ``OrtValue`` (on ``cuda``); ``owner``: the producing backend, kept alive with it;
    ``rows``: ``(start, stop)`` of a row slice of ``value`` (``None``: all of it)."""

    value: Any
    family: tuple[str, int]
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    owner: Any = None
    rows: tuple[int, int] | None = None

    def __len__(self) -> int:
        return int(self.shape[0]) if self.shape else 0

    @property
    def nbytes(self) -> int:
        """Bytes of this (possibly sliced) tensor."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def offset(self) -> int:
        """Byte offset of the first row within ``value``'s buffer."""
        if self.rows is None or not self.shape:
            return 0
        return self.rows[0] * (self.nbytes // max(1, len(self)))

    @property
    def device_id(self) -> int:
        return self.family[1]

    def slice(self, start: int, stop: int) -> DeviceTensor:
        """Rows ``start:stop`` (first dimension) as a view of the same device memory (no copy)."""
        n = len(self)
        start, stop = max(0, min(int(start), n)), max(0, min(int(stop), n))
        if stop <= start:
            raise BackendError(f"{self.name}: empty device slice {start}:{stop} of {n} rows; pass a non-empty range")
        base = 0 if self.rows is None else self.rows[0]
        return DeviceTensor(self.value, self.family, self.name, (stop - start, *self.shape[1:]), self.dtype,
                            self.owner, (base + start, base + stop))

    def to_host(self) -> np.ndarray:
        """Copy to a host array (``OrtValue.numpy()`` copies device memory to the CPU)."""
        arr = np.asarray(self.value.numpy())
        return arr if self.rows is None else arr[self.rows[0]:self.rows[1]]


def device_link(producer: Any, consumer: Any) -> bool:
    """Whether ``producer.run_device`` outputs can be fed to ``consumer`` without a host round trip: both engines
    expose the same ``device_family`` (onnxruntime CUDA or TensorRT provider, same GPU)."""
    fam = getattr(producer, "device_family", None)
    return (fam is not None and fam == getattr(consumer, "device_family", None)
            and callable(getattr(producer, "run_device", None)) and callable(getattr(consumer, "run_device", None)))


# ----------------------------------------------------------------------------- pinned host staging


def _ort_pinned(ort: Any, device_id: int) -> Callable[[tuple[int, ...], np.dtype], tuple[np.ndarray, Any]] | None:
    """An allocator of onnxruntime's HOST_ACCESSIBLE (pinned) memory for the CUDA provider on ``device_id``, or
    ``None`` where this onnxruntime has no such OrtEpDevice."""
    get_devices, mem_type = getattr(ort, "get_ep_devices", None), getattr(ort, "OrtDeviceMemoryType", None)
    if get_devices is None or mem_type is None:
        return None
    try:
        for dev in get_devices():
            if dev.ep_name == "CUDAExecutionProvider" and int(getattr(dev.device, "device_id", 0)) == device_id:
                info = dev.memory_info(mem_type.HOST_ACCESSIBLE)
                if info is not None:
                    def alloc(shape: tuple[int, ...], dtype: np.dtype, info: Any = info) -> tuple[np.ndarray, Any]:
                        value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype.type, memory_info=info)
                        arr = value.numpy()
                        if arr.ctypes.data != value.data_ptr():  # a copy, not a view: unusable as staging
                            raise BackendError("pinned OrtValue is not a numpy view")
                        return arr, value
                    return alloc
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None
    return None


def _cuda_register(device_id: int) -> tuple[Callable[[np.ndarray], Any], Callable[[Any], None]] | None:
    """(register, unregister) page-locking numpy buffers with cuda-python's ``cudaHostRegister``, or ``None``."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        try:
            from cuda import cudart as rt  # type: ignore[no-redef]  # older cuda-python layout
        except ImportError:
            return None

    def register(arr: np.ndarray) -> Any:
        (err,) = rt.cudaHostRegister(arr.ctypes.data, arr.nbytes, rt.cudaHostRegisterDefault)
        return arr.ctypes.data if int(err) == 0 else None

    def unregister(ptr: Any) -> None:
        rt.cudaHostUnregister(ptr)

    return register, unregister


class PinnedStaging:
    """Reusable host staging buffers, one per input name, grown to the largest shape asked for (the first full
    batch) and then reused for every later batch, partial ones included (a view of the first rows).

    ``ort``: the onnxruntime module (for its pinned allocator); ``register``: ``(register, unregister)`` of
    page-locking (default: cuda-python's ``cudaHostRegister`` if installed). :attr:`pinned` tells, per name,
    how the buffer is held (``"onnxruntime"``, ``"cudaHostRegister"`` or ``"pageable"``)."""

    def __init__(self, device_id: int = 0, *, ort: Any = None,
                 register: tuple[Callable[[np.ndarray], Any], Callable[[Any], None]] | None | bool = True) -> None:
        self.device_id = int(device_id)
        self._ort_alloc = _ort_pinned(ort, self.device_id) if ort is not None else None
        self._register = _cuda_register(self.device_id) if register is True else (register or None)
        self._buffers: dict[str, tuple[np.ndarray, Any]] = {}
        self.pinned: dict[str, str] = {}
        self.allocations = 0

    def view(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A C-contiguous host array of ``shape`` backed by ``name``'s staging buffer (grown when too small)."""
        shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        held = self._buffers.get(name)
        if held is None or held[0].dtype != dtype or held[0].shape[1:] != shape[1:] or held[0].shape[0] < shape[0]:
            self._release(name)
            self._buffers[name] = self._allocate(name, shape, dtype)
        return self._buffers[name][0][: shape[0]]

    def stage(self, name: str, arr: np.ndarray) -> np.ndarray:
        """``arr`` copied into ``name``'s staging buffer (no copy when ``arr`` already is that buffer's view)."""
        out = self.view(name, arr.shape, arr.dtype)
        if out.ctypes.data != arr.ctypes.data:
            np.copyto(out, arr, casting="no")
        return out

    def _allocate(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, Any]:
        self.allocations += 1
        if self._ort_alloc is not None:
            try:
                arr, keep = self._ort_alloc(shape, dtype)
                self.pinned[name] = "onnxruntime"
                return arr, keep
            except (BackendError, RuntimeError, TypeError, ValueError):
                self._ort_alloc = None  # this build cannot: use the next way from now on
        arr = np.empty(shape, dtype=dtype)
        if self._register is not None and arr.nbytes:
            ptr = self._register[0](arr)
            if ptr is not None:
                self.pinned[name] = "cudaHostRegister"
                return arr, ("registered", ptr)
        if self.pinned.get(name) != "pageable":
            log.info("staging buffer %r is pageable host memory (install cuda-python for pinned transfers)", name)
        self.pinned[name] = "pageable"
        return arr, None

    def _release(self, name: str) -> None:
        held = self._buffers.pop(name, None)
        if held is not None and isinstance(held[1], tuple) and held[1][0] == "registered" and self._register:
            self._register[1](held[1][1])

    def close(self) -> None:
        """Unpin and drop every buffer (idempotent)."""
        for name in list(self._buffers):
            self._release(name)
