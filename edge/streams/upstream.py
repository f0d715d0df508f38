"""Upstream subscriptions: one WebSocket per channel to the nearest healthy region.

The region is chosen as a request's would be: the route that matches ``upstream_path``, its
regions ordered for this POP (``edge.router``), the live ones first (``live_regions``) and a
backend by the failover walk (``next_attempt``), with the health monitor's view; the outcome
is reported to the monitor like a request's.  The subscription asks for ``since=`` the
channel's last sequence, so when it dies (the origin killed, a reset, a close) the next one,
on another backend or region, replays what was missed; if that region cannot replay that far
the hub sees the gap and tells clients (``Hub.publish``).  A subscription that moved to a
farther region moves back once the nearer one has been up for ``move_back_after``
(``edge.streams.moveback``), resubscribing since its last sequence the same way.

Every upstream message is hostile until checked: valid UTF-8 JSON (it is sent to clients as a
text frame), an object naming this channel, an integer ``seq`` and a finite ``ts``; bounded in
size (``max_upstream_message``).  Anything else is counted and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Callable
from typing import Protocol
from urllib.parse import quote

import aiohttp

from edge.streams.moveback import RegionUptime, nearer_region
from edge.streams.stats import StreamStats
from edge.upstream import Attempt, HealthView, live_regions, next_attempt
from edge.websocket import UpstreamServices
from meridian.log import get_logger

log = get_logger("edge.streams")

#: The longest wait between two rounds of failed attempts.
MAX_RETRY_DELAY = 5.0


class Publisher(Protocol):
    def publish(self, name: str, payload: bytes, seq: int, ts: float) -> bool: ...

    def last_seq(self, name: str) -> int | None: ...

    def fail(self, name: str, reason: str) -> None: ...


def parse_message(name: str, data: bytes) -> tuple[int, float] | None:
    """(seq, ts) of a valid upstream message for channel ``name``, else None."""
    try:
        document = json.loads(data.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        return None
    if not isinstance(document, dict) or document.get("channel") != name:
        return None
    seq, ts = document.get("seq"), document.get("ts")
    if type(seq) is not int or not 0 <= seq < 1 << 63:
        return None
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts):
        return None
    return seq, float(ts)


class UpstreamLinks:
    """The upstream subscriptions of one worker, one task per open channel."""

    def __init__(
        self,
        services: UpstreamServices,
        publisher: Callable[[], Publisher | None],
        stats: StreamStats,
        loop: asyncio.AbstractEventLoop,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.services = services
        self.publisher = publisher
        self.stats = stats
        self.loop = loop
        #: Times regions came up (the move-back hold); the loop's clock unless a test's.
        self.clock = clock if clock is not None else loop.time
        self.tasks: dict[str, asyncio.Task[None]] = {}
        #: Channel -> the region its subscription is connected to now.
        self.connected: dict[str, str] = {}
        #: Subscriptions made since start, by region.
        self.made: dict[str, int] = {}
        #: Channel -> the attempt (region, backend) its subscription is connected to now.
        self.attempts: dict[str, Attempt] = {}
        #: Subscriptions moved while connected, by reason (``backend_down``,
        #: ``nearer_region_back``).
        self.moves: dict[str, int] = {}
        self.uptime = RegionUptime()
        self._session: aiohttp.ClientSession | None = None

    def open(self, name: str, first: Attempt | None = None) -> None:
        """Subscribes to ``name`` (on ``first``, else where the failover walk says)."""
        if name not in self.tasks:
            self.tasks[name] = self.loop.create_task(self._run(name, first))

    def close(self, name: str) -> None:
        task = self.tasks.pop(name, None)
        if task is not None:
            task.cancel()
        self.connected.pop(name, None)
        self.attempts.pop(name, None)

    def move_off_unhealthy(self) -> None:
        """Subscriptions on a backend the health monitor took out of rotation, or in a region
        it holds down, move to the next one, as requests would, resubscribing since their
        last sequence (no gap).  One that has nowhere else to go stays where it is."""
        health = self.services.health.snapshot
        for name, attempt in list(self.attempts.items()):
            if health.region_up(attempt.region) and attempt.backend in health.usable_backends(
                attempt.region
            ):
                continue  # (a region in panic lists every backend as usable: not "up")
            if self._next([attempt]) is None:
                continue
            self._move(name, attempt, "backend_down")

    def on_health(self, snapshot: HealthView) -> None:
        """A new health snapshot (the monitor's subscription): regions coming up are timed
        from now, for the move-back hold."""
        self.uptime.observe(
            (r.name for r in self.services.state.config.regions), snapshot, self.clock()
        )

    def move_back_nearer(self) -> None:
        """Subscriptions on a region behind one that has been up for ``move_back_after`` move
        back to it (``edge.streams.moveback``), at most ``move_back_rate`` per call (one
        sweep), resubscribing since their last sequence."""
        state, health = self.services.state, self.services.health.snapshot
        streams = state.config.edge.streams
        target = state.router.match("", streams.upstream_path) if streams is not None else None
        now = self.clock()
        # Also here, not only on the subscription: a worker without one still times regions.
        self.on_health(health)
        if streams is None or target is None or not self.attempts:
            return
        regions = live_regions(target.regions, health)
        budget = streams.move_back_rate
        for name, attempt in list(self.attempts.items()):
            region = nearer_region(
                attempt.region, regions, self.uptime.since, now, streams.move_back_after
            )
            if region is None:
                continue
            first = next_attempt((region,), health, [], {}, self.services.rng)
            if first is None:
                continue
            self._move(name, attempt, "nearer_region_back", first)
            budget -= 1
            if budget == 0:
                return  # the others on the next sweeps

    def _move(self, name: str, attempt: Attempt, reason: str, first: Attempt | None = None) -> None:
        # A move back names where it goes; a move off lets the walk choose.
        where = {"to": first.region} if first is not None else {}
        log.info(
            "stream_upstream_moving",
            channel=name,
            region=attempt.region,
            backend=attempt.backend,
            reason=reason,
            **where,
        )
        self.moves[reason] = self.moves.get(reason, 0) + 1
        self.close(name)
        self.open(name, first)

    async def aclose(self) -> None:
        tasks = list(self.tasks.values())
        for name in list(self.tasks):
            self.close(name)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connect = self.services.state.config.edge.timeouts.connect
            self._session = aiohttp.ClientSession(
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=connect * 2, sock_connect=connect, sock_read=None
                ),
            )
        return self._session

    def _next(self, tried: list[Attempt]) -> Attempt | None:
        state, health = self.services.state, self.services.health.snapshot
        streams = state.config.edge.streams
        if streams is None:
            return None
        target = state.router.match("", streams.upstream_path)
        if target is None:
            return None
        regions = live_regions(target.regions, health)
        return next_attempt(regions, health, tried, {}, self.services.rng)

    async def _run(self, name: str, first: Attempt | None = None) -> None:
        tried: list[Attempt] = []
        delay = 0.0
        while True:
            # A move back names its first attempt; the walk decides the others.
            attempt = first if first is not None else self._next(tried)
            first = None
            if attempt is None:
                streams = self.services.state.config.edge.streams
                base = streams.retry_delay if streams is not None else 1.0
                delay = min(MAX_RETRY_DELAY, max(base, delay * 2))
                tried.clear()
                await asyncio.sleep(delay)
                continue
            tried.append(attempt)
            outcome = await self._subscribe(name, attempt)
            if outcome == "refused":
                return
            # Failed or ended there: nothing moves back to it before a full hold.
            self.uptime.setback(attempt.region, self.clock())
            if outcome == "served":
                # It worked, then ended: the next try goes elsewhere first, at once.
                tried[:] = [attempt]
                delay = 0.0

    async def _subscribe(self, name: str, attempt: Attempt) -> str:
        """One upstream subscription; "failed", "served" (it delivered, then ended) or
        "refused" (the origin does not know the channel: the hub is told)."""
        services = self.services
        streams = services.state.config.edge.streams
        publisher = self.publisher()
        if streams is None or publisher is None:
            return "refused"
        pool = services.upstream.client.pool(attempt.backend)
        backend, tls = pool.backend, pool.tls
        since = publisher.last_seq(name)
        query = f"?channel={quote(name, safe=':')}" + (
            f"&since={since}" if since is not None else ""
        )
        host = f"[{backend.host}]" if ":" in backend.host else backend.host
        url = (
            f"{'wss' if tls is not None else 'ws'}://{host}:{backend.port}"
            f"{backend.prefix.decode('ascii')}{streams.upstream_path}{query}"
        )
        try:
            async with self._client().ws_connect(
                url,
                ssl=tls if tls is not None else True,
                max_msg_size=streams.max_upstream_message,
                heartbeat=streams.ping_interval,
                timeout=aiohttp.ClientWSTimeout(ws_close=1.0),
                autoclose=True,
                compress=0,
                proxy=None,
            ) as ws:
                services.health.report(attempt.backend, True)
                self.connected[name] = attempt.region
                self.attempts[name] = attempt
                self.made[attempt.region] = self.made.get(attempt.region, 0) + 1
                log.info("stream_upstream_open", channel=name, region=attempt.region, since=since)
                delivered = await self._pump(name, ws)
        except aiohttp.WSServerHandshakeError as exc:
            if 400 <= exc.status < 500:
                log.warning("stream_upstream_refused", channel=name, status=exc.status)
                publisher.fail(name, "unknown_channel")
                self.tasks.pop(name, None)
                return "refused"
            services.health.report(attempt.backend, False)
            return "failed"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            services.health.report(attempt.backend, False)
            log.warning(
                "stream_upstream_failed", channel=name, region=attempt.region, error=repr(exc)
            )
            self.attempts.pop(name, None)
            return "failed" if self.connected.pop(name, None) is None else "served"
        region = self.connected.pop(name, None)
        self.attempts.pop(name, None)
        log.warning("stream_upstream_lost", channel=name, region=region, messages=delivered)
        # One that ended before delivering anything counts as a failure (backoff applies):
        # an origin that accepts and closes at once is not hammered.
        return "served" if delivered else "failed"

    async def _pump(self, name: str, ws: aiohttp.ClientWebSocketResponse) -> int:
        """Publishes what the upstream sends until it ends; how many messages it sent."""
        stats = self.stats
        count = 0
        async for message in ws:
            count += 1
            if message.type == aiohttp.WSMsgType.BINARY:
                data: bytes = message.data
            elif message.type == aiohttp.WSMsgType.TEXT:
                data = message.data.encode()
            else:
                break
            parsed = parse_message(name, data)
            publisher = self.publisher()
            if parsed is None or publisher is None:
                stats.invalid += 1
                continue
            publisher.publish(name, data, parsed[0], parsed[1])
        return count
