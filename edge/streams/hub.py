"""The stream hub: channels, their subscribers, bounded history and sequence tracking (no I/O).

A channel holds the last ``history`` messages of its upstream subscription, each as the frame
bytes written to clients (framed once, ``edge.streams.frames``).  Sequences are the origin's:

* an upstream message at or below the channel's last sequence is a duplicate (a
  resubscription's overlap) and is dropped;
* one past the last sequence is published: appended to the history, written to every live
  subscriber (``Subscriber``: direct write, else queue and policy);
* further ahead is a gap the upstream could not bridge: every subscriber is told with one
  ``resync`` frame (the sequence after which the stream continues; their state must be
  refetched), and the history restarts there, so history never spans a hole.

A client joins a channel live, ``since`` a sequence, or after a snapshot that reflects a
sequence (``start``): what it missed comes from the history when the history reaches back far
enough, else it gets a ``resync``; a client asking for what the channel has not published yet
waits for it.  Either way it sees each sequence at most once and never a silent hole.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable

from edge.streams.frames import DEFLATE, EVENTS, KINDS, data_frame, sse_event, text_frame
from edge.streams.queue import Subscriber, write_to_each
from edge.streams.stats import StreamStats
from meridian.config import CHANNEL_NAME, EdgeStreams, StreamChannel

#: Seconds a channel the upstream refused is refused at once (no new upstream attempt), and
#: how many such names are remembered (the oldest are forgotten first).
REFUSED_FOR = 30.0
REFUSED_MAX = 10_000


def channel_policy(streams: EdgeStreams, name: str) -> StreamChannel | None:
    """The first channel pattern that matches ``name`` (exact, or a prefix ending in ``*``)."""
    if not CHANNEL_NAME.fullmatch(name):
        return None
    for channel in streams.channels:
        pattern = channel.pattern
        if (pattern.endswith("*") and name.startswith(pattern[:-1])) or pattern == name:
            return channel
    return None


def control(kind: str, channel: str, **fields: object) -> bytes:
    """A message of the edge's own (``subscribed``, ``resync``, ``error``, ...), unframed."""
    return json.dumps({"type": kind, "channel": channel, **fields}).encode()


def framed(sse: bool, kind: str, payload: bytes) -> bytes:
    """A message of the edge's own as a WebSocket frame, or as an event named ``kind``."""
    return sse_event(payload, event=kind) if sse else text_frame(payload)


def notify(sub: Subscriber[Channel], kind: str, channel: str, **fields: object) -> None:
    sub.send(framed(sub.sse, kind, control(kind, channel, **fields)))


class Channel:
    """One channel at this edge: its history and its subscribers."""

    __slots__ = (
        "conflate",
        "groups",
        "history",
        "history_bytes",
        "history_limit",
        "idle_since",
        "last_seq",
        "members",
        "name",
        "waiting",
    )

    def __init__(self, name: str, policy: StreamChannel, now: float) -> None:
        self.name = name
        self.conflate = policy.slow_consumer == "conflate"
        #: (sequence, origin timestamp, payload, its bytes per kind of subscriber: made when
        #: first needed), oldest first, consecutive sequences.
        self.history: deque[tuple[int, float, bytes, list[bytes | None]]] = deque()
        #: Payload bytes in the history, and the bounds (messages, bytes).
        self.history_bytes = 0
        self.history_limit = (policy.history, policy.history_bytes)
        self.last_seq: int | None = None
        #: Live subscribers by kind (``edge.streams.frames``: PLAIN, DEFLATE, EVENTS), in dicts
        #: (ordered, O(1) removal): each kind gets its own bytes, made once per message.
        self.groups: tuple[dict[Subscriber[Channel], None], ...] = tuple({} for _ in range(KINDS))
        #: Subscribers waiting for a sequence the channel has not published: (who, after).
        self.waiting: dict[Subscriber[Channel], int] = {}
        #: Subscriptions, started or not (a snapshot being fetched).
        self.members = 0
        #: When the last subscriber left (the upstream subscription lingers), or None.
        self.idle_since: float | None = now

    @property
    def oldest_seq(self) -> int | None:
        return self.history[0][0] if self.history else None

    def reconfigure(self, policy: StreamChannel) -> None:
        self.conflate = policy.slow_consumer == "conflate"
        self.history_limit = (policy.history, policy.history_bytes)
        self._trim()

    def remember(self, seq: int, ts: float, payload: bytes) -> list[bytes | None]:
        """Appends a message to the history (the oldest go past either bound); its frames
        per kind of subscriber, to be filled in."""
        frames: list[bytes | None] = [None] * KINDS
        self.history.append((seq, ts, payload, frames))
        self.history_bytes += len(payload)
        self._trim()
        return frames

    def forget(self) -> None:
        self.history.clear()
        self.history_bytes = 0

    def _trim(self) -> None:
        history, (count, size) = self.history, self.history_limit
        while len(history) > 1 and (len(history) > count or self.history_bytes > size):
            self.history_bytes -= len(history.popleft()[2])

    def replay(self, sub: Subscriber[Channel], after: int) -> bool:
        """Send ``sub`` every message after ``after`` from the history; False when the history
        does not reach back to ``after + 1`` (nothing is sent)."""
        oldest = self.oldest_seq
        if oldest is None or oldest > after + 1:
            return False
        kind = sub.kind
        for seq, ts, payload, frames in self.history:
            if seq > after:
                frame = frames[kind]
                if frame is None:
                    frame = frames[kind] = data_frame(kind, payload, seq)
                sub.send(frame, ts)
        return True

    def live(self, sub: Subscriber[Channel]) -> None:
        self.groups[sub.kind][sub] = None

    def everyone(self) -> list[Subscriber[Channel]]:
        """Live and waiting subscribers."""
        return [sub for group in self.groups for sub in group] + list(self.waiting)


