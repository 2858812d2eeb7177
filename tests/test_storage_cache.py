"""The bounded local cache of bucket objects (utils/storage/cache.py): hits, LRU eviction within the size,
the grace period, session forgetting, and several processes sharing one folder."""
from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from utils import errors
from utils.storage.cache import ObjectCache

SID = "s" * 24


def filler(data: bytes, calls: list | None = None):
    def fetch(fh):
        if calls is not None:
            calls.append(1)
        fh.write(data)
    return fetch


def test_a_miss_fetches_once_then_hits(tmp_path):
    cache = ObjectCache(tmp_path, 1 << 20)
    calls: list = []
    p1 = cache.get(f"{SID}/crops/000.png", filler(b"abc", calls))
    p2 = cache.get(f"{SID}/crops/000.png", filler(b"xyz", calls))
    assert p1 == p2 and p1.read_bytes() == b"abc" and len(calls) == 1


def test_a_failed_fetch_leaves_nothing(tmp_path):
    cache = ObjectCache(tmp_path, 1 << 20)

    def broken(fh):
        fh.write(b"half")
        raise errors.StorageUnavailable("gone")
    with pytest.raises(errors.StorageUnavailable):
        cache.get(f"{SID}/meta.json", broken)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"] == []


@pytest.mark.parametrize("key", ["../x", f"{SID}/../other", "not-a-session/x", f"{SID}/.hidden", "", f"{SID}//x"])
def test_keys_outside_a_session_are_refused(tmp_path, key):
    with pytest.raises(errors.NotFound):
        ObjectCache(tmp_path, 1 << 20).path(key)


def test_least_recently_used_copies_go_first_and_the_size_holds(tmp_path):
    cache = ObjectCache(tmp_path, 350, grace_s=0)
    for i in range(3):
        cache.get(f"{SID}/f{i}", filler(bytes(100)))
        os.utime(tmp_path / SID / f"f{i}", (time.time() - 100 + i, time.time() - 100 + i))
    cache.get(f"{SID}/f0", filler(b""))              # a hit: f0 is now the most recent
    cache.get(f"{SID}/f3", filler(bytes(100)))        # 400 bytes > 350: the least recently used (f1) goes
    assert sorted(p.name for p in (tmp_path / SID).iterdir()) == ["f0", "f2", "f3"]
    assert cache.usage()["bytes"] == 300


def test_a_copy_handed_out_just_now_is_kept_past_the_size(tmp_path):
    cache = ObjectCache(tmp_path, 50, grace_s=60)
    a = cache.get(f"{SID}/a", filler(bytes(100)))
    b = cache.get(f"{SID}/b", filler(bytes(100)))
    assert a.exists() and b.exists()     # its caller is about to open it


def test_forget_drops_a_sessions_copies(tmp_path):
    cache = ObjectCache(tmp_path, 1 << 20)
    other = "o" * 24
    cache.get(f"{SID}/a", filler(b"1"))
    cache.get(f"{other}/a", filler(b"2"))
    assert cache.sessions() == sorted([SID, other])
    assert cache.forget(SID) is True and cache.forget(SID) is False
    assert cache.sessions() == [other]


def _worker(root: str, seed: int, rounds: int, queue) -> None:
    import random
    rng = random.Random(seed)
    cache = ObjectCache(root, 40_000, grace_s=0.2)
    bad = 0
    for _ in range(rounds):
        i = rng.randrange(60)
        want = bytes([i]) * (1000 + i)
        try:
            got = cache.get(f"{SID}/k{i:02d}", filler(want)).read_bytes()
        except FileNotFoundError:
            got = None       # trimmed between get() and read (allowed only past the grace; counted)
        bad += got is not None and got != want
    queue.put(bad)


def test_several_processes_share_one_cache_folder(tmp_path):
    """Four processes read 60 keys at random through one small cache (it holds about 35 of them): every read
    is the whole object, the folder stays near its size, and no temp file is left."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), s, 300, q)) for s in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert [q.get(timeout=5) for _ in procs] == [0, 0, 0, 0]
    cache = ObjectCache(tmp_path, 40_000, grace_s=0)
    cache.trim()
    assert cache.usage()["bytes"] <= 40_000
    assert list(tmp_path.rglob("*.part")) == []
