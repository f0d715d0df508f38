"""Optional sharing of transitions between the instances of one POP, over Redis pub/sub.

Each instance publishes the transitions it saw itself and adopts the ones its peers saw, so a
backend one instance finds dead leaves every instance's rotation at once.  Redis is a helper,
never a dependency: when it is down, each instance runs on its own view, says so once in the log
and in ``meridian_health_redis_connected``, and keeps trying in the background.  Transitions are
not queued while disconnected (a stale verdict replayed later would be wrong); peers converge
through their own checks meanwhile.

Redis may be one server, a Sentinel-watched master or a Cluster (``meridian.redis_conn``):
a failover looks like any other outage here (the link drops, reconnects to the promoted
replica, or on a cluster to the next live node, and says so once each way).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meridian.health.state import Health, Transition
from meridian.log import get_logger
from meridian.redis_conn import RedisClient, RedisConnection, RedisTarget, Subscription, redact

log = get_logger("health")

CONNECT_TIMEOUT = 1.0
COMMAND_TIMEOUT = 2.0
#: Reconnect backoff: doubles from the first value up to the second.
RETRY_BACKOFF = (0.25, 5.0)
#: How often the reader wakes to notice a dead connection even when no message arrives.
READ_POLL = 1.0
#: Transitions waiting to be published; beyond this they are dropped, not buffered.
QUEUE_SIZE = 1024
PROTOCOL_VERSION = 1


def channel_for(pop: str | None) -> str:
    return f"meridian:health:{pop or 'all'}"


@dataclass(frozen=True, slots=True)
class PeerTransition:
    origin: str
    target: str
    state: Health
    reason: str
    ejection_left: float | None


def encode(origin: str, transition: Transition) -> str:
    return json.dumps(
        {
            "v": PROTOCOL_VERSION,
            "from": origin,
            "target": transition.target,
            "state": transition.new.value,
            "reason": transition.reason,
            "ejection_left": transition.ejection_seconds,
        },
        separators=(",", ":"),
    )


def decode(data: bytes | str) -> PeerTransition | None:
    """A peer's message, or None when it is not one we understand."""
    try:
        message: Any = json.loads(data)
        if not isinstance(message, dict) or message.get("v") != PROTOCOL_VERSION:
            return None
        left = message.get("ejection_left")
        if left is not None and (isinstance(left, bool) or not isinstance(left, int | float)):
            return None
        origin, target, reason = message["from"], message["target"], message["reason"]
        if not all(isinstance(value, str) for value in (origin, target, reason)):
            return None
        return PeerTransition(
            origin, target, Health(message["state"]), reason, None if left is None else float(left)
        )
    except (ValueError, KeyError, TypeError):
        return None


class PeerLink:
    """One Redis connection pair (subscriber + publisher) on the POP's channel, reconnecting."""

    def __init__(
        self,
        url: str | RedisTarget,
        channel: str,
        *,
        on_transition: Callable[[PeerTransition], None],
        on_connected: Callable[[bool], None],
    ) -> None:
        self.target = RedisTarget.standalone(url) if isinstance(url, str) else url
        self.display_url = self.target.display
        self.channel = channel
        #: Who we are on the channel, so that our own messages are ignored.
        self.origin = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.connected = False
        #: Failed connection attempts so far (for /status and tests).
        self.failures = 0
        self._on_transition = on_transition
        self._on_connected = on_connected
        self._queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_SIZE)
        self._outage_logged = False

    def publish(self, transition: Transition) -> None:
        """Share a transition we saw; never blocks, and drops it while disconnected."""
        if self.connected:
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(encode(self.origin, transition))

    async def run(self) -> None:
        """Connect, relay, and reconnect after any failure, until cancelled."""
        # One client for the link's life: on a cluster it knows the topology as it changes
        # and each new subscription tries the next node, past a dead one.
        connection = RedisConnection(
            self.target, timeout=None, connect_timeout=CONNECT_TIMEOUT, pool_size=4
        )
        try:
            await self._run(connection)
        finally:
            await connection.aclose()

    async def _run(self, connection: RedisConnection) -> None:
        backoff = RETRY_BACKOFF[0]
        while True:
            try:
                await self._session(connection)
            except Exception as exc:  # any failure means "run on the local view", never a crash
                reason = _describe(exc)
            else:  # pragma: no cover - _session only returns by raising
                reason = "closed"
            if self.connected:
                backoff = RETRY_BACKOFF[0]
            self._set_connected(False)
            self.failures += 1
            if not self._outage_logged:
                self._outage_logged = True
                log.warning(
                    "health_redis_unavailable",
                    url=self.display_url,
                    channel=self.channel,
                    reason=reason,
                    action="running on the local view; retrying in the background",
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_BACKOFF[1])

    async def _session(self, connection: RedisConnection) -> None:
        pubsub = connection.pubsub()
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):  # a hung Redis is a down Redis
                await pubsub.subscribe(self.channel)
            while not self._queue.empty():  # verdicts from before the outage are stale
                self._queue.get_nowait()
            self._set_connected(True)
            if self._outage_logged or self.failures == 0:
                log.info("health_redis_connected", url=self.display_url, channel=self.channel)
            self._outage_logged = False
            async with asyncio.TaskGroup() as group:
                group.create_task(self._read(pubsub))
                group.create_task(self._write(connection.client))
        finally:
            await pubsub.aclose()

    async def _read(self, pubsub: Subscription) -> None:
        while True:
            message = await pubsub.get_message(wait=READ_POLL)
            if message is None or message.get("type") != "message":
                continue
            peer = decode(message["data"])
            if peer is not None and peer.origin != self.origin:
                self._on_transition(peer)

    async def _write(self, client: RedisClient) -> None:
        while True:
            payload = await self._queue.get()
            async with asyncio.timeout(COMMAND_TIMEOUT):
                await client.publish(self.channel, payload)

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self._on_connected(connected)


__all__ = ["PeerLink", "PeerTransition", "channel_for", "decode", "encode", "redact"]


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"
