"""L2: a Redis shared by the edge instances of one POP.

Looked up after an L1 miss (by the coalesced leader only, so one GET per key per instance),
written after a fill in the background.  Redis is an optimisation, never a dependency: every
call runs under ``redis_guard`` (a deadline, a circuit breaker, errors counted in
``meridian_cache_redis_errors_total{reason}``), so nothing here raises to the caller: a failed
lookup is a miss, a failed write is dropped.

Redis is one server, a Sentinel-watched master or a Cluster (``meridian.redis_conn``); the
same commands work on all three.  Keys, under a namespace (``meridian:cache:`` by default),
each with a hash tag ``{h}`` (``redis_codec.redis_key``) so that every key of one resource
lives in one cluster slot (the lookup's GETs of ``e:`` and ``v:``, a purge's DEL of a resource
and its variants) while resources spread over the slots:

* ``e:{h}<key>``: one stored response (``redis_codec.encode``), PX = freshness left + the
  larger stale window;
* ``v:{h}<primary>``: the Vary names of a resource with variants;
* ``s:{h}<primary>``: a set of its variant keys, so an exact purge reaches all of them;
* ``t:{h}<surrogate key>``: a set of keys tagged with it (a tag purge deletes them);
* ``l:{h}<key>``: the cross-instance fill lock (SET NX PX, released by token);
* channel ``purge`` and the stream ``p:{h}log``: purges broadcast to the other instances, and
  replayed by one whose subscription dropped (``redis_broadcast``).

The parts: ``RedisL2`` (entries and the fill lock, and the facade over the rest),
``redis_codec`` (keys and records), ``redis_guard`` (deadline and breaker), ``redis_purge``
(what a purge deletes), ``redis_broadcast`` (how it reaches the other instances).

While a master fails over (Sentinel or Cluster) its calls fail fast or time out like any
other Redis trouble: the breaker, misses instead of hits, purges queued and retried.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

from meridian.log import get_logger
from meridian.redis_conn import MAX_REPLY_STRING, RedisConnection, RedisTarget

from .entry import Entry, StoredResponse
from .key import VARIANT_SEPARATOR, Negotiator, negotiate_coding, vary_key
from .policy import Headers
from .redis_broadcast import PurgeLog, PurgeMessage, PurgeSubscription
from .redis_codec import (
    MAGIC,
    VERSION,
    DecodeError,
    decode,
    encode,
    glob_escape,
    redis_key,
    slot_tag,
)
from .redis_guard import SOCKET_TIMEOUT, CircuitBreaker, Guard, Skipped, count
from .redis_purge import RedisPurger

if TYPE_CHECKING:
    from meridian.config import CacheConfig

log = get_logger("cache")

#: ``acquire``'s answer when Redis is unavailable: proceed without a cross-instance lock.
NO_LOCK: Final = b""

_RELEASE_LUA: Final = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class RedisL2:
    """The shared second level; see the module docstring.  Never raises on Redis trouble."""

    def __init__(
        self,
        target: RedisTarget | str,
        *,
        timeout: float,
        max_value: int,
        clock: Callable[[], float],
        monotonic: Callable[[], float] = time.monotonic,
        namespace: str = "meridian:cache:",
        instance_id: str | None = None,
        breaker: CircuitBreaker | None = None,
        on_error: Callable[[str], None] | None = None,
        negotiate: Negotiator = negotiate_coding,
        admin_timeout: float = 10.0,
        pool_size: int = 32,
    ) -> None:
        if "{" in namespace or "}" in namespace:
            raise ValueError("the namespace must not contain { or } (Redis Cluster hash tags)")
        self.timeout = timeout
        self.max_value = max_value
        self.admin_timeout = admin_timeout
        self.instance_id = instance_id or f"{os.uname().nodename}:{os.getpid()}:{id(self):x}"
        self._guard = Guard(timeout, breaker=breaker, monotonic=monotonic, on_error=on_error)
        self.breaker = self._guard.breaker
        self._clock = clock  # wall time: key TTLs follow the entries' freshness
        self._negotiate = negotiate
        self._ns = namespace.encode()
        if isinstance(target, str):
            target = RedisTarget.standalone(target)
        # No client-side retries: a second attempt would only double the time a request waits.
        self._connection = RedisConnection(
            target,
            timeout=max(timeout, SOCKET_TIMEOUT),
            connect_timeout=max(timeout, SOCKET_TIMEOUT),
            pool_size=pool_size,
            # A stored value is at most max_value; anything longer is not ours.
            max_string=max(max_value, MAX_REPLY_STRING),
        )
        self._redis = self._connection.client
        self._release = self._redis.register_script(_RELEASE_LUA)
        self._purger = RedisPurger(self._redis, self._ns, self._guard, admin_timeout)
        self._log = PurgeLog(self._redis, self._ns, self.instance_id)
        self.channel = self._log.channel
        self._subscription = PurgeSubscription(
            self._connection,
            self._log,
            self._guard,
            admin_timeout=admin_timeout,
            monotonic=monotonic,
        )
        #: Set while the purge subscription is live and caught up (tests and readiness wait
        #: on it).
        self.subscribed = self._subscription.subscribed
        #: Set once the command connections are open (``start`` opens them): the first
        #: requests then do not pay a connect, or a cluster's slot map, inside their deadline.
        self.connected = asyncio.Event()
        self._connecting: asyncio.Task[None] | None = None

    @classmethod
    def from_config(
        cls,
        config: CacheConfig,
        *,
        clock: Callable[[], float],
        instance_id: str | None = None,
        negotiate: Negotiator = negotiate_coding,
    ) -> RedisL2 | None:
        """The L2 ``config`` names (``redis_url``, or Sentinel or Cluster nodes), with its
        deadline and value bound; None when it names none."""
        target = RedisTarget.from_config(config)
        if target is None:
            return None
        return cls(
            target,
            timeout=config.redis_timeout,
            max_value=config.redis_max_value,
            clock=clock,
            instance_id=instance_id,
            negotiate=negotiate,
        )

    @property
    def available(self) -> bool:
        return not self.breaker.is_open

    @property
    def target(self) -> RedisTarget:
        return self._connection.target

    @property
    def on_error(self) -> Callable[[str], None] | None:
        """Told the reason of every failed call (the cache counts them)."""
        return self._guard.on_error

    @on_error.setter
    def on_error(self, on_error: Callable[[str], None] | None) -> None:
        self._guard.on_error = on_error

    def _key(self, kind: bytes, raw: bytes) -> bytes:
        return redis_key(self._ns, kind, raw)

    # ----------------------------------------------------------------------------------------
    # Lookup and store

    async def get(self, primary: bytes, headers: Headers) -> tuple[bytes, StoredResponse] | None:
        """The stored response (and its key) for a request, or None (miss, error, skipped)."""

        async def fetch() -> tuple[bytes, bytes | None]:
            # Two GETs in one round trip rather than an MGET: while a cluster slot migrates,
            # a multi-key command whose keys are not all on one side (v: rarely exists) is
            # refused with TRYAGAIN, and single-key commands just follow ASK.
            pipe = self._redis.pipeline(transaction=False)
            pipe.get(self._key(b"e:", primary))
            pipe.get(self._key(b"v:", primary))
            plain, names = cast("list[bytes | None]", await pipe.execute())
            if plain is not None:
                return primary, plain
            if not names:
                return primary, None
            key = (
                primary
                + VARIANT_SEPARATOR
                + vary_key(tuple(names.split(b",")), headers, self._negotiate)
            )
            value = cast("bytes | None", await self._redis.get(self._key(b"e:", key)))
            return key, value

        result = await self._guard.call("get", fetch)
        if isinstance(result, Skipped):
            return None
        key, data = result
        if data is None:
            return None
        try:
            return key, decode(data)
        except DecodeError as exc:
            log.debug("redis_value_undecodable", error=str(exc))
            return None

    async def put(self, entry: Entry) -> bool:
        """Store ``entry`` for as long as it is of use; False when skipped or too large."""
        response = entry.response
        ttl_ms = int(response.freshness.retain_for(self._clock()) * 1000)
        if ttl_ms <= 0:
            return False
        value = encode(response)
        if len(value) > self.max_value:
            return False

        async def store() -> None:
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(self._key(b"e:", entry.key), value, px=ttl_ms)
            if response.vary:
                pipe.set(self._key(b"v:", entry.primary), b",".join(response.vary), px=ttl_ms)
                self._add_to_set(pipe, self._key(b"s:", entry.primary), entry.key, ttl_ms)
            for tag in response.surrogate_keys:
                self._add_to_set(pipe, self._key(b"t:", tag.encode()), entry.key, ttl_ms)
            await pipe.execute()

        return not isinstance(await self._guard.call("put", store), Skipped)

    @staticmethod
    def _add_to_set(pipe: Any, key: bytes, member: bytes, ttl_ms: int) -> None:
        pipe.sadd(key, member)
        # NX gives a new set an expiry; GT only ever extends it (a set lives as long as the
        # longest-lived member it names).
        pipe.pexpire(key, ttl_ms, nx=True)
        pipe.pexpire(key, ttl_ms, gt=True)

    # ----------------------------------------------------------------------------------------
    # Cross-instance fill lock

    async def acquire(self, key: bytes, ttl: float) -> bytes | None:
        """Try to become the POP-wide filler of ``key``.

        Returns a token when acquired, None when another instance holds the lock, and
        ``NO_LOCK`` (empty) when Redis is unavailable: then fill without a lock.
        """
        token = os.urandom(8).hex().encode()
        result = await self._guard.call(
            "lock",
            lambda: self._redis.set(
                self._key(b"l:", key), token, nx=True, px=max(1, int(ttl * 1000))
            ),
        )
        if isinstance(result, Skipped):
            return NO_LOCK
        return token if result else None

    async def release(self, key: bytes, token: bytes) -> None:
        if token:
            await self._guard.call(
                "unlock", lambda: self._release(keys=[self._key(b"l:", key)], args=[token])
            )

    async def wait_for_fill(
        self, primary: bytes, headers: Headers, lock_key: bytes, wait: float
    ) -> tuple[bytes, StoredResponse] | None:
        """Poll for another instance's fill until it lands, its lock goes, or ``wait`` seconds
        pass (then the caller fetches itself)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        delay = 0.005
        while loop.time() < deadline:
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, 0.05)
            found = await self.get(primary, headers)
            if found is not None:
                return found
            held = await self._guard.call(
                "lock", lambda: self._redis.exists(self._key(b"l:", lock_key))
            )
            if isinstance(held, Skipped) or not held:
                return await self.get(primary, headers)  # it may have landed just before
        return None

    # ----------------------------------------------------------------------------------------
    # Purges (``redis_purge`` deletes, ``redis_broadcast`` tells the other instances)

    async def apply_purge(self, kind: str, value: bytes, *, force: bool = False) -> int | None:
        """A purge's whole Redis half: delete what it covers from L2, then broadcast it to the
        POP's other instances (in that order: an instance that drops its L1 on the message
        cannot refill from L2 what the purge covers).  Returns the keys deleted, or None when
        either step failed (the caller keeps the purge and retries: both are idempotent).
        The broadcast is attempted even when the delete failed (a slow SCAN): the other
        instances then at least drop their L1.  ``force``: past an open breaker, as a probe."""
        deleted = await self._purger.purge(kind, value, force)
        published = await self._publish(kind, value, force)
        if isinstance(deleted, Skipped) or not published:
            return None
        return deleted

    async def purge_primary(self, primary: bytes) -> int:
        """Delete every stored variant of a resource; returns keys deleted (0 if skipped)."""
        return count(await self._purger.primary(primary))

    async def purge_tag(self, tag: str) -> int:
        return count(await self._purger.tag(tag))

    async def purge_url_prefix(self, prefix: bytes) -> int:
        """Delete responses whose URL starts with ``prefix`` (``https://host/path``)."""
        return count(await self._purger.url_prefix(prefix))

    async def purge_path_prefix(self, prefix: bytes) -> int:
        """Delete responses whose path, on any host, starts with ``prefix``."""
        return count(await self._purger.path_prefix(prefix))

    async def publish(self, kind: str, value: bytes) -> bool:
        return await self._publish(kind, value, False)

    async def _publish(self, kind: str, value: bytes, force: bool) -> bool:
        sent = await self._guard.call("publish", lambda: self._log.send(kind, value), force=force)
        return not isinstance(sent, Skipped)

    # ----------------------------------------------------------------------------------------
    # Subscription

    def start(
        self, on_purge: Callable[[PurgeMessage], None], on_resync: Callable[[], None]
    ) -> None:
        """Subscribe to purges from the other instances, reconnecting forever.

        ``on_resync`` runs when a subscription is re-established after a loss and the purges
        sent meanwhile cannot be replayed: the owner should drop what they might have covered.
        """
        self._subscription.start(on_purge, on_resync)
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        """Open the command connections, retrying each second until Redis answers once."""
        failures = 0
        while True:
            try:
                await asyncio.wait_for(self._connection.prepare(), self.admin_timeout)
            except Exception as exc:  # Redis down or slow at start: requests go without it
                failures += 1
                (log.warning if failures == 1 else log.debug)(
                    "redis_connect_failed", error=str(exc) or type(exc).__name__
                )
                await asyncio.sleep(1.0)
            else:
                if failures:
                    log.info("redis_connected", failures=failures)
                self.connected.set()
                return

    async def aclose(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        await self._subscription.aclose()
        await self._guard.unhurried.aclose()
        await self._connection.aclose()


__all__ = [
    "MAGIC",
    "NO_LOCK",
    "VERSION",
    "CircuitBreaker",
    "DecodeError",
    "PurgeMessage",
    "RedisL2",
    "RedisTarget",
    "decode",
    "encode",
    "glob_escape",
    "redis_key",
    "slot_tag",
]
