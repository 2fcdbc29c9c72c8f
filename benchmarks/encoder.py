"""Encoder throughput (tiles/s) by batch size and backend, for the test encoder and the full UNI architecture.

Backends: PyTorch eager fp32; PyTorch autocast (bf16 on CPU, fp16 on GPU); ``torch.compile`` (fp32);
ONNX Runtime CPU; and, where available, ONNX Runtime CUDA, ONNX Runtime TensorRT EP (fp16) and native
TensorRT (fp16 engine) through :func:`hishrst_runtime.backends.load_backend`. Every call takes host
uint8 NHWC tiles and returns host float32 features (host↔device copies included, as in the pipeline).
UNI uses random weights (``load_encoder("uni", random_init=True)``): same architecture and FLOPs.
On a GPU each row also gives the achieved TFLOP/s and its share of the GPU's dense fp16/bf16 peak.

    python -m benchmarks.encoder                       # full run (test-vit and UNI)
    python -m benchmarks.encoder --quick               # sub-minute smoke run (test-vit only)
    python -m benchmarks.encoder --encoders uni --batch-sizes 1,4 --backends torch-fp32,ort-cpu
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import (JsonlWriter, base_parser, int_list, print_table, str_list, time_call,
                                workdir_of)

BACKENDS = ("torch-fp32", "torch-autocast", "torch-compile", "ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt")
ENCODERS = ("test-vit", "uni")

#: Dense (no sparsity) fp16/bf16 tensor-core peak, TFLOP/s, from NVIDIA datasheets; the first entry whose
#: key is a substring of the GPU name (case-insensitive) wins, so more specific names come first.
GPU_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4),
    ("H100", 989.4),  # H100 SXM5 (nvidia-smi: "NVIDIA H100 80GB HBM3")
    ("H800 PCIe", 756.0), ("H800", 989.4), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("A10", 125.0), ("V100-PCIE", 112.0), ("V100", 125.0), ("T4", 65.0),
]


def gpu_peak_tflops(name: str | None) -> float | None:
    if not name:
        return None
    low = name.lower()
    return next((peak for key, peak in GPU_PEAK_TFLOPS if key.lower() in low), None)


def vit_flops_per_tile(backbone: Any, input_size: int) -> float:
    """Forward FLOPs (2 × multiply-accumulates) of one tile through a timm ViT: patch embedding,
    attention projections, attention scores/values and MLPs (ViT-L/16 at 224 px: 61.6 GMAC = 123.2 GFLOP)."""
    p = backbone.patch_embed.patch_size
    p = p[0] if isinstance(p, (tuple, list)) else int(p)
    n_patch = (input_size // p) ** 2
    n_tok = n_patch + int(getattr(backbone, "num_prefix_tokens", 1))
    d = int(backbone.embed_dim)
    macs = n_patch * 3 * p * p * d
    for blk in backbone.blocks:
        hidden = int(blk.mlp.fc1.out_features)
        mlp_in = int(blk.mlp.fc1.in_features)
        fc2_in = int(blk.mlp.fc2.in_features)
        macs += n_tok * (3 * d * d + d * d)  # qkv + proj
        macs += 2 * n_tok * n_tok * d  # q·kᵀ and attn·v
        macs += n_tok * (mlp_in * hidden + fc2_in * d)  # MLP (SwiGLU: fc1 is packed gate+value)
    return 2.0 * macs


# ------------------------------------------------------------------------------------------ runners


def _torch_runner(enc: Any, device: str, mode: str) -> tuple[Callable[[np.ndarray], Any], str]:
    import contextlib

    import torch

    model = enc.to(device)
    label = "fp32"
    ctx: Callable[[], Any] = contextlib.nullcontext
    if mode == "autocast":
        dtype = torch.float16 if device == "cuda" else torch.bfloat16
        label = "fp16 autocast" if device == "cuda" else "bf16 autocast"
        ctx = lambda: torch.autocast(device_type=device, dtype=dtype)
    elif mode == "compile":
        import torch._dynamo as dynamo

        for attr in ("cache_size_limit", "recompile_limit"):  # one graph per batch size
            if hasattr(dynamo.config, attr):
                setattr(dynamo.config, attr, 64)
        model = torch.compile(enc, dynamic=False)
        label = "fp32 torch.compile"

    def run(tiles: np.ndarray) -> Any:
        x = torch.from_numpy(tiles).to(device)
        with torch.inference_mode(), ctx():
            y = model(x)
        return y.float().cpu().numpy()  # synchronises

    return run, label


def _onnx(enc: Any, workdir: Path, precision: str) -> Path:
    """The encoder's ONNX export, cached by name + weights fingerprint + precision."""
    from hishrst_export.onnx_export import export_encoder_onnx

    from hishrst_train.encoders import encoder_fingerprint

    from hishrst_runtime.core.vocab import DEFAULT_TILE_LAYOUT

    path = workdir / "onnx" / f"{enc.spec.name}-{encoder_fingerprint(enc)}-{precision}-{DEFAULT_TILE_LAYOUT.lower()}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        device = next(enc.parameters()).device
        export_encoder_onnx(enc, tmp, precision=precision)  # (moves the module to the CPU)
        enc.to(device)
        for extra in tmp.parent.glob(tmp.name + ".data"):
            extra.rename(path.with_name(path.name + ".data"))
        tmp.rename(path)
    return path


