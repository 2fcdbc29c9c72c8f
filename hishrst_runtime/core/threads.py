"""How many CPU threads hishrst may use: the one rule for training, feature extraction and the runtime.

torch and ONNX Runtime default to one thread per logical core of the *machine*. On a shared node that
oversubscribes: a Slurm job or container limited to 2 of 64 cores, or a laptop whose cores are busy,
runs 15–30× slower than with the right count. :func:`usable_cores` is what this process may run on —
the smallest of the CPU affinity mask (``taskset``, Slurm's ``--cpus-per-task``), the cgroup CPU quota
(Docker ``--cpus``, Kubernetes limits: ``cpu.max`` v2 or ``cpu.cfs_quota_us`` v1) and the machine.
:func:`default_threads` then leaves out the cores other processes are keeping busy (the 1-minute load
average minus this process's own share), never going below one. ``--threads N`` (or
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


def busy_cores(cores: int) -> int:
    """Cores other processes keep busy now: the 1-minute load average minus this process's share, rounded
    down, clipped to ``[0, cores - 1]`` (0 where the load average is unknown)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0
    own = 0.0
    try:
        import psutil

        own = psutil.Process().cpu_percent(interval=None) / 100.0
    except (ImportError, OSError):
        pass
    return int(max(0, min(cores - 1, math.floor(load - own))))


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
