"""Streams, piece by piece without sockets: the config section, client framing, the sample
origin's deterministic feed, and what the edge accepts from an upstream."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.streams import client_frame
from edge.streams.frames import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    ClientFrames,
    FrameError,
    accept_key,
    close_frame,
    deflate_frame,
    frame,
    negotiate_deflate,
    parse_close,
    text_frame,
)
from edge.streams.upstream import parse_message
from meridian.config import EdgeStreams
from meridian.origin_streams import Feed
from tests.test_config import demo_data, problems_of

STREAMS: dict[str, Any] = {
    "channels": [{"pattern": "ticker:*", "slow_consumer": "conflate"}, {"pattern": "trades:*"}]
}


def with_streams(streams: dict[str, Any]) -> dict[str, Any]:
    data = demo_data()
    data["edge"]["streams"] = streams
    return data


def test_streams_section_loads_frozen_with_defaults() -> None:
    from meridian.config import parse_config

    config = parse_config(with_streams({**STREAMS, "send_queue": "64KiB"}))
    streams = config.edge.streams
    assert isinstance(streams, EdgeStreams)
    assert streams.send_queue == 64 * 1024
    assert streams.channels[0].slow_consumer == "conflate"
    assert streams.channels[1].slow_consumer == "disconnect"
    assert streams.path == "/stream"
    with pytest.raises(AttributeError):
        streams.path = "/x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("streams", "expected"),
    [
        ({"channels": []}, "edge.streams.channels: at least one channel pattern is required"),
        (
            {"channels": [{"pattern": "ticker"}]},
            "edge.streams.channels[0].pattern: 'ticker' is not KIND:NAME",
        ),
        (
            {"channels": [{"pattern": "a:*", "slow_consumer": "drop"}]},
            "edge.streams.channels[0].slow_consumer",
        ),
        (
            {"channels": [{"pattern": "a:*", "history": 0}]},
            "edge.streams.channels[0].history: must be 1..1000000",
        ),
        (
            {"channels": [{"pattern": "a:*", "history_bytes": "10"}]},
            "edge.streams.channels[0].history_bytes: must be 1 KiB..1 GiB",
        ),
        ({**STREAMS, "path": "stream"}, "edge.streams.path: must be a path starting with /"),
        ({**STREAMS, "snapshot_path": "/snap"}, "edge.streams.snapshot_path: must contain"),
        ({**STREAMS, "send_queue": "1KiB"}, "edge.streams.send_queue: must be 4 KiB..64 MiB"),
        ({**STREAMS, "ping_timeout": 0}, "edge.streams.ping_timeout: must be positive"),
        ({**STREAMS, "max_connections_per_ip": -1}, "edge.streams.max_connections_per_ip"),
        ({**STREAMS, "unknown": 1}, "edge.streams.unknown: unknown key"),
    ],
)
def test_bad_streams_config_names_the_field(streams: dict[str, Any], expected: str) -> None:
    problems = problems_of(with_streams(streams))
    assert len(problems) == 1, problems
    assert problems[0].startswith("t.yaml: ")
    assert expected in problems[0]


def test_accept_key_is_rfc6455s_example_and_rejects_bad_keys() -> None:
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert accept_key(b"short") is None
    assert accept_key(b"!!!!") is None


def test_server_frames_use_the_three_length_forms() -> None:
    assert frame(OP_TEXT, b"hi") == b"\x81\x02hi"
    assert frame(OP_TEXT, b"x" * 300)[:4] == b"\x81\x7e\x01\x2c"
    assert frame(OP_TEXT, b"x" * 70_000)[:10] == b"\x81\x7f" + (70_000).to_bytes(8, "big")
    assert parse_close(close_frame(1012, "service restart")[2:]) == (1012, "service restart")
    assert len(close_frame(1008, "é" * 100)) <= 127  # a control frame's payload fits 125


def masked(payload: bytes, opcode: int = OP_TEXT, fin: bool = True, key: bytes = b"abcd") -> bytes:
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        return bytes((first, 0x80 | size)) + key + body
    return bytes((first, 0x80 | 126)) + size.to_bytes(2, "big") + key + body


@given(st.binary(max_size=600), st.integers(1, 50))
def test_client_frames_survive_any_split(payload: bytes, step: int) -> None:
    data = masked(payload[:200], OP_TEXT, fin=False) + masked(b"p", OP_PING)
    data += masked(payload[200:], 0x0) + client_frame(b"z")
    reader = ClientFrames(4096)
    out = []
    for i in range(0, len(data), step):
        out += reader.feed(data[i : i + step])
    assert out == [(OP_PING, b"p"), (OP_TEXT, payload), (OP_TEXT, b"z")]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\x81\x02hi", CLOSE_PROTOCOL_ERROR),  # unmasked
        (b"\xc1\x82abcdxx", CLOSE_PROTOCOL_ERROR),  # RSV1 without an extension
        (masked(b"x" * 200, OP_PING), CLOSE_PROTOCOL_ERROR),  # control frame over 125
        (masked(b"x", OP_CLOSE, fin=False), CLOSE_PROTOCOL_ERROR),  # fragmented control
        (masked(b"x", 0x0), CLOSE_PROTOCOL_ERROR),  # continuation of nothing
        (masked(b"x", 0x3), CLOSE_PROTOCOL_ERROR),  # reserved opcode
        (bytes((0x81, 0xFF)) + (1 << 40).to_bytes(8, "big"), CLOSE_TOO_BIG),  # before the body
        (masked(b"x" * 100, fin=False) + masked(b"y" * 100, 0x0), CLOSE_TOO_BIG),
    ],
)
def test_client_frame_violations_have_their_close_code(data: bytes, code: int) -> None:
    with pytest.raises(FrameError) as info:
        ClientFrames(150).feed(data)
    assert info.value.code == code


def test_feed_is_deterministic_and_sequenced_by_time() -> None:
    feed = Feed({"BTC-USD": (67_000.0, 2)}, rate=10.0, history=100, lockstep=True)
    assert feed.current("trades:BTC-USD", 1000.05) == 10_000
    assert feed.oldest("trades:BTC-USD", 1000.05) == 9_901
    message = json.loads(feed.message("trades:BTC-USD", 10_000))
    assert message["seq"] == 10_000 and message["ts"] == 1000.0
    assert feed.message("ticker:BTC-USD", 7) == Feed(feed.symbols, 10.0, 5, lockstep=True).message(
        "ticker:BTC-USD", 7
    )
    snapshot = json.loads(feed.snapshot("trades:BTC-USD", 50))
    assert [t["id"] for t in snapshot["data"]][-1] == 50 and snapshot["seq"] == 50
    assert feed.known("depth:BTC-USD") and not feed.known("depth:NOPE")
    assert not feed.known("orders:BTC-USD")


@pytest.mark.parametrize(
    ("data", "parsed"),
    [
        (b'{"channel":"t:X","seq":5,"ts":1.5,"data":{}}', (5, 1.5)),
        (b'{"channel":"t:Y","seq":5,"ts":1.5}', None),  # another channel
        (b'{"channel":"t:X","seq":"5","ts":1.5}', None),
        (b'{"channel":"t:X","seq":true,"ts":1.5}', None),
        (b'{"channel":"t:X","seq":-1,"ts":1.5}', None),
        (b'{"channel":"t:X","seq":5,"ts":NaN}', None),
        (b'{"channel":"t:X","seq":5,"ts":false}', None),
        (b"[1]", None),
        (b'{"channel":"t:X","seq":5,"ts":1,"d":"\xff"}', None),  # not UTF-8
        (b"{", None),
    ],
)
def test_upstream_messages_are_checked(data: bytes, parsed: tuple[int, float] | None) -> None:
    assert parse_message("t:X", data) == parsed


@pytest.mark.parametrize(
    ("offer", "answer"),
    [
        (None, None),
        (b"x-webkit-deflate-frame", None),
        (
            b"permessage-deflate; client_max_window_bits",
            b"permessage-deflate; server_no_context_takeover",
        ),
        (
            b"permessage-deflate; client_no_context_takeover; server_no_context_takeover",
            b"permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        ),
        (b"permessage-deflate; server_max_window_bits=10", None),  # we compress with 15
        (
            b"permessage-deflate; server_max_window_bits=10, permessage-deflate",
            b"permessage-deflate; server_no_context_takeover",
        ),
        (b"permessage-deflate; mystery=1", None),
    ],
)
def test_permessage_deflate_negotiation(offer: bytes | None, answer: bytes | None) -> None:
    assert negotiate_deflate(offer) == answer


def test_deflate_frames_are_compressed_alone_and_small_ones_stay_plain() -> None:
    import zlib

    payload = json.dumps({"bids": [[1.5, 2.5]] * 40}).encode()
    compressed = deflate_frame(payload)
    assert compressed[0] == 0xC1  # FIN, RSV1, text
    assert len(compressed) < len(payload) / 2
    body = compressed[4:] if compressed[1] == 126 else compressed[2:]
    assert zlib.decompressobj(-15).decompress(body + b"\x00\x00\xff\xff") == payload
    assert deflate_frame(b'{"a":1}') == text_frame(b'{"a":1}')


def test_compressed_client_messages_are_inflated_within_the_bound() -> None:
    import zlib

    def compressed(text: bytes) -> bytes:
        compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
        data = compressor.compress(text) + compressor.flush(zlib.Z_SYNC_FLUSH)
        framed = masked(data[:-4])
        return bytes((framed[0] | 0x40,)) + framed[1:]

    reader = ClientFrames(1000, deflate=True)
    assert reader.feed(compressed(b'{"op":"subscribe"}') + masked(b"plain")) == [
        (OP_TEXT, b'{"op":"subscribe"}'),
        (OP_TEXT, b"plain"),
    ]
    with pytest.raises(FrameError) as info:
        ClientFrames(1000, deflate=True).feed(compressed(b"x" * 100_000))  # 100 KB from ~100 B
    assert info.value.code == CLOSE_TOO_BIG
    with pytest.raises(FrameError):
        ClientFrames(1000, deflate=False).feed(compressed(b"x"))


def test_feed_channels_tick_at_independent_phases() -> None:
    """Each channel ticks at its own offset in the interval, from its name alone; the
    sequence a channel has published at a time agrees with its messages' timestamps."""
    symbols = {name: (100.0, 2) for name in ("BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD")}
    feed = Feed(symbols, rate=10.0, history=100)
    channels = [f"{kind}:{name}" for kind in ("ticker", "trades", "depth") for name in symbols]
    phases = [feed.phase(c) for c in channels]
    assert all(0.0 <= p < 1.0 for p in phases)
    assert len({round(p, 6) for p in phases}) == len(channels)  # no two tick together
    # Spread over the interval, not bunched: 12 channels leave no gap of half of it.
    ordered = sorted(phases)
    gaps = [b - a for a, b in itertools.pairwise(ordered)]
    assert max([*gaps, 1.0 - ordered[-1] + ordered[0]]) < 0.5
    # The same in every process and region (a fresh feed), and the same bytes.
    again = Feed(symbols, rate=10.0, history=5)
    assert [again.phase(c) for c in channels] == phases
    assert again.message("trades:SOL-USD", 77) == feed.message("trades:SOL-USD", 77)
    for channel in channels:
        ts = json.loads(feed.message(channel, 5_000))["ts"]
        assert ts == feed.timestamp(channel, 5_000) == (5_000 + feed.phase(channel)) / 10.0
        assert feed.current(channel, ts) == 5_000
        assert feed.current(channel, ts - 1e-6) == 4_999
    # Two channels' messages of the same sequence are published at different instants.
    stamps = {feed.timestamp(c, 5_000) for c in channels}
    assert len(stamps) == len(channels)
    # Lockstep: every channel at phase 0, all ticking together (the fan-out's worst case).
    lockstep = Feed(symbols, rate=10.0, history=100, lockstep=True)
    assert {lockstep.timestamp(c, 5_000) for c in channels} == {500.0}
