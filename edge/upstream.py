"""Upstreams: which backend gets an attempt, whether a failed attempt is retried, and the pools.

The policy half is pure and synchronous (tested without sockets):

* ``pick_backend`` -- least outstanding requests with the power of two choices: sample two
  untried candidates, take the one with fewer requests in flight from this process.
* ``next_attempt`` -- the failover walk: each region in order gets one attempt and one retry on
  another backend, at most ``MAX_ATTEMPTS`` in all; the caller also stops at its deadline.
* ``retry_allowed`` -- only methods the service lists (GET and HEAD by default), only
  requests whose body can be sent again (none, or one the edge buffered whole; a streamed
  body is not kept), and only failures before any response byte: connect errors, resets,
  first-byte timeouts.  A request that never got a connection (the backend's pool was full)
  may always move on: nothing of it was sent.
* ``FailureKind.blames_backend`` -- which failures are evidence against the backend (fed to
  passive health) and which are the edge's own: a wait for a pool slot, a local resource
  error (EMFILE, ENFILE, ENOBUFS: the edge is out of descriptors or buffers, not the
  backend), an attempt the edge abandoned because the backend left rotation.

The I/O half, ``UpstreamPool``, is the edge's own HTTP/1.1 client (``edge.upstream_client``
over ``edge.upstream_wire``: keep-alive pools, timeouts, backpressure) and a bound of
``pool_size`` requests in flight per backend kept here (``try_acquire``/``wait_for_slot``/
``release``), outside the connect timeout: a wait for a slot counted as connect time made a
full pool look like a backend that does not accept connections, and slow uploads holding the
slots got healthy backends ejected.  It maps the client's errors onto ``UpstreamFailure``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections import deque
from collections.abc import AsyncIterable, Callable, Coroutine, Iterable, Mapping, Sequence
from enum import Enum
from typing import NamedTuple, Protocol

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from edge.errors import EdgeError
from edge.upstream_client import ClientLimits, OriginClient, UpstreamError
from edge.upstream_client import OriginResponse as OriginResponse
from edge.upstream_wire import UpstreamBodyError
from meridian.config import EdgeTimeouts, EdgeUpstream
from meridian.health.checks import is_local_error
from meridian.origin_tls import client_context

#: Attempts per request, all regions together.
MAX_ATTEMPTS = 4
#: Attempts in one region before moving to the next (one try, one retry on another backend).
ATTEMPTS_PER_REGION = 2


class HealthView(Protocol):
    """The part of ``meridian.health.HealthSnapshot`` the edge reads per request."""

    def region_up(self, name: str) -> bool: ...

    def ejected_only(self, name: str) -> bool: ...

    def usable_backends(self, region: str) -> tuple[str, ...]: ...


class SnapshotView(HealthView, Protocol):
    """A whole health snapshot, as ``Pipeline.on_health`` receives it."""

    def backend_up(self, url: str) -> bool: ...


class Attempt(NamedTuple):
    """One try of a request on one backend (a NamedTuple: one is made per request)."""

    region: str
    backend: str


class FailureKind(Enum):
    CONNECT = "connect"
    RESET = "reset"
    TIMEOUT = "timeout"
    #: The upstream answered something that is not HTTP.
    PROTOCOL = "protocol"
    #: No slot in the backend's pool within the connect timeout: the edge's own limit.
    POOL = "pool"
    #: The edge ran out of a local resource (descriptors, buffers, ports) connecting.
    LOCAL = "local"
    #: The edge gave up waiting because the backend left rotation meanwhile.
    ABANDONED = "abandoned"

    @property
    def status(self) -> int:
        if self is FailureKind.TIMEOUT:
            return 504
        if self is FailureKind.POOL or self is FailureKind.LOCAL:
            return 503
        return 502

    @property
    def blames_backend(self) -> bool:
        """Whether this failure is evidence against the backend (a passive health report)."""
        return self in _BACKEND_FAULTS

    @property
    def sent(self) -> bool:
        """Whether any of the request may have reached the backend: not when no connection
        was had (a full pool, a failed connect): the client sends nothing before it has one."""
        return self not in _NOTHING_SENT


_NOTHING_SENT = frozenset({FailureKind.POOL, FailureKind.CONNECT, FailureKind.LOCAL})
_BACKEND_FAULTS = frozenset(
    {FailureKind.CONNECT, FailureKind.RESET, FailureKind.TIMEOUT, FailureKind.PROTOCOL}
)


#: What reading an upstream response's body may raise: the errors the stages catch at this
#: boundary and turn into an edge answer.
UPSTREAM_BODY_ERRORS: tuple[type[Exception], ...] = (
    UpstreamBodyError,
    ConnectionError,
    OSError,
    TimeoutError,
)


class UpstreamFailure(EdgeError):
    """An attempt that produced no response head."""

    def __init__(self, kind: FailureKind, detail: str) -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail


# --------------------------------------------------------------------------------------------
# Policy


def live_regions(regions: Sequence[str], health: HealthView) -> tuple[str, ...]:
    """The regions to try, in order: those up; when none is, those down only because traffic
    ejected their backends.  An ejection is a guess from a few failed requests, an active
    check's verdict is not: when every region is ejected, sending traffic anyway (panic, as
    Envoy does) beats answering 503 until the ejections time out."""
    live = tuple(name for name in regions if health.region_up(name))
    if live:
        return live
    return tuple(name for name in regions if health.ejected_only(name))


def pick_backend(
    candidates: Sequence[str],
    outstanding: Mapping[str, int],
    rng: random.Random,
    exclude: frozenset[str] = frozenset(),
) -> str | None:
    """Power of two choices over least outstanding requests; None when nothing is left."""
    pool = [b for b in candidates if b not in exclude] if exclude else candidates
    if not pool:
        return None
    if len(pool) == 1:
        return pool[0]
    first, second = rng.sample(pool, 2)
    return first if outstanding.get(first, 0) <= outstanding.get(second, 0) else second


def next_attempt(
    regions: Sequence[str],
    health: HealthView,
    tried: Sequence[Attempt],
    outstanding: Mapping[str, int],
    rng: random.Random,
) -> Attempt | None:
    """The next attempt of the failover walk, or None when it is exhausted."""
    if not tried:  # the first attempt (nearly every request): the first region with a backend
        for region in regions:
            backend = pick_backend(health.usable_backends(region), outstanding, rng)
            if backend is not None:
                return Attempt(region, backend)
        return None
    if len(tried) >= MAX_ATTEMPTS or not regions:
        return None
    used = frozenset(a.backend for a in tried)
    start = regions.index(tried[-1].region) if tried and tried[-1].region in regions else 0
    for index in range(start, len(regions)):
        region = regions[index]
        if sum(1 for a in tried if a.region == region) >= ATTEMPTS_PER_REGION:
            continue
        backend = pick_backend(health.usable_backends(region), outstanding, rng, used)
        if backend is not None:
            return Attempt(region, backend)
    return None


def retry_allowed(
    method: str, retry_methods: frozenset[str], has_body: bool, failure: FailureKind
) -> bool:
    """Whether the walk may go on after ``failure``.  ``has_body``: the request has a body
    that cannot be sent again (streamed).  Every ``UpstreamFailure`` happened before a response
    head arrived; one that sent nothing (a full pool) may move on whatever the method."""
    if not failure.sent:
        return True
    return method in retry_methods and not has_body


# --------------------------------------------------------------------------------------------
# I/O


def upstream_headers(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Header lines (lower-case names, raw values) as they go upstream, in order: bytes as the
    client sent them, never decoded (``upstream_wire.header_block``).  Content-Length is left
    out: the client writes the framing of the body it actually sends."""
    # ``header_block``'s format, filtered in the same pass (no list of the lines kept).
    return b"".join([b"%s: %s\r\n" % line for line in headers if line[0] != b"content-length"])


