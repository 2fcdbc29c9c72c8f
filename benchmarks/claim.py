"""Scheduling of a cohort over 4 workers sharing one output folder: ``hishrst-run --claim`` (work stealing)
against static ``--shard I/4`` (round-robin over the sorted list), makespan of 4 concurrent worker processes.

12 synthetic OME-Zarr discs of mixed sizes (3 big, 9 small; the big ones are ``s00``, ``s04``, ``s08``: sizes
that repeat with the shard period, as when a scanner's batches or the names carry the magnification, so
round-robin puts every big slide into shard 0). Each worker is a real ``hishrst-run`` process on the torch-free
tiny bundle whose engine is replaced by a simulated accelerator: zeros after ``tiles / --tiles-per-s`` seconds of
sleep, so the 4 workers measure scheduling, not contention for this machine's cores (slide preparation, tile
cutting and writing still run for real). Per run: the makespan (spawn of the 4 workers to the last exit), each
worker's wall time, slides and busy seconds (from its run report), the slides' summed busy seconds and the lower
bound ``max(sum / 4, longest slide)``, and the 1-minute load average before the run (``load_avg_1m`` of each
record is the one after it). Modes alternate (claim, shard, claim, ...) so drift in the machine's load hits both.

    python -m benchmarks.claim            # 3 repeats per mode
    python -m benchmarks.claim --quick    # 1 repeat, smaller slides: a smoke run
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import JsonlWriter, base_parser, load_average, print_table, workdir_of

WORKERS = 4
SLIDES = 12
BIG = (0, 4, 8)  # indices of the big slides: all in shard 0 of 4


def _worker(argv: list[str]) -> None:
    """``python -m benchmarks.claim worker TILES_PER_S HISHRST-RUN-ARGS...``: ``hishrst-run`` with the simulated
    accelerator (no-op engines that sleep ``tiles / TILES_PER_S`` per encoder batch)."""
    from hishrst_runtime.backends.noop import NoopBackend
    from hishrst_runtime.inference.engines import Engines
    from hishrst_runtime.jobs import runner

    rate = float(argv[0])

    def engines(bundle: Any, provider: str, **kw: Any) -> Engines:
        d, g = bundle.spec.encoder.feature_dim, len(bundle.spec.genes)

        def encoder_shape(f: dict[str, Any]) -> tuple[int, int]:
            time.sleep(len(f["tiles"]) / rate)
            return len(f["tiles"]), d

        return Engines(NoopBackend(encoder_shape), NoopBackend(lambda f: (*f["features"].shape[:2], g)), "noop")

    runner.load_engines = engines
    sys.argv = ["hishrst-run", *argv[1:]]
    from hishrst_runtime.cli.main import run_main

    run_main()


def _data(workdir: Path, quick: bool) -> tuple[Path, list[Path]]:
    """The tiny bundle and the 12 slides (cached in ``workdir``)."""
    from hishrst_runtime.slides.pyramid import write_ome_zarr
    from tests.runtime.cli.test_options import disc_image
    from tests.runtime.conftest import build_tiny_bundle

    root = workdir / ("claim-quick" if quick else "claim")
    bundle = root / "bundle"
    if not (bundle / "manifest.json").is_file():
        build_tiny_bundle(bundle)
    big, small = (640, 320) if quick else (1600, 640)
    slides = []
    for i in range(SLIDES):
        path = root / "slides" / f"s{i:02d}.ome.zarr"
        if not path.exists():
            write_ome_zarr(disc_image(big if i in BIG else small), path, mpp=0.5, chunk=256)
        slides.append(path)
    return bundle, slides


def _env() -> dict[str, str]:
    from hishrst_runtime.jobs.shards import SHARD_ENGINES

    drop = {v for e in SHARD_ENGINES for v in (e.index_var, e.count_var) if v}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _one_run(mode: str, bundle: Path, slides: list[Path], out: Path, args: Any) -> dict[str, Any]:
    """Spawn 4 workers (``--claim`` or ``--shard i/4``), wait for all; the run's record."""
    common = [*map(str, slides), "--bundle", str(bundle), "--out", str(out), "--pitch-um", str(args.pitch_um),
              "--batch-size", "32", "--workers", "1", "--no-progress", "--no-qc", "-q"]
    load_before = load_average()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    procs = []
    for i in range(WORKERS):
        extra = ["--claim"] if mode == "claim" else ["--shard", f"{i}/{WORKERS}"]
        cmd = [sys.executable, "-m", "benchmarks.claim", "worker", str(args.tiles_per_s), *common, *extra]
        with open(out / f"worker-{i}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT))
    walls: dict[int, float] = {}
    while len(walls) < WORKERS:  # each worker's exit time
        for i, p in enumerate(procs):
            if i not in walls and p.poll() is not None:
                walls[i] = round(time.perf_counter() - t0, 2)
        time.sleep(0.02)
    for i, p in enumerate(procs):
        if p.returncode != 0:
            text = (out / f"worker-{i}.log").read_text()[-2000:]
            raise RuntimeError(f"a {mode} worker failed (exit {p.returncode}): {text}")
    makespan = time.perf_counter() - t0
    return {"mode": mode, "makespan_s": round(makespan, 2), "load_avg_before": load_before,
            **_workers(out, [walls[i] for i in range(WORKERS)])}


def _workers(out: Path, walls: list[float]) -> dict[str, Any]:
    """Per worker (from the run reports of ``out``): slides run, busy seconds; and the slides' lower bound."""
    reports = [json.loads(p.read_text()) for p in sorted((out / "hishrst_runs").glob("*.json"))]
    per, seconds = [], []
    for r in sorted(reports, key=lambda r: r["started_at"]):
        ran = [s for s in r["slides"] if s["status"] == "ok"]
        per.append({"slides": len(ran), "busy_s": round(sum(s["seconds"] or 0 for s in ran), 2),
                    "report_seconds": r["seconds"]})
        seconds += [s["seconds"] or 0 for s in ran]
    total = sum(seconds)
    return {"per_worker": per, "exit_after_s": walls, "slides_run": len(seconds), "work_s": round(total, 2),
            "lower_bound_s": round(max(total / WORKERS, max(seconds, default=0.0)), 2),
            "busiest_worker_s": max((w["busy_s"] for w in per), default=None)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return _worker(argv[1:])
    p = base_parser("claim", __doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None, help="runs per mode (default: 3; --quick: 1)")
    p.add_argument("--tiles-per-s", type=float, default=None,
                   help="speed of the simulated accelerator per worker (default: 250; --quick: 500)")
    p.add_argument("--pitch-um", type=float, default=None, help="query-grid pitch, µm (default: 10; --quick: 20)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.tiles_per_s = args.tiles_per_s or (500.0 if args.quick else 250.0)
    args.pitch_um = args.pitch_um or (20.0 if args.quick else 10.0)
    bundle, slides = _data(workdir_of(args), args.quick)
    runs = workdir_of(args) / "claim-runs"
    rows = []
    with JsonlWriter(args.out, benchmark="claim", quick=args.quick, append=args.append) as w:
        for rep in range(args.repeats):
            for mode in ("claim", "shard"):
                out = runs / f"{mode}-{rep}-{os.getpid()}"
                rec = _one_run(mode, bundle, slides, out, args)
                rows.append(w.write({"kind": "makespan", "status": "ok", "repeat": rep, "workers": WORKERS,
                                     "slides": SLIDES, "big_slides": list(BIG), "tiles_per_s": args.tiles_per_s,
                                     "pitch_um": args.pitch_um, **rec}))
                print(f"  {mode} #{rep}: makespan {rec['makespan_s']} s (load {rec['load_avg_before']})", flush=True)
        med = {m: statistics.median(r["makespan_s"] for r in rows if r["mode"] == m) for m in ("claim", "shard")}
        w.write({"kind": "summary", "status": "ok", "repeats": args.repeats, "median_makespan_s": med,
                 "shard_over_claim": round(med["shard"] / med["claim"], 3)})
    print_table(rows, [("mode", "mode"), ("repeat", "#"), ("makespan_s", "makespan s"),
                       ("lower_bound_s", "bound s"), ("busiest_worker_s", "busiest s"),
                       ("load_avg_before", "load before"), ("load_avg_1m", "load after")],
                title="4 workers, 12 slides: --claim vs --shard I/4")
    print(f"median makespan: claim {med['claim']} s, shard {med['shard']} s (shard/claim "
          f"{med['shard'] / med['claim']:.2f}x)")
    return None


if __name__ == "__main__":
    main()
