"""The sample origin's market streams: channels with per-channel sequences, replay, snapshots.

Channels are ``ticker:SYMBOL``, ``trades:SYMBOL`` and ``depth:SYMBOL``.  Every channel
publishes at ``rate`` messages per second, and message ``n`` of channel ``c`` is scheduled at
``(n + phase(c)) / rate`` (Unix time) and derived from (channel, n) alone: every region
publishes the same bytes under the same sequence number at the same time, so an edge that
loses one region resubscribes to another ``since`` its last sequence and continues with no gap
and no difference.  What a region can replay is bounded (``history`` messages back from now),
like a real feed's.

A channel's phase is a fraction of the tick interval taken from a hash of its name
(``channel_phase``): real markets do not tick every instrument at the same instant, and a
publisher that did would hand an edge every channel's fan-out in one burst.  ``lockstep``
puts every phase at 0 (every channel ticks together: the worst case for a fan-out, kept for
benchmarks).

    GET /stream?channel=ticker:BTC-USD[&since=SEQ]   WebSocket: one text frame per message
    GET /api/v1/snapshot/ticker:BTC-USD              the channel's state at a sequence

A message is ``{"channel": C, "seq": N, "ts": T, "data": {...}}`` with ``ts`` the origin
timestamp (the scheduled publish time, seconds).  A snapshot is ``{"channel": C, "seq": N,
"ts": T, "data": ...}`` too, with ``X-Sequence: N``: for ticker and depth the value of message
N (each message is the whole value), for trades the last ``SNAPSHOT_TRADES`` trades up to N.
A client that applies the snapshot then every message after N has missed nothing.

``GET /_control`` reports the open stream subscriptions per channel (``streams``), and how late
the publishing tasks wrote their messages (``publish_late_ms``: write time minus ``ts``, a count
per whole millisecond): the first hop of a message's delivery lag, measured where it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import Counter
from typing import Any

from aiohttp import WSMsgType, web

from meridian.log import get_logger

log = get_logger("origin.streams")

KINDS = ("ticker", "trades", "depth")
DEFAULT_RATE = 10.0
DEFAULT_HISTORY = 10_000
SNAPSHOT_TRADES = 20
DEPTH_LEVELS = 10
#: Subscriptions one origin process serves at once (each is a WebSocket).
MAX_SUBSCRIPTIONS = 10_000


def _rng_value(channel: str, seq: int, salt: int) -> float:
    """A deterministic number in [0, 1) from (channel, seq, salt): the same in every process."""
    h = 1469598103934665603
    for byte in f"{channel}|{seq}|{salt}".encode():
        h = ((h ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return (h >> 11) / float(1 << 53)


def channel_phase(channel: str) -> float:
    """Where in the tick interval ``channel`` ticks, in [0, 1): from its name alone, so every
    region (and every run) agrees."""
    return _rng_value(channel, 0, 0x9E37)


class Feed:
    """The deterministic channels of one origin process (no I/O: tested with a clock)."""

    def __init__(
        self,
        symbols: dict[str, tuple[float, int]],
        rate: float,
        history: int,
        *,
        lockstep: bool = False,
    ) -> None:
        #: symbol -> (reference price, price decimals)
        self.symbols = symbols
        self.rate = rate
        self.history = history
        self.lockstep = lockstep

    def known(self, channel: str) -> bool:
        kind, _, symbol = channel.partition(":")
        return kind in KINDS and symbol in self.symbols

    def phase(self, channel: str) -> float:
        """The channel's offset in the tick interval, as a fraction of it (0 in lockstep)."""
        return 0.0 if self.lockstep else channel_phase(channel)

    def current(self, channel: str, now: float) -> int:
        """The channel's last sequence published at ``now``."""
        return math.floor(now * self.rate - self.phase(channel))

    def oldest(self, channel: str, now: float) -> int:
        """The channel's oldest sequence still replayable at ``now``."""
        return self.current(channel, now) - self.history + 1

    def timestamp(self, channel: str, seq: int) -> float:
        """When message ``seq`` of ``channel`` is published (its ``ts``)."""
        return (seq + self.phase(channel)) / self.rate

    def data(self, channel: str, seq: int) -> dict[str, Any]:
        kind, _, symbol = channel.partition(":")
        base, decimals = self.symbols[symbol]
        # A slow wave plus noise: prices that look alive and are the same everywhere.
        mid = base * (
            1.0 + 0.01 * math.sin(seq / 600.0) + 0.0005 * (_rng_value(channel, seq, 0) - 0.5)
        )
        if kind == "ticker":
            spread = base * 0.0001
            return {
                "bid": round(mid - spread, decimals),
                "ask": round(mid + spread, decimals),
                "last": round(mid, decimals),
                "volume": round(1000 * _rng_value(channel, seq, 1), 4),
            }
        if kind == "trades":
            return {
                "id": seq,
                "price": round(mid, decimals),
                "size": round(5 * _rng_value(channel, seq, 2), 6),
                "side": "buy" if _rng_value(channel, seq, 3) < 0.5 else "sell",
            }
        step = base * 0.00005
        return {
            "bids": [
                [
                    round(mid - step * (i + 1), decimals),
                    round(10 * _rng_value(channel, seq, 10 + i), 4),
                ]
                for i in range(DEPTH_LEVELS)
            ],
            "asks": [
                [
                    round(mid + step * (i + 1), decimals),
                    round(10 * _rng_value(channel, seq, 40 + i), 4),
                ]
                for i in range(DEPTH_LEVELS)
            ],
        }

    def message(self, channel: str, seq: int) -> bytes:
        document = {
            "channel": channel,
            "seq": seq,
            "ts": self.timestamp(channel, seq),
            "data": self.data(channel, seq),
        }
        return json.dumps(document, separators=(",", ":")).encode()

    def snapshot(self, channel: str, seq: int) -> bytes:
        kind = channel.partition(":")[0]
        data: Any
        if kind == "trades":
            data = [self.data(channel, n) for n in range(seq - SNAPSHOT_TRADES + 1, seq + 1)]
        else:
            data = self.data(channel, seq)
        document = {
            "channel": channel,
            "seq": seq,
            "ts": self.timestamp(channel, seq),
            "data": data,
        }
        return json.dumps(document, separators=(",", ":")).encode()


