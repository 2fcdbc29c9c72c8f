"""GPU throughput in one prepared run (≤ ``--budget-s``, default 8 minutes) at UNI's architecture and batch 256:

1. ``torch-eager-fp16``: timm ``vit_large_patch16_224`` (UNI's settings, random init, nothing downloaded) in
   fp16 on the GPU, fed host uint8 tiles and returning host features — the baseline a user would write;
2. ``ort-cuda-fp16``: the same architecture exported by ``hishrst_export.onnx_export.export_encoder_onnx``
   (fp16) and run by the runtime's ONNX Runtime CUDA engine (``load_backend(provider="cuda")``);
3. ``hishrst-run``: ``run_slides`` (what ``hishrst-run`` runs) with that encoder (``--provider cuda``) on a
   synthetic whole slide at 0.5 µm/px (112-µm tiles), after an untimed small slide in the same run;
4. ``tensorrt-fp16``: a native TensorRT fp16 engine of the export (``hishrst_export.tensorrt.build_engine``),
   where ``tensorrt`` imports and enough of the budget is left for the build.

The ONNX Runtime, TensorRT and ``hishrst-run`` steps run in fresh, torch-free processes (as ``hishrst-run``
does; the export happens first, in this process), each killed when the budget runs out.
Every step is timed after warm-up calls, with ``torch.cuda.synchronize()`` after each timed call (the
runtime's engines return host arrays, so they are synchronous already); tiles/s = batch × calls / seconds.
Writes one JSON line per step (``benchmarks/results/gpu.jsonl``) and prints the ``RESULTS.md`` section,
naming the GPU (nvidia-smi, else ``torch.cuda.get_device_name``). Without a GPU it prints
``no GPU: skipped (...)`` and exits 0 without writing anything. A step that fails is recorded with
``status="failed"`` and its reason, the others go on, and the exit status is 1.

    python -m benchmarks.gpu                 # on a GPU node
    python -m benchmarks.gpu --budget-s 300 --steps torch-eager-fp16,ort-cuda-fp16
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import JsonlWriter, base_parser, print_table, str_list, workdir_of

STEPS = ("torch-eager-fp16", "ort-cuda-fp16", "hishrst-run", "tensorrt-fp16")
BATCH = 256
BUDGET_S = 480.0
#: Seconds of budget a step needs to start (the TensorRT build of ViT-L takes minutes).
STEP_MIN_S = {"torch-eager-fp16": 30.0, "ort-cuda-fp16": 90.0, "hishrst-run": 90.0, "tensorrt-fp16": 200.0}
UNI_PATCH_UM = 112.0


class Skip(Exception):
    """A step that cannot run here, with the reason."""


def gpu_status() -> tuple[str | None, str | None]:
    """(the GPU's name, None), or (None, why there is no usable GPU). Imports torch lazily."""
    try:
        import torch
    except ImportError:
        return None, "torch is not installed"
    if not torch.cuda.is_available():
        return None, "torch.cuda.is_available() is False (no NVIDIA GPU, driver or CUDA build of torch)"
    from hishrst_runtime.backends.base import gpu_name

    return gpu_name(0) or torch.cuda.get_device_name(0), None


def cuda_sync() -> None:
    import torch

    torch.cuda.synchronize()


@dataclasses.dataclass
class Ctx:
    """What the steps of one run share; ``clock`` / ``sync`` are replaced in tests."""

    work: Path
    gpu: str
    batch: int
    warmup: int
    min_time: float
    min_iters: int
    budget_s: float
    slide_mm: float
    max_iters: int = 1000
    workers: int | None = None
    isolate: bool = False
    clock: Callable[[], float] = time.perf_counter
    sync: Callable[[], None] = cuda_sync
    start: float = 0.0
    onnx: Path | None = None
    done: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def left_s(self) -> float:
        return self.budget_s - (self.clock() - self.start)

    def tiles(self) -> np.ndarray:
        return np.random.default_rng(0).integers(0, 256, (self.batch, 224, 224, 3), dtype=np.uint8)


def time_steps(fn: Callable[[], Any], ctx: Ctx) -> dict[str, Any]:
    """``ctx.warmup`` untimed calls, then timed calls (each followed by ``ctx.sync()``) until ``ctx.min_time``
    seconds and ``ctx.min_iters`` calls (at most ``ctx.max_iters``); seconds per call and the totals."""
    for _ in range(ctx.warmup):
        fn()
    ctx.sync()
    times: list[float] = []
    while len(times) < ctx.min_iters or (sum(times) < ctx.min_time and len(times) < ctx.max_iters):
        t0 = ctx.clock()
        fn()
        ctx.sync()
        times.append(ctx.clock() - t0)
    return {"warmup": ctx.warmup, "iters": len(times), "seconds": sum(times), "median_s": statistics.median(times),
            "min_s": min(times)}


def throughput(batch: int, t: dict[str, Any]) -> dict[str, Any]:
    """tiles/s = batch × timed calls / their seconds; ms per batch (median and min)."""
    return {"batch_size": batch, "tiles": batch * t["iters"], "tiles_per_s": batch * t["iters"] / t["seconds"],
            "ms_per_batch_median": 1e3 * t["median_s"], "ms_per_batch_min": 1e3 * t["min_s"],
            "iters": t["iters"], "warmup": t["warmup"], "seconds": t["seconds"]}


# ------------------------------------------------------------------------------------------ runners


def torch_eager_runner(ctx: Ctx) -> tuple[Callable[[], Any], str, Callable[[], None]]:
    """(run one batch, label, release): timm UNI architecture, ``.half().cuda()``, host uint8 in, host float out."""
    import timm
    import torch

    from hishrst_train.encoders import get_encoder_spec

    spec = get_encoder_spec("uni")
    torch.manual_seed(0)
    model = timm.create_model(spec.arch, pretrained=False, **spec.timm_kwargs).half().cuda().eval()
    mean = torch.tensor(spec.mean, device="cuda", dtype=torch.float16).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device="cuda", dtype=torch.float16).view(1, 3, 1, 1)
    tiles = ctx.tiles()

    def run() -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(tiles).cuda().permute(0, 3, 1, 2).half().div_(255)
            return model((x - mean) / std).float().cpu().numpy()

    def release() -> None:
        nonlocal model
        model = None
        torch.cuda.empty_cache()

    return run, f"timm {spec.arch} fp16 eager (torch {torch.__version__})", release


