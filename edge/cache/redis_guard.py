"""Every call to the POP's Redis, guarded: a deadline, a circuit breaker, errors counted.

Redis is an optimisation, never a dependency:

* every call has a deadline (``redis_timeout``, 50 ms by default; admin work such as a purge's
  SCAN passes a longer one);
* errors and timeouts feed a circuit breaker: after ``threshold`` consecutive failures Redis is
  skipped for ``cooldown`` seconds, then one probe decides; opening and closing log once each;
  every failure is reported to ``on_error`` with its reason (timeout, connection, error);
* nothing raises to the caller: a failed or skipped call returns ``SKIPPED``;
* the deadline is how long the caller waits, not how long the call may run: a call past its
  deadline finishes in the background (``Unhurried``), within the connection's own socket
  timeouts (``SOCKET_TIMEOUT``).  Cancelled mid-reply, a connection is torn down and must be
  made again under the next call's deadline: on a loaded machine that connect never fits in
  50 ms, and Redis stayed unusable while it was merely slow.

``CircuitBreaker`` is pure (the caller passes the time); ``Guard`` runs the calls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis

from meridian.log import get_logger

log = get_logger("cache")

T = TypeVar("T")


class CircuitBreaker:
    """Consecutive-failure breaker with a single probe after each cool-down.

    ``allow`` is False while open; once the cool-down has passed, the first caller is let
    through as a probe (and the window restarts, so concurrent callers keep skipping).
    """

    __slots__ = ("_failures", "_open", "_until", "cooldown", "threshold")

    def __init__(self, threshold: int = 3, cooldown: float = 5.0) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._failures = 0
        self._open = False
        self._until = 0.0

    @property
    def is_open(self) -> bool:
        return self._open

    def allow(self, now: float) -> bool:
        if not self._open:
            return True
        if now < self._until:
            return False
        self._until = now + self.cooldown  # this caller is the probe
        return True

    def record_success(self) -> bool:
        """Returns True when this success closes an open breaker."""
        self._failures = 0
        if self._open:
            self._open = False
            return True
        return False

    def record_failure(self, now: float) -> bool:
        """Returns True when this failure opens the breaker (not when a probe fails again)."""
        self._failures += 1
        if self._open:
            self._until = now + self.cooldown
            return False
        if self._failures >= self.threshold:
            self._open = True
            self._until = now + self.cooldown
            return True
        return False


#: The socket timeouts (connect, each reply) of a guarded connection: how long a call its
#: caller stopped waiting for may still take to finish in the background, and when a call with
#: a long deadline (a purge) takes Redis for stalled.  Five times the default deadline: enough
#: for a connect on a loaded machine (Redis itself answers in well under a millisecond), and
#: what an admin call during a stall costs (a purge then answers "queued" after it).
SOCKET_TIMEOUT: Final = 0.25

#: Calls still running past their deadline, at most (then new calls fail at once, as timeouts).
BACKGROUND_LIMIT: Final = 64


class Backlogged(TimeoutError):
    """Too many earlier calls are still running past their deadline."""


class Unhurried:
    """Waits for calls up to a deadline without cancelling them (see the module docstring).

    A call past its deadline runs on in the background, at most ``limit`` of them; its result
    is dropped, its error read (and forgotten).  ``aclose`` cancels the stragglers.
    """

    __slots__ = ("_running", "limit")

    def __init__(self, limit: int = BACKGROUND_LIMIT) -> None:
        self.limit = limit
        self._running: set[asyncio.Future[Any]] = set()

    @property
    def running(self) -> int:
        """Calls started and not finished (also those whose caller still waits)."""
        return len(self._running)

    async def wait(self, call: Awaitable[T], deadline: float) -> T:
        """``call``'s result, or TimeoutError after ``deadline`` seconds (the call goes on)."""
        if len(self._running) >= self.limit:
            if asyncio.iscoroutine(call):
                call.close()  # never started: not "never awaited" either
            raise Backlogged(f"{len(self._running)} earlier Redis calls still running")
        task = asyncio.ensure_future(call)
        self._running.add(task)
        task.add_done_callback(self._finished)
        async with asyncio.timeout(deadline):
            return await asyncio.shield(task)

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled():
            task.exception()  # read, so a straggler's error is not reported as never retrieved

    async def aclose(self) -> None:
        stragglers = list(self._running)
        for task in stragglers:
            task.cancel()
        await asyncio.gather(*stragglers, return_exceptions=True)


class Skipped:
    """What ``Guard.call`` returns when Redis was skipped or failed (``SKIPPED``)."""


SKIPPED: Final = Skipped()


class Guard:
    """Runs Redis operations under a deadline and the breaker; see the module docstring."""

    def __init__(
        self,
        timeout: float,
        *,
        breaker: CircuitBreaker | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.timeout = timeout
        self.breaker = breaker or CircuitBreaker()
        self._monotonic = monotonic  # breaker cool-downs
        self.on_error = on_error
        self.unhurried = Unhurried()

    async def call(
        self,
        op: str,
        make: Callable[[], Awaitable[T]],
        deadline: float | None = None,
        *,
        force: bool = False,
    ) -> T | Skipped:
        """Run one Redis operation within ``deadline`` seconds (default: the per-call timeout),
        unless the breaker is open (``force``: even then, as a probe: a retried purge must
        not wait out every cool-down); any failure is counted and becomes ``SKIPPED``."""
        if not self.breaker.allow(self._monotonic()) and not force:
            return SKIPPED
        try:
            result = await self.unhurried.wait(
                make(), deadline if deadline is not None else self.timeout
            )
        except Exception as exc:  # Redis trouble of any kind must never fail a request
            self._failure(op, exc)
            return SKIPPED
        if self.breaker.record_success():
            log.info("redis_recovered", op=op)
        return result

    def _failure(self, op: str, exc: BaseException) -> None:
        reason = error_reason(exc)
        if self.on_error is not None:
            self.on_error(reason)
        if self.breaker.record_failure(self._monotonic()):
            log.warning(
                "redis_unavailable",
                op=op,
                reason=reason,
                error=str(exc) or type(exc).__name__,
                skip_for=self.breaker.cooldown,
            )


def count(result: int | Skipped) -> int:
    """A count a guarded call returned, 0 when it was skipped."""
    return 0 if isinstance(result, Skipped) else result


def error_reason(exc: BaseException) -> str:
    """The ``reason`` label of a failed Redis call."""
    if isinstance(exc, TimeoutError | aioredis.TimeoutError):
        return "timeout"
    if isinstance(exc, OSError | aioredis.ConnectionError):
        return "connection"
    return "error"


__all__ = [
    "BACKGROUND_LIMIT",
    "SKIPPED",
    "SOCKET_TIMEOUT",
    "Backlogged",
    "CircuitBreaker",
    "Guard",
    "Skipped",
    "Unhurried",
    "count",
    "error_reason",
]
