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
from collections.abc import AsyncIterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import aiohttp
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

    def usable_backends(self, region: str) -> tuple[str, ...]: ...


@dataclass(frozen=True, slots=True)
class Attempt:
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
    return tuple(name for name in regions if health.region_up(name))


def pick_backend(
    candidates: Sequence[str],
    outstanding: Mapping[str, int],
    rng: random.Random,
    exclude: frozenset[str] = frozenset(),
) -> str | None:
    """Power of two choices over least outstanding requests; None when nothing is left."""
    pool = [b for b in candidates if b not in exclude] if exclude else list(candidates)
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


def _header_text(value: bytes) -> str:
    # aiohttp writes header text as UTF-8: valid UTF-8 round-trips exactly; other bytes cannot.
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


class UpstreamPool:
    """One aiohttp session for the process; counts requests in flight per backend."""

    def __init__(self, *, pool_size: int, timeouts: EdgeTimeouts) -> None:
        self.pool_size = pool_size
        self.timeouts = timeouts
        #: Requests in flight per backend URL: the load signal for ``pick_backend``.
        self.outstanding: dict[str, int] = {}
        self._session: aiohttp.ClientSession | None = None
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
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            raise_for_status=False,
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
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | None,
    ) -> aiohttp.ClientResponse:
        """Send one attempt and return once the response head is in; raises UpstreamFailure."""
        assert self._session is not None, "UpstreamPool.start() was not awaited"
        url = URL(backend + target, encoded=True)
        sent = CIMultiDict((name.decode("latin-1"), _header_text(value)) for name, value in headers)
        try:
            return await self._session.request(
                method,
                url,
                headers=sent,
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