def export_onnx(ctx: Ctx) -> Path:
    """The UNI architecture (random init) exported to fp16 ONNX by ``export_encoder_onnx`` (cached in the work dir)."""
    from hishrst_runtime.core.vocab import DEFAULT_TILE_LAYOUT

    path = ctx.work / "gpu" / f"uni-random-fp16-{DEFAULT_TILE_LAYOUT.lower()}.onnx"  # the layout bundles take
    if not path.exists():
        from hishrst_export.onnx_export import export_encoder_onnx

        from hishrst_train.encoders import load_encoder

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        export_encoder_onnx(load_encoder("uni", random_init=True), tmp, precision="fp16")
        tmp.rename(path)
    return path


def export_tiles(ctx: Ctx) -> np.ndarray:
    """:meth:`Ctx.tiles` in the layout of the export (:func:`export_onnx`): the exported graph's own input."""
    from hishrst_runtime.core.patches import to_tile_layout
    from hishrst_runtime.core.vocab import DEFAULT_TILE_LAYOUT

    return to_tile_layout(ctx.tiles(), DEFAULT_TILE_LAYOUT)


def require_ort_cuda() -> None:
    """Raise :class:`Skip` when onnxruntime lists no CUDA execution provider."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        from hishrst_runtime.backends.base import GPU_EXTRA_HINT

        raise Skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider. Fix: {GPU_EXTRA_HINT}")


def require_tensorrt() -> None:
    """Raise :class:`Skip` when the ``tensorrt`` package does not import."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        raise Skip(f"tensorrt does not import ({e}); pip install 'hishrst[gpu]'") from e


def ort_cuda_runner(ctx: Ctx) -> tuple[Callable[[], Any], str, Callable[[], None]]:
    """(run, label, release) of the runtime's ONNX Runtime CUDA engine on the fp16 export."""
    require_ort_cuda()
    from hishrst_runtime.backends import load_backend

    ctx.onnx = ctx.onnx or export_onnx(ctx)
    be = load_backend(ctx.onnx, provider="cuda")
    tiles = export_tiles(ctx)
    return (lambda: be.run({"tiles": tiles})[0]), f"{be.name} fp16 ONNX", be.close


