"""How many CPU threads hishrst may use: the one rule for training, feature extraction and the runtime.

torch and ONNX Runtime default to one thread per logical core of the *machine*. On a shared node that
oversubscribes: a Slurm job or container limited to 2 of 64 cores, or a laptop whose cores are busy,
runs 15–30× slower than with the right count. :func:`usable_cores` is what this process may run on —
the smallest of the CPU affinity mask (``taskset``, Slurm's ``--cpus-per-task``), the cgroup CPU quota
(Docker ``--cpus``, Kubernetes limits: ``cpu.max`` v2 or ``cpu.cfs_quota_us`` v1) and the machine.
:func:`default_threads` then leaves out the cores other processes are keeping busy (measured over a quarter of a
second, or the 1-minute load average without psutil), never going below one. ``--threads N`` (or
``$HISHRST_THREADS``) always wins.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from hishrst_runtime.core.errors import InputError

__all__ = ["THREADS_ENV", "usable_cores", "cgroup_cpu_limit", "busy_cores", "default_threads", "resolve_threads"]

#: Environment variable that sets the thread count for every command (like ``--threads``).
THREADS_ENV = "HISHRST_THREADS"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``);
    None when unlimited or unknown."""
    text = _read(root / "cpu.max")
    if text:
        quota, _, period = text.partition(" ")
        if quota != "max":
            try:
                return max(0.01, int(quota) / int(period or 100000))
            except ValueError:
                return None
        return None
    quota, period = _read(root / "cpu" / "cpu.cfs_quota_us"), _read(root / "cpu" / "cpu.cfs_period_us")
    try:
        if quota and period and int(quota) > 0:
            return max(0.01, int(quota) / int(period))
    except ValueError:
        return None
    return None


def usable_cores() -> int:
    """Cores this process may run on: min(affinity mask, cgroup quota rounded up, machine), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _sampled_busy(cores: int, interval: float) -> float | None:
    """CPUs other processes used over the last ``interval`` seconds (psutil), None when psutil is missing."""
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    me.cpu_percent(interval=None)
    total = psutil.cpu_percent(interval=interval) / 100.0 * (psutil.cpu_count() or cores)
    return max(0.0, total - me.cpu_percent(interval=None) / 100.0)


def busy_cores(cores: int, *, interval: float = 0.25) -> int:
    """Cores other processes keep busy now, rounded to the nearest core and clipped to ``[0, cores - 1]``:
    measured over ``interval`` seconds (psutil; a fresh burst of work shows at once), else the 1-minute load
    average (which lags by a minute), else 0."""
    busy = _sampled_busy(cores, interval)
    if busy is None:
        try:
            busy = float(os.getloadavg()[0])
        except (AttributeError, OSError):
            return 0
    return int(max(0, min(cores - 1, round(busy))))


def default_threads(*, reserve: int = 0) -> int:
    """Threads for compute when nobody said: :func:`usable_cores` minus :func:`busy_cores` minus ``reserve``
    (cores kept for this process's own reader threads), at least 1."""
    cores = usable_cores()
    return max(1, cores - busy_cores(cores) - max(0, reserve))


def resolve_threads(threads: int | None, *, reserve: int = 0) -> int:
    """``threads`` when given (``--threads``), else ``$HISHRST_THREADS``, else :func:`default_threads`.

    Raises :class:`InputError` for a value below 1 or a malformed environment variable."""
    if threads is None:
        text = os.environ.get(THREADS_ENV, "").strip()
        if not text:
            return default_threads(reserve=reserve)
        try:
            threads = int(text)
        except ValueError as e:
            raise InputError(f"${THREADS_ENV}={text!r} is not a whole number of threads; set it like "
                             f"{THREADS_ENV}=4 or unset it") from e
    if int(threads) < 1:
        raise InputError(f"--threads {threads}: must be at least 1")
    return int(threads)
