"""Rate limits shared by a POP's instances (``shared: true``): one Lua script per decision in
the POP's Redis (``edge.cache``'s ``redis_*``: one server, Sentinel or Cluster).

The script is ``edge.ratelimit``'s GCRA on Redis's own clock (``TIME`` inside the script, so
instances whose clocks disagree still agree on one budget); a key's theoretical arrival time
is one string value that expires when its burst is back.  Keys are hash-tagged
(``meridian:rl:{<limit>:<key>}``) so a Cluster keeps each in one slot.

Every call has ``edge.cache.redis_timeout`` (a late one still finishes, see ``redis_guard``);
after three failures in a row a breaker skips
Redis for five seconds (then one probe).  While Redis is slow, gone or skipped, the limit is
decided by its local table instead (``Gcra``, per instance: each instance allows the whole
rate, so the POP's budget is multiplied by its instances, never unlimited), counted in
``meridian_edge_rate_limit_fallbacks_total{limit,reason}`` and logged at most once per
``LOG_INTERVAL``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Hashable
from typing import Any, Final

from redis.exceptions import NoScriptError, RedisError

from edge.cache.redis_guard import SOCKET_TIMEOUT, CircuitBreaker, Unhurried
from edge.fdlimit import Throttle
from edge.http1 import Headers
from edge.ratelimit import LimitRule, RateLimits, Refusal
from meridian.log import get_logger
from meridian.redis_conn import RedisConnection, RedisTarget

log = get_logger("edge")

#: GCRA in one atomic step.  KEYS[1]: the key's TAT; ARGV: interval, span (seconds).
#: Returns {admitted 1/0, seconds to wait, seconds the TAT is ahead of now} (as strings:
#: Lua numbers come back truncated to integers).
SCRIPT: Final = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local interval = tonumber(ARGV[1])
local span = tonumber(ARGV[2])
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then
  tat = math.max(tonumber(stored) or now, now)
end
local after = tat + interval
local wait = after - now - span
if wait > 1e-9 then
  return {0, string.format('%.6f', wait), string.format('%.6f', tat - now)}
end
redis.call('SET', KEYS[1], string.format('%.6f', after), 'PX', math.ceil((after - now) * 1000) + 1)
return {1, '0', string.format('%.6f', after - now)}
"""


def redis_key(limit: str, key: Hashable) -> str:
    """The Redis key of ``key`` under ``limit``, hash-tagged whole (one slot per key)."""
    if isinstance(key, int):
        part = f"n{key:x}"
    elif isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], bytes):
        head, value = key
        part = "h" + value.hex() if head == b"h" else f"n{head:x}:" + value.hex()
    else:
        raise TypeError(f"not a rate limit key: {key!r}")
    return f"meridian:rl:{{{limit}:{part}}}"