def tensorrt_runner(ctx: Ctx) -> tuple[Callable[[], Any], str, Callable[[], None]]:
    """(run, label, release) of a native TensorRT fp16 engine of the export (built here, cached)."""
    require_tensorrt()
    from hishrst_export.tensorrt import build_engine, tensorrt_info

    from hishrst_runtime.backends import load_backend

    ctx.onnx = ctx.onnx or export_onnx(ctx)
    info = tensorrt_info()
    gpu = "".join(ch if ch.isalnum() else "_" for ch in info["gpu"])
    engine = ctx.work / "gpu" / f"{ctx.onnx.stem}-{gpu}-trt{info['version']}-b{ctx.batch}.plan"
    if not engine.exists():
        build_engine(ctx.onnx, out_path=engine, precision="fp16", max_batch=ctx.batch, opt_batch=ctx.batch,
                     timing_cache=ctx.work / "gpu" / "timing.cache")
    be = load_backend(engine, provider="trt-native", engine_path=engine)
    tiles = export_tiles(ctx)
    return (lambda: be.run({"tiles": tiles})[0]), f"{be.name} fp16 engine", be.close


RUNNERS: dict[str, Callable[[Ctx], tuple[Callable[[], Any], str, Callable[[], None]]]] = {
    "torch-eager-fp16": torch_eager_runner, "ort-cuda-fp16": ort_cuda_runner, "tensorrt-fp16": tensorrt_runner}


def run_e2e(ctx: Ctx) -> dict[str, Any]:
    """``run_slides`` with the fp16 export on ``--provider cuda``: an untimed small slide, then the measured one."""
    import shutil

    from benchmarks._synth_wsi import ensure_placeholder_bundle, ensure_zarr
    from hishrst_runtime.jobs.runner import run_slides

    require_ort_cuda()
    ctx.onnx = ctx.onnx or export_onnx(ctx)
    bundle = ensure_placeholder_bundle(ctx.work, UNI_PATCH_UM, encoder=ctx.onnx, precision="fp16")
    slides = [ensure_zarr(ctx.work, side_um=1000.0, mpp=0.5, seed=9),
              ensure_zarr(ctx.work, side_um=1000.0 * ctx.slide_mm, mpp=0.5)]
    out = ctx.work / "gpu" / "out-e2e"
    shutil.rmtree(out, ignore_errors=True)
    said: list[str] = []
    warm, r = run_slides(slides, bundle_dir=bundle, out_dir=out, provider="cuda", batch_size=ctx.batch,
                         pitch_um=UNI_PATCH_UM, grid="square", overwrite=True, progress=False, echo=said.append,
                         **({} if ctx.workers is None else {"workers": ctx.workers}))
    shutil.rmtree(out, ignore_errors=True)
    bad = [f"{x.slide}: {x.reason}" for x in (warm, r) if x.status != "ok"]
    if bad:
        raise RuntimeError("hishrst-run failed: " + "; ".join(bad))
    return {"slide": Path(r.slide).name, "slide_mm": ctx.slide_mm, "points": r.computed, "slide_seconds": r.seconds,
            "stream_seconds": r.stats.seconds, "stages": dict(r.stats.stages), "engine": r.engine,
            "engine_line": next((s for s in said if s.startswith("engine:")), None)}


# ------------------------------------------------------------------------------------------- steps


def engine_step(name: str, ctx: Ctx) -> dict[str, Any]:
    """One engine step: build its runner, time it, release it; the record's measurement fields."""
    run, label, release = RUNNERS[name](ctx)
    try:
        t = time_steps(run, ctx)
    finally:
        release()
    return {"label": label, **throughput(ctx.batch, t)}


def e2e_step(ctx: Ctx) -> dict[str, Any]:
    r = run_e2e(ctx)
    rec = {**r, "label": f"hishrst-run ({r.get('engine_line') or 'engine: cuda'})", "batch_size": ctx.batch,
           "tiles_per_s": r["points"] / r["slide_seconds"], "stream_tiles_per_s": r["points"] / r["stream_seconds"]}
    eng = ctx.done.get("ort-cuda-fp16")
    if eng:  # the same engine alone, on pre-cut tiles
        rec.update(engine_only_tiles_per_s=eng["tiles_per_s"], e2e_over_engine=rec["tiles_per_s"] / eng["tiles_per_s"])
    return rec


def measure(name: str, ctx: Ctx) -> dict[str, Any]:
    """The measurement of one step, in this process."""
    return e2e_step(ctx) if name == "hishrst-run" else engine_step(name, ctx)