def _runtime_runner(enc: Any, backend: str, workdir: Path, max_batch: int, threads: int | None) -> tuple[Callable, str, Any]:
    from hishrst_runtime.backends import load_backend, provider_report

    provider = {"ort-cpu": "cpu", "ort-cuda": "cuda", "ort-tensorrt": "tensorrt", "tensorrt": "trt-native"}[backend]
    if provider != "cpu":
        reason = provider_report().get(provider)
        if reason is not None:
            raise _Skip(reason)
    if backend == "tensorrt":
        from hishrst_export.tensorrt import build_engine, tensorrt_info

        info = tensorrt_info()
        gpu = "".join(ch if ch.isalnum() else "_" for ch in info["gpu"])
        onnx16 = _onnx(enc, workdir, "fp16")
        engine = workdir / "trt" / f"{onnx16.stem}-{gpu}-trt{info['version']}-b{max_batch}.plan"
        if not engine.exists():
            build_engine(onnx16, out_path=engine, precision="fp16", max_batch=max_batch, opt_batch=max_batch,
                         timing_cache=workdir / "trt" / "timing.cache")
        be = load_backend(engine, provider="trt-native", engine_path=engine)
        label = "fp16 engine"
    else:
        onnx32 = _onnx(enc, workdir, "fp32")
        kw: dict[str, Any] = {"threads": threads}
        if provider == "tensorrt":
            kw.update(cache_dir=workdir / "trt-ep", fp16=True, max_batch=max_batch)
        be = load_backend(onnx32, provider=provider, **kw)  # type: ignore[arg-type]
        label = "fp16" if provider == "tensorrt" else "fp32"

    from hishrst_runtime.core.patches import to_tile_layout
    from hishrst_runtime.core.vocab import DEFAULT_TILE_LAYOUT

    fed: dict[int, np.ndarray] = {}

    def run(tiles: np.ndarray) -> Any:
        """The export's own layout (the bundles' default), converted once per tile set (in the untimed warm-up)."""
        x = fed.get(id(tiles))
        if x is None:
            fed.clear()
            x = fed[id(tiles)] = to_tile_layout(tiles, DEFAULT_TILE_LAYOUT)
        return be.run({"tiles": x})[0]

    return run, f"{be.name} {label}", be


class _Skip(Exception):
    pass


# --------------------------------------------------------------------------------------------- main


def default_batches(name: str, gpu: bool, quick: bool) -> list[int]:
    if name == "uni":
        return ([1, 8] if gpu else [1]) if quick else ([1, 8, 32, 64, 128, 256] if gpu else [1, 4, 8])
    return ([1, 32] if gpu else [1, 8]) if quick else ([1, 8, 32, 64, 128, 256, 512] if gpu else [1, 8, 32, 64, 128, 256])


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser("encoder", __doc__.split("\n\n")[0])
    p.add_argument("--encoders", type=str_list, default=None, help=f"comma list of {', '.join(ENCODERS)} "
                   "(default: both; --quick: test-vit only)")
    p.add_argument("--backends", type=str_list, default=list(BACKENDS), help=f"comma list of {', '.join(BACKENDS)}")
    p.add_argument("--batch-sizes", type=int_list, default=None, help="comma list (default depends on encoder/device)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime (default: physical cores)")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timed calls per point (default 2; --quick 0.2)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device for the torch backends")
    args = p.parse_args(argv)
    unknown = [b for b in args.backends if b not in BACKENDS] + [e for e in (args.encoders or []) if e not in ENCODERS]
    if unknown:
        p.error(f"unknown backend/encoder {unknown}")
    return args


@dataclasses.dataclass
class _Setup:
    """Where and how the points of one invocation are measured."""

    args: argparse.Namespace
    work: Path
    device: str
    gpu_name: str | None
    peak: float | None
    timing: dict[str, Any]

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"


