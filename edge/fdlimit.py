"""File descriptors at the edge: a reserve kept for the edge's own connections, and a voice
when the limit is reached.

At ``RLIMIT_NOFILE`` the event loop (libuv, under uvloop) accepts each new connection on a
spare descriptor and closes it at once: the client sees a reset, nothing is logged, and the
edge's own upstream connections and health checks fail with EMFILE, which used to mark every
backend down.  So:

* ``FdBudget`` -- client connections stop at ``limit - reserve`` (nginx's
  ``worker_connections``): one more is closed at once, counted and logged, and the reserve
  stays free for upstream connections, health checks, Redis and the admin listener.
* ``fd_exhausted`` -- a probe (one ``dup`` and one ``close``) run once a second by the
  connection sweep: when it fails with EMFILE/ENFILE the loop is dropping connections
  silently, so the edge says so.
* ``Throttle`` -- one log line per event kind per ``interval`` at most, carrying how many
  times the event happened since the last line (a flood must not become a log flood).

``Throttle`` and ``FdBudget`` are pure (the clock is passed in).
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: Descriptors kept free for the edge's own use: a tenth of the limit, within these bounds.
RESERVE_MIN = 64
RESERVE_MAX = 1024
#: Seconds between two log lines about the same thing.
LOG_INTERVAL = 10.0
#: errno values of a process (or system) out of descriptors.
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE})


@dataclass(frozen=True, slots=True)
class FdBudget:
    """How many client connections one process may hold."""

    #: The soft ``RLIMIT_NOFILE`` (0: unlimited as far as we know).
    limit: int
    reserve: int

    @classmethod
    def of_limit(cls, limit: int) -> FdBudget:
        if limit <= 0:
            return cls(0, 0)
        reserve = min(RESERVE_MAX, max(RESERVE_MIN, limit // 10))
        # A tiny limit still leaves half for clients (a test, or a badly set up host).
        return cls(limit, min(reserve, limit // 2))

    @classmethod
    def current(cls) -> FdBudget:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return cls.of_limit(0 if soft == resource.RLIM_INFINITY else soft)

    @property
    def max_connections(self) -> int:
        """Client connections allowed at once (0: no bound)."""
        return self.limit - self.reserve if self.limit else 0

    def admits(self, open_connections: int) -> bool:
        cap = self.max_connections
        return cap == 0 or open_connections < cap


class Throttle:
    """At most one report per ``interval`` seconds; ``note`` returns how many events the
    report covers (this one included), or 0 while it is held back."""

    __slots__ = ("_held", "_next", "interval")

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._next = float("-inf")
        self._held = 0

    def note(self, now: float) -> int:
        self._held += 1
        if now < self._next:
            return 0
        count, self._held = self._held, 0
        self._next = now + self.interval
        return count


def fd_exhausted(probe_fd: int) -> bool:
    """Whether this process is out of descriptors right now (a ``dup`` of ``probe_fd`` fails
    with EMFILE or ENFILE)."""
    try:
        copy = os.dup(probe_fd)
    except OSError as exc:
        return exc.errno in EXHAUSTED
    os.close(copy)
    return False


class ResourceStats(Collector):
    """``meridian_edge_connections_refused_total{reason}``,
    ``meridian_edge_fd_exhausted_total`` (probes that found the process out of descriptors:
    the loop was dropping new connections) and ``meridian_edge_fd_limit``."""

    def __init__(self, budget: FdBudget) -> None:
        self.budget = budget
        self.refused: dict[str, int] = {}
        self.exhausted = 0

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def collect(self) -> Iterable[Metric]:
        refused = CounterMetricFamily(
            "meridian_edge_connections_refused",
            "Client connections closed on arrival, by reason (fd_reserve: the descriptors "
            "left are kept for upstream connections and health checks).",
            labels=["reason"],
        )
        for reason, value in sorted(self.refused.items()):
            refused.add_metric([reason], value)
        yield refused
        yield CounterMetricFamily(
            "meridian_edge_fd_exhausted",
            "Probes that found the process out of file descriptors (new connections were "
            "being closed by the event loop).",
            value=self.exhausted,
        )
        limits = GaugeMetricFamily(
            "meridian_edge_fd_limit",
            "The soft RLIMIT_NOFILE (kind=nofile) and the client connections it allows "
            "(kind=connections); 0: unbounded.",
            labels=["kind"],
        )
        limits.add_metric(["nofile"], self.budget.limit)
        limits.add_metric(["connections"], self.budget.max_connections)
        yield limits

    def describe(self) -> Iterable[Metric]:
        return []