def child_step(name: str, ctx_fields: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure` in a fresh process (``run_child`` target): no torch, nothing to synchronise (the
    runtime's engines return host arrays)."""
    ctx = Ctx(**{**ctx_fields, "work": Path(ctx_fields["work"]), "onnx": Path(ctx_fields["onnx"]),
                 "sync": lambda: None, "isolate": False})
    try:
        return {"status": "ok", **measure(name, ctx)}
    except Skip as e:
        return {"status": "skipped", "reason": str(e)}


def measure_isolated(name: str, ctx: Ctx) -> dict[str, Any]:
    """The checks and the export here, then :func:`child_step` in a fresh process stopped at the budget's end."""
    from benchmarks._common import run_child

    if name == "tensorrt-fp16":
        require_tensorrt()
    else:
        require_ort_cuda()
    ctx.onnx = ctx.onnx or export_onnx(ctx)
    fields = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(Ctx) if f.name not in ("clock", "sync", "isolate")}
    fields.update(work=str(ctx.work), onnx=str(ctx.onnx), budget_s=float("inf"), start=0.0)
    r = run_child("benchmarks.gpu:child_step", {"name": name, "ctx_fields": fields}, timeout=max(1.0, ctx.left_s()))
    if r.pop("status") == "skipped":
        raise Skip(r["reason"])
    return r


def run_step(name: str, ctx: Ctx) -> dict[str, Any]:
    """The record of one step: ``ok`` with its measurement, ``skipped`` (unavailable, or no budget left) or
    ``failed`` with the reason."""
    base = {"kind": "step", "step": name, "gpu_name": ctx.gpu}
    if ctx.left_s() < STEP_MIN_S[name]:
        return {**base, "status": "skipped", "reason": f"time budget: {ctx.left_s():.0f} s left of {ctx.budget_s:.0f} s, "
                f"the step needs {STEP_MIN_S[name]:.0f} s (raise --budget-s)"}
    t0 = ctx.clock()
    try:
        isolated = ctx.isolate and name != "torch-eager-fp16"
        rec = measure_isolated(name, ctx) if isolated else measure(name, ctx)
    except Skip as e:
        return {**base, "status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - a broken step is recorded; the others go on
        return {**base, "status": "failed", "reason": f"{type(e).__name__}: {str(e)[:500]}"}
    rec = {**base, "status": "ok", **rec, "step_wall_s": ctx.clock() - t0}
    ctx.done[name] = rec
    return rec


def _parse_args(argv: list[str] | None) -> Any:
    p = base_parser("gpu", __doc__.split("\n\n")[0])
    p.add_argument("--steps", type=str_list, default=list(STEPS), help=f"comma list of {', '.join(STEPS)}")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-clock budget, s (default 480)")
    p.add_argument("--batch-size", type=int, default=BATCH, help="tiles per call (default 256)")
    p.add_argument("--slide-mm", type=float, default=8.0, help="side of the hishrst-run slide, mm (default 8)")
    p.add_argument("--workers", type=int, default=None, help="hishrst-run reader threads (default: the runtime's)")
    args = p.parse_args(argv)
    if unknown := [s for s in args.steps if s not in STEPS]:
        p.error(f"unknown step(s) {unknown}; choose from {', '.join(STEPS)}")
    return args


def main(argv: list[str] | None = None, *, clock: Callable[[], float] = time.perf_counter,
         sync: Callable[[], None] | None = None, isolate: bool = True) -> list[dict[str, Any]]:
    """Run the steps; ``clock`` / ``sync`` / ``isolate=False`` (everything in this process) are for tests."""
    args = _parse_args(argv)
    gpu, why = gpu_status()
    if gpu is None:
        print(f"no GPU: skipped ({why}); nothing written", flush=True)
        return []
    timing = (1, 0.5, 2) if args.quick else (3, 3.0, 5)
    ctx = Ctx(workdir_of(args), gpu, args.batch_size, *timing, budget_s=args.budget_s,
              slide_mm=2.0 if args.quick else args.slide_mm, workers=args.workers, isolate=isolate, clock=clock,
              sync=sync or cuda_sync)
    ctx.start = clock()
    print(f"GPU: {gpu}; steps {', '.join(args.steps)}; batch {args.batch_size}; budget {args.budget_s:.0f} s", flush=True)
    with JsonlWriter(args.out, benchmark="gpu", quick=args.quick, append=args.append) as out:
        for name in (s for s in STEPS if s in args.steps):
            rec = out.write(run_step(name, ctx))
            print(f"  {name:18s} {rec['status']:7s} " + (f"{rec['tiles_per_s']:9.1f} tiles/s" if rec["status"] == "ok"
                  else rec["reason"]), flush=True)
        records = out.records
    print_table([r for r in records if r["status"] == "ok"],
                [("step", "step"), ("label", "engine"), ("tiles_per_s", "tiles/s"), ("ms_per_batch_median", "ms/batch"),
                 ("iters", "calls")], title=f"{gpu}, batch {args.batch_size} -> {args.out}")
    from benchmarks.report import section

    print("\n" + section("gpu", records, title=f"gpu — {gpu}"))
    if any(r["status"] == "failed" for r in records):
        raise SystemExit(1)
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
