"""Request coalescing: concurrent misses of one key cause one upstream fetch.

The first request for a key (the leader) runs the fetch in its own task: no task, future or
callback more per miss.  The fetch must still go on when the leader's client disconnects (the
requests waiting on it need it, and so does the cache): the front ends ask ``leads_fill``
before they cancel a request whose client went away, and leave a leader to finish its fill
(its answer goes nowhere).  A leader cancelled anyway (its total deadline passed) releases its
waiters: they coalesce again, one of them leading a new fetch.  Waiters await the leader
through ``asyncio.shield`` on a future made when the first of them arrives.  A background
refresh runs as a task of its own.  A fetch returns ``(value, shareable)``:

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
from typing import Any, Generic, TypeVar

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


#: The tasks leading a fill now (``leads_fill``): a front end does not cancel them when their
#: client goes away.  Each is removed when its fill settles.
_LEADING: set[asyncio.Task[Any]] = set()


def leads_fill(task: asyncio.Task[Any]) -> bool:
    """Whether ``task`` is running a fetch other requests (and the cache) may need: a front
    end lets it finish rather than cancel it when its client goes away."""
    return task in _LEADING


class _LeaderGone(Exception):
    """The leader was cancelled before its fetch settled: its waiters coalesce again."""


class _Flight(Generic[R]):
    """One fetch in flight: a leader's (``outcome`` None until a waiter or ``drain`` asks for
    it; ``leader`` its task, in ``_LEADING`` until it settles) or a background refresh's
    (``task``, which ``outcome`` is)."""

    __slots__ = ("leader", "outcome", "task")

    def __init__(
        self,
        task: asyncio.Task[tuple[R, bool]] | None = None,
        leader: asyncio.Task[Any] | None = None,
    ) -> None:
        self.task = task
        self.leader = leader
        self.outcome: asyncio.Future[tuple[R, bool]] | None = task

    def awaited(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[tuple[R, bool]]:
        """What waiters await: the refresh's task, or a future the leader settles."""
        if self.outcome is None:
            self.outcome = loop.create_future()
        return self.outcome

    def settle(self, result: tuple[R, bool] | None, error: BaseException | None) -> None:
        """The leader's end, for whoever awaits ``outcome``."""
        outcome = self.outcome
        if outcome is None or outcome.done():
            return
        if error is None:
            assert result is not None
            outcome.set_result(result)
        else:
            # (``asyncio.shield`` marks it retrieved for a waiter that stopped waiting.)
            outcome.set_exception(error)


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
        self._inflight: dict[bytes, _Flight[R]] = {}
        #: The loop of the last fetch: in 3.11 ``get_running_loop`` costs a getpid() system
        #: call, so it is asked only when that loop no longer runs (tests run a loop each; a
        #: worker runs one for its life).
        self._loop: asyncio.AbstractEventLoop | None = None

    def in_flight(self, key: bytes) -> bool:
        return key in self._inflight

    def __len__(self) -> int:
        return len(self._inflight)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def lead(self, key: bytes) -> _Flight[R] | None:
        """Lead the fetch for ``key`` in the calling task, which runs it itself (no ``run``
        coroutine to pass through: one frame fewer on every miss) and ends with ``led`` or
        ``abandon``; None when a fetch for ``key`` is in flight or the key is remembered as
        uncacheable (maybe expired): then ``run`` decides."""
        inflight = self._inflight
        if key in inflight or key in self.hit_for_miss._until:
            return None
        loop = self._loop  # ``_running_loop``, inline
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)  # with the loop: no getpid()
        flight: _Flight[R] = _Flight(None, task)
        inflight[key] = flight
        if task is not None:
            _LEADING.add(task)
        return flight

    def led(self, key: bytes, flight: _Flight[R], value: R, shareable: bool) -> None:
        """The end of ``flight``'s fetch: ``value``, for its waiters if ``shareable``."""
        inflight = self._inflight  # ``_land``, inline (every miss ends here)
        if inflight.get(key) is flight:
            del inflight[key]
        if flight.leader is not None:
            _LEADING.discard(flight.leader)
        if flight.outcome is not None:  # someone waits (a tuple only for them)
            flight.settle((value, shareable), None)
        if shareable:  # ``_remember``, inline: a shareable answer forgets the key
            self.hit_for_miss._until.pop(key, None)
        else:
            self.hit_for_miss.mark(key, self._clock())

    def abandon(self, key: bytes, flight: _Flight[R], error: BaseException) -> None:
        """The end of ``flight``'s fetch: ``error`` raised in the leader.  Its waiters get the
        same exception; a leader cancelled releases them to coalesce again."""
        if isinstance(error, asyncio.CancelledError):
            flight.settle(None, _LeaderGone())
        elif isinstance(error, Exception):
            flight.settle(None, error)
        self._land(key, flight)

    def _land(self, key: bytes, flight: _Flight[R]) -> None:
        inflight = self._inflight
        if inflight.get(key) is flight:
            del inflight[key]
        if flight.leader is not None:
            _LEADING.discard(flight.leader)

    async def run(self, key: bytes, fetch: Fetch[R]) -> tuple[R, Role]:
        """Run ``fetch`` for ``key`` unless one is in flight; returns the value and our role."""
        hit_for_miss = self.hit_for_miss
        while True:
            # The clock is read only for a key remembered (most keys never are).
            if key in hit_for_miss and hit_for_miss.active(key, self._clock()):
                value, _ = await fetch()
                return value, Role.ALONE
            flight = self._inflight.get(key)
            if flight is None:
                # Not remembered (asked just now: ``active`` forgets an expired key): leads.
                flight = self.lead(key)
                assert flight is not None
                try:
                    value, shareable = await fetch()
                except BaseException as error:
                    self.abandon(key, flight, error)
                    raise
                self.led(key, flight, value, shareable)
                return value, Role.LEADER
            if self._on_wait is not None:
                self._on_wait()
            try:
                async with asyncio.timeout(self.lock_timeout):
                    value, shareable = await asyncio.shield(flight.awaited(self._running_loop()))
            except TimeoutError:
                value, _ = await fetch()
                return value, Role.ALONE
            except _LeaderGone:
                continue  # coalesce again: one of the waiters leads now
            if not shareable:
                value, _ = await fetch()
                return value, Role.ALONE
            return value, Role.WAITER

    def _remember(self, key: bytes, shareable: bool) -> None:
        if shareable:
            self.hit_for_miss.clear(key)
        else:
            self.hit_for_miss.mark(key, self._clock())

    def refresh(self, key: bytes, fetch: Fetch[R]) -> bool:
        """Start a background fetch for ``key`` unless one is in flight; True if started."""
        if key in self._inflight:
            return False

        async def lead(awaitable: Awaitable[tuple[R, bool]]) -> tuple[R, bool]:
            return await awaitable

        fetching = fetch()
        loop = self._running_loop()
        # A coroutine runs as the task itself (no wrapper to pass through on each resume).
        # (``type is`` first: the ABC's isinstance costs more, and fetches are coroutines.)
        if type(fetching) is CoroutineType or isinstance(fetching, Coroutine):
            task = loop.create_task(fetching)
        else:
            task = loop.create_task(lead(fetching))
        flight = _Flight(task)
        self._inflight[key] = flight

        def done(finished: asyncio.Task[tuple[R, bool]]) -> None:
            if self._inflight.get(key) is flight:
                del self._inflight[key]
            if finished.cancelled():
                return
            error = finished.exception()  # also marks it retrieved: no "never retrieved" noise
            if error is not None:
                if self._on_background_error is not None:
                    self._on_background_error(error)
                return
            self._remember(key, finished.result()[1])

        task.add_done_callback(done)
        return True

    async def drain(self) -> None:
        """Wait for every fetch in flight (tests, shutdown)."""
        while self._inflight:
            loop = self._running_loop()
            await asyncio.gather(
                *(flight.awaited(loop) for flight in list(self._inflight.values())),
                return_exceptions=True,
            )


__all__ = ["Coalescer", "Fetch", "HitForMiss", "Role", "leads_fill"]
