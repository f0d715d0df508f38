"""L2: a Redis shared by the edge instances of one POP.

Looked up after an L1 miss (by the coalesced leader only, so one GET per key per instance),
written after a fill in the background.  Redis is an optimisation, never a dependency:

* every call has a deadline (``redis_timeout``, 50 ms by default) and a pool of connections;
* errors and timeouts feed a circuit breaker: after ``threshold`` consecutive failures Redis is
  skipped for ``cooldown`` seconds, then one probe decides; opening and closing log once each;
  every failure increments ``meridian_cache_redis_errors_total{reason}``;
* nothing here raises to the caller: a failed lookup is a miss, a failed write is dropped.

Redis is one server, a Sentinel-watched master or a Cluster (``meridian.redis_conn``); the
same commands work on all three.  Keys, under a namespace (``meridian:cache:`` by default),
each with a hash tag ``{h}`` (``h``: 16 hex digits of a BLAKE2b of the resource's primary key)
so that every key of one resource lives in one cluster slot (the lookup's MGET of ``e:`` and
``v:``, a purge's DEL of a resource and its variants) while resources spread over the slots:

* ``e:{h}<key>``: one stored response (``encode``), PX = freshness left + the larger stale
  window;
* ``v:{h}<primary>``: the Vary names of a resource with variants;
* ``s:{h}<primary>``: a set of its variant keys, so an exact purge reaches all of them;
* ``t:{h}<surrogate key>``: a set of keys tagged with it (tag purge: SMEMBERS + DEL,
  O(tagged); on a cluster the DEL is split per slot);
* ``l:{h}<key>``: the cross-instance fill lock (SET NX PX, released by token);
* channel ``purge``: purge and invalidation messages, applied to L1 by every instance;
* ``p:{h}log``: the same messages as a stream (XADD, ~100,000 kept), and ``p:{h}log\0epoch``,
  a random token naming this incarnation of the log (one slot for both).

An instance whose subscription drops (a failover, a restart) missed the messages sent
meanwhile.  While subscribed it notes every few seconds how far the log had got (its last
ID, less a 10-s margin for a sender between XADD and PUBLISH); once subscribed again it
replays the log from there, so its L1 survives the failover.  Only when the log cannot prove
it holds every message since (another epoch: Redis lost its data; trimmed past the mark; more
than 10,000 to replay; still unreadable after 30 s) does it drop its whole L1, as before.

Prefix purges SCAN the whole keyspace (``SCAN MATCH e:{????????????????}G|<prefix>*``, on
every master of a cluster): O(keys in Redis), a few hundred ms per million keys, in batches
that do not block Redis; they run with ``admin_timeout`` rather than the per-request deadline.

While a master fails over (Sentinel or Cluster) its calls fail fast or time out like any
other Redis trouble: the breaker below, misses instead of hits, purges queued and retried.

Values are a compact, versioned binary record (no pickle): magic ``MC``, version byte, fixed
fields, then length-prefixed reason, coding, Vary names, surrogate keys, headers and body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

import redis.asyncio as aioredis

from meridian.log import get_logger
from meridian.redis_conn import RedisConnection, RedisTarget

from .entry import Entry, StoredResponse
from .key import VARIANT_SEPARATOR, Negotiator, negotiate_coding, vary_key
from .policy import Freshness, Header, Headers

log = get_logger("cache")

T = TypeVar("T")

# --------------------------------------------------------------------------------------------
# Circuit breaker (pure)


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


# --------------------------------------------------------------------------------------------
# Serialisation (pure)

MAGIC: Final = b"MC"
VERSION: Final = 1
_FIXED: Final = struct.Struct("<2sBHBddddd")
_U8: Final = struct.Struct("<B")
_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")
_HEADER: Final = struct.Struct("<HI")
_NO_STALE, _ALWAYS_REVALIDATE, _COMPRESSIBLE, _AUTH_OK = 1, 2, 4, 8


class DecodeError(ValueError):
    """A value that is not a record this version understands."""


def encode(response: StoredResponse) -> bytes:
    """Serialise a stored response (binary-safe, no pickle)."""
    f = response.freshness
    flags = (
        (_NO_STALE if f.no_stale else 0)
        | (_ALWAYS_REVALIDATE if f.always_revalidate else 0)
        | (_COMPRESSIBLE if response.compressible else 0)
        | (_AUTH_OK if response.auth_ok else 0)
    )
    coding = response.content_coding or b""
    vary = b",".join(response.vary)
    tags = " ".join(response.surrogate_keys).encode("utf-8")
    parts = [
        _FIXED.pack(
            MAGIC,
            VERSION,
            response.status,
            flags,
            f.response_time,
            f.initial_age,
            f.lifetime,
            f.stale_while_revalidate,
            f.stale_if_error,
        ),
        _U8.pack(len(response.reason[:255])),
        response.reason[:255],
        _U8.pack(len(coding)),
        coding,
        _U16.pack(len(vary)),
        vary,
        _U32.pack(len(tags)),
        tags,
        _U16.pack(len(response.headers)),
    ]
    for name, value in response.headers:
        parts.append(_HEADER.pack(len(name), len(value)))
        parts.append(name)
        parts.append(value)
    parts.append(response.body)
    return b"".join(parts)


def decode(data: bytes) -> StoredResponse:
    """Inverse of ``encode``; raises DecodeError on anything else (truncation, other versions)."""
    view = memoryview(data)
    try:
        magic, version, status, flags, rtime, age, lifetime, swr, sie = _FIXED.unpack_from(view)
        if magic != MAGIC or version != VERSION:
            raise DecodeError(f"not a v{VERSION} record")
        pos = _FIXED.size

        def take(n: int) -> bytes:
            nonlocal pos
            if pos + n > len(view):
                raise DecodeError("truncated")
            chunk = bytes(view[pos : pos + n])
            pos += n
            return chunk

        def length(fmt: struct.Struct) -> int:
            nonlocal pos
            (n,) = fmt.unpack_from(view, pos)
            pos += fmt.size
            return int(n)

        reason = take(length(_U8))
        coding = take(length(_U8))
        vary = take(length(_U16))
        tags = take(length(_U32)).decode("utf-8")
        headers: list[Header] = []
        for _ in range(length(_U16)):
            name_len, value_len = _HEADER.unpack_from(view, pos)
            pos += _HEADER.size
            name = take(name_len)
            headers.append((name, take(value_len)))
        body = bytes(view[pos:])
    except (struct.error, UnicodeDecodeError) as exc:
        raise DecodeError(str(exc)) from None
    return StoredResponse(
        status=status,
        reason=reason,
        headers=tuple(headers),
        body=body,
        freshness=Freshness(
            response_time=rtime,
            initial_age=age,
            lifetime=lifetime,
            stale_while_revalidate=swr,
            stale_if_error=sie,
            no_stale=bool(flags & _NO_STALE),
            always_revalidate=bool(flags & _ALWAYS_REVALIDATE),
        ),
        vary=tuple(vary.split(b",")) if vary else (),
        surrogate_keys=tuple(tags.split()) if tags else (),
        content_coding=coding or None,
        compressible=bool(flags & _COMPRESSIBLE),
        auth_ok=bool(flags & _AUTH_OK),
    )


def slot_tag(raw: bytes) -> bytes:
    """The cluster hash tag of a key's resource: ``{`` 16 hex digits ``}``.  Hex, so that no
    ``{`` or ``}`` in a URL can end the tag early; the same for every variant of a resource."""
    primary = raw.split(VARIANT_SEPARATOR, 1)[0]
    return b"{" + hashlib.blake2b(primary, digest_size=8).hexdigest().encode() + b"}"


#: What ``slot_tag`` looks like in a SCAN pattern.
_TAG_GLOB: Final = b"{" + b"?" * 16 + b"}"


def redis_key(namespace: bytes, kind: bytes, raw: bytes) -> bytes:
    """The Redis key of ``raw`` (a store key, a primary, a surrogate key) under ``kind``."""
    return namespace + kind + slot_tag(raw) + raw


def glob_escape(raw: bytes) -> bytes:
    """Escape Redis glob metacharacters so ``raw`` matches literally in SCAN MATCH."""
    out = bytearray()
    for byte in raw:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)


# --------------------------------------------------------------------------------------------
# The Redis shell


@dataclass(frozen=True, slots=True)
class PurgeMessage:
    """A purge broadcast to the POP's instances; ``kind`` is primary/url_prefix/path_prefix/tag."""

    kind: str
    value: bytes
    sender: str

    def encode(self) -> bytes:
        return json.dumps(
            {"v": 1, "from": self.sender, "kind": self.kind, "value": self.value.decode("latin-1")}
        ).encode()

    @staticmethod
    def decode(data: bytes) -> PurgeMessage | None:
        try:
            doc = json.loads(data)
            return PurgeMessage(
                kind=str(doc["kind"]),
                value=str(doc["value"]).encode("latin-1"),
                sender=str(doc["from"]),
            )
        except (ValueError, KeyError, TypeError, UnicodeEncodeError):
            return None


