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

The I/O half, ``UpstreamPool``, is one aiohttp ``ClientSession`` per process with automatic
decompression off, and a bound of ``pool_size`` requests in flight per backend kept here
(``try_acquire``/``wait_for_slot``/``release``), not in aiohttp's connector: aiohttp counts
the wait for a slot inside its connect timeout, so a full pool looked like a backend that
does not accept connections, and slow uploads holding the slots got healthy backends ejected.
It maps aiohttp's errors onto ``UpstreamFailure`` at the boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import AsyncIterable, Iterable, Mapping, Sequence
from enum import Enum
from typing import NamedTuple, Protocol

import aiohttp
from aiohttp.typedefs import LooseHeaders
from multidict import CIMultiDict
from yarl import URL

from edge.errors import EdgeError
from edge.memos import UPSTREAM_URLS, BoundedMemo
from meridian.config import EdgeTimeouts
from meridian.health.checks import is_local_error

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
        """Whether any of the request may have reached the backend."""
        return self is not FailureKind.POOL


_BACKEND_FAULTS = frozenset(
    {FailureKind.CONNECT, FailureKind.RESET, FailureKind.TIMEOUT, FailureKind.PROTOCOL}
)


#: What reading an upstream response's body may raise (aiohttp's and the system's errors): the
#: foreign errors the stages catch at this boundary and turn into an edge answer.
UPSTREAM_BODY_ERRORS: tuple[type[Exception], ...] = (
    aiohttp.ClientError,
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


#: Upstream URLs parsed, by backend + target (bounded: yarl takes microseconds per parse).
URL_MEMO_SIZE = UPSTREAM_URLS.bound


def _header_text(value: bytes) -> str:
    # aiohttp writes header text as UTF-8: valid UTF-8 round-trips exactly; other bytes cannot.
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def upstream_headers(headers: Iterable[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    """Header lines (lower-case names, raw values) in the form aiohttp sends them, in order.

    A caller that sends the same lines again keeps this and sends ``copy()``s of it."""
    return CIMultiDict([(name.decode("latin-1"), _header_text(value)) for name, value in headers])


#: Every header aiohttp would add on its own: the edge sends what the client sent, no more.
SKIPPED_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_SKIPPED: CIMultiDict[None] = CIMultiDict((name, None) for name in sorted(SKIPPED_AUTO_HEADERS))


class UpstreamRequest(aiohttp.ClientRequest):
    """aiohttp's request without two per-request copies of the header lines (the session's
    ``request_class``).

    * ``update_auto_headers``: aiohttp builds a CIMultiDict of the skipped names and a copy of
      the headers extended with them, per request, to find which defaults to add.  The edge
      skips every default (``SKIPPED_AUTO_HEADERS``), so nothing is ever added: the names are
      only recorded (aiohttp reads them again for a body's Content-Type).
    * ``update_headers``: aiohttp copies the session's merge of the headers (itself a new
      CIMultiDict per request) into another, Host first.  With a Host line (every HTTP/1.1
      request) the merge is taken as it is, so the lines go out in the client's order;
      without one aiohttp's way adds Host from the URL.
    """

    def update_headers(self, headers: LooseHeaders | None) -> None:
        if type(headers) is CIMultiDict and "host" in headers:
            self.headers = headers
            return
        super().update_headers(headers)

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = _SKIPPED


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

    def give_back(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the place changes hands: ``busy`` stays
                return
        self.busy = max(0, self.busy - 1)


class UpstreamPool:
    """One aiohttp session for the process; bounds and counts requests in flight per backend.

    A request takes a slot (``try_acquire``, else ``wait_for_slot``) before it is sent and
    gives it back with ``release`` once its response is done with; a freed slot goes to the
    longest waiter.  A request whose body is streamed (too large to buffer) holds its slot for
    as long as its client takes to send it, so those take at most half of a backend's slots
    (``streamed=True``): uploads trickling from slow clients cannot starve everyone else."""

    def __init__(self, *, pool_size: int, timeouts: EdgeTimeouts) -> None:
        self.pool_size = pool_size
        self.timeouts = timeouts
        #: Requests in flight per backend URL, waiters for a slot included: the load signal
        #: for ``pick_backend``.
        self.outstanding: dict[str, int] = {}
        self._slots: dict[str, Gate] = {}
        self._streams: dict[str, Gate] = {}
        self._session: aiohttp.ClientSession | None = None
        #: ``edge.memos.UPSTREAM_URLS``.
        self._urls: BoundedMemo[str, URL] = BoundedMemo(UPSTREAM_URLS)
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.connect,
            sock_connect=timeouts.connect,
            # Per read: bounds the wait for the first byte and every later stall.
            sock_read=timeouts.first_byte,
        )

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            # The bound per backend is ours (``Gate``): aiohttp's would count the wait for a
            # slot as connect time.  Idle connections stay bounded by the peak in flight.
            limit=0,
            limit_per_host=0,
            keepalive_timeout=self.timeouts.upstream_idle,
            ttl_dns_cache=60,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=self._timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=SKIPPED_AUTO_HEADERS,
            raise_for_status=False,
            request_class=UpstreamRequest,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        self.outstanding[backend] = self.outstanding.get(backend, 0) + 1
        if streamed:
            return False  # rare: always through wait_for_slot (two gates)
        return self._gate(backend).try_take()

    async def wait_for_slot(self, backend: str, within: float, *, streamed: bool = False) -> None:
        """After ``try_acquire`` said False: wait up to ``within`` seconds for a slot (and,
        for a streamed body, a place in the streamed share).  Raises ``UpstreamFailure(POOL)``
        (the request is then no longer counted) when none came."""
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
        self.outstanding[backend] = self.outstanding.get(backend, 1) - 1
        gate = self._slots.get(backend)
        if gate is not None:
            gate.give_back()
        if streamed:
            stream = self._streams.get(backend)
            if stream is not None:
                stream.give_back()

    def slots_in_use(self, backend: str) -> int:
        gate = self._slots.get(backend)
        return 0 if gate is None else gate.busy

    async def send(
        self,
        backend: str,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
    ) -> aiohttp.ClientResponse:
        """Send one attempt and return once the response head is in; raises UpstreamFailure.

        ``headers``: from ``upstream_headers`` (aiohttp copies them, they stay as they are)."""
        assert self._session is not None, "UpstreamPool.start() was not awaited"
        text = backend + target
        url = self._urls.get(text)
        if url is None:
            if len(self._urls) >= self._urls.bound:
                self._urls.clear()  # bounded without bookkeeping: it refills with what is hot
            url = self._urls[text] = URL(text, encoded=True)
        try:
            return await self._session.request(
                method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                compress=None,
                auto_decompress=False,
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamFailure(FailureKind.CONNECT, f"connect timeout: {exc}") from None
        except aiohttp.ServerTimeoutError as exc:
            raise UpstreamFailure(FailureKind.TIMEOUT, f"first byte timeout: {exc}") from None
        except aiohttp.ClientConnectorError as exc:
            kind = FailureKind.LOCAL if is_local_error(exc) else FailureKind.CONNECT
            raise UpstreamFailure(kind, str(exc.os_error or exc)) from None
        except aiohttp.ClientResponseError as exc:
            raise UpstreamFailure(FailureKind.PROTOCOL, exc.message) from None
        except (aiohttp.ClientError, ConnectionError, OSError) as exc:
            kind = FailureKind.LOCAL if is_local_error(exc) else FailureKind.RESET
            raise UpstreamFailure(kind, type(exc).__name__ + ": " + str(exc)) from None
        except TimeoutError:
            raise UpstreamFailure(FailureKind.TIMEOUT, "first byte timeout") from None