class Gate:
    """A counting gate with FIFO waiters (what ``asyncio.Semaphore`` is, plus a bounded wait
    that tells a timeout apart, and a hand-over that keeps the count when a waiter is woken).
    Synchronous on the fast path: ``try_take`` costs a comparison when a slot is free."""

    __slots__ = ("busy", "limit", "waiters")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    def try_take(self) -> bool:
        if self.busy < self.limit and not self.waiters:
            self.busy += 1
            return True
        return False

    async def wait(self, within: float) -> bool:
        """Wait up to ``within`` seconds for a place; False when none came in time."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(within):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.give_back()  # granted as we gave up: pass the place on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):  # give_back skips it anyway
                    self.waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                return False
            raise
        return True

    def resize(self, limit: int) -> None:
        """A new limit (a reload); a raised one lets waiters in at once."""
        self.limit = limit
        while self.waiters and self.busy < limit:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.busy += 1
                waiter.set_result(None)

    def give_back(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the place changes hands: ``busy`` stays
                return
        self.busy = max(0, self.busy - 1)


def _limits(pool_size: int, timeouts: EdgeTimeouts, settings: EdgeUpstream) -> ClientLimits:
    return ClientLimits(
        connect=timeouts.connect,
        first_byte=timeouts.first_byte,
        read_idle=settings.read_timeout,
        idle_timeout=timeouts.upstream_idle,
        # Idle connections up to the peak in flight: fewer, and a burst that ends closes
        # connections the next burst must open again.
        max_idle=pool_size if settings.max_idle is None else settings.max_idle,
        max_requests=settings.max_requests,
    )


def _tls_factory(settings: EdgeUpstream, source: str) -> Callable[[], ssl.SSLContext]:
    tls = settings.tls
    return lambda: client_context(tls, source)


class UpstreamMetrics(Collector):
    """The upstream client's numbers, read at scrape time (plain counters on the request path):
    connections open, created and reused per backend, connect and first-byte latency per
    backend (sum and count), and requests that waited for a pool slot."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    def collect(self) -> Iterable[Metric]:
        stats = self.pool.client.stats
        families: list[Metric] = []
        for name, text, table in (
            ("open", "Upstream connections open, per backend.", stats.open),
            ("created", "Upstream connections made, per backend.", stats.created),
            ("reused", "Requests sent on a kept-alive connection, per backend.", stats.reused),
            ("resumed", "TLS connections that resumed a session, per backend.", stats.resumed),
            (
                "stale",
                "Kept-alive connections found closed as a request went out, per backend.",
                stats.stale,
            ),
        ):
            family: Metric
            if name == "open":
                family = GaugeMetricFamily(
                    "meridian_edge_upstream_connections_open", text, labels=["backend"]
                )
            else:
                family = CounterMetricFamily(
                    f"meridian_edge_upstream_connections_{name}", text, labels=["backend"]
                )
            for backend, value in sorted(table.items()):
                family.add_metric([backend], value)
            families.append(family)
        for name, text, pairs in (
            ("connect", "Time to connect to a backend.", stats.connect_seconds),
            ("first_byte", "Request sent to response head, per backend.", stats.first_byte_seconds),
        ):
            summary = SummaryMetricFamily(
                f"meridian_edge_upstream_{name}_seconds", text, labels=["backend"]
            )
            for backend, (total, count) in sorted(pairs.items()):
                summary.add_metric([backend], count_value=int(count), sum_value=total)
            families.append(summary)
        waits = CounterMetricFamily(
            "meridian_edge_upstream_pool_waits",
            "Requests that found every connection of a backend busy and waited for one.",
            labels=["backend"],
        )
        for backend, value in sorted(self.pool.pool_waits.items()):
            waits.add_metric([backend], value)
        families.append(waits)
        return families

    def describe(self) -> Iterable[Metric]:
        return []