class Hub:
    """Every channel of one worker.  ``on_open(name)``/``on_close(name)`` start and stop the
    channel's upstream subscription (``edge.streams.upstream``)."""

    def __init__(
        self,
        streams: EdgeStreams,
        *,
        clock: Callable[[], float],
        stats: StreamStats,
        on_open: Callable[[str], None],
        on_close: Callable[[str], None],
    ) -> None:
        self.streams = streams
        self.clock = clock
        self.stats = stats
        self.on_open = on_open
        self.on_close = on_close
        self.channels: dict[str, Channel] = {}
        #: Subscriptions per client address (``max_subscriptions_per_ip``).
        self.per_ip: dict[str, int] = {}
        #: Channels the upstream refused, until when (a client cannot make the edge ask the
        #: origin for an unknown channel again and again).
        self.refused: dict[str, float] = {}

    def configure(self, streams: EdgeStreams) -> None:
        """A reload: new policies and limits for open channels; nothing is closed."""
        self.streams = streams
        for name, channel in self.channels.items():
            policy = channel_policy(streams, name)
            if policy is not None:
                channel.reconfigure(policy)

    # -- subscriptions ------------------------------------------------------------------------

    def join(self, sub: Subscriber[Channel], name: str) -> str | None:
        """Adds a (not yet started) subscription; the reason when it is refused."""
        streams = self.streams
        if name in sub.channels:
            return "already_subscribed"
        policy = channel_policy(streams, name)
        if policy is None:
            return "unknown_channel"
        until = self.refused.get(name)
        if until is not None:
            if self.clock() < until:
                return "unknown_channel"
            del self.refused[name]
        if len(sub.channels) >= streams.max_subscriptions_per_connection:
            return "too_many_subscriptions"
        held = self.per_ip.get(sub.ip, 0)
        if streams.max_subscriptions_per_ip and held >= streams.max_subscriptions_per_ip:
            return "too_many_subscriptions_from_address"
        channel = self.channels.get(name)
        if channel is None:
            if len(self.channels) >= streams.max_channels:
                return "too_many_channels"
            channel = self.channels[name] = Channel(name, policy, self.clock())
            self.on_open(name)
        channel.idle_since = None
        channel.members += 1
        sub.channels[name] = channel
        self.per_ip[sub.ip] = held + 1
        return None

    def start(self, sub: Subscriber[Channel], name: str, after: int | None) -> None:
        """Starts a joined subscription: live (``after`` None), or with every message after
        ``after`` (a ``since``, or the sequence a snapshot reflects)."""
        channel = sub.channels.get(name)
        if channel is None or sub.closed:
            return
        if self.channels.get(name) is not channel:  # failed while a snapshot was fetched
            notify(sub, "error", name, reason="upstream_refused")
            self.leave(sub, name)
            return
        last = channel.last_seq
        notify(sub, "subscribed", name, seq=last)
        if after is None or (last is not None and after == last):
            channel.live(sub)
        elif last is None or after > last:
            channel.waiting[sub] = after
        elif channel.replay(sub, after):
            channel.live(sub)
        else:
            self._resync_one(sub, channel, last, "history")
            channel.live(sub)

    def leave(self, sub: Subscriber[Channel], name: str) -> bool:
        channel = sub.channels.pop(name, None)
        if channel is None:
            return False
        channel.groups[sub.kind].pop(sub, None)
        channel.waiting.pop(sub, None)
        sub.slots.pop(channel, None)  # a conflated frame still queued stays in the queue
        held = self.per_ip.get(sub.ip, 1) - 1
        if held > 0:
            self.per_ip[sub.ip] = held
        else:
            self.per_ip.pop(sub.ip, None)
        channel.members -= 1
        if channel.members <= 0:
            channel.idle_since = self.clock()
        return True

    def remove(self, sub: Subscriber[Channel]) -> None:
        """The client is gone: every subscription ends, nothing more is written to it."""
        for name in list(sub.channels):
            self.leave(sub, name)
        sub.mark_closed()

    # -- upstream -----------------------------------------------------------------------------

    def publish(self, name: str, payload: bytes, seq: int, ts: float) -> bool:
        """An upstream message (already validated); False when it was not published (a
        duplicate, or no such channel)."""
        channel = self.channels.get(name)
        if channel is None:
            return False
        stats = self.stats
        stats.messages_in += 1
        stats.arrived(ts)
        last = channel.last_seq
        if last is not None and seq <= last:
            stats.duplicates += 1
            return False
        if last is not None and seq > last + 1:
            self._gap(channel, seq)
        frames = channel.remember(seq, ts, payload)
        channel.last_seq = seq
        for kind, group in enumerate(channel.groups):
            if group:
                frame = frames[kind] = data_frame(kind, payload, seq)
                if kind == DEFLATE:
                    stats.compressed += 1
                self._fan_out(group, frame, ts, channel)
        if channel.waiting:
            self._promote(channel, seq)
        return True

    def _fan_out(
        self,
        subscribers: dict[Subscriber[Channel], None],
        frame: bytes,
        ts: float,
        channel: Channel,
    ) -> None:
        """The same bytes to every subscriber: recorded once in the write batch, else written
        at once or queued (``Subscriber``)."""
        subs = tuple(subscribers)
        batch = subs[0].batch
        if batch is not None:
            batch.fan_out(frame, ts, channel, subs)
            return
        write_to_each(frame, ts, channel, subs)

    def _gap(self, channel: Channel, seq: int) -> None:
        """The upstream continues past a hole: one resync frame for every subscriber."""
        self.stats.resyncs["upstream_gap"] += sum(len(group) for group in channel.groups)
        payload = control("resync", channel.name, seq=seq - 1, reason="upstream_gap")
        for kind, group in enumerate(channel.groups):
            frame = framed(kind == EVENTS, "resync", payload)
            for sub in tuple(group):
                sub.send(frame)
        channel.forget()
        # Waiting subscribers asked for something now lost: they learn it when promoted.

    def _promote(self, channel: Channel, seq: int) -> None:
        for sub, after in tuple(channel.waiting.items()):
            if after >= seq:
                continue
            del channel.waiting[sub]
            if not channel.replay(sub, after):
                self._resync_one(sub, channel, seq - 1, "history")
                channel.replay(sub, seq - 1)
            channel.live(sub)

    def _resync_one(
        self, sub: Subscriber[Channel], channel: Channel, seq: int, reason: str
    ) -> None:
        self.stats.resyncs[reason] += 1
        notify(sub, "resync", channel.name, seq=seq, reason=reason)

    def fail(self, name: str, reason: str) -> None:
        """The upstream refused the channel: its subscribers are told and it is closed."""
        channel = self.channels.get(name)
        if channel is None:
            return
        for sub in channel.everyone():
            notify(sub, "error", name, reason=reason)
            self.leave(sub, name)
        # Subscribers still fetching a snapshot find the channel gone when they start.
        self.channels.pop(name, None)
        if len(self.refused) >= REFUSED_MAX:
            del self.refused[next(iter(self.refused))]
        self.refused[name] = self.clock() + REFUSED_FOR
        self.on_close(name)

    def sweep(self) -> None:
        """Closes channels nobody has subscribed to for ``linger`` seconds."""
        now, linger = self.clock(), self.streams.linger
        for name, channel in list(self.channels.items()):
            if channel.idle_since is not None and now - channel.idle_since >= linger:
                del self.channels[name]
                self.on_close(name)
