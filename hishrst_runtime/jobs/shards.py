"""Sharding slides over jobs, so many array jobs (Slurm, Kubernetes, AWS Batch) can share one output folder.

:func:`shard_items` sorts the items by a stable key (by default ``str(item)``, i.e. the path
string) and deals them round-robin: shard ``i`` of ``n`` gets sorted items ``i, i + n, i + 2n, ...``.
The ``n`` shards partition the list exactly (every item in exactly one shard, for any ``n``, also
``n > len(items)``, when some shards are empty), and round-robin balances shards better than
contiguous blocks when slide sizes drift with their names. :func:`parse_shard` reads ``"I/N"``
(0-based ``I``); :func:`shard_choice_from_env` reads the array-job engine's variables, one row of
:data:`SHARD_ENGINES` per engine (the first engine with any of its variables set is used):

- Slurm job arrays: ``SLURM_ARRAY_TASK_ID`` / ``SLURM_ARRAY_TASK_COUNT`` (and ``_MIN`` / ``_STEP``);
- Kubernetes Indexed Jobs: ``JOB_COMPLETION_INDEX`` (set by the Job controller) / ``HISHRST_SHARD_COUNT``
  (Kubernetes does not export ``spec.completions``: set it to the same number in the pod template);
- AWS Batch array jobs: ``AWS_BATCH_JOB_ARRAY_INDEX`` / ``AWS_BATCH_JOB_ARRAY_SIZE`` (both set by Batch).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hishrst_runtime.core.errors import InputError

__all__ = ["ShardSpecError", "ShardEngine", "ShardChoice", "SHARD_ENGINES", "shard_items", "parse_shard",
           "shard_from_env", "shard_choice_from_env"]

T = TypeVar("T")


class ShardSpecError(InputError):
    """A shard specification (``--shard I/N`` or an array job's variables) is malformed or inconsistent."""


@dataclass(frozen=True)
class ShardEngine:
    """An array-job engine: the variables holding this task's 0-based index and the number of tasks."""

    name: str
    label: str
    index_var: str
    count_var: str
    count_hint: str
    min_var: str | None = None  # Slurm: the array's first id (ids MIN, MIN+STEP, ...)
    step_var: str | None = None


#: Engines whose array tasks default ``--shard``, in the order they are looked for.
SHARD_ENGINES: tuple[ShardEngine, ...] = (
    ShardEngine("slurm", "Slurm job array", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
                "run inside a Slurm job array (sbatch --array)", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"),
    ShardEngine("kubernetes", "Kubernetes Indexed Job", "JOB_COMPLETION_INDEX", "HISHRST_SHARD_COUNT",
                "set HISHRST_SHARD_COUNT to the Job's spec.completions in the pod template (Kubernetes does "
                "not export it)"),
    ShardEngine("aws-batch", "AWS Batch array job", "AWS_BATCH_JOB_ARRAY_INDEX", "AWS_BATCH_JOB_ARRAY_SIZE",
                "run as an AWS Batch array job (--array-properties size=N)"),
)


@dataclass(frozen=True)
class ShardChoice:
    """This job's shard and where it came from: ``source`` is ``--shard`` or an engine's name; ``variables``
    the environment variables read (empty for ``--shard``)."""

    index: int
    count: int
    source: str = "--shard"
    variables: dict[str, str] = field(default_factory=dict)

    @property
    def pair(self) -> tuple[int, int]:
        """``(index, count)``."""
        return self.index, self.count

    def describe(self) -> str:
        """Where it came from, for the console: ``--shard`` or ``kubernetes: JOB_COMPLETION_INDEX=2, ...``."""
        shown = ", ".join(f"{k}={v}" for k, v in self.variables.items())
        return f"{self.source}: {shown}" if shown else self.source

    def record(self) -> dict[str, Any]:
        """The run report's ``shard`` entry: ``index``, ``count`` and, for a shard read from an array job,
        ``source`` (the engine) and ``variables`` (absent for ``--shard I/N``, which ``args`` records)."""
        if self.source == "--shard":
            return {"index": self.index, "count": self.count}
        return {"index": self.index, "count": self.count, "source": self.source, "variables": dict(self.variables)}


def shard_items(items: Sequence[T], *, index: int, count: int, key: Callable[[T], Any] = str) -> list[T]:
    """Shard ``index`` (0-based) of ``count``: sorted by ``key`` (default ``str``), then every
    ``count``-th item starting at ``index``. Over all indices the shards partition ``items`` exactly."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ShardSpecError(f"shard count must be an integer >= 1, got {count!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ShardSpecError(f"shard index must be an integer in [0, {count}), got {index!r}")
    return sorted(items, key=key)[index::count]


def parse_shard(spec: str) -> tuple[int, int]:
    """Parse ``"I/N"`` (shard ``I`` of ``N``, 0-based, ``0 <= I < N``) into ``(I, N)``."""
    parts = str(spec).strip().split("/")
    if len(parts) != 2:
        raise ShardSpecError(f"shard {spec!r}: expected 'I/N' such as '0/4' (0-based index I of N shards)")
    try:
        index, count = int(parts[0]), int(parts[1])
    except ValueError as e:
        raise ShardSpecError(f"shard {spec!r}: I and N must be integers, as in '0/4'") from e
    if count < 1:
        raise ShardSpecError(f"shard {spec!r}: N must be >= 1")
    if not 0 <= index < count:
        raise ShardSpecError(f"shard {spec!r}: I must be in 0..{count - 1} (0-based); "
                             f"for the last of {count} shards write '{count - 1}/{count}'")
    return index, count


def shard_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``(index, count)`` from an array job's variables (:func:`shard_choice_from_env`), or ``None``."""
    choice = shard_choice_from_env(environ)
    return None if choice is None else choice.pair


def shard_choice_from_env(environ: Mapping[str, str] | None = None) -> ShardChoice | None:
    """This task's shard from the first engine of :data:`SHARD_ENGINES` with any variable set, or ``None``
    outside an array job; an engine with only one of its two variables raises :class:`ShardSpecError`.

    Slurm: ``index = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) // SLURM_ARRAY_TASK_STEP`` (MIN defaults to
    0, STEP to 1), so ``--array=1-8`` and ``--array=0-14:2`` both give indices ``0..count-1``; arrays with
    irregular ids (``--array=1,5,9``) cannot be mapped to shards: use ``--shard I/N`` there. Kubernetes and
    AWS Batch indices are 0-based already.
    """
    env = os.environ if environ is None else environ
    for engine in SHARD_ENGINES:
        index, count = env.get(engine.index_var), env.get(engine.count_var)
        if index is None and count is None:
            continue
        if index is None or count is None:
            have, miss = (engine.index_var, engine.count_var) if count is None else (engine.count_var, engine.index_var)
            raise ShardSpecError(f"{have} is set but {miss} is not; {engine.count_hint}, or pass --shard I/N")
        return _engine_shard(engine, env, index, count)
    return None


def _engine_shard(engine: ShardEngine, env: Mapping[str, str], index: str, count: str) -> ShardChoice:
    """The shard of one engine's (present) variables, validated."""
    names = [engine.index_var, engine.count_var]
    raw = [index, count]
    for var, default in ((engine.min_var, "0"), (engine.step_var, "1")):
        if var is not None:
            names.append(var)
            raw.append(env.get(var, default))
    try:
        tid, n, tmin, step = (*(int(str(v).strip()) for v in raw), 0, 1)[:4]
    except ValueError as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in zip(names, raw, strict=True))
        raise ShardSpecError(f"{engine.label} variables must be integers ({shown})") from e
    if n < 1 or step < 1:
        raise ShardSpecError(f"{engine.count_var}={n}" + (f" and {engine.step_var}={step}" if engine.step_var else "")
                             + " must be >= 1")
    offset = tid - tmin
    if offset < 0 or offset % step or not 0 <= offset // step < n:
        where = f" ({engine.min_var}={tmin}, STEP={step})" if engine.min_var else ""
        raise ShardSpecError(f"{engine.label} task {engine.index_var}={tid} does not map to a shard of {n}{where}: "
                             f"the indices must be 0..{engine.count_var}-1" + (" (MIN, MIN+STEP, ...)" if where else "")
                             + "; use --shard I/N for irregular arrays")
    shown = {k: str(v).strip() for k, v in zip(names, raw, strict=True) if k in env}
    return ShardChoice(offset // step, n, engine.name, shown)
