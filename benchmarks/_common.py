"""Helpers shared by the benchmark scripts (torch-free at import: children that measure the runtime's
memory import this module too).

* :func:`machine_info` — CPU model, cores, memory, GPU, package versions, load average;
* :class:`JsonlWriter` — one JSON object per measurement, each stamped with machine info and time;
* :func:`print_table` — a fixed-width table of records;
* :func:`time_call` — warm-up, then repeated timing until a minimum time and count are reached;
* :func:`run_child` — run ``module:function(**kwargs)`` in a fresh interpreter and measure its peak
  RSS (the child's own ``ru_maxrss`` and a psutil-polled sum over its process tree);
* data: :func:`ensure_section`, :func:`ensure_slides` (1× and a lazily 2×2-tiled 4× OME-Zarr slide),
  :func:`ensure_bundle` (a fitted run + exported bundle), all cached in a work directory.

``python -m benchmarks._common prepare [--quick] [--workdir DIR]`` builds the cached data up front.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
#: Synthetic sections, slides, bundles and ONNX exports are cached here (``--workdir`` /
#: ``$HISHRST_BENCH_WORKDIR`` override it).
DEFAULT_WORKDIR = ROOT / "benchmarks" / ".work"

#: Bundle training used by the pipeline / reference benchmarks: (epochs, genes). Throughput does not
#: depend on the number of epochs; the gene count sets the head's output size (1000 = ``hishrst fit``'s default).
BUNDLE_FULL = (3, 1000)
BUNDLE_QUICK = (1, 50)


# ----------------------------------------------------------------------------------------- CLI basics


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """Parser with the flags every benchmark has: ``--quick``, ``--out``, ``--append``, ``--workdir``."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats: a sub-minute smoke run")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.jsonl",
                   help=f"JSON-lines output (default: benchmarks/results/{name}.jsonl)")
    p.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    p.add_argument("--workdir", type=Path, default=None,
                   help="cache of synthetic data, bundles and ONNX files (default: $HISHRST_BENCH_WORKDIR or benchmarks/.work)")
    return p


def workdir_of(args: argparse.Namespace) -> Path:
    w = args.workdir or os.environ.get("HISHRST_BENCH_WORKDIR") or DEFAULT_WORKDIR
    path = Path(w).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def int_list(text: str, *, minimum: int = 1) -> list[int]:
    """``"1,8,32"`` → ``[1, 8, 32]`` (argparse type; every value ≥ ``minimum``)."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not vals or min(vals) < minimum:
        raise argparse.ArgumentTypeError(f"expected integers ≥ {minimum}, got {text!r}")
    return vals


def count_list(text: str) -> list[int]:
    """Like :func:`int_list` but allowing 0 (e.g. DataLoader ``num_workers``)."""
    return int_list(text, minimum=0)


def str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# --------------------------------------------------------------------------------------- machine info


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_MACHINE: dict[str, Any] | None = None


def machine_info() -> dict[str, Any]:
    """Facts about this machine and software stack (cached; never imports torch)."""
    global _MACHINE
    if _MACHINE is None:
        import psutil

        from hishrst_runtime.backends.base import gpu_name

        ort_providers: list[str] | None
        try:
            import onnxruntime as ort

            ort_providers = list(ort.get_available_providers())
        except ImportError:
            ort_providers = None
        try:
            usable = len(os.sched_getaffinity(0))
        except AttributeError:
            usable = os.cpu_count()
        _MACHINE = {
            "cpu_model": cpu_model(),
            "cores_logical": os.cpu_count(),
            "cores_physical": psutil.cpu_count(logical=False),
            "cores_usable": usable,
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": gpu_name(0),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "versions": {d: _version(d) for d in ("hishrst", "numpy", "torch", "torchvision", "timm", "onnxruntime",
                                                   "onnxruntime-gpu", "tensorrt", "zarr", "pillow")},
            "onnxruntime_providers": ort_providers,
        }
    return _MACHINE


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def command_line() -> str:
    """The command that produced the current measurements, as typed (module form)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None and spec.name else f"python {sys.argv[0]}"
    return " ".join([head, *map(shlex.quote, sys.argv[1:])])


