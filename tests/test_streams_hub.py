"""The stream hub's sequence and slow-consumer logic, in memory (``edge.streams.hub``).

Clients are fake transports (a list of written frames and a ``paused`` flag) and a checker
that reads what a client would: every sequence at most once, none skipped on a channel that
does not conflate unless a ``resync`` said so, and a ``since`` or a snapshot continued exactly.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.streams.frames import text_frame
from edge.streams.hub import Hub, channel_policy
from edge.streams.queue import Subscriber
from edge.streams.stats import StreamStats
from meridian.config import EdgeStreams, StreamChannel

STREAMS = EdgeStreams(
    channels=(
        StreamChannel("ticker:*", slow_consumer="conflate", history=8),
        StreamChannel("trades:*", slow_consumer="disconnect", history=8),
    ),
    send_queue=4096,
    linger=5.0,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeClient:
    """A transport: frames written, a pause flag, and the close the policy asked for."""

    def __init__(self, hub: Hub, stats: StreamStats, ip: str = "192.0.2.1", limit: int = 4096):
        self.frames: list[bytes] = []
        self.closed: tuple[int, str] | None = None
        self.hub = hub
        self.sub = Subscriber(self.frames.append, self._close, ip, limit, stats)

    def _close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
        self.hub.remove(self.sub)

    def messages(self) -> list[dict[str, Any]]:
        out = []
        for frame in [f for write in self.frames for f in split_frames(write)]:
            assert frame[0] == 0x81  # final text frame, unmasked (no mask bit below)
            size = frame[1]
            assert not size & 0x80
            offset = 2 if size < 126 else 4
            out.append(json.loads(frame[offset:]))
        return out


def make_hub(streams: EdgeStreams = STREAMS) -> tuple[Hub, StreamStats, Clock, list[str]]:
    clock = Clock()
    stats = StreamStats(clock)
    events: list[str] = []
    hub = Hub(
        streams,
        clock=clock,
        stats=stats,
        on_open=lambda name: events.append(f"open {name}"),
        on_close=lambda name: events.append(f"close {name}"),
    )
    return hub, stats, clock, events


def payload(channel: str, seq: int) -> bytes:
    return json.dumps({"channel": channel, "seq": seq, "ts": 999.0, "data": {"v": seq}}).encode()


def publish(hub: Hub, channel: str, seq: int) -> bool:
    return hub.publish(channel, payload(channel, seq), seq, 999.0)


def check(
    messages: list[dict[str, Any]], channel: str, *, conflate: bool, since: int | None = None
) -> list[int]:
    """The client-side checker: the data sequences seen; fails on a duplicate, a step back,
    or (without conflation) a hole that no resync announced; ``since``: what the client
    subscribed after (the first message must be the next one)."""
    expected: int | None = None if since is None else since + 1
    seen: list[int] = []
    for message in messages:
        if message.get("channel") != channel:
            continue
        kind = message.get("type")
        if kind == "resync":
            expected = message["seq"] + 1
            continue
        if kind == "snapshot":
            expected = message["seq"] + 1
            continue
        if kind == "subscribed":
            continue
        seq = message["seq"]
        if expected is not None:
            if conflate:
                assert seq >= expected, (seq, expected, seen)
            else:
                assert seq == expected, (seq, expected, seen)
        assert seq not in seen
        seen.append(seq)
        expected = seq + 1
    return seen


def test_channel_patterns_match_prefix_or_exact_name():
    assert channel_policy(STREAMS, "ticker:BTC-USD") is STREAMS.channels[0]
    assert channel_policy(STREAMS, "trades:ETH-USD") is STREAMS.channels[1]
    assert channel_policy(STREAMS, "depth:BTC-USD") is None
    assert channel_policy(STREAMS, "ticker:") is None
    assert channel_policy(STREAMS, "ticker:BTC USD") is None
    assert channel_policy(STREAMS, "ticker:" + "X" * 65) is None


def test_one_frame_object_is_written_to_every_subscriber():
    hub, stats, _, events = make_hub()
    clients = [FakeClient(hub, stats) for _ in range(3)]
    for client in clients:
        assert hub.join(client.sub, "trades:BTC-USD") is None
        hub.start(client.sub, "trades:BTC-USD", None)
    assert events == ["open trades:BTC-USD"]
    publish(hub, "trades:BTC-USD", 1)
    frames = [client.frames[-1] for client in clients]
    assert frames[0] == text_frame(payload("trades:BTC-USD", 1))
    assert all(frame is frames[0] for frame in frames)
    assert stats.messages_in == 1
    assert stats.messages_out == 3 + 3  # three acknowledgements, three deliveries


def test_duplicates_are_dropped_and_a_gap_is_announced():
    hub, stats, _, _ = make_hub()
    client = FakeClient(hub, stats)
    hub.join(client.sub, "trades:X")
    hub.start(client.sub, "trades:X", None)
    for seq in (1, 2, 2, 1, 3, 7, 8):
        publish(hub, "trades:X", seq)
    messages = client.messages()
    assert check(messages, "trades:X", conflate=False) == [1, 2, 3, 7, 8]
    assert [m for m in messages if m.get("type") == "resync"] == [
        {"type": "resync", "channel": "trades:X", "seq": 6, "reason": "upstream_gap"}
    ]
    assert stats.duplicates == 2
    assert stats.resyncs["upstream_gap"] == 1


def test_since_replays_from_history_or_resyncs_when_it_cannot_bridge():
    hub, stats, _, _ = make_hub()
    first = FakeClient(hub, stats)
    hub.join(first.sub, "trades:X")
    hub.start(first.sub, "trades:X", None)
    for seq in range(1, 21):  # history keeps 13..20
        publish(hub, "trades:X", seq)
    near, far, ahead = FakeClient(hub, stats), FakeClient(hub, stats), FakeClient(hub, stats)
    for client, since in ((near, 14), (far, 3), (ahead, 22)):
        hub.join(client.sub, "trades:X")
        hub.start(client.sub, "trades:X", since)
    for seq in range(21, 25):
        publish(hub, "trades:X", seq)
    assert check(near.messages(), "trades:X", conflate=False) == list(range(15, 25))
    far_messages = far.messages()
    assert far_messages[1] == {
        "type": "resync",
        "channel": "trades:X",
        "seq": 20,
        "reason": "history",
    }
    assert check(far_messages, "trades:X", conflate=False) == list(range(21, 25))
    assert check(ahead.messages(), "trades:X", conflate=False) == [23, 24]


def test_a_stalled_trades_client_is_cut_with_1008_and_others_keep_receiving():
    hub, stats, _, _ = make_hub()
    stalled, healthy = FakeClient(hub, stats), FakeClient(hub, stats)
    for client in (stalled, healthy):
        hub.join(client.sub, "trades:X")
        hub.start(client.sub, "trades:X", None)
    stalled.sub.paused = True
    seq = 0
    while stalled.closed is None:
        seq += 1
        publish(hub, "trades:X", seq)
        assert seq < 1000
    assert stalled.closed == (1008, "slow consumer: send queue full on trades:X")
    for more in range(seq + 1, seq + 5):
        publish(hub, "trades:X", more)
    assert check(healthy.messages(), "trades:X", conflate=False) == list(range(1, seq + 5))
    assert stats.disconnected["slow_consumer"] == 1
    assert not stalled.sub.queue and stalled.sub.closed
    assert hub.per_ip == {"192.0.2.1": 1}


def test_a_stalled_ticker_client_is_conflated_to_the_latest_value():
    hub, stats, _, _ = make_hub()
    client = FakeClient(hub, stats)
    hub.join(client.sub, "ticker:X")
    hub.start(client.sub, "ticker:X", None)
    publish(hub, "ticker:X", 1)
    client.sub.paused = True
    for seq in range(2, 200):
        publish(hub, "ticker:X", seq)
    assert len(client.sub.queue) == 1 and client.closed is None
    client.sub.resume()
    assert check(client.messages(), "ticker:X", conflate=True) == [1, 199]
    assert stats.conflated == 197


def test_unsubscribe_and_linger_close_the_channel_once():
    hub, stats, clock, events = make_hub()
    client = FakeClient(hub, stats)
    hub.join(client.sub, "ticker:X")
    hub.start(client.sub, "ticker:X", None)
    assert hub.leave(client.sub, "ticker:X")
    clock.now += 4.9
    hub.sweep()
    assert "ticker:X" in hub.channels
    hub.join(client.sub, "ticker:X")  # back within the linger: same channel, same upstream
    hub.leave(client.sub, "ticker:X")
    clock.now += 5.0
    hub.sweep()
    assert events == ["open ticker:X", "close ticker:X"]
    assert hub.per_ip == {}


def test_limits_per_connection_address_and_channel_count():
    streams = replace(
        STREAMS, max_subscriptions_per_connection=2, max_subscriptions_per_ip=3, max_channels=4
    )
    hub, stats, _, _ = make_hub(streams)
    one, two = FakeClient(hub, stats), FakeClient(hub, stats)
    assert hub.join(one.sub, "ticker:A") is None
    assert hub.join(one.sub, "ticker:A") == "already_subscribed"
    assert hub.join(one.sub, "ticker:B") is None
    assert hub.join(one.sub, "ticker:C") == "too_many_subscriptions"
    assert hub.join(two.sub, "ticker:C") is None
    assert hub.join(two.sub, "ticker:D") == "too_many_subscriptions_from_address"
    other = FakeClient(hub, stats, ip="192.0.2.2")
    assert hub.join(other.sub, "ticker:D") is None
    assert hub.join(other.sub, "ticker:E") == "too_many_channels"
    assert hub.join(other.sub, "depth:A") == "unknown_channel"
    hub.remove(one.sub)
    assert hub.per_ip == {"192.0.2.1": 1, "192.0.2.2": 1}


def test_a_refused_channel_tells_its_subscribers():
    hub, stats, clock, events = make_hub()
    client = FakeClient(hub, stats)
    hub.join(client.sub, "ticker:NOPE")
    hub.start(client.sub, "ticker:NOPE", None)
    hub.fail("ticker:NOPE", "unknown_channel")
    assert client.messages()[-1] == {
        "type": "error",
        "channel": "ticker:NOPE",
        "reason": "unknown_channel",
    }
    assert events == ["open ticker:NOPE", "close ticker:NOPE"]
    assert not client.sub.channels and hub.per_ip == {}
    # Asked again at once: refused here, with no new upstream attempt; later, tried again.
    assert hub.join(client.sub, "ticker:NOPE") == "unknown_channel"
    clock.now += 30.0
    assert hub.join(client.sub, "ticker:NOPE") is None
    assert events[-1] == "open ticker:NOPE"


# Upstream: ("next" | "dup" | "gap", size); clients: (join at step, since offset or None,
# pause at step, resume at step).
_upstream = st.lists(
    st.tuples(st.sampled_from(["next", "next", "next", "dup", "gap"]), st.integers(1, 12)),
    min_size=1,
    max_size=80,
)
_clients = st.lists(
    st.tuples(
        st.integers(0, 80),
        st.one_of(st.none(), st.integers(-15, 5)),
        st.integers(0, 80),
        st.integers(0, 80),
    ),
    min_size=1,
    max_size=6,
)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("channel", ["trades:X", "ticker:X"])
@settings(max_examples=150, deadline=None)
@given(upstream=_upstream, clients=_clients)
def test_any_interleaving_is_gap_free_and_duplicate_free(channel, batched, upstream, clients):
    from edge.streams.queue import WriteBatch

    hub, stats, _, _ = make_hub(replace(STREAMS, send_queue=1500))
    conflate = channel.startswith("ticker")
    fakes = [FakeClient(hub, stats, limit=1500) for _ in clients]
    keeper = FakeClient(hub, stats, limit=1 << 20)  # holds the channel open throughout
    deferred: list[Any] = []
    batch = WriteBatch(deferred.append) if batched else None

    def end_of_iteration() -> None:
        while deferred:
            deferred.pop()()

    for fake in [*fakes, keeper]:
        fake.sub.batch = batch
    hub.join(keeper.sub, channel)
    hub.start(keeper.sub, channel, None)
    last = 0
    starts: dict[FakeClient, int | None] = {keeper: None}
    for step, (kind, size) in enumerate(upstream):
        for fake, (join_at, since, pause_at, resume_at) in zip(fakes, clients, strict=True):
            if step == join_at:
                hub.join(fake.sub, channel)
                starts[fake] = after = None if since is None else max(0, last + since)
                hub.start(fake.sub, channel, after)
            if step == pause_at:
                end_of_iteration()  # a socket fills only when written to: at a flush
                fake.sub.paused = True
            if step == resume_at and fake.sub.paused and not fake.sub.closed:
                fake.sub.resume()
        if kind == "next":
            last += 1
            publish(hub, channel, last)
        elif kind == "dup":
            if last:
                assert not publish(hub, channel, max(1, last - size))
        else:
            last += size
            publish(hub, channel, last)
        end_of_iteration()
    for fake in [*fakes, keeper]:
        if fake.sub.paused and not fake.sub.closed:
            fake.sub.resume()
        seen = check(fake.messages(), channel, conflate=conflate, since=starts.get(fake))
        if fake.closed is None and seen and fake.sub.channels:
            assert seen[-1] == last  # a live client ends on the latest message
        if not conflate and fake.closed is None:
            assert stats.conflated == 0


def test_each_kind_of_subscriber_gets_its_own_bytes_made_once() -> None:
    from edge.streams.frames import DEFLATE, EVENTS, PLAIN

    hub, stats, _, _ = make_hub()
    clients = {
        kind: [FakeClient(hub, stats) for _ in range(2)] for kind in (PLAIN, DEFLATE, EVENTS)
    }
    for kind, group in clients.items():
        for client in group:
            client.sub.kind = kind
            hub.join(client.sub, "trades:X")
            hub.start(client.sub, "trades:X", None)
    big = json.dumps({"channel": "trades:X", "seq": 1, "ts": 999.0, "data": "x" * 400}).encode()
    hub.publish("trades:X", big, 1, 999.0)
    last = {kind: [c.frames[-1] for c in group] for kind, group in clients.items()}
    for frames in last.values():
        assert frames[0] is frames[1]  # one object for the whole group
    assert last[PLAIN][0][0] == 0x81
    assert last[DEFLATE][0][0] == 0xC1 and len(last[DEFLATE][0]) < len(big) / 4
    assert last[EVENTS][0].split(b"\r\n", 1)[1].startswith(b"id: 1\ndata: {")
    assert stats.compressed == 1
    # Control messages: plain frames for both WebSocket kinds, a named event for SSE.
    assert clients[EVENTS][0].frames[0].split(b"\r\n", 1)[1].startswith(b"event: subscribed\n")
    late = FakeClient(hub, stats)
    late.sub.kind = EVENTS
    hub.join(late.sub, "trades:X")
    hub.start(late.sub, "trades:X", 0)  # replayed from history as an event
    assert late.frames[-1] == last[EVENTS][0]


def test_frames_of_one_loop_iteration_go_out_in_one_write_per_client() -> None:
    from edge.streams.queue import WriteBatch

    hub, stats, _, _ = make_hub()
    deferred: list[Any] = []
    batch = WriteBatch(deferred.append)
    clients = [FakeClient(hub, stats) for _ in range(2)]
    for client in clients:
        client.sub.batch = batch
        for channel in ("trades:A", "trades:B", "ticker:C"):
            hub.join(client.sub, channel)
            hub.start(client.sub, channel, None)
    for channel in ("trades:A", "trades:B", "ticker:C"):
        publish(hub, channel, 1)
    assert all(not client.frames for client in clients) and len(deferred) == 1
    deferred.pop()()  # the end of the iteration
    for client in clients:
        assert len(client.frames) == 1  # three acknowledgements and three messages, one write
        reader = FakeClient(hub, stats)
        reader.frames[:] = split_frames(client.frames[0])
        assert [(m.get("type"), m["channel"]) for m in reader.messages()] == [
            ("subscribed", "trades:A"),
            ("subscribed", "trades:B"),
            ("subscribed", "ticker:C"),
            (None, "trades:A"),
            (None, "trades:B"),
            (None, "ticker:C"),
        ]
    publish(hub, "trades:A", 2)
    clients[0].sub.mark_closed()  # closed before the flush: nothing more reaches it
    deferred.pop()()
    assert len(clients[0].frames) == 1 and len(clients[1].frames) == 2


def split_frames(data: bytes) -> list[bytes]:
    frames = []
    while data:
        size, offset = data[1] & 0x7F, 2
        if size == 126:
            size, offset = int.from_bytes(data[2:4], "big"), 4
        frames.append(data[: offset + size])
        data = data[offset + size :]
    return frames


def test_history_is_bounded_in_messages_and_bytes_and_follows_a_reload() -> None:
    streams = replace(
        STREAMS,
        channels=(StreamChannel("trades:*", history=8, history_bytes=2048),),
    )
    hub, stats, _, _ = make_hub(streams)
    client = FakeClient(hub, stats)
    hub.join(client.sub, "trades:X")
    hub.start(client.sub, "trades:X", None)
    for seq in range(1, 21):
        publish(hub, "trades:X", seq)
    channel = hub.channels["trades:X"]
    assert [entry[0] for entry in channel.history] == list(range(13, 21))
    big = b'{"pad":"' + b"x" * 900 + b'"}'
    for seq in (21, 22, 23):
        hub.publish("trades:X", big, seq, 999.0)
    assert [entry[0] for entry in channel.history] == [22, 23]  # 2 x 910 bytes fit in 2 KiB
    assert channel.history_bytes == 2 * len(big)
    hub.configure(replace(streams, channels=(StreamChannel("trades:*", history=1),)))
    assert [entry[0] for entry in channel.history] == [23]


def test_a_burst_is_written_as_it_comes_not_gathered_without_bound() -> None:
    from edge.streams.queue import BATCH_BYTES, WriteBatch

    hub, stats, _, _ = make_hub()
    deferred: list[Any] = []
    client = FakeClient(hub, stats, limit=1 << 20)
    client.sub.batch = WriteBatch(deferred.append)
    hub.join(client.sub, "trades:X")
    hub.start(client.sub, "trades:X", None)
    big = b'{"pad":"' + b"x" * 1000 + b'"}'
    for seq in range(1, 101):  # a replay of 100 KB in one iteration
        hub.publish("trades:X", big, seq, 999.0)
    assert client.frames  # written during the burst
    assert client.sub.out_bytes < BATCH_BYTES
    while deferred:
        deferred.pop()()
    assert sum(len(split_frames(w)) for w in client.frames) == 101  # the ack and 100 messages


def batched_clients(
    count: int, channels: tuple[str, ...]
) -> tuple[Hub, StreamStats, list[FakeClient], list[Any]]:
    """``count`` clients on ``channels`` sharing one write batch; their acknowledgements
    written; ``deferred`` holds what the loop would run at the iteration's end."""
    from edge.streams.queue import WriteBatch

    hub, stats, _, _ = make_hub()
    deferred: list[Any] = []
    batch = WriteBatch(deferred.append)
    clients = [FakeClient(hub, stats) for _ in range(count)]
    for client in clients:
        client.sub.batch = batch
        for channel in channels:
            hub.join(client.sub, channel)
            hub.start(client.sub, channel, None)
    while deferred:
        deferred.pop()()
    for client in clients:
        client.frames.clear()
    return hub, stats, clients, deferred


