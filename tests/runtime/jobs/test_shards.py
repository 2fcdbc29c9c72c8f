"""Tests for hishrst_runtime.jobs.shards: slide sharding and Slurm array parsing."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from hishrst_runtime.jobs.shards import ShardSpecError, parse_shard, shard_from_env, shard_items


# ------------------------------------------------------------------------------------ sharding


def check_partition(items: list, count: int) -> None:
    shards = [shard_items(items, index=i, count=count) for i in range(count)]
    flat = [x for shard in shards for x in shard]
    assert sorted(flat, key=str) == sorted(items, key=str)  # every item exactly once
    assert len(flat) == len(items)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1  # balanced
    shuffled = random.Random(count).sample(items, len(items))
    assert [shard_items(shuffled, index=i, count=count) for i in range(count)] == shards  # order-independent


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 16, 33])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 8, 40])
def test_shards_partition_exactly(n: int, count: int) -> None:
    check_partition([Path(f"/data/slides/s{i:03d}.svs") for i in range(n)], count)


def test_shards_property() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=100, deadline=None)
    @hypothesis.given(st.lists(st.text(max_size=6), max_size=30), st.integers(min_value=1, max_value=12))
    def prop(items: list[str], count: int) -> None:
        check_partition(items, count)

    prop()


def test_shard_items_sorts_by_path_string_and_validates() -> None:
    items = [Path("b.svs"), Path("a.svs"), Path("c.svs")]
    assert shard_items(items, index=0, count=2) == [Path("a.svs"), Path("c.svs")]
    assert shard_items(items, index=1, count=2) == [Path("b.svs")]
    for index, count in [(2, 2), (-1, 2), (0, 0), (True, 2)]:
        with pytest.raises(ShardSpecError):
            shard_items(items, index=index, count=count)


def test_parse_shard() -> None:
    assert parse_shard("0/4") == (0, 4)
    assert parse_shard(" 3/4 ") == (3, 4)
    assert parse_shard("0/1") == (0, 1)
    for bad in ["4/4", "-1/4", "1", "a/b", "1/0", "1/2/3", "", "1.5/4"]:
        with pytest.raises(ShardSpecError, match="shard"):
            parse_shard(bad)
    with pytest.raises(ShardSpecError, match="3/4"):  # suggests the 0-based last shard
        parse_shard("4/4")


def test_shard_from_env() -> None:
    assert shard_from_env({}) is None
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
    # --array=1-4: ids 1..4 with MIN=1
    got = [shard_from_env({"SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": "4",
                           "SLURM_ARRAY_TASK_MIN": "1"}) for i in range(1, 5)]
    assert got == [(0, 4), (1, 4), (2, 4), (3, 4)]
    # --array=10-16:3: ids 10, 13, 16
    got = [shard_from_env({"SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "10",
                           "SLURM_ARRAY_TASK_STEP": "3"}) for i in (10, 13, 16)]
    assert got == [(0, 3), (1, 3), (2, 3)]
    with pytest.raises(ShardSpecError, match="SLURM_ARRAY_TASK_COUNT is not"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "1"})
    with pytest.raises(ShardSpecError, match="SLURM_ARRAY_TASK_ID is not"):
        shard_from_env({"SLURM_ARRAY_TASK_COUNT": "4"})
    with pytest.raises(ShardSpecError, match="integers"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"})
    for env in [
        {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"},  # 1-based ids without MIN
        {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"},
        {"SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "10",
         "SLURM_ARRAY_TASK_STEP": "3"},
        {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "0"},
    ]:
        with pytest.raises(ShardSpecError, match="SLURM"):
            shard_from_env(env)
    os_env = dict(os.environ)
    if "SLURM_ARRAY_TASK_ID" not in os_env and "SLURM_ARRAY_TASK_COUNT" not in os_env:
        assert shard_from_env() is None  # reads os.environ by default
