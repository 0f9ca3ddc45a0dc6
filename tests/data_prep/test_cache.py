"""The node-local shard cache's bound: least recently used copies go first, never one a reader holds."""

import os

import pytest

from data_prep import storage
from segnet import SegNetError

SHARD = 100  # bytes of each fake cached shard


@pytest.fixture
def cache(tmp_path):
    """Four cached shards, a (least recently used) to d (most recently used)."""
    for age, name in enumerate("abcd"):
        (tmp_path / f"{name}.arrow").write_bytes(b"x" * SHARD)
        os.utime(tmp_path / f"{name}.arrow", ns=(age * 10**9, age * 10**9))
    return tmp_path


def names(paths):
    return [p.stem for p in paths]


def test_the_least_recently_used_shards_make_room_first(cache):
    os.utime(cache / "a.arrow", ns=(10 * 10**9, 0))  # a used just now (its access time)
    evicted = storage.make_room(cache, SHARD, bound=2 * SHARD + 50)
    assert names(evicted) == ["b", "c", "d"]
    assert storage.cache_use(cache) + SHARD <= 2 * SHARD + 50
    assert sorted(p.stem for p in cache.glob("*.arrow")) == ["a"]


def test_a_shard_a_reader_holds_is_never_evicted(cache):
    held = storage.hold_shard(cache / "a.arrow")
    evicted = storage.make_room(cache, SHARD, bound=2 * SHARD)
    assert names(evicted) == ["b", "c", "d"]  # a is the oldest, but open
    assert (cache / "a.arrow").exists()
    held.close()
    assert names(storage.make_room(cache, SHARD, bound=SHARD)) == ["a"]


def test_nothing_is_evicted_within_the_bound(cache):
    assert storage.make_room(cache, SHARD, bound=5 * SHARD) == []


def test_a_held_shard_that_was_evicted_says_so(cache):
    storage.make_room(cache, 0, bound=0)
    with pytest.raises(FileNotFoundError):
        storage.hold_shard(cache / "a.arrow")


def test_the_bound_comes_from_the_argument_then_the_environment_then_the_disk(cache, monkeypatch):
    monkeypatch.delenv(storage.CACHE_BYTES, raising=False)
    disk = os.statvfs(cache)
    assert storage.cache_bound(cache) == pytest.approx(
        (disk.f_bavail * disk.f_frsize + 4 * SHARD) // 2, rel=0.01
    )
    monkeypatch.setenv(storage.CACHE_BYTES, "2e9")
    assert storage.cache_bound(cache) == 2_000_000_000
    assert storage.cache_bound(cache, 300) == 300
    monkeypatch.setenv(storage.CACHE_BYTES, "lots")
    with pytest.raises(SegNetError, match="SEGNET_CACHE_BYTES='lots' is not a number of bytes"):
        storage.cache_bound(cache)