def test_a_fan_out_is_recorded_once_and_written_at_the_iterations_end() -> None:
    hub, stats, clients, deferred = batched_clients(3, ("trades:A",))
    batch = clients[0].sub.batch
    assert batch is not None
    publish(hub, "trades:A", 1)
    # Nothing per subscriber yet: one record, no client in the batch's own list.
    assert len(batch.fanouts) == 1 and not batch.dirty and len(deferred) == 1
    assert all(not c.frames and not c.sub.out for c in clients)
    before = stats.messages_out
    deferred.pop()()
    assert [len(c.frames) for c in clients] == [1, 1, 1]
    assert clients[0].frames[0] is clients[1].frames[0] is clients[2].frames[0]
    assert stats.messages_out - before == 3 and sum(stats.lag_counts) >= 3
    assert not batch.fanouts and not batch.scheduled


def test_messages_of_one_iteration_reach_each_client_in_one_write_in_order() -> None:
    hub, _, clients, deferred = batched_clients(2, ("trades:A", "trades:B"))
    single = FakeClient(hub, clients[0].sub.stats)  # on one of the channels only
    single.sub.batch = clients[0].sub.batch
    hub.join(single.sub, "trades:B")
    hub.start(single.sub, "trades:B", None)
    deferred.pop()()
    single.frames.clear()
    for seq in (1, 2):
        publish(hub, "trades:A", seq)
        publish(hub, "trades:B", seq)
    assert len(deferred) == 1
    deferred.pop()()
    for client in clients:
        assert len(client.frames) == 1  # four messages, one write
        assert [(m["channel"], m["seq"]) for m in client.messages()] == [
            ("trades:A", 1),
            ("trades:B", 1),
            ("trades:A", 2),
            ("trades:B", 2),
        ]
    assert len(single.frames) == 1
    assert [(m["channel"], m["seq"]) for m in single.messages()] == [
        ("trades:B", 1),
        ("trades:B", 2),
    ]