class UpstreamPool:
    """The process's upstream client (``edge.upstream_client``); bounds and counts requests in
    flight per backend.

    A request takes a slot (``try_acquire``, else ``wait_for_slot``) before it is sent and
    gives it back with ``release`` once its response is done with; a freed slot goes to the
    longest waiter.  A slot is a connection: connections open per backend never exceed
    ``pool_size``.  A request whose body is streamed (too large to buffer) holds its slot for
    as long as its client takes to send it, so those take at most half of a backend's slots
    (``streamed=True``): uploads trickling from slow clients cannot starve everyone else."""

    def __init__(
        self,
        *,
        pool_size: int,
        timeouts: EdgeTimeouts,
        settings: EdgeUpstream | None = None,
        source: str = "<memory>",
    ) -> None:
        """``source``: the config file (``edge.upstream.tls``'s relative paths start there)."""
        settings = settings or EdgeUpstream()
        self.pool_size = pool_size
        self.timeouts = timeouts
        self.settings = settings
        #: Requests in flight per backend URL, waiters for a slot included: the load signal
        #: for ``pick_backend``.
        self.outstanding: dict[str, int] = {}
        #: Requests that had to wait for a slot, per backend.
        self.pool_waits: dict[str, int] = {}
        self._slots: dict[str, Gate] = {}
        self._streams: dict[str, Gate] = {}
        #: The path each backend URL names (``Backend.prefix``), sent before request targets:
        #: one entry per backend, like ``_slots`` (targets themselves are encoded per request:
        #: nearly every miss has a target never seen, so a memo of them only cost).
        self._prefixes: dict[str, bytes] = {}
        self.client = OriginClient(
            _limits(pool_size, timeouts, settings),
            tls=_tls_factory(settings, source),
            failure=_failure,
        )

    def reconfigure(
        self, pool_size: int, timeouts: EdgeTimeouts, settings: EdgeUpstream, source: str
    ) -> None:
        """A reloaded config: limits and timeouts at once; changed TLS settings for the next
        connections (``OriginClient.reconfigure``); a new ``pool_size`` for every backend's
        slots (a raised one lets waiters in)."""
        tls_changed = settings.tls != self.settings.tls
        self.timeouts, self.settings = timeouts, settings
        self.client.reconfigure(
            _limits(pool_size, timeouts, settings),
            _tls_factory(settings, source) if tls_changed else None,
        )
        if pool_size != self.pool_size:
            self.pool_size = pool_size
            for gate in self._slots.values():
                gate.resize(pool_size)
            for gate in self._streams.values():
                gate.resize(max(1, pool_size // 2))

    async def start(self) -> None:
        self.client.start()

    async def close(self) -> None:
        await self.client.close()

    def _gate(self, backend: str) -> Gate:
        gate = self._slots.get(backend)
        if gate is None:
            gate = self._slots[backend] = Gate(self.pool_size)
        return gate

    def _stream_gate(self, backend: str) -> Gate:
        gate = self._streams.get(backend)
        if gate is None:
            gate = self._streams[backend] = Gate(max(1, self.pool_size // 2))
        return gate

    def try_acquire(self, backend: str, *, streamed: bool = False) -> bool:
        """Count a request for ``backend`` and take a slot if one is free (the usual case).
        False: the request is counted but must ``wait_for_slot``."""
        outstanding = self.outstanding
        outstanding[backend] = outstanding.get(backend, 0) + 1
        if streamed:
            return False  # rare: always through wait_for_slot (two gates)
        gate = self._slots.get(backend) or self._gate(backend)
        if gate.busy < gate.limit and not gate.waiters:  # Gate.try_take, inline
            gate.busy += 1
            return True
        return False

    async def wait_for_slot(self, backend: str, within: float, *, streamed: bool = False) -> None:
        """After ``try_acquire`` said False: wait up to ``within`` seconds for a slot (and,
        for a streamed body, a place in the streamed share).  Raises ``UpstreamFailure(POOL)``
        (the request is then no longer counted) when none came."""
        self.pool_waits[backend] = self.pool_waits.get(backend, 0) + 1
        try:
            if streamed:
                stream = self._stream_gate(backend)
                if not stream.try_take() and not await stream.wait(within):
                    raise UpstreamFailure(
                        FailureKind.POOL, f"no place for a streamed body within {within:g}s"
                    )
                try:
                    slots = self._gate(backend)
                    if not slots.try_take() and not await slots.wait(within):
                        raise UpstreamFailure(
                            FailureKind.POOL, f"no free connection within {within:g}s"
                        )
                except BaseException:
                    stream.give_back()
                    raise
            elif not await self._gate(backend).wait(within):
                raise UpstreamFailure(FailureKind.POOL, f"no free connection within {within:g}s")
        except BaseException:
            self.outstanding[backend] = self.outstanding.get(backend, 1) - 1
            raise

    def release(self, backend: str, *, streamed: bool = False) -> None:
        """The request that took a slot for ``backend`` is done with it."""
        outstanding = self.outstanding
        outstanding[backend] = outstanding.get(backend, 1) - 1
        gate = self._slots.get(backend)
        if gate is not None:
            if gate.waiters:
                gate.give_back()
            elif gate.busy > 0:  # Gate.give_back with nobody waiting, inline
                gate.busy -= 1
        if streamed:
            stream = self._streams.get(backend)
            if stream is not None:
                stream.give_back()

    def slots_in_use(self, backend: str) -> int:
        gate = self._slots.get(backend)
        return 0 if gate is None else gate.busy

    def send(
        self,
        backend: str,
        method: str,
        target: str,
        headers: bytes,
        body: bytes | AsyncIterable[bytes] | None,
        length: int | None = None,
        *,
        replayable: bool = False,
    ) -> Coroutine[object, object, OriginResponse]:
        """Send one attempt (awaited: the response once its head is in); raises
        UpstreamFailure.  The client's own coroutine, returned as it is: no frame of its own
        (the client maps its errors with ``_failure``).

        ``headers``: from ``upstream_headers``; ``length``: a streamed body's declared length
        (None: chunked); ``replayable``: may be sent again on a new connection when a
        kept-alive one turns out closed (``OriginClient.send``)."""
        prefix = self._prefixes.get(backend)
        if prefix is None:
            prefix = self._prefixes[backend] = self.client.pool(backend).backend.prefix
        sent = target.encode("latin-1")
        if prefix:
            sent = prefix + sent
        return self.client.send(backend, method, sent, headers, body, length, replayable=replayable)


def _failure(exc: UpstreamError) -> UpstreamFailure:
    """The client's error as the walk knows it (``OriginClient.failure``)."""
    kind = exc.kind
    if kind == "connect_os":
        kind = "local" if is_local_error(exc.__cause__) else "connect"
    return UpstreamFailure(FailureKind(kind), exc.detail)
