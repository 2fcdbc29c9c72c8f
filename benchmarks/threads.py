"""``hishrst fit`` on an idle machine vs with every core kept busy by other processes.

Each fit runs in a fresh process (``hishrst fit`` on one synthetic section, the test encoder, fixed epochs and
no early stop, features cached beforehand so the fit itself is timed). Settings: hishrst's default thread
count (:mod:`hishrst_runtime.core.threads`: usable cores minus those other processes keep busy) and, for
comparison, an explicit ``--threads`` equal to every core (what torch does by default). The busy cores are
``python -c 'while True: pass'`` spinners started before the fit and killed after it.

    python -m benchmarks.threads [--quick]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import JsonlWriter, base_parser, print_table, workdir_of

HISHRST = [sys.executable, "-c", "from hishrst.cli import main; main()"]
FIT = ["--task", "full", "--epochs", "{epochs}", "--val-frac", "0", "--encoder", "test-vit", "--allow-test-encoder",
       "--no-progress", "--device", "cpu", "--overwrite"]


def _section(work: Path) -> Path:
    data = work / "threads-data"
    if not (data / "outs").is_dir():
        subprocess.run([*HISHRST, "synth", str(data), "--preset", "small"], check=True,
                       stdout=subprocess.DEVNULL)
    return data / "outs"


def _fit(outs: Path, run: Path, cache: Path, *, epochs: int, threads: int | None, busy: int) -> dict[str, Any]:
    args = [a.format(epochs=epochs) for a in FIT] + (["--threads", str(threads)] if threads else [])
    cmd = [*HISHRST, "fit", str(outs), "--out", str(run), "--cache-dir", str(cache), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HISHRST_THREADS")}
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0.0)
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        wall = time.perf_counter() - t0
    finally:
        for p in spin:
            p.kill()
    chosen = next((ln for ln in out.splitlines() if ln.startswith("threads:")), "threads: ?")
    return {"busy_cores": busy, "threads_option": threads or "default", "chosen": chosen, "wall_s": round(wall, 2)}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = base_parser("threads", __doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=None, help="fit epochs (default 15, --quick 2)")
    args = p.parse_args(argv)
    work = workdir_of(args)
    epochs = args.epochs or (2 if args.quick else 15)
    cores = len(os.sched_getaffinity(0))
    outs, cache = _section(work), work / "threads-cache"
    _fit(outs, work / "threads-run", cache, epochs=1, threads=None, busy=0)  # fills the feature cache, untimed
    writer = JsonlWriter(args.out, benchmark="threads", quick=args.quick, append=args.append)
    recs = []
    for busy, threads in ((0, None), (cores, None), (cores, cores)):
        rec = _fit(outs, work / "threads-run", cache, epochs=epochs, threads=threads, busy=busy)
        recs.append(writer.write({"status": "ok", **rec, "epochs": epochs, "cores": cores}))
    idle = recs[0]["wall_s"]
    for r in recs:
        r["vs_idle"] = round(r["wall_s"] / idle, 2)
    print_table(recs, [("busy_cores", "busy cores"), ("threads_option", "--threads"), ("chosen", "chosen"),
                       ("wall_s", "fit wall s"), ("vs_idle", "× idle")])
    return recs


if __name__ == "__main__":
    main()
