"""TensorRT optimisation profiles from the batch sizes a run uses, and the over-profile check (torch-free).

A TensorRT engine built for dynamic shapes carries optimisation profiles: per input a (min, opt, max) shape;
the builder picks kernels for ``opt`` that are valid from ``min`` to ``max``, and "a runtime error will be
raised if the input tensor dimensions fall outside the valid range for this profile"
(``tensorrt.IOptimizationProfile``,
https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/OptimizationProfile.html:
``builder.create_optimization_profile()``, ``profile.set_shape(name, min, opt, max)``,
``config.add_optimization_profile(profile)``; at run time ``context.set_input_shape``). onnxruntime's TensorRT
execution provider takes the same ranges as ``trt_profile_min_shapes`` / ``trt_profile_opt_shapes`` /
``trt_profile_max_shapes`` (``"name:1x224x224x3,..."``,
https://onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html#explicit-shape-range-for-dynamic-shape-input).

The ranges here come from what the run does: the encoder is called with ``--batch-size`` tiles and, at the end
of every work unit, a partial batch of any size from 1; the head with 1 … ``head_batch`` groups (sub-spot: tiles,
``tokens [B, rows, cols, width]`` with only ``B`` dynamic). :func:`run_batch_sizes` lists those sizes,
:func:`batch_range` turns them into (min, opt, max) and :func:`check_profile` refuses, before TensorRT does, a
batch the profile does not cover, naming the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from hishrst_runtime.backends.base import BackendError

__all__ = ["BatchRange", "ProfileRange", "batch_range", "check_profile", "run_batch_sizes"]

#: (min, opt, max) of a first (batch) dimension.
BatchRange = tuple[int, int, int]
#: (min, opt, max) shape of one input.
ProfileRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def run_batch_sizes(batch_size: int, total: int | None = None) -> tuple[int, ...]:
    """The batch sizes of a run that calls an engine with ``batch_size`` items at a time: ``batch_size`` and the
    last partial batch of ``total`` items; with ``total`` unknown (work units of any size) every size from 1, so
    ``(1, batch_size)``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if total is None:
        return (1, batch_size) if batch_size > 1 else (1,)
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total!r}")
    full, last = divmod(int(total), batch_size)
    sizes = ([batch_size] if full else []) + ([last] if last else [])
    return tuple(sorted(set(sizes)))


def batch_range(sizes: Iterable[int], *, cap: int | None = None) -> BatchRange:
    """(min, opt, max) first dimension covering every batch size in ``sizes`` (e.g. :func:`run_batch_sizes`, or
    the head's group counts): min = the smallest, opt = max = the largest (full batches carry almost all the
    work). ``cap`` (an engine's or the bundle's ``max_batch``) bounds all three."""
    got = sorted({int(s) for s in sizes})
    if not got or got[0] < 1:
        raise ValueError(f"batch sizes must be >= 1, got {sorted(sizes) if got else 'none'}")
    hi = got[-1] if cap is None else min(got[-1], int(cap))
    lo = min(got[0], hi)
    return lo, hi, hi


def check_profile(where: str, shapes: Mapping[str, Sequence[int]], profile: Mapping[str, ProfileRange] | None) -> None:
    """Raise :class:`BackendError` when an input shape lies outside its (min, max) in ``profile``: a batch larger
    than the engine was built for names the largest batch it takes and how to get a larger one."""
    for name, shape in shapes.items():
        rng = (profile or {}).get(name)
        if rng is None:
            continue
        lo, _, hi = rng
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(hi):
            raise BackendError(f"{where}: input {name!r} has rank {len(shape)}, the TensorRT profile rank {len(hi)}; "
                               "re-export the bundle")
        bad = [i for i, (d, a, b) in enumerate(zip(shape, lo, hi)) if not a <= d <= b]
        if not bad:
            continue
        if bad == [0]:
            raise BackendError(f"{where}: batch of {shape[0]} for input {name!r} is outside the TensorRT profile "
                               f"({lo[0]}..{hi[0]}); use --batch-size {hi[0]} or less, or rebuild the engine for "
                               f"larger batches (hishrst export --max-batch {shape[0]})")
        raise BackendError(f"{where}: input {name!r} shape {list(shape)} is outside the TensorRT profile (min "
                           f"{list(lo)}, max {list(hi)}); re-export the bundle for this shape")