class JsonlWriter:
    """Writes one JSON object per line; each gets ``benchmark``, ``timestamp``, ``command``, ``quick``,
    ``load_avg_1m`` and ``machine``. Replaces the file unless ``append``."""

    def __init__(self, path: Path, *, benchmark: str, quick: bool, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.benchmark, self.quick = benchmark, quick
        self.records: list[dict[str, Any]] = []
        self.command = command_line()
        self._fh = open(self.path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        rec = {"benchmark": self.benchmark, **record, "quick": self.quick,
               "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "load_avg_1m": load_average(), "command": self.command, "machine": machine_info()}
        self._fh.write(json.dumps(rec, default=_json_default) + "\n")
        self._fh.flush()
        self.records.append(rec)
        return rec

    def skip(self, reason: str, **fields: Any) -> dict[str, Any]:
        """Record (and print) a measurement that could not be made, with the reason."""
        print(f"  skipped {' '.join(f'{k}={v}' for k, v in fields.items())}: {reason}", flush=True)
        return self.write({**fields, "status": "skipped", "reason": reason})

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------- tables


def fmt(v: Any) -> str:
    """Compact human formatting: 3 significant digits for floats, '-' for missing."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01 or a == 0:
            return f"{v:.3g}" if a < 1 else f"{v:.2f}"
        return f"{v:.2e}"
    return str(v)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], *, title: str | None = None) -> str:
    """Print ``rows`` as a table; ``columns`` = [(key, header)]; returns the text."""
    cells = [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    lines = []
    if title:
        lines.append(f"\n{title}")
    lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, ((_, h), w) in enumerate(zip(columns, widths))))
    lines.append("  ".join("-" * w for w in widths))
    for c in cells:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


# ------------------------------------------------------------------------------------------- timing


def time_call(fn: Callable[[], Any], *, warmup: int = 2, min_time: float = 1.0, min_iters: int = 3,
              max_iters: int = 10_000, slow_s: float = 2.0) -> dict[str, Any]:
    """Time ``fn`` after ``warmup`` calls: repeat until ``min_time`` seconds *and* ``min_iters`` calls.

    When the first warm-up call takes longer than ``slow_s`` (e.g. ViT-L on a CPU), the remaining
    warm-up calls are skipped and ``min_iters`` drops to 2. Returns seconds per call (median, min,
    mean), the number of timed calls and the first warm-up call's seconds (includes lazy setup,
    compilation, engine builds).
    """
    first = None
    for i in range(max(1, warmup)):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i == 0:
            first = dt
            if dt > slow_s:
                min_iters = min(min_iters, 2)
                break
    times: list[float] = []
    t_end = time.perf_counter() + min_time
    while len(times) < max(1, min_iters) or (time.perf_counter() < t_end and len(times) < max_iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "mean_s": statistics.fmean(times),
            "iters": len(times), "first_call_s": first}


# ------------------------------------------------------------------------------- subprocess + memory


def run_child(target: str, kwargs: dict[str, Any], *, timeout: float | None = None, poll_s: float = 0.05,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``target`` (``"module:function"``) with ``kwargs`` in a fresh Python and return its result.

    The function must return a JSON-able dict. Adds ``child_maxrss_bytes`` (the child's own peak RSS,
    ``getrusage(RUSAGE_SELF)``), ``tree_peak_rss_bytes`` (peak of the summed RSS of the child and its
    own children, polled every ``poll_s`` s; shared pages are counted once per process),
    ``process_wall_s`` and ``torch_imported`` (whether the child ended with torch loaded).
    Raises ``RuntimeError`` with the child's output tail if it fails.
    """
    import psutil

    with tempfile.TemporaryDirectory(prefix="hishrst-bench-") as tmp:
        args_f, res_f = Path(tmp) / "args.json", Path(tmp) / "result.json"
        args_f.write_text(json.dumps(kwargs, default=_json_default))
        cmd = [sys.executable, "-m", "benchmarks._common", "child", target, str(args_f), str(res_f)]
        e = dict(os.environ)
        e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([e["PYTHONPATH"]] if e.get("PYTHONPATH") else [])])
        e.update(env or {})
        log = Path(tmp) / "log.txt"
        t0 = time.perf_counter()
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, cwd=str(ROOT), env=e, stdout=fh, stderr=subprocess.STDOUT)
            peak = [0]
            stop = threading.Event()

            def poll() -> None:
                try:
                    p = psutil.Process(proc.pid)
                except psutil.NoSuchProcess:
                    return
                while not stop.is_set():
                    try:
                        total = p.memory_info().rss
                        for c in p.children(recursive=True):
                            try:
                                total += c.memory_info().rss
                            except psutil.NoSuchProcess:
                                pass
                        peak[0] = max(peak[0], total)
                    except psutil.NoSuchProcess:
                        return
                    stop.wait(poll_s)

            th = threading.Thread(target=poll, daemon=True)
            th.start()
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = -9
            finally:
                stop.set()
                th.join()
        wall = time.perf_counter() - t0
        if rc != 0 or not res_f.exists():
            tail = log.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"benchmark child {target} failed (exit code {rc}):\n{tail}")
        result = json.loads(res_f.read_text())
    result["tree_peak_rss_bytes"] = peak[0]
    result["process_wall_s"] = wall
    return result


def _child_main(target: str, args_file: str, result_file: str) -> None:
    import resource

    module, func = target.split(":")
    kwargs = json.loads(Path(args_file).read_text())
    result = getattr(importlib.import_module(module), func)(**kwargs)
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["child_maxrss_bytes"] = int(ru if sys.platform == "darwin" else ru * 1024)
    result["torch_imported"] = "torch" in sys.modules
    Path(result_file).write_text(json.dumps(result, default=_json_default))