class _Skipped:
    """Returned by ``_call`` when Redis was skipped or failed."""


_SKIPPED: Final = _Skipped()
#: ``acquire``'s answer when Redis is unavailable: proceed without a cross-instance lock.
NO_LOCK: Final = b""

_RELEASE_LUA: Final = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_DELETE_BATCH: Final = 500
#: The purge log: entries kept (approximately), the margin a mark leaves for a sender
#: between its XADD and its PUBLISH, how often a mark is taken, the most a resync replays,
#: and how long an unreadable log is retried before the L1 is dropped instead.
_LOG_KEEP: Final = 100_000
_LOG_MARGIN_MS: Final = 10_000
_LOG_MARK_EVERY: Final = 5.0
_LOG_REPLAY_MAX: Final = 10_000
_LOG_PATIENCE: Final = 30.0
_KINDS: Final = frozenset({"primary", "tag", "url_prefix", "path_prefix"})


def _id_ms(entry_id: bytes | str | None) -> int:
    """The millisecond part of a stream ID (``b"1700000000000-3"`` -> 1700000000000)."""
    if entry_id is None:
        return 0
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.split("-", 1)[0])


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
        self.timeout = timeout
        self.max_value = max_value
        self.admin_timeout = admin_timeout
        self.instance_id = instance_id or f"{os.uname().nodename}:{os.getpid()}:{id(self):x}"
        self.breaker = breaker or CircuitBreaker()
        self._clock = clock  # wall time: key TTLs follow the entries' freshness
        self._monotonic = monotonic  # breaker cool-downs
        self.on_error = on_error
        self._negotiate = negotiate
        if "{" in namespace or "}" in namespace:
            raise ValueError("the namespace must not contain { or } (Redis Cluster hash tags)")
        self._ns = namespace.encode()
        self.channel = self._ns + b"purge"
        self._log = self._key(b"p:", b"log")
        self._log_epoch = self._key(b"p:", b"log" + VARIANT_SEPARATOR + b"epoch")
        if isinstance(target, str):
            target = RedisTarget.standalone(target)
        # No client-side retries: a second attempt would only double the time a request waits.
        self._connection = RedisConnection(
            target, timeout=timeout, connect_timeout=timeout, pool_size=pool_size
        )
        self._redis = self._connection.client
        self._release = self._redis.register_script(_RELEASE_LUA)
        self._subscriber: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        #: Set while the purge subscription is live and caught up (tests and readiness wait
        #: on it).
        self.subscribed = asyncio.Event()

    @property
    def available(self) -> bool:
        return not self.breaker.is_open

    @property
    def target(self) -> RedisTarget:
        return self._connection.target

    def _key(self, kind: bytes, raw: bytes) -> bytes:
        return redis_key(self._ns, kind, raw)

    # ----------------------------------------------------------------------------------------
    # Guarded calls

    async def _call(
        self,
        op: str,
        make: Callable[[], Awaitable[T]],
        deadline: float | None = None,
        *,
        force: bool = False,
    ) -> T | _Skipped:
        """Run one Redis operation within ``deadline`` seconds (default: the per-call timeout),
        unless the breaker is open (``force``: even then, as a probe: a retried purge must
        not wait out every cool-down); any failure is counted and becomes ``_SKIPPED``."""
        if not self.breaker.allow(self._monotonic()) and not force:
            return _SKIPPED
        try:
            async with asyncio.timeout(deadline if deadline is not None else self.timeout):
                result = await make()
        except Exception as exc:  # Redis trouble of any kind must never fail a request
            self._failure(op, exc)
            return _SKIPPED
        if self.breaker.record_success():
            log.info("redis_recovered", op=op)
        return result

    def _failure(self, op: str, exc: BaseException) -> None:
        reason = _error_reason(exc)
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

        result = await self._call("get", fetch)
        if isinstance(result, _Skipped):
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

        return not isinstance(await self._call("put", store), _Skipped)

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
        result = await self._call(
            "lock",
            lambda: self._redis.set(
                self._key(b"l:", key), token, nx=True, px=max(1, int(ttl * 1000))
            ),
        )
        if isinstance(result, _Skipped):
            return NO_LOCK
        return token if result else None

    async def release(self, key: bytes, token: bytes) -> None:
        if token:
            await self._call(
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
            held = await self._call("lock", lambda: self._redis.exists(self._key(b"l:", lock_key)))
            if isinstance(held, _Skipped) or not held:
                return await self.get(primary, headers)  # it may have landed just before
        return None

    # ----------------------------------------------------------------------------------------
    # Purges

    async def apply_purge(self, kind: str, value: bytes, *, force: bool = False) -> int | None:
        """A purge's whole Redis half: delete what it covers from L2, then broadcast it to the
        POP's other instances (in that order: an instance that drops its L1 on the message
        cannot refill from L2 what the purge covers).  Returns the keys deleted, or None when
        either step failed (the caller keeps the purge and retries: both are idempotent).
        The broadcast is attempted even when the delete failed (a slow SCAN): the other
        instances then at least drop their L1."""
        deleted = await self._purge(kind, value, force)
        published = await self._publish(kind, value, force)
        if isinstance(deleted, _Skipped) or not published:
            return None
        return deleted

    async def _purge(self, kind: str, value: bytes, force: bool) -> int | _Skipped:
        if kind.startswith("soft_"):
            # A soft purge leaves L2 alone: instances ignore copies received before it
            # (``Purges.covers``) and the one refresh it causes overwrites them.
            return 0
        if kind == "primary":
            return await self._purge_primary(value, force)
        if kind == "tag":
            return await self._purge_tag(value.decode("utf-8"), force)
        if kind == "url_prefix":
            return await self._purge_url_prefix(value, force)
        if kind == "path_prefix":
            return await self._purge_path_prefix(value, force)
        raise ValueError(f"unknown purge kind {kind!r}")

    async def purge_primary(self, primary: bytes) -> int:
        """Delete every stored variant of a resource; returns keys deleted (0 if skipped)."""
        return _count(await self._purge_primary(primary, False))

    async def _purge_primary(self, primary: bytes, force: bool) -> int | _Skipped:
        async def purge() -> int:
            variants = cast("set[bytes]", await self._redis.smembers(self._key(b"s:", primary)))
            keys = [self._key(b"e:", primary), self._key(b"v:", primary)]
            keys.append(self._key(b"s:", primary))
            keys.extend(self._key(b"e:", k) for k in variants)
            return await self._delete_batched(keys)

        return await self._call("purge", purge, self.admin_timeout, force=force)

    async def purge_tag(self, tag: str) -> int:
        return _count(await self._purge_tag(tag, False))

    async def _purge_tag(self, tag: str, force: bool) -> int | _Skipped:
        async def purge() -> int:
            tag_key = self._key(b"t:", tag.encode())
            members = cast("set[bytes]", await self._redis.smembers(tag_key))
            return await self._delete_batched([self._key(b"e:", k) for k in members] + [tag_key])

        return await self._call("purge", purge, self.admin_timeout, force=force)

    async def purge_url_prefix(self, prefix: bytes) -> int:
        """Delete responses whose URL starts with ``prefix`` (``https://host/path``)."""
        return _count(await self._purge_url_prefix(prefix, False))

    async def _purge_url_prefix(self, prefix: bytes, force: bool) -> int | _Skipped:
        pattern = self._ns + b"e:" + _TAG_GLOB + b"G|" + glob_escape(prefix) + b"*"
        return await self._scan_delete(pattern, lambda url: url.startswith(prefix), force)

    async def purge_path_prefix(self, prefix: bytes) -> int:
        """Delete responses whose path, on any host, starts with ``prefix``."""
        return _count(await self._purge_path_prefix(prefix, False))

    async def _purge_path_prefix(self, prefix: bytes, force: bool) -> int | _Skipped:
        pattern = self._ns + b"e:" + _TAG_GLOB + b"G|*://*" + glob_escape(prefix) + b"*"

        def matches(url: bytes) -> bool:
            start = url.find(b"/", url.find(b"://") + 3)
            return start != -1 and url.startswith(prefix, start)

        return await self._scan_delete(pattern, matches, force)

    async def _scan_delete(
        self, pattern: bytes, matches: Callable[[bytes], bool], force: bool
    ) -> int | _Skipped:
        skip = len(self._ns) + len(b"e:") + len(_TAG_GLOB) + len(b"G|")

        async def purge() -> int:
            doomed: list[bytes] = []
            async for key in self._redis.scan_iter(match=pattern, count=1000):
                url = bytes(key)[skip:].split(VARIANT_SEPARATOR, 1)[0]
                if matches(url):  # the glob's * may span "/" and over-match
                    doomed.append(key)
            return await self._delete_batched(doomed)

        return await self._call("purge", purge, self.admin_timeout, force=force)

    async def _delete_batched(self, keys: Sequence[bytes]) -> int:
        """DEL per key, pipelined: a cluster splits a multi-key DEL per slot, and refuses it
        with TRYAGAIN while the slot migrates; single-key DELs follow ASK instead."""
        deleted = 0
        for start in range(0, len(keys), _DELETE_BATCH):
            pipe = self._redis.pipeline(transaction=False)
            for key in keys[start : start + _DELETE_BATCH]:
                pipe.delete(key)
            deleted += sum(int(n) for n in await pipe.execute())
        return deleted

    async def publish(self, kind: str, value: bytes) -> bool:
        return await self._publish(kind, value, False)

    async def _publish(self, kind: str, value: bytes, force: bool) -> bool:
        message = PurgeMessage(kind, value, self.instance_id).encode()

        async def send() -> None:
            # Logged first: a subscriber that misses the PUBLISH finds it in the log.
            await self._redis.xadd(self._log, {b"m": message}, maxlen=_LOG_KEEP, approximate=True)
            await self._redis.publish(self.channel, message)

        result = await self._call("publish", send, force=force)
        return not isinstance(result, _Skipped)

    async def _log_position(self) -> tuple[bytes, int, int]:
        """The purge log's (epoch, last ID's ms, largest trimmed ID's ms); starts an epoch
        when there is none (a new or emptied Redis)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(self._log_epoch, os.urandom(8).hex().encode(), nx=True)
        pipe.get(self._log_epoch)
        _, epoch = await pipe.execute()
        try:
            info = cast("dict[Any, Any]", await self._redis.xinfo_stream(self._log))
        except aioredis.ResponseError:  # no such key: nothing logged in this epoch yet
            return bytes(epoch), 0, 0

        def field(name: str) -> Any:
            return info.get(name, info.get(name.encode()))

        return (
            bytes(epoch),
            _id_ms(field("last-generated-id")),
            _id_ms(field("max-deleted-entry-id")),
        )

    async def _replay(
        self, mark: tuple[bytes, int], on_purge: Callable[[PurgeMessage], None]
    ) -> int | None:
        """Apply every logged purge from ``mark`` on; None when the log cannot prove it
        holds all of them (then the caller drops its L1)."""
        epoch, since_ms = mark
        now_epoch, _last, trimmed_ms = await self._log_position()
        if now_epoch != epoch or (trimmed_ms and trimmed_ms >= since_ms):
            return None
        entries = cast(
            "list[tuple[bytes, dict[bytes, bytes]]]",
            await self._redis.xrange(
                self._log, min=f"{max(0, since_ms)}-0", max="+", count=_LOG_REPLAY_MAX + 1
            ),
        )
        if len(entries) > _LOG_REPLAY_MAX:
            return None
        replayed = 0
        for _id, fields in entries:
            purge = PurgeMessage.decode(fields.get(b"m", b""))
            if purge is not None and purge.sender != self.instance_id and purge.kind in _KINDS:
                on_purge(purge)  # idempotent: one also received by PUBLISH does no harm
                replayed += 1
        return replayed

    # ----------------------------------------------------------------------------------------
    # Subscription

    def start(
        self, on_purge: Callable[[PurgeMessage], None], on_resync: Callable[[], None]
    ) -> None:
        """Subscribe to purges from the other instances, reconnecting forever.

        ``on_resync`` runs when a subscription is re-established after a loss: purges sent
        meanwhile were missed, so the owner should drop what they might have covered.
        """
        if self._subscriber is None:
            self._subscriber = asyncio.ensure_future(self._subscribe_loop(on_purge, on_resync))

    async def _subscribe_loop(
        self, on_purge: Callable[[PurgeMessage], None], on_resync: Callable[[], None]
    ) -> None:
        lost = False
        lost_at = 0.0
        backoff = 0.1
        #: (epoch, ms): every purge logged before ms has reached this instance.
        mark: tuple[bytes, int] | None = None
        resync_due = False
        await self._call("connect", self._connection.prepare, max(self.timeout, 2.0))
        while not self._closing.is_set():
            pubsub = self._connection.pubsub()
            try:
                async with asyncio.timeout(max(self.timeout, 1.0)):
                    await pubsub.subscribe(self.channel)
                backoff = 0.1
                if lost:
                    lost = False
                    resync_due = True
                    log.info("redis_purge_subscription_restored")
                next_mark = 0.0
                while not self._closing.is_set():
                    now = self._monotonic()
                    if resync_due:
                        replayed = await self._resync(mark, on_purge)
                        if isinstance(replayed, int):
                            resync_due = False
                            log.info("redis_purges_replayed", replayed=replayed)
                        elif replayed is None or now - lost_at >= _LOG_PATIENCE:
                            resync_due = False
                            on_resync()  # purges may have been missed: L1 starts afresh
                        # else Redis did not answer: the next round tries again
                    if not resync_due and not self.subscribed.is_set():
                        self.subscribed.set()  # subscribed, and caught up
                    if not resync_due and now >= next_mark:
                        position = await self._call("purge_log", self._log_position)
                        if isinstance(position, _Skipped):
                            next_mark = now + 1.0
                        else:
                            mark = (position[0], position[1] - _LOG_MARGIN_MS)
                            next_mark = now + _LOG_MARK_EVERY
                    message = await pubsub.get_message(wait=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    purge = PurgeMessage.decode(message["data"])
                    if purge is not None and purge.sender != self.instance_id:
                        on_purge(purge)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.subscribed.clear()
                if not lost:
                    log.warning("redis_purge_subscription_lost", error=str(exc) or repr(exc))
                    lost_at = self._monotonic()
                lost = True
            finally:
                await pubsub.aclose()  # never raises: the connection may already be gone
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), backoff)
            backoff = min(backoff * 2, 5.0)

    async def _resync(
        self, mark: tuple[bytes, int] | None, on_purge: Callable[[PurgeMessage], None]
    ) -> int | _Skipped | None:
        """Replay the purges missed since ``mark``: the count, None when that cannot be
        done (drop L1), ``_SKIPPED`` when Redis did not answer (try again)."""
        if mark is None:
            return None
        result = await self._call(
            "purge_log", lambda: self._replay(mark, on_purge), self.admin_timeout, force=True
        )
        return result

    async def aclose(self) -> None:
        self._closing.set()
        if self._subscriber is not None:
            self._subscriber.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._subscriber
            self._subscriber = None
        await self._connection.aclose()


def _count(result: int | _Skipped) -> int:
    return 0 if isinstance(result, _Skipped) else result


def _error_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | aioredis.TimeoutError):
        return "timeout"
    if isinstance(exc, OSError | aioredis.ConnectionError):
        return "connection"
    return "error"


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
