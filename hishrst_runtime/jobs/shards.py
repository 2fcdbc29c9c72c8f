"""Sharding slides over jobs, so many Slurm jobs can share one output folder.

:func:`shard_items` sorts the items by a stable key (by default ``str(item)``, i.e. the path
string) and deals them round-robin: shard ``i`` of ``n`` gets sorted items ``i, i + n, i + 2n, ...``.
The ``n`` shards partition the list exactly (every item in exactly one shard, for any ``n``, also
``n > len(items)``, when some shards are empty), and round-robin balances shards better than
contiguous blocks when slide sizes drift with their names. :func:`parse_shard` reads ``"I/N"``
(0-based ``I``); :func:`shard_from_env` reads a Slurm job array.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from hishrst_runtime.core.errors import InputError

__all__ = ["ShardSpecError", "shard_items", "parse_shard", "shard_from_env"]

T = TypeVar("T")


class ShardSpecError(InputError):
    """A shard specification (``--shard I/N`` or Slurm array variables) is malformed or inconsistent."""


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
    """``(index, count)`` from a Slurm job array, or ``None`` outside one.

    ``index = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) // SLURM_ARRAY_TASK_STEP`` (MIN defaults to
    0, STEP to 1), so ``--array=1-8`` and ``--array=0-14:2`` both give indices ``0..count-1``;
    ``count = SLURM_ARRAY_TASK_COUNT``. Arrays with irregular ids (``--array=1,5,9``) cannot be mapped
    to shards: use ``--shard I/N`` there.
    """
    env = os.environ if environ is None else environ
    task_id, task_count = env.get("SLURM_ARRAY_TASK_ID"), env.get("SLURM_ARRAY_TASK_COUNT")
    if task_id is None and task_count is None:
        return None
    if task_id is None or task_count is None:
        have, miss = "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"
        if task_id is None:
            have, miss = miss, have
        raise ShardSpecError(f"{have} is set but {miss} is not; run inside a Slurm job array or pass --shard I/N")
    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP")
    raw = (task_id, task_count, env.get("SLURM_ARRAY_TASK_MIN", "0"), env.get("SLURM_ARRAY_TASK_STEP", "1"))
    try:
        tid, count, tmin, step = (int(str(v).strip()) for v in raw)
    except ValueError as e:
        shown = ", ".join(f"{n}={v!r}" for n, v in zip(names, raw, strict=True))
        raise ShardSpecError(f"Slurm array variables must be integers ({shown})") from e
    if count < 1 or step < 1:
        raise ShardSpecError(f"SLURM_ARRAY_TASK_COUNT={count} and SLURM_ARRAY_TASK_STEP={step} must be >= 1")
    offset = tid - tmin
    if offset < 0 or offset % step or not 0 <= offset // step < count:
        raise ShardSpecError(
            f"Slurm array task {tid} does not map to a shard of {count} (SLURM_ARRAY_TASK_MIN={tmin}, "
            f"STEP={step}): the array ids must be MIN, MIN+STEP, ... ; use --shard I/N for irregular arrays")
    return offset // step, count