def mb(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


# --------------------------------------------------------------------------------------------- data


class Tiled2x2:
    """A lazy ``(2H, 2W, 3)`` view of an image tiled 2 × 2 (any ``[y0:y1, x0:x1]``-sliceable image):
    4× the area, never materialised (``write_ome_zarr`` reads it band by band)."""

    def __init__(self, image: Any) -> None:
        self.image = image
        self.h, self.w = int(image.shape[0]), int(image.shape[1])
        self.shape = (2 * self.h, 2 * self.w, 3)
        self.dtype = np.dtype(np.uint8)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        out = np.empty((max(0, y1 - y0), max(0, x1 - x0), 3), np.uint8)
        for ty in (0, 1):
            a, b = max(y0, ty * self.h), min(y1, (ty + 1) * self.h)
            if a >= b:
                continue
            for tx in (0, 1):
                c, d = max(x0, tx * self.w), min(x1, (tx + 1) * self.w)
                if c >= d:
                    continue
                block = np.asarray(self.image[a - ty * self.h : b - ty * self.h, c - tx * self.w : d - tx * self.w])
                out[a - y0 : b - y0, c - x0 : d - x0] = block[..., :3]
        return out


def _build_dir(final: Path, build: Callable[[Path], Any]) -> Path:
    """Build ``final`` through a temporary sibling renamed into place (an interrupted build leaves nothing)."""
    if final.exists():
        return final
    tmp = final.with_name(f".{final.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        build(tmp)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _say(msg: str) -> None:
    print(f"[setup] {msg}", flush=True)


def ensure_section(workdir: Path, preset: str) -> Path:
    """A synthetic Visium section (``hishrst_train.synth``, seed 0); returns its directory (``outs/``, ``image.tif``)."""
    final = workdir / f"synth-{preset}"
    if not final.exists():
        from hishrst_train.synth import make_synthetic_visium

        t0 = time.perf_counter()
        _build_dir(final, lambda d: make_synthetic_visium(d, preset=preset))  # type: ignore[arg-type]
        _say(f"synthetic {preset} section in {time.perf_counter() - t0:.1f} s -> {final}")
    return final


def ensure_slides(workdir: Path, preset: str) -> dict[str, Path]:
    """OME-Zarr slides of the section image: ``"1x"`` and ``"4x"`` (the image tiled 2 × 2, lazily)."""
    from hishrst_runtime.convert import write_ome_zarr

    from hishrst_train.synth import PRESETS

    section = ensure_section(workdir, preset)
    mpp = float(PRESETS[preset].mpp)
    slides = {}
    for tag in ("1x", "4x"):
        final = workdir / "slides" / f"{preset}-{tag}.ome.zarr"
        if not final.exists():
            from hishrst_train.io import open_fullres_image

            final.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            img = open_fullres_image(section / "image.tif")
            src = img if tag == "1x" else Tiled2x2(img)
            tmp = final.with_name(f".{final.name}.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                write_ome_zarr(src, tmp, mpp=mpp)
                tmp.rename(final)
            finally:
                img.close()
                shutil.rmtree(tmp, ignore_errors=True)
            _say(f"{final.name} ({src.shape[1]}×{src.shape[0]} px) in {time.perf_counter() - t0:.1f} s")
        slides[tag] = final
    return slides


def ensure_bundle(workdir: Path, preset: str, *, epochs: int, n_genes: int) -> tuple[Path, Path]:
    """A ``test-vit`` recovery run fitted on the synthetic section and its exported fp32 bundle: (run, bundle)."""
    section = ensure_section(workdir, preset)
    tag = f"{preset}-e{epochs}-g{n_genes}"
    run_dir, bundle_dir = workdir / f"run-{tag}", workdir / f"bundle-{tag}"
    if not run_dir.exists():
        from hishrst_train.tasks import fit_run

        t0 = time.perf_counter()
        _build_dir(run_dir, lambda d: fit_run(section / "outs", out=d, epochs=epochs, n_genes=n_genes, progress=False))
        _say(f"fitted {run_dir.name} in {time.perf_counter() - t0:.1f} s")
    if not bundle_dir.exists():
        from hishrst_export.bundle import export_bundle

        t0 = time.perf_counter()
        tmp = bundle_dir.with_name(f"{bundle_dir.name}-tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        export_bundle(run_dir, out=tmp)
        tmp.rename(bundle_dir)
        _say(f"exported {bundle_dir.name} in {time.perf_counter() - t0:.1f} s")
    return run_dir, bundle_dir


def data_plan(quick: bool) -> tuple[str, int, int]:
    """(preset, bundle epochs, bundle genes) for quick / full runs."""
    return ("small", *BUNDLE_QUICK) if quick else ("dlpfc", *BUNDLE_FULL)


def check_finite_positive(records: Iterable[dict[str, Any]], keys: Sequence[str]) -> None:
    for r in records:
        for k in keys:
            v = r.get(k)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"measurement {k}={v!r} is not a positive finite number: {r}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["child"]:
        _child_main(*argv[1:4])
        return
    p = base_parser("_common", "Build the cached synthetic data (sections, slides, bundles) used by the benchmarks.")
    p.add_argument("command", choices=["prepare"])
    args = p.parse_args(argv)
    work = workdir_of(args)
    preset, epochs, genes = data_plan(args.quick)
    ensure_slides(work, preset)
    ensure_bundle(work, preset, epochs=epochs, n_genes=genes)
    print(f"ready: {work}")


if __name__ == "__main__":
    main()