def test_a_clients_own_frame_follows_what_was_fanned_out_before_it() -> None:
    hub, _, clients, deferred = batched_clients(1, ("trades:A",))
    (client,) = clients
    publish(hub, "trades:A", 1)
    publish(hub, "trades:A", 3)  # a hole: the resync is the client's own frame
    while deferred:
        deferred.pop()()
    messages = client.messages()
    assert [(m.get("type"), m["seq"]) for m in messages] == [
        (None, 1),
        ("resync", 2),
        (None, 3),
    ]
    check(messages, "trades:A", conflate=False)


def test_a_client_paused_at_the_flush_gets_the_fan_out_queued_then_conflated() -> None:
    hub, stats, clients, deferred = batched_clients(2, ("ticker:T",))
    slow, fast = clients
    publish(hub, "ticker:T", 1)
    slow.sub.paused = True  # its socket filled after the fan-out, before the flush
    deferred.pop()()
    assert not slow.frames and len(fast.frames) == 1
    publish(hub, "ticker:T", 2)
    deferred.pop()()
    assert len(slow.sub.queue) == 1 and stats.conflated == 1  # 2 replaced 1 in place
    slow.sub.resume()
    assert [m["seq"] for m in slow.messages()] == [2]
    assert [m["seq"] for m in fast.messages()] == [1, 2]
