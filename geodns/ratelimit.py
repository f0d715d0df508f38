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


#: What one answer is expected to cost at most on the fast path when computed for the first
#: time (a new place: locate, select, render; memo hits and pre-rendered answers cost ~5-20 us).
#: A prefix may spend ``responses_per_second`` times this per second on computing answers.
COST_PER_RESPONSE = 125e-6


class ComputeBudget:
    """Cost accounting before an answer is built (dnsdist decides on the question and the
    client's network before any work; BIND's RRL only after).

    Each client prefix (the rate limiter's) has a budget of computing time: ``rate`` seconds
    per second, one second of burst.  The caller asks :meth:`check_prefix` before computing an
    answer and reports what computing took with :meth:`charge`; the balance may go negative by
    one answer's cost, and a prefix in debt gets nothing computed (dropped, or every ``slip``-th
    a TC reply built from the query alone) until time has paid the debt.  So a flood of
    questions that take the strict path (EDNS options other than ECS, BADVERS, odd sections)
    from one network costs at most ``rate`` of a core, whatever their rate; memoized and
    pre-rendered answers cost microseconds and are left to the response rate limit.  Over TCP
    (no spoofing, no slip) the caller waits :meth:`wait` before reading on.  Pure: the caller
    passes ``now``."""

    def __init__(
        self, config: RateLimitConfig, rate: float | None = None, max_prefixes: int = 100_000
    ) -> None:
        self.enabled = config.enabled
        self.rate = rate if rate is not None else config.responses_per_second * COST_PER_RESPONSE
        self.slip = config.slip
        self.max_prefixes = max_prefixes
        self._buckets: dict[tuple[int, int], _Bucket] = {}

    def _bucket(self, key: tuple[int, int], now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_prefixes:
                self._forget_idle(now)
            bucket = self._buckets[key] = _Bucket(self.rate, now)
            return bucket
        elapsed = now - bucket.updated
        if elapsed > 0.0:
            tokens = bucket.tokens + elapsed * self.rate
            bucket.tokens = tokens if tokens < self.rate else self.rate
            bucket.updated = now
        return bucket

    def check_prefix(self, key: tuple[int, int], now: float) -> Verdict:
        """May an answer be computed for this prefix now?"""
        if not self.enabled:
            return Verdict.SEND
        bucket = self._bucket(key, now)
        if bucket.tokens > 0.0:
            return Verdict.SEND
        bucket.limited += 1
        if self.slip > 0 and bucket.limited % self.slip == 0:
            return Verdict.SLIP
        return Verdict.DROP

    def charge(self, key: tuple[int, int], seconds: float, now: float) -> None:
        """Debit what computing an answer for this prefix took."""
        if self.enabled:
            self._bucket(key, now).tokens -= seconds

    def wait(self, key: tuple[int, int], now: float) -> float:
        """Seconds until this prefix may have an answer computed again (0: now)."""
        if not self.enabled:
            return 0.0
        tokens = self._bucket(key, now).tokens
        return 0.0 if tokens > 0.0 else (-tokens / self.rate if self.rate > 0 else 1.0) + 1e-4

    def _forget_idle(self, now: float) -> None:
        # Idle for a second: a debt of one answer's cost (well under ``rate``) is paid by then.
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.updated < 1.0}
        if len(self._buckets) >= self.max_prefixes:
            self._buckets.clear()
