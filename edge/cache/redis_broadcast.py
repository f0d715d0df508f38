"""How a purge reaches the POP's other instances through Redis, and how one that was missed is
caught up with.

A purge is sent twice (``PurgeLog.send``): appended to a stream, ``p:{h}log`` (XADD, ~100,000
kept; ``p:{h}log\\0epoch`` is a random token naming this incarnation of the log, in the same
slot), then published on the channel ``purge``.  Every instance subscribes to the channel
(``PurgeSubscription``) and applies what the others send.

An instance whose subscription drops (a failover, a restart) missed the messages sent
meanwhile.  While subscribed it notes every few seconds how far the log had got (its last ID,
less a 10-s margin for a sender between XADD and PUBLISH); once subscribed again it replays the
log from there, so its L1 survives the failover.  Only when the log cannot prove it holds every
message since (another epoch: Redis lost its data; trimmed past the mark; more than 10,000 to
replay; still unreadable after 30 s) does it drop its whole L1 (``on_resync``).

Messages are hostile input like any other read from Redis: one that does not parse, names an
unknown kind or comes from this instance is ignored; a replay reads at most 10,001 entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, cast

import redis.asyncio as aioredis

from meridian.log import get_logger
from meridian.redis_conn import RedisClient, RedisConnection

from .key import VARIANT_SEPARATOR
from .redis_codec import redis_key
from .redis_guard import Guard, Skipped

log = get_logger("cache")

#: The purge log: entries kept (approximately), the margin a mark leaves for a sender
#: between its XADD and its PUBLISH, how often a mark is taken, the most a resync replays,
#: and how long an unreadable log is retried before the L1 is dropped instead.
_LOG_KEEP: Final = 100_000
_LOG_MARGIN_MS: Final = 10_000
_LOG_MARK_EVERY: Final = 5.0
_LOG_REPLAY_MAX: Final = 10_000
_LOG_PATIENCE: Final = 30.0
_KINDS: Final = frozenset({"primary", "tag", "url_prefix", "path_prefix"})

#: (epoch, ms): every purge logged before ms (in that incarnation of the log) has been seen.
Mark = tuple[bytes, int]


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


def _id_ms(entry_id: bytes | str | None) -> int:
    """The millisecond part of a stream ID (``b"1700000000000-3"`` -> 1700000000000)."""
    if entry_id is None:
        return 0
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.split("-", 1)[0])


class PurgeLog:
    """The purge channel and its log: send a purge, mark how far the log has got, replay it
    from a mark.  Unguarded: callers run these under ``Guard.call``."""

    def __init__(self, client: RedisClient, namespace: bytes, instance_id: str) -> None:
        self._redis = client
        self.instance_id = instance_id
        self.channel = namespace + b"purge"
        self._log = redis_key(namespace, b"p:", b"log")
        self._epoch = redis_key(namespace, b"p:", b"log" + VARIANT_SEPARATOR + b"epoch")

    async def send(self, kind: str, value: bytes) -> None:
        message = PurgeMessage(kind, value, self.instance_id).encode()
        # Logged first: a subscriber that misses the PUBLISH finds it in the log.
        await self._redis.xadd(self._log, {b"m": message}, maxlen=_LOG_KEEP, approximate=True)
        await self._redis.publish(self.channel, message)

    def received(self, data: bytes) -> PurgeMessage | None:
        """A message from the channel or the log, if it is another instance's purge."""
        purge = PurgeMessage.decode(data)
        if purge is None or purge.sender == self.instance_id:
            return None
        return purge

    async def mark(self) -> Mark:
        """How far the log has got, less the margin for a sender between XADD and PUBLISH."""
        epoch, last_ms, _trimmed = await self._position()
        return epoch, last_ms - _LOG_MARGIN_MS

    async def _position(self) -> tuple[bytes, int, int]:
        """The purge log's (epoch, last ID's ms, largest trimmed ID's ms); starts an epoch
        when there is none (a new or emptied Redis)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(self._epoch, os.urandom(8).hex().encode(), nx=True)
        pipe.get(self._epoch)
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

    async def replay(self, mark: Mark, on_purge: Callable[[PurgeMessage], None]) -> int | None:
        """Apply every logged purge from ``mark`` on; None when the log cannot prove it
        holds all of them (then the caller drops its L1)."""
        epoch, since_ms = mark
        now_epoch, _last, trimmed_ms = await self._position()
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
            purge = self.received(fields.get(b"m", b""))
            if purge is not None and purge.kind in _KINDS:
                on_purge(purge)  # idempotent: one also received by PUBLISH does no harm
                replayed += 1
        return replayed


class PurgeSubscription:
    """The subscription to the other instances' purges, reconnecting forever (module doc)."""

    def __init__(
        self,
        connection: RedisConnection,
        purge_log: PurgeLog,
        guard: Guard,
        *,
        admin_timeout: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connection = connection
        self._log = purge_log
        self._guard = guard
        self._admin_timeout = admin_timeout
        self._monotonic = monotonic
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        #: Set while the subscription is live and caught up (tests and readiness wait on it).
        self.subscribed = asyncio.Event()

    def start(
        self, on_purge: Callable[[PurgeMessage], None], on_resync: Callable[[], None]
    ) -> None:
        """Subscribe; ``on_resync`` runs when purges sent while the subscription was lost
        could not be replayed (the owner should drop what they might have covered)."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run(on_purge, on_resync))

    async def _run(
        self, on_purge: Callable[[PurgeMessage], None], on_resync: Callable[[], None]
    ) -> None:
        guard, purge_log = self._guard, self._log
        lost = False
        lost_at = 0.0
        backoff = 0.1
        mark: Mark | None = None
        resync_due = False
        await guard.call("connect", self._connection.prepare, max(guard.timeout, 2.0))
        while not self._closing.is_set():
            pubsub = self._connection.pubsub()
            try:
                async with asyncio.timeout(max(guard.timeout, 1.0)):
                    await pubsub.subscribe(purge_log.channel)
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
                        taken = await guard.call("purge_log", purge_log.mark)
                        if isinstance(taken, Skipped):
                            next_mark = now + 1.0
                        else:
                            mark = taken
                            next_mark = now + _LOG_MARK_EVERY
                    message = await pubsub.get_message(wait=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    purge = purge_log.received(message["data"])
                    if purge is not None:
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
        self, mark: Mark | None, on_purge: Callable[[PurgeMessage], None]
    ) -> int | Skipped | None:
        """Replay the purges missed since ``mark``: the count, None when that cannot be
        done (drop L1), ``SKIPPED`` when Redis did not answer (try again)."""
        if mark is None:
            return None
        return await self._guard.call(
            "purge_log",
            lambda: self._log.replay(mark, on_purge),
            self._admin_timeout,
            force=True,
        )

    async def aclose(self) -> None:
        self._closing.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


__all__ = ["Mark", "PurgeLog", "PurgeMessage", "PurgeSubscription"]
