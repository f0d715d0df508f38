"""Request coalescing: one fetch per key, bounded waits, hit-for-miss, one background refresh."""

from __future__ import annotations

import asyncio

import pytest

from edge.cache.coalesce import Coalescer, HitForMiss, Role, leads_fill
from edge.cache.testing import FakeClock


def coalescer(
    clock: FakeClock,
    *,
    lock_timeout: float = 5.0,
    hit_for_miss: float = 10.0,
    waits: list[int] | None = None,
) -> Coalescer[str]:
    return Coalescer(
        lock_timeout=lock_timeout,
        hit_for_miss=hit_for_miss,
        clock=clock,
        on_wait=(lambda: waits.append(1)) if waits is not None else None,
    )


class Origin:
    """A fetch that blocks until released, counting calls."""

    def __init__(self, value: str = "v", shareable: bool = True) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.value = value
        self.shareable = shareable

    async def fetch(self) -> tuple[str, bool]:
        self.calls += 1
        await self.release.wait()
        return f"{self.value}{self.calls}", self.shareable


async def until(predicate: object, within: float = 5.0) -> None:
    """Yield to the loop until ``predicate()`` holds (no fixed sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0)


async def test_thousand_concurrent_misses_make_one_fetch() -> None:
    waits: list[int] = []
    co = coalescer(FakeClock(), waits=waits)
    origin = Origin()
    tasks = [asyncio.create_task(co.run(b"k", origin.fetch)) for _ in range(1000)]
    await until(lambda: len(waits) == 999)
    origin.release.set()
    results = await asyncio.gather(*tasks)
    assert origin.calls == 1
    assert {value for value, _ in results} == {"v1"}
    roles = [role for _, role in results]
    assert roles.count(Role.LEADER) == 1 and roles.count(Role.WAITER) == 999
    assert not co.in_flight(b"k")


async def test_different_keys_do_not_coalesce() -> None:
    co = coalescer(FakeClock())
    origin = Origin()
    origin.release.set()
    await asyncio.gather(co.run(b"a", origin.fetch), co.run(b"b", origin.fetch))
    assert origin.calls == 2


async def test_waiter_gives_up_after_lock_timeout_and_fetches_alone() -> None:
    co = coalescer(FakeClock(), lock_timeout=0.05)
    slow = Origin("slow")
    fast = Origin("fast")
    fast.release.set()
    leader = asyncio.create_task(co.run(b"k", slow.fetch))
    await until(lambda: co.in_flight(b"k"))
    value, role = await co.run(b"k", fast.fetch)
    assert (value, role) == ("fast1", Role.ALONE)
    assert not leader.done()  # the slow fetch goes on for its own request
    slow.release.set()
    assert await leader == ("slow1", Role.LEADER)


async def test_uncacheable_answer_releases_waiters_and_is_remembered() -> None:
    clock = FakeClock()
    waits: list[int] = []
    co = coalescer(clock, hit_for_miss=10.0, waits=waits)
    first = Origin("private", shareable=False)
    waiter_fetch = Origin("own", shareable=False)
    waiter_fetch.release.set()
    leader = asyncio.create_task(co.run(b"k", first.fetch))
    await until(lambda: co.in_flight(b"k"))
    waiter = asyncio.create_task(co.run(b"k", waiter_fetch.fetch))
    await until(lambda: len(waits) == 1)
    first.release.set()
    assert await leader == ("private1", Role.LEADER)
    assert await waiter == ("own1", Role.ALONE)  # fetched on its own, not the leader's answer
    # Remembered: concurrent requests now skip the queue entirely.
    gate = Origin("pass", shareable=False)
    tasks = [asyncio.create_task(co.run(b"k", gate.fetch)) for _ in range(5)]
    await until(lambda: gate.calls == 5)
    gate.release.set()
    assert all(role is Role.ALONE for _, role in await asyncio.gather(*tasks))
    assert not co.in_flight(b"k")


async def test_hit_for_miss_expires() -> None:
    clock = FakeClock()
    co = coalescer(clock, hit_for_miss=10.0)
    nope = Origin(shareable=False)
    nope.release.set()
    await co.run(b"k", nope.fetch)
    assert co.hit_for_miss.active(b"k", clock())
    clock.advance(10.0)
    good = Origin()
    good.release.set()
    assert (await co.run(b"k", good.fetch))[1] is Role.LEADER


async def test_cacheable_answer_clears_hit_for_miss() -> None:
    clock = FakeClock()
    co = coalescer(clock)
    co.hit_for_miss.mark(b"k", clock())
    # A request that passes (alone) and gets a cacheable answer does not clear it...
    ok = Origin()
    ok.release.set()
    assert (await co.run(b"k", ok.fetch))[1] is Role.ALONE
    # ...but a led fetch does: e.g. a background refresh.
    assert co.refresh(b"k", ok.fetch)
    await co.drain()
    assert not co.hit_for_miss.active(b"k", clock())


async def test_leader_failure_reaches_every_waiter_once() -> None:
    waits: list[int] = []
    co = coalescer(FakeClock(), waits=waits)
    calls = 0
    gate = asyncio.Event()

    async def failing() -> tuple[str, bool]:
        nonlocal calls
        calls += 1
        await gate.wait()
        raise ConnectionError("origin down")

    tasks = [asyncio.create_task(co.run(b"k", failing)) for _ in range(20)]
    await until(lambda: len(waits) == 19)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert calls == 1
    assert all(isinstance(r, ConnectionError) for r in results)
    assert not co.hit_for_miss.active(b"k", 0.0)


async def test_a_leader_is_known_to_lead_while_it_fetches_and_no_longer() -> None:
    # The front ends ask ``leads_fill`` before cancelling a request whose client went away.
    co = coalescer(FakeClock())
    origin = Origin()
    leader = asyncio.create_task(co.run(b"k", origin.fetch))
    await until(lambda: co.in_flight(b"k"))
    assert leads_fill(leader)
    origin.release.set()
    assert await leader == ("v1", Role.LEADER)
    assert not leads_fill(leader) and not co.in_flight(b"k")


async def test_a_cancelled_leader_releases_its_waiters_to_coalesce_again() -> None:
    # A leader cancelled anyway (its deadline passed): its fetch ends with it, and one of its
    # waiters leads a new one that the others share.
    waits: list[int] = []
    co = coalescer(FakeClock(), waits=waits)
    origin = Origin()
    leader = asyncio.create_task(co.run(b"k", origin.fetch))
    await until(lambda: co.in_flight(b"k"))
    waiters = [asyncio.create_task(co.run(b"k", origin.fetch)) for _ in range(3)]
    await until(lambda: len(waits) == 3)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert not leads_fill(leader)
    await until(lambda: origin.calls == 2 and len(waits) == 5)
    origin.release.set()
    results = await asyncio.gather(*waiters)
    assert sorted(role.value for _, role in results) == ["leader", "waiter", "waiter"]
    assert {value for value, _ in results} == {"v2"}
    assert origin.calls == 2


async def test_background_refresh_runs_exactly_once_per_key() -> None:
    waits: list[int] = []
    co = coalescer(FakeClock(), waits=waits)
    origin = Origin()
    started = [co.refresh(b"k", origin.fetch) for _ in range(100)]
    assert started.count(True) == 1
    # A miss arriving meanwhile joins the refresh instead of fetching again.
    joined = asyncio.create_task(co.run(b"k", origin.fetch))
    await until(lambda: len(waits) == 1)
    origin.release.set()
    assert await joined == ("v1", Role.WAITER)
    await co.drain()
    assert origin.calls == 1
    assert co.refresh(b"k", origin.fetch)  # finished: a later refresh may start again
    await co.drain()
    assert origin.calls == 2


async def test_background_failure_is_reported_not_raised() -> None:
    errors: list[BaseException] = []
    co: Coalescer[str] = Coalescer(
        lock_timeout=1.0, hit_for_miss=1.0, clock=FakeClock(), on_background_error=errors.append
    )

    async def failing() -> tuple[str, bool]:
        raise TimeoutError("slow origin")

    assert co.refresh(b"k", failing)
    await co.drain()
    assert len(errors) == 1 and isinstance(errors[0], TimeoutError)


def test_hit_for_miss_is_bounded() -> None:
    memory = HitForMiss(10.0, max_keys=100)
    for i in range(1000):
        memory.mark(b"%d" % i, 0.0)
        assert len(memory) <= 100
    assert memory.active(b"999", 5.0)
    memory.clear(b"999")
    assert not memory.active(b"999", 5.0)
