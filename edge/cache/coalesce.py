"""Request coalescing: concurrent misses of one key cause one upstream fetch.

The first request for a key (the leader) starts the fetch as its own task, so the fetch goes on
when the leader's client disconnects: the waiters still need it.  Every caller awaits the task
through ``asyncio.shield`` (the leader through a future of its own that the task's end settles:
the same protection, one future fewer).  A fetch returns ``(value, shareable)``:

* shareable (the response was cacheable): every waiter gets the same value;
* not shareable: the waiters are released at once to fetch on their own, and the key is
  remembered as uncacheable for ``hit_for_miss`` seconds, so later requests skip the queue
  instead of serialising behind one another.  Unlike Varnish's hit-for-miss object, the memory
  simply expires, and any shareable answer for the key clears it at once;
* an exception: every waiter gets the same exception (a failing origin is asked once, not once
  per waiter).

A waiter never waits longer than ``lock_timeout``; then it fetches on its own.  ``refresh``
starts a background fetch only if none is in flight for the key, which is what makes
stale-while-revalidate refresh exactly once.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Coroutine
from types import CoroutineType
from typing import Generic, TypeVar

R = TypeVar("R")
#: A fetch: returns the value and whether waiters may share it.
Fetch = Callable[[], Awaitable[tuple[R, bool]]]


class Role(enum.Enum):
    #: Ran the one fetch.
    LEADER = "leader"
    #: Got the leader's shared value.
    WAITER = "waiter"
    #: Fetched on its own: hit-for-miss, lock timeout, or an unshareable leader result.
    ALONE = "alone"


class HitForMiss:
    """Keys recently answered uncacheably, each remembered until ``ttl`` seconds pass."""

    __slots__ = ("_until", "max_keys", "ttl")

    def __init__(self, ttl: float, *, max_keys: int = 65536) -> None:
        self.ttl = ttl
        self.max_keys = max_keys
        self._until: dict[bytes, float] = {}

    def __len__(self) -> int:
        return len(self._until)

    def __contains__(self, key: bytes) -> bool:
        """Whether ``key`` is remembered (maybe expired: ``active`` says)."""
        return key in self._until

    def active(self, key: bytes, now: float) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if now < until:
            return True
        del self._until[key]
        return False

    def mark(self, key: bytes, now: float) -> None:
        if self.ttl <= 0:
            return
        if len(self._until) >= self.max_keys and key not in self._until:
            # Bounded without bookkeeping: forgetting costs only a coalescing attempt.
            self._until = {k: t for k, t in self._until.items() if t > now}
            if len(self._until) >= self.max_keys:
                self._until.clear()
        self._until[key] = now + self.ttl

    def clear(self, key: bytes) -> None:
        self._until.pop(key, None)


class Coalescer(Generic[R]):
    """One in-flight fetch per key; see the module docstring."""

    def __init__(
        self,
        *,
        lock_timeout: float,
        hit_for_miss: float,
        clock: Callable[[], float],
        on_wait: Callable[[], None] | None = None,
        on_background_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.lock_timeout = lock_timeout
        self.hit_for_miss = HitForMiss(hit_for_miss)
        self._clock = clock
        self._on_wait = on_wait
        self._on_background_error = on_background_error
        self._inflight: dict[bytes, asyncio.Task[tuple[R, bool]]] = {}
        #: The loop of the last fetch started: in 3.11 ``get_running_loop`` costs a getpid()
        #: system call, so it is asked only when that loop no longer runs (tests run a loop
        #: each; a worker runs one for its life).
        self._loop: asyncio.AbstractEventLoop | None = None

    def in_flight(self, key: bytes) -> bool:
        return key in self._inflight

    def __len__(self) -> int:
        return len(self._inflight)

    async def run(self, key: bytes, fetch: Fetch[R]) -> tuple[R, Role]:
        """Run ``fetch`` for ``key`` unless one is in flight; returns the value and our role."""
        hit_for_miss = self.hit_for_miss
        # The clock is read only for a key remembered (most keys never are).
        if key in hit_for_miss and hit_for_miss.active(key, self._clock()):
            value, _ = await fetch()
            return value, Role.ALONE
        task = self._inflight.get(key)
        if task is None:
            # The leader's own future, settled by the fetch task's done callback: what
            # ``asyncio.shield`` would make, without its second future and callbacks.
            _, mine = self._start(key, fetch, leader=True)
            assert mine is not None
            value, _ = await mine
            return value, Role.LEADER
        if self._on_wait is not None:
            self._on_wait()
        try:
            async with asyncio.timeout(self.lock_timeout):
                value, shareable = await asyncio.shield(task)
        except TimeoutError:
            value, _ = await fetch()
            return value, Role.ALONE
        if not shareable:
            value, _ = await fetch()
            return value, Role.ALONE
        return value, Role.WAITER

    def refresh(self, key: bytes, fetch: Fetch[R]) -> bool:
        """Start a background fetch for ``key`` unless one is in flight; True if started."""
        if key in self._inflight:
            return False
        self._start(key, fetch, background=True)
        return True

    def _start(
        self,
        key: bytes,
        fetch: Fetch[R],
        *,
        background: bool = False,
        leader: bool = False,
    ) -> tuple[asyncio.Task[tuple[R, bool]], asyncio.Future[tuple[R, bool]] | None]:
        """The fetch for ``key`` as a task of its own and, with ``leader``, the future the
        leader awaits: it gets the outcome (unless the leader was cancelled meanwhile)."""

        async def lead(awaitable: Awaitable[tuple[R, bool]]) -> tuple[R, bool]:
            return await awaitable

        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        fetching = fetch()
        # A coroutine runs as the task itself (no wrapper to pass through on each resume).
        # (``type is`` first: the ABC's isinstance costs more, and fetches are coroutines.)
        if type(fetching) is CoroutineType or isinstance(fetching, Coroutine):
            task = loop.create_task(fetching)
        else:
            task = loop.create_task(lead(fetching))
        mine = loop.create_future() if leader else None
        self._inflight[key] = task

        def done(finished: asyncio.Task[tuple[R, bool]]) -> None:
            if self._inflight.get(key) is finished:
                del self._inflight[key]
            waiting = mine is not None and not mine.done()
            if finished.cancelled():
                if waiting:
                    assert mine is not None
                    mine.cancel()
                return
            error = finished.exception()  # also marks it retrieved: no "never retrieved" noise
            if error is not None:
                if waiting:
                    assert mine is not None
                    mine.set_exception(error)
                if background and self._on_background_error is not None:
                    self._on_background_error(error)
                return
            result = finished.result()
            if waiting:
                assert mine is not None
                mine.set_result(result)
            if result[1]:
                self.hit_for_miss.clear(key)
            else:
                self.hit_for_miss.mark(key, self._clock())

        task.add_done_callback(done)
        return task, mine

    async def drain(self) -> None:
        """Wait for every fetch in flight (tests, shutdown)."""
        while self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)


__all__ = ["Coalescer", "Fetch", "HitForMiss", "Role"]
