"""Helpers shared by the benchmark scripts (torch-free at import: children that measure the runtime's
memory import this module too).

* :func:`machine_info` — CPU model, cores, memory, GPU, package versions, load average;
* :class:`JsonlWriter` — one JSON object per measurement, each stamped with machine info and time;
* :func:`print_table` — a fixed-width table of records;
* :func:`time_call` — warm-up, then repeated timing until a minimum time and count are reached;
* :func:`run_child` — run ``module:function(**kwargs)`` in a fresh interpreter and measure its peak
  RSS (the child's own ``ru_maxrss`` and a psutil-polled sum over its process tree);
* :func:`peak_rss_bytes` — this process's peak RSS.

The synthetic data the benchmarks share (sections, slides, bundles) is built by :mod:`benchmarks._data`.
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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hishrst_runtime.core.jsonutil import json_default

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
#: Synthetic sections, slides, bundles and ONNX exports are cached here (``--workdir`` /
#: ``$HISHRST_BENCH_WORKDIR`` override it).
DEFAULT_WORKDIR = ROOT / "benchmarks" / ".work"



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


def str_list(text: str, *, choices: Sequence[str] | None = None) -> list[str]:
    """``"a,b"`` → ``["a", "b"]`` (argparse type; with ``choices``, via ``functools.partial``: each one of them)."""
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if choices is not None and (not vals or any(v not in choices for v in vals)):
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(choices)}, got {text!r}")
    return vals


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
        self._fh = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        rec = {"benchmark": self.benchmark, **record, "quick": self.quick,
               "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "load_avg_1m": load_average(), "command": self.command, "machine": machine_info()}
        self._fh.write(json.dumps(rec, default=json_default) + "\n")
        self._fh.flush()
        self.records.append(rec)
        return rec

    def skip(self, reason: str, **fields: Any) -> dict[str, Any]:
        """Record (and print) a measurement that could not be made, with the reason."""
        print(f"  skipped {' '.join(f'{k}={v}' for k, v in fields.items())}: {reason}", flush=True)
        return self.write({**fields, "status": "skipped", "reason": reason})

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonlWriter:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    with tempfile.TemporaryDirectory(prefix="hishrst-bench-") as tmp:
        args_f, res_f = Path(tmp) / "args.json", Path(tmp) / "result.json"
        args_f.write_text(json.dumps(kwargs, default=json_default))
        cmd = [sys.executable, "-m", "benchmarks._common", "child", target, str(args_f), str(res_f)]
        log = Path(tmp) / "log.txt"
        t0 = time.perf_counter()
        rc, peak = _wait_polled(cmd, _child_env(env), log, timeout=timeout, poll_s=poll_s)
        wall = time.perf_counter() - t0
        if rc != 0 or not res_f.exists():
            tail = log.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"benchmark child {target} failed (exit code {rc}):\n{tail}")
        result = json.loads(res_f.read_text())
    result["tree_peak_rss_bytes"] = peak
    result["process_wall_s"] = wall
    return result


def _child_env(env: dict[str, str] | None) -> dict[str, str]:
    """This process's environment with the repository root first on ``PYTHONPATH``, plus ``env``."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([e["PYTHONPATH"]] if e.get("PYTHONPATH") else [])])
    e.update(env or {})
    return e


def _wait_polled(cmd: list[str], env: dict[str, str], log: Path, *, timeout: float | None,
                 poll_s: float) -> tuple[int, int]:
    """Run ``cmd`` (output to ``log``) while a thread polls its process tree's RSS: (exit code, peak bytes).
    A run past ``timeout`` is killed (exit code -9)."""
    import psutil  # noqa: F401 - fail before starting the child if it is missing

    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=fh, stderr=subprocess.STDOUT)
        peak = [0]
        stop = threading.Event()
        th = threading.Thread(target=_poll_tree_rss, args=(proc.pid, peak, stop, poll_s), daemon=True)
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
    return rc, peak[0]


def _poll_tree_rss(pid: int, peak: list[int], stop: threading.Event, poll_s: float) -> None:
    """Until ``stop`` is set or the process ends: ``peak[0]`` = the highest summed RSS of ``pid`` and its children."""
    import psutil

    try:
        p = psutil.Process(pid)
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


def peak_rss_bytes() -> int:
    """This process's peak RSS (bytes): Linux ``VmHWM`` (``ru_maxrss`` keeps the pre-``exec`` mark there: a forked
    benchmark child's would be its parent's RSS), else ``ru_maxrss`` (bytes on macOS)."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024))


def _child_main(target: str, args_file: str, result_file: str) -> None:
    module, func = target.split(":")
    kwargs = json.loads(Path(args_file).read_text())
    result = getattr(importlib.import_module(module), func)(**kwargs)
    result["child_maxrss_bytes"] = peak_rss_bytes()
    result["torch_imported"] = "torch" in sys.modules
    Path(result_file).write_text(json.dumps(result, default=json_default))


def mb(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks._common child MODULE:FUNC ARGS.json RESULT.json`` (used by :func:`run_child`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 4 or argv[0] != "child":
        raise SystemExit("usage: python -m benchmarks._common child MODULE:FUNC ARGS.json RESULT.json "
                         "(internal; to build the benchmark data use `python -m benchmarks._data prepare`)")
    _child_main(*argv[1:4])


if __name__ == "__main__":
    main()