class SharedLimits:
    """Decides the shared limits of one worker through Redis, locally when it cannot."""

    def __init__(self, target: RedisTarget, *, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self.breaker = CircuitBreaker()
        self._unhurried = Unhurried()  # a late call finishes: its connection stays usable
        #: (limit, reason) -> decisions made locally instead of in Redis.
        self.fallbacks: dict[tuple[str, str], int] = {}
        self._connection: RedisConnection | None = None
        self._sha: str | None = None
        self._log = Throttle()
        self._preparing: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Open the connection and load the script now, in the background: the first
        decisions would otherwise pay both inside their deadline and fall back to local."""
        if self._preparing is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a synchronous test): decisions connect on first use
                return
            self._preparing = loop.create_task(self._prepare())

    async def _prepare(self) -> None:
        try:
            await self._connected().prepare()
            await self._load(self._connected().client)
        except Exception as exc:  # Redis down or slow: decisions connect (or fall back) later
            log.warning(
                "rate_limit_redis_connect_failed",
                target=self.target.display,
                error=str(exc) or type(exc).__name__,
            )

    def _connected(self) -> RedisConnection:
        connection = self._connection
        if connection is None:
            connection = self._connection = RedisConnection(
                self.target,
                timeout=max(self.timeout, SOCKET_TIMEOUT),
                connect_timeout=max(self.timeout, SOCKET_TIMEOUT),
            )
        return connection

    async def _load(self, client: Any) -> str:
        sha = self._sha
        if sha is None:
            loaded = await _awaited(client.script_load(SCRIPT))
            sha = self._sha = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        return sha

    async def check(
        self, limits: RateLimits, route: str, peer: str, headers: Headers, now: float
    ) -> Refusal | None:
        """``RateLimits.check`` for the shared limits on ``route``: None admitted; a refusal
        (a dry run's: admitted, to be logged)."""
        entries = limits.shared_entries(route)
        if not entries:
            return None
        client = limits.client(peer, headers)
        if client is None:
            return None
        dry: Refusal | None = None
        for index, rule, counts in entries:
            network = client.keys[index]
            if network is None:
                counts.exempt += 1
                continue
            key = rule.key(network, headers)
            wait, remaining = await self.take(rule, key, now)
            if wait == 0.0:
                counts.allowed += 1
                continue
            # The local bucket only keeps the log's bookkeeping (one line per key).
            refusal = Refusal(rule, wait, rule.gcra.bucket(key, now), client.address, remaining)
            if rule.dry_run:
                counts.would_limit += 1
                dry = refusal
                continue
            counts.limited += 1
            return refusal
        return dry

    async def take(self, rule: LimitRule, key: Hashable, now: float) -> tuple[float, int]:
        """One decision: (0.0, remaining) admitted, else (seconds to wait, remaining)."""
        gcra = rule.gcra
        reason = "breaker_open"
        if self.breaker.allow(now):
            try:
                admitted, wait, ahead = await self._unhurried.wait(
                    self._run(redis_key(rule.name, key), rule), self.timeout
                )
            except (RedisError, OSError, TimeoutError, ValueError) as exc:
                reason = "timeout" if isinstance(exc, TimeoutError) else "error"
                if self.breaker.record_failure(now):
                    log.error("rate_limit_redis_down", target=self.target.display)
            else:
                if self.breaker.record_success():
                    log.info("rate_limit_redis_back", target=self.target.display)
                remaining = max(0, int((gcra.span - ahead) / gcra.interval + 1e-9))
                return (0.0 if admitted else wait), remaining
        # Redis cannot say: this instance decides alone, and says so.
        self.fallbacks[rule.name, reason] = self.fallbacks.get((rule.name, reason), 0) + 1
        held = self._log.note(now)
        if held:
            log.warning(
                "rate_limit_local_fallback",
                limit=rule.name,
                reason=reason,
                decisions=held,
                target=self.target.display,
            )
        bucket = gcra.bucket(key, now)
        return gcra.take(bucket, now), gcra.remaining(bucket, now)

    async def _run(self, key: str, rule: LimitRule) -> tuple[bool, float, float]:
        client = self._connected().client
        args = (repr(rule.gcra.interval), repr(rule.gcra.span))
        reply: object
        sha = await self._load(client)
        try:
            reply = await _awaited(client.evalsha(sha, 1, key, *args))
        except NoScriptError:  # Redis restarted (or failed over): load it again
            self._sha = None
            reply = await _awaited(client.eval(SCRIPT, 1, key, *args))
        if not isinstance(reply, list) or len(reply) != 3:
            raise ValueError(f"unexpected reply {reply!r}")
        admitted, wait, ahead = reply
        return int(admitted) == 1, float(wait), float(ahead)

    async def aclose(self) -> None:
        if self._preparing is not None:
            self._preparing.cancel()
            await asyncio.gather(self._preparing, return_exceptions=True)
        await self._unhurried.aclose()
        if self._connection is not None:
            await self._connection.aclose()
            self._connection = None


async def _awaited(value: Awaitable[object] | object) -> object:
    """redis-py's stubs type its commands as ``Awaitable[T] | T``: the asyncio client's are
    always awaitables."""
    if isinstance(value, Awaitable):
        return await value
    return value


__all__ = ["SCRIPT", "SharedLimits", "redis_key"]