#: The largest lateness kept apart (ms); later writes are counted in this bucket.
LATE_CAP_MS = 10_000


class Lateness:
    """How late messages were written, a count per whole millisecond (bounded: at most
    ``LATE_CAP_MS + 1`` buckets)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()

    def record(self, seconds: float, count: int = 1) -> None:
        self.counts[min(LATE_CAP_MS, max(0, int(seconds * 1000)))] += count

    def snapshot(self) -> dict[str, int]:
        return {str(ms): n for ms, n in sorted(self.counts.items())}


class StreamServer:
    """The stream endpoints of one origin: one publishing task per channel in use, its
    subscribers, each channel on its own schedule (``Feed.timestamp``)."""

    def __init__(self, feed: Feed) -> None:
        self.feed = feed
        self.subscribers: dict[str, set[web.WebSocketResponse]] = {}
        #: Subscriptions opened since start, per channel.
        self.opened: Counter[str] = Counter()
        #: Channel -> the last sequence its task has published (channels in use only).
        self.sent: dict[str, int] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running = False
        #: Write time minus ``ts`` of every message written by the publishing tasks.
        self.late = Lateness()

    def status(self) -> dict[str, Any]:
        return {
            "subscriptions": {c: len(s) for c, s in sorted(self.subscribers.items()) if s},
            "opened": dict(sorted(self.opened.items())),
            "rate": self.feed.rate,
            "history": self.feed.history,
            "lockstep": self.feed.lockstep,
            "publish_late_ms": self.late.snapshot(),
        }

    def install(self, app: web.Application) -> None:
        app.router.add_get("/stream", self.handle_stream)
        app.router.add_get("/api/v1/snapshot/{channel}", self.handle_snapshot)
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._stop)

    async def _start(self, _app: web.Application) -> None:
        self._running = True

    async def _stop(self, _app: web.Application) -> None:
        self._running = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sockets in list(self.subscribers.values()):
            for ws in list(sockets):
                await ws.close(code=1001, message=b"origin shutting down")

    def published(self, channel: str) -> int:
        """The channel's last published sequence; its publishing task starts on first use
        (what was scheduled before counts as published: a subscriber replays it)."""
        sent = self.sent.get(channel)
        if sent is None:
            sent = self.sent[channel] = self.feed.current(channel, time.time())
            if self._running:
                self._tasks[channel] = asyncio.create_task(self._publish(channel))
        return sent

    def _channel(self, request: web.Request) -> str:
        channel = request.query.get("channel", "") or request.match_info.get("channel", "")
        if not self.feed.known(channel):
            raise web.HTTPNotFound(text=f"unknown channel {channel[:80]!r}")
        return channel

    async def handle_snapshot(self, request: web.Request) -> web.StreamResponse:
        channel = self._channel(request)
        seq = self.published(channel)
        return web.Response(
            body=self.feed.snapshot(channel, seq),
            content_type="application/json",
            headers={"Cache-Control": "public, max-age=1", "X-Sequence": str(seq)},
        )

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        channel = self._channel(request)
        since_text = request.query.get("since")
        since: int | None = None
        if since_text is not None:
            try:
                since = int(since_text)
            except ValueError:
                raise web.HTTPBadRequest(text="since must be an integer") from None
        if sum(len(s) for s in self.subscribers.values()) >= MAX_SUBSCRIPTIONS:
            raise web.HTTPServiceUnavailable(text="too many subscriptions")
        ws = web.WebSocketResponse(autoping=True, heartbeat=None, max_msg_size=4096)
        await ws.prepare(request)
        sockets = self.subscribers.setdefault(channel, set())
        self.opened[channel] += 1
        self.published(channel)
        try:
            if since is not None:
                # Replay what this region still has up to what the channel's task has
                # published, then join it with no await in between: nothing is missed,
                # nothing repeated.
                first = max(since + 1, self.feed.oldest(channel, time.time()))
                while True:
                    last = self.sent[channel]
                    for seq in range(first, last + 1):
                        await ws.send_bytes(self.feed.message(channel, seq))
                    first = max(first, last + 1)
                    if self.sent[channel] == last:
                        break
            sockets.add(ws)
            async for message in ws:
                if message.type == WSMsgType.ERROR:
                    break
        finally:
            sockets.discard(ws)
        return ws

    async def _publish(self, channel: str) -> None:
        """Publishes message ``n`` of ``channel`` at ``feed.timestamp(channel, n)``."""
        feed = self.feed
        sockets = self.subscribers.setdefault(channel, set())
        while True:
            sent = self.sent[channel]
            next_at = feed.timestamp(channel, sent + 1)
            await asyncio.sleep(max(0.0, next_at - time.time()))
            now_seq = feed.current(channel, time.time())
            # Woken very late (a suspended process): what no subscriber could replay any
            # more is skipped (subscribers see the gap and resync), not sent in a burst.
            sent = max(sent, now_seq - max(1, feed.history))
            for seq in range(sent + 1, now_seq + 1):
                # Published as of now: a subscriber joining later replays it instead.
                self.sent[channel] = seq
                if not sockets:
                    continue
                message = feed.message(channel, seq)
                self.late.record(time.time() - feed.timestamp(channel, seq), len(sockets))
                for ws in list(sockets):
                    if ws.closed:
                        sockets.discard(ws)
                        continue
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await ws.send_bytes(message)
