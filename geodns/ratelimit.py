"""Response rate limiting against reflection (BIND's RRL, simplified to per-prefix buckets).

Each client prefix (/24 for IPv4, /56 for IPv6 by default) has a token bucket of
``responses_per_second`` tokens refilled continuously, one second of burst.  Over the limit a
response is dropped, except every ``slip``-th, which is sent truncated so that a real client
behind the prefix retries over TCP (which is never limited) while a spoofed victim gets nothing
bigger than the query.  Pure: the caller passes ``now``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum

from meridian.config import RateLimitConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Verdict(StrEnum):
    SEND = "send"
    DROP = "drop"
    SLIP = "slip"


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    limited: int = 0


class ResponseRateLimiter:
    def __init__(self, config: RateLimitConfig, max_prefixes: int = 100_000) -> None:
        self.config = config
        self.rate = float(config.responses_per_second)
        self.max_prefixes = max_prefixes
        self._v4_shift = 32 - config.ipv4_prefix
        self._v6_shift = 128 - config.ipv6_prefix
        self._buckets: dict[tuple[int, int], _Bucket] = {}

    def prefix_of(self, client: IPAddress) -> tuple[int, int]:
        if client.version == 4:
            return 4, int(client) >> self._v4_shift
        return 6, int(client) >> self._v6_shift

    def check(self, client: IPAddress, now: float) -> Verdict:
        if not self.config.enabled:
            return Verdict.SEND
        return self.check_prefix(self.prefix_of(client), now)

    def check_prefix(self, key: tuple[int, int], now: float) -> Verdict:
        """:meth:`check` for a prefix from :meth:`prefix_of` (callers may cache it per sender)."""
        if not self.config.enabled:
            return Verdict.SEND
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_prefixes:
                self._forget_idle(now)
            bucket = self._buckets[key] = _Bucket(self.rate, now)
        else:
            elapsed = now - bucket.updated
            if elapsed > 0.0:
                tokens = bucket.tokens + elapsed * self.rate
                bucket.tokens = tokens if tokens < self.rate else self.rate
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return Verdict.SEND
        bucket.limited += 1
        slip = self.config.slip
        if slip > 0 and bucket.limited % slip == 0:
            return Verdict.SLIP
        return Verdict.DROP

    def _forget_idle(self, now: float) -> None:
        # A bucket idle for a second is full again: forgetting it changes nothing.
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.updated < 1.0}
        if len(self._buckets) >= self.max_prefixes:
            self._buckets.clear()  # a flood of distinct prefixes: start afresh
