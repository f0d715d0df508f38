"""Upstreams: which backend gets an attempt, whether a failed attempt is retried, and the pools.

The policy half is pure and synchronous (tested without sockets):

* ``pick_backend`` -- least outstanding requests with the power of two choices: sample two
  untried candidates, take the one with fewer requests in flight from this process.
* ``next_attempt`` -- the failover walk: each region in order gets one attempt and one retry on
  another backend, at most ``MAX_ATTEMPTS`` in all; the caller also stops at its deadline.
* ``retry_allowed`` -- only methods the service lists (GET and HEAD by default), only
  requests without a body (bodies are streamed, not kept, so they cannot be replayed), and
  only failures before any response byte: connect errors, resets, first-byte timeouts.

The I/O half, ``UpstreamPool``, is one aiohttp ``ClientSession`` per process with automatic
decompression off and a keep-alive pool bounded per backend (``limit_per_host``: the key is
host and port, so every backend URL gets its own bound).  It maps aiohttp's errors onto
``UpstreamFailure`` at the boundary.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterable, Iterable, Mapping, Sequence
from enum import Enum
from typing import NamedTuple, Protocol

import aiohttp
from aiohttp.typedefs import LooseHeaders
from multidict import CIMultiDict
from yarl import URL

from meridian.config import EdgeTimeouts

#: Attempts per request, all regions together.
MAX_ATTEMPTS = 4
#: Attempts in one region before moving to the next (one try, one retry on another backend).
ATTEMPTS_PER_REGION = 2


class HealthView(Protocol):
    """The part of ``meridian.health.HealthSnapshot`` the edge reads per request."""

    def region_up(self, name: str) -> bool: ...

    def ejected_only(self, name: str) -> bool: ...

    def usable_backends(self, region: str) -> tuple[str, ...]: ...


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

    @property
    def status(self) -> int:
        return 504 if self is FailureKind.TIMEOUT else 502


class UpstreamFailure(Exception):
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
    del failure  # every UpstreamFailure happened before a response head arrived
    return method in retry_methods and not has_body


# --------------------------------------------------------------------------------------------
# I/O


#: Upstream URLs parsed, by backend + target (bounded: yarl takes microseconds per parse).
URL_MEMO_SIZE = 4096


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


class UpstreamPool:
    """One aiohttp session for the process; counts requests in flight per backend."""

    def __init__(self, *, pool_size: int, timeouts: EdgeTimeouts) -> None:
        self.pool_size = pool_size
        self.timeouts = timeouts
        #: Requests in flight per backend URL: the load signal for ``pick_backend``.
        self.outstanding: dict[str, int] = {}
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.connect,
            sock_connect=timeouts.connect,
            # Per read: bounds the wait for the first byte and every later stall.
            sock_read=timeouts.first_byte,
        )

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=self.pool_size,
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

    def acquire(self, backend: str) -> None:
        self.outstanding[backend] = self.outstanding.get(backend, 0) + 1

    def release(self, backend: str) -> None:
        self.outstanding[backend] = self.outstanding.get(backend, 1) - 1

    async def send(
        self,
        backend: str,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | None,
    ) -> aiohttp.ClientResponse:
        """Send one attempt and return once the response head is in; raises UpstreamFailure.

        ``headers``: from ``upstream_headers`` (aiohttp copies them, they stay as they are)."""
        assert self._session is not None, "UpstreamPool.start() was not awaited"
        text = backend + target
        url = self._urls.get(text)
        if url is None:
            if len(self._urls) >= URL_MEMO_SIZE:
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
            raise UpstreamFailure(FailureKind.CONNECT, str(exc.os_error or exc)) from None
        except aiohttp.ClientResponseError as exc:
            raise UpstreamFailure(FailureKind.PROTOCOL, exc.message) from None
        except (aiohttp.ClientError, ConnectionError, OSError) as exc:
            raise UpstreamFailure(FailureKind.RESET, type(exc).__name__ + ": " + str(exc)) from None
        except TimeoutError:
            raise UpstreamFailure(FailureKind.TIMEOUT, "first byte timeout") from None
