"""ONNX Runtime with the CUDA execution provider, fed through I/O binding.

I/O binding (https://onnxruntime.ai/docs/performance/tune-performance/iobinding.html; Python API:
https://onnxruntime.ai/docs/api/python/api_summary.html#iobinding): each input batch is copied into a reused
pinned host staging buffer (:class:`~hishrst_runtime.backends.device.PinnedStaging`) and from there into a reused
device ``OrtValue`` (``OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", device_id)`` once per shape,
then ``update_inplace``), bound with ``io_binding.bind_ortvalue_input``. Inputs go up as they are: the encoder's
``tiles`` as **uint8** (4x fewer bytes than float32; the graph scales and normalises on the GPU). Every output is
bound to the device (``io_binding.bind_output(name, "cuda", device_id)``: onnxruntime allocates it with the
shape it computes) and ``session.run_with_iobinding`` runs the graph.

:meth:`OrtCudaBackend.run` copies every output back (``copy_outputs_to_cpu()``): the numpy-in / numpy-out
:class:`~hishrst_runtime.backends.base.Backend` contract. :meth:`OrtCudaBackend.run_device` is the optional
device-resident path: the outputs named in ``keep`` come back as
:class:`~hishrst_runtime.backends.device.DeviceTensor` handles (``io_binding.get_outputs()``), those in
``fetch`` as host arrays (``OrtValue.numpy()``), the rest are never copied. Both ``run`` and ``run_device`` take
a ``DeviceTensor`` of the same :attr:`~OrtCudaBackend.device_family` as a feed, bound directly
(``bind_ortvalue_input``, or ``bind_input(..., buffer_ptr)`` for a row slice): a sub-spot encoder's ``tokens``
feed the head without a host round trip, and only the head's ``expression`` is copied to the CPU.

onnxruntime falls back to the CPU *silently* when it cannot create the CUDA provider (CUDA/cuDNN
libraries missing, the CPU-only ``onnxruntime`` wheel installed, no GPU): the session is created,
just without CUDA. We therefore check ``session.get_providers()`` right after creation and refuse to
continue with a CPU session that claims to be CUDA.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.backends.base import (
    GPU_EXTRA_HINT,
    BackendBase,
    BackendError,
    check_model_path,
    ort_errors,
    ort_session_options,
    ort_type_to_numpy,
    preload_ort_cuda_libraries,
    prepare_feeds,
)
from hishrst_runtime.backends.device import DeviceTensor, PinnedStaging

Feed = np.ndarray | DeviceTensor
#: Device input OrtValues kept per (input, shape): the full batch, the partial last batches, the head's sizes.
MAX_DEVICE_INPUTS = 8

__all__ = ["OrtCudaBackend", "cuda_provider_options", "explain_missing_provider"]


def cuda_provider_options(device_id: int = 0) -> dict[str, Any]:
    """CUDA execution-provider options (documented keys of onnxruntime's CUDA EP)."""
    return {
        "device_id": int(device_id),
        "arena_extend_strategy": "kNextPowerOfTwo",
        # Our models are a fixed-shape-per-batch ViT encoder and a small head: exhaustive cuDNN
        # search happens once per new shape and then pays off over a whole slide.
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "do_copy_in_default_stream": True,
    }


def explain_missing_provider(ep: str, session_providers: list[str] | None = None) -> str:
    """Why execution provider ``ep`` is unusable, and the fix.

    ``session_providers`` is what a session that came up without ``ep`` got instead (``None`` when no
    session was created because this onnxruntime build does not have ``ep`` at all).
    """
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if ep not in avail:
        why = (
            f"this onnxruntime {ort.__version__} build has no {ep} (available: {', '.join(avail)}), "
            "i.e. the CPU-only 'onnxruntime' wheel is installed"
        )
    elif ep == "TensorrtExecutionProvider":
        why = (
            f"onnxruntime lists {ep} but could not create it: the TensorRT libraries (libnvinfer) are missing "
            "or do not match this onnxruntime-gpu release, the CUDA/cuDNN libraries are missing, or no NVIDIA GPU is visible"
        )
    else:
        why = (
            f"onnxruntime lists {ep} but could not create it: the CUDA or cuDNN libraries onnxruntime-gpu "
            "was built against are missing (or the wrong major version), or no NVIDIA GPU / driver is visible"
        )
    fallback = f"; the session silently fell back to {', '.join(session_providers) or 'nothing'}" if session_providers else ""
    return (
        f"{why}{fallback}. "
        f"Fix: {GPU_EXTRA_HINT}; check `nvidia-smi` and `python -c \"import onnxruntime; onnxruntime.print_debug_info()\"` "
        "(onnxruntime >= 1.21), or choose --provider cpu"
    )


class OrtCudaBackend(BackendBase):
    """An onnxruntime session on ``CUDAExecutionProvider`` (CPU provider kept for unsupported nodes).

    Args:
        model_path: the ``.onnx`` file.
        device_id: CUDA device ordinal.
        threads: intra-op CPU threads for nodes left on the CPU (default: physical cores).
    """

    provider = "cuda"
    _EP = "CUDAExecutionProvider"

    def __init__(self, model_path: str | Path, *, device_id: int = 0, threads: int | None = None) -> None:
        self.model_path = check_model_path(model_path)
        self.device_id = int(device_id)
        self._open([(self._EP, cuda_provider_options(self.device_id)), "CPUExecutionProvider"], threads=threads)

    def _open(self, providers: list[Any], *, threads: int | None) -> None:
        """Create the session (refusing a silent CPU fallback) and read its inputs and outputs."""
        import onnxruntime as ort

        self._session = self._create_session(providers, threads=threads)
        self._adopt_session_io(self._session)
        self.name = f"onnxruntime-{self.provider}-{ort.__version__}"

    def _create_session(self, providers: list[Any], *, threads: int | None) -> Any:
        """Create the session and check that ``self._EP`` is really in use."""
        import onnxruntime as ort

        preload_ort_cuda_libraries()
        so = ort_session_options(threads=threads)
        try:
            session = ort.InferenceSession(str(self.model_path), sess_options=so, providers=providers)
        except ort_errors() as e:
            raise BackendError(
                f"{self.model_path}: could not create an onnxruntime session with {self._EP} ({e}). "
                f"Fix: {GPU_EXTRA_HINT}, or choose --provider cpu"
            ) from e
        got = session.get_providers()
        if self._EP not in got:
            raise BackendError(f"{self.model_path}: {explain_missing_provider(self._EP, got)}")
        return session

    @property
    def device_family(self) -> tuple[str, int]:
        """Engines with equal families exchange :class:`DeviceTensor` values (CUDA memory of one GPU)."""
        return ("onnxruntime-cuda", self.device_id)

    def _device_state(self) -> None:
        """The reused pinned staging buffers and device input values (created on first use)."""
        if getattr(self, "_staging", None) is None:
            import onnxruntime as ort

            self._staging = PinnedStaging(self.device_id, ort=ort)
            self._device_inputs: OrderedDict[tuple[str, tuple[int, ...]], Any] = OrderedDict()

    def run(self, feeds: Mapping[str, Feed]) -> list[np.ndarray]:
        """Run with I/O binding; returns host arrays in ``output_names`` order (``copy_outputs_to_cpu()``)."""
        binding, _ = self._bind_and_run(feeds)
        try:
            return [np.asarray(o) for o in binding.copy_outputs_to_cpu()]
        except ort_errors() as e:
            raise BackendError(f"{self.model_path}: copying outputs from {self.name} device {self.device_id} "
                               f"failed ({e})") from e

    def run_device(self, feeds: Mapping[str, Feed], *, keep: Collection[str] = (),
                   fetch: Collection[str] | None = None) -> dict[str, Feed]:
        """Run with I/O binding, leaving outputs on the GPU: ``{name: DeviceTensor}`` for the outputs in ``keep``,
        ``{name: host array}`` for those in ``fetch`` (default: every output not kept); others are not copied."""
        fetch = [n for n in self.output_names if n not in keep] if fetch is None else list(fetch)
        unknown = [n for n in (*keep, *fetch) if n not in self.output_names]
        if unknown:
            raise BackendError(f"{self.name}: no output(s) {unknown}; the model has {self.output_names}")
        binding, _ = self._bind_and_run(feeds)
        out: dict[str, Feed] = {}
        try:
            values = binding.get_outputs()
            for name, value in zip(self.output_names, values):
                if name in keep:
                    out[name] = DeviceTensor(value, self.device_family, name, tuple(int(d) for d in value.shape()),
                                             ort_type_to_numpy(value.data_type()), owner=self)
                elif name in fetch:
                    out[name] = np.asarray(value.numpy())
        except ort_errors() as e:
            raise BackendError(f"{self.model_path}: reading outputs of {self.name} failed ({e})") from e
        return out

    def _bind_and_run(self, feeds: Mapping[str, Feed]) -> tuple[Any, list[Any]]:
        """Bind the inputs (device values as they are, host arrays through pinned staging), bind every output to
        the device, run; (the binding, the values kept alive until the run has finished)."""
        if self._session is None:
            raise BackendError(f"{self.name}: the backend was closed")
        self._device_state()
        device = {n: v for n, v in feeds.items() if isinstance(v, DeviceTensor)}
        host = {n: v for n, v in feeds.items() if n not in device}
        for name, value in device.items():
            self._check_device_feed(name, value)
        idx = [i for i, n in enumerate(self.input_names) if n not in device]
        arrays = prepare_feeds(host, [self.input_names[i] for i in idx], [self.input_dtypes[i] for i in idx],
                               [self.input_shapes[i] for i in idx], where=self.name)
        self._check_profile({**{self.input_names[i]: a.shape for i, a in zip(idx, arrays)},
                             **{n: v.shape for n, v in device.items()}})
        try:
            binding = self._session.io_binding()
            alive: list[Any] = []
            for i, arr in zip(idx, arrays):
                alive.append(self._upload(binding, self.input_names[i], arr))
            for name, value in device.items():
                self._bind_device(binding, name, value)
                alive.append(value)
            for name in self.output_names:
                binding.bind_output(name, "cuda", self.device_id)
            self._session.run_with_iobinding(binding)
        except ort_errors() as e:
            raise BackendError(f"{self.model_path}: inference failed on {self.name} device {self.device_id} ({e})") from e
        return binding, alive

    def _upload(self, binding: Any, name: str, arr: np.ndarray) -> Any:
        """Copy ``arr`` (its own dtype: uint8 tiles stay uint8) through the pinned staging buffer into the device
        value reused for its shape (``update_inplace``), and bind that value."""
        import onnxruntime as ort

        staged = self._staging.stage(name, arr)
        key = (name, tuple(arr.shape))
        value = self._device_inputs.pop(key, None)
        if value is None:
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), arr.dtype.type, "cuda",
                                                              self.device_id)
            while len(self._device_inputs) >= MAX_DEVICE_INPUTS:
                self._device_inputs.popitem(last=False)
        self._device_inputs[key] = value  # most recently used last
        value.update_inplace(staged)
        binding.bind_ortvalue_input(name, value)
        return value

    def _bind_device(self, binding: Any, name: str, value: DeviceTensor) -> None:
        """Bind a device value of this family: whole (``bind_ortvalue_input``) or a row slice of it
        (``bind_input`` at the slice's device address)."""
        if value.rows is None:
            binding.bind_ortvalue_input(name, value.value)
        else:
            binding.bind_input(name, "cuda", self.device_id, np.dtype(value.dtype).type, list(value.shape),
                               int(value.value.data_ptr()) + value.offset)

    def _check_device_feed(self, name: str, value: DeviceTensor) -> None:
        """Refuse a device value of another GPU/engine family, an unknown input, or a wrong dtype or shape."""
        if value.family != self.device_family:
            raise BackendError(f"{self.name}: input {name!r} lives on {value.family}, this engine on "
                               f"{self.device_family}; pass a host array (DeviceTensor.to_host()) instead")
        if name not in self.input_names:
            raise BackendError(f"{self.name}: no input {name!r}; the model expects {self.input_names}")
        i = self.input_names.index(name)
        want, shape = self.input_shapes[i], tuple(value.shape)
        if np.dtype(value.dtype) != self.input_dtypes[i] or len(shape) != len(want) or any(
                w is not None and w != d for w, d in zip(want, shape)):
            spec = "x".join("?" if w is None else str(w) for w in want)
            raise BackendError(f"{self.name}: device input {name!r} is {np.dtype(value.dtype)} {list(shape)}, the "
                               f"model expects {self.input_dtypes[i]} [{spec}]; re-export the bundle")

    def _check_profile(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """No profile to respect on the CUDA provider (the TensorRT provider checks its own)."""

    def close(self) -> None:
        """Drop the session, the device inputs and the pinned staging buffers (idempotent)."""
        self._session = None
        staging, self._staging = getattr(self, "_staging", None), None
        self._device_inputs = OrderedDict()
        if staging is not None:
            staging.close()
