"""The cache and the cyclic garbage collector: what hits allocate, what eviction frees, and the
edge's freezing of the heap as the cache grows (``edge.server.FreezeCacheGrowth``)."""

from __future__ import annotations

import functools
import gc
from collections.abc import Iterator

import pytest

from edge import server
from edge.cache.entry import BYTES_OVERHEAD, Entry
from edge.cache.store import MemoryStore
from tests.test_cache_store import NOW, make_entry


@pytest.fixture
def collector_off() -> Iterator[None]:
    """The cyclic GC disabled (only reference counting frees anything), restored after."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _untracked(entry: Entry) -> bool:
    """The entry's cached response forms hold nothing the collector walks."""
    return entry._wire is None or not gc.is_tracked(entry._wire)


@pytest.mark.parametrize("head_only", [False, True])  # slot 0 has attributes, others a dict
def test_a_hit_allocates_nothing_the_collector_tracks(head_only: bool) -> None:
    entry = make_entry(body=b"x" * 2000)
    wire = functools.partial(entry.wire, head_only=head_only)
    wire("identity", NOW + 1)  # asked once: noted, not kept
    assert _untracked(entry)
    first = wire("identity", NOW + 1.2)
    assert wire("identity", NOW + 1.5) is first  # same Age: the same bytes
    assert _untracked(entry)  # ints and bytes only
    wire("identity", NOW + 2)
    later = wire("identity", NOW + 2.1)
    assert later is not first and b"\r\nage: 2\r\n" in later
    assert wire("identity", NOW + 2) is later
    assert _untracked(entry)


def test_wire_cache_accounts_bytes_of_the_replaced_response() -> None:
    store = MemoryStore(10**6, 10**6)
    entry = make_entry(body=b"x" * 100)
    store.put(entry)
    entry.wire("identity", NOW + 1)
    one = entry.wire("identity", NOW + 1)  # asked twice: kept
    after_one = store.bytes
    assert after_one == entry.size
    entry.wire("identity", NOW + 12)  # a new Age second, asked once: the old bytes go
    assert store.bytes == entry.size == after_one - len(one) - BYTES_OVERHEAD
    two = entry.wire("identity", NOW + 12)  # "age: 12" is one byte longer than "age: 1"
    assert store.bytes == entry.size == after_one + len(two) - len(one)


def test_entries_share_one_resize_callback() -> None:
    store = MemoryStore(10**6, 10**6)
    entries = [make_entry(url=b"https://h/%d" % i) for i in range(3)]
    for entry in entries:
        store.put(entry)
    assert entries[0].on_resize is entries[1].on_resize is entries[2].on_resize
    assert store.stored == 3
    store.remove(entries[0].key)
    assert entries[0].on_resize is None
    assert store.stored == 3  # a count of puts, not of what is held


@pytest.mark.usefixtures("collector_off")
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("how", ["evict", "remove", "replace", "clear"])
def test_entries_that_leave_the_store_are_freed_without_the_collector(
    how: str, frozen: bool
) -> None:
    """No reference cycle keeps a removed entry: reference counting alone frees it, even after
    a ``gc.freeze`` (what the edge does as its cache grows)."""
    store = MemoryStore(10**9, 10**6)
    count = 2000
    for i in range(count):
        store.put(make_entry(url=b"https://h/%d" % i, body=b"b%d" % i))
    for entry in list(store.entries())[:10]:
        entry.wire("identity", NOW + 1)  # built forms and on_resize calls too
    tracked = len(gc.get_objects())
    frozen_before = gc.get_freeze_count()
    if frozen:
        gc.freeze()
    try:
        if how == "evict":
            store.max_bytes = 0
            store.evict()
        elif how == "remove":
            for key in [entry.key for entry in store.entries()]:
                store.remove(key)
        elif how == "replace":
            for i in range(count):
                store.put(make_entry(url=b"https://h/%d" % i, body=b"new"))
            store.clear()
        else:
            store.clear()
        assert len(store) == 0 and store.bytes == 0
        # Each entry was three tracked objects (Entry, StoredResponse, Freshness).
        remaining = len(gc.get_objects()) + gc.get_freeze_count() - frozen_before
        assert remaining < tracked - 2 * count
    finally:
        if frozen:
            gc.unfreeze()


def test_freeze_follows_the_cache_growth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "GC_FREEZE_EVERY", 100)
    stored = [5]
    freezes: list[int] = []
    monkeypatch.setattr(server.gc, "freeze", lambda: freezes.append(stored[0]))
    hook = server.FreezeCacheGrowth(lambda: stored[0])
    stored[0] = 104
    hook("stop", {"generation": 1, "collected": 0, "uncollectable": 0})
    assert freezes == []  # 99 new entries: not yet
    stored[0] = 105
    hook("start", {"generation": 1})
    hook("stop", {"generation": 0, "collected": 0, "uncollectable": 0})
    assert freezes == []  # only after collections that promote to the old generation
    hook("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
    assert freezes == [105] and hook.freezes == 1
    stored[0] = 180
    hook("stop", {"generation": 1, "collected": 0, "uncollectable": 0})
    assert freezes == [105]
    stored[0] = 205
    hook("stop", {"generation": 1, "collected": 0, "uncollectable": 0})
    assert freezes == [105, 205]


def test_freeze_hook_really_freezes() -> None:
    stored = [0]
    hook = server.FreezeCacheGrowth(lambda: stored[0])
    before = gc.get_freeze_count()
    keep = [[i] for i in range(1000)]
    stored[0] = server.GC_FREEZE_EVERY
    try:
        hook("stop", {"generation": 1, "collected": 0, "uncollectable": 0})
        assert gc.get_freeze_count() >= before + len(keep)
    finally:
        gc.unfreeze()