def _setup(args: argparse.Namespace) -> _Setup:
    import torch

    work = workdir_of(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    timing = {"warmup": 1, "min_time": 0.2, "min_iters": 2} if args.quick else {"warmup": 3, "min_time": 2.0, "min_iters": 5}
    if args.min_time is not None:
        timing["min_time"] = args.min_time
    return _Setup(args, work, device, gpu_name, gpu_peak_tflops(gpu_name), timing)


def _runner(enc: Any, backend: str, batches: list[int], s: _Setup) -> tuple[Callable, str, Any]:
    """(run, label, backend to close or None) of one backend; raises :class:`_Skip` for a known reason."""
    if not backend.startswith("torch"):
        return _runtime_runner(enc, backend, s.work, max(batches), s.args.threads)
    if backend == "torch-compile" and s.args.quick and not s.gpu:
        raise _Skip("--quick on CPU: torch.compile (inductor) spends tens of seconds compiling C++ "
                    "per batch size; run without --quick")
    run, label = _torch_runner(enc, s.device, backend.split("-", 1)[1])
    return run, label, None


def _measure_encoder(out: JsonlWriter, name: str, s: _Setup, rng: np.random.Generator) -> None:
    from hishrst_train.encoders import load_encoder

    enc = load_encoder(name, random_init=True).eval()
    flops = vit_flops_per_tile(enc.backbone, enc.input_size)
    batches = s.args.batch_sizes or default_batches(name, s.gpu, s.args.quick)
    print(f"\n{name}: {flops / 1e9:.4g} GFLOP/tile, input {enc.input_size} px, device {s.device}, "
          f"batch sizes {batches}", flush=True)
    for backend in s.args.backends:
        base = {"encoder": name, "backend": backend, "device": "cuda" if backend in ("ort-cuda", "ort-tensorrt", "tensorrt")
                else ("cpu" if backend == "ort-cpu" else s.device)}
        try:
            run, label, closer = _runner(enc, backend, batches, s)
        except _Skip as e:
            out.skip(str(e), **base)
            continue
        except Exception as e:  # noqa: BLE001 - a backend that cannot start is reported, not fatal
            out.skip(f"{type(e).__name__}: {e}", **base)
            continue
        for bs in batches:
            tiles = rng.integers(0, 256, (bs, enc.input_size, enc.input_size, 3), dtype=np.uint8)
            _measure_point(out, base, run, label, tiles, flops, s, threads=getattr(closer, "threads", None))
        if closer is not None:
            closer.close()


def _measure_point(out: JsonlWriter, base: dict[str, Any], run: Callable, label: str, tiles: np.ndarray,
                   flops: float, s: _Setup, *, threads: int | None) -> None:
    """Time one backend at one batch size and record it (or why it failed)."""
    import torch

    bs, backend, cuda = len(tiles), base["backend"], base["device"] == "cuda"
    try:
        t = time_call(lambda: run(tiles), **s.timing)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory at a large batch
        out.skip(f"{type(e).__name__}: {str(e)[:300]}", **base, batch_size=bs)
        return
    tps = bs / t["median_s"]
    tflops = tps * flops / 1e12
    out.write({**base, "label": label, "status": "ok", "batch_size": bs, "tiles_per_s": tps,
               "ms_per_batch_median": 1e3 * t["median_s"], "ms_per_batch_min": 1e3 * t["min_s"],
               "iters": t["iters"], "first_call_s": t["first_call_s"], "flops_per_tile": flops,
               "tflops": tflops, "gpu_name": s.gpu_name if cuda else None,
               "gpu_peak_tflops_fp16": s.peak if cuda else None,
               "pct_of_peak": 100 * tflops / s.peak if s.peak and cuda else None,
               "threads": torch.get_num_threads() if backend.startswith("torch") else threads})
    print(f"  {backend:<15} {label:<32} batch {bs:>4}: {tps:10.1f} tiles/s", flush=True)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = _parse_args(argv)
    s = _setup(args)
    encoders = args.encoders or (["test-vit"] if args.quick else list(ENCODERS))
    with JsonlWriter(args.out, benchmark="encoder", quick=args.quick, append=args.append) as out:
        if args.quick and not args.encoders:
            out.skip("--quick: building UNI (ViT-L, 300M parameters) and exporting it to ONNX take over a minute "
                     "on a small CPU; run without --quick (or pass --encoders uni)", encoder="uni")
        rng = np.random.default_rng(0)
        for name in encoders:
            _measure_encoder(out, name, s, rng)
        rows = [r for r in out.records if r.get("status") == "ok"]
        cols = [("encoder", "encoder"), ("backend", "backend"), ("device", "device"), ("batch_size", "batch"),
                ("tiles_per_s", "tiles/s"), ("ms_per_batch_median", "ms/batch")]
        if s.gpu:
            cols += [("tflops", "TFLOP/s"), ("pct_of_peak", "% peak fp16")]
        print_table(rows, cols, title=f"encoder throughput ({'quick' if args.quick else 'full'} run) -> {args.out}")
        return out.records


if __name__ == "__main__":
    main()
