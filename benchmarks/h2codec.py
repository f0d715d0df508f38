"""The HTTP/2 codec alone, in one process: CPU per request of the edge's own connection core
(``edge.h2core``) and, when it is installed, of the ``h2`` library it replaced.

    python -m benchmarks.h2codec [--requests 200000] [--per-connection 1000] [--rounds 3]

Two scenarios: the same request again and again (h2load's), and one path per request (no
block ever repeats, so the HPACK memo never answers: the ``hpack`` decoder's own cost).
h2load's traffic shape, ``--per-connection`` requests on each connection (``benchmarks.tls``
runs 40,000 requests over 64 connections: 625 each): each read carries 10 requests (HEADERS
with END_STREAM, the client's HPACK encoder indexing them, so from the second on each block
is a few indexed bytes) and a connection WINDOW_UPDATE giving back what the previous
responses took; each request is answered with a 2 KB body (HEADERS from a precomputed block
without indexing, ``edge.hpack_literal``, and one DATA frame), and the read's output taken
once.  No sockets, TLS, stages or cache: what ``benchmarks.tls`` measures around it.  Prints
CPU µs per request (``time.process_time``) per round and the best round for each codec.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import hpack

from edge.h2core import H2Core, RequestReceived
from edge.h2wire import PREFACE, frame_header, settings_frame, window_update
from edge.hpack_literal import LiteralEncoder

BODY = b"x" * 2107
RESPONSE = [
    (b":status", b"200"),
    (b"content-type", b"application/json"),
    (b"cache-control", b"public, max-age=300"),
    (b"age", b"1"),
    (b"x-cache", b"HIT"),
    (b"content-length", str(len(BODY)).encode()),
]
REQUEST = [
    (b":method", b"GET"),
    (b":path", b"/api/v1/symbols"),
    (b":scheme", b"https"),
    (b":authority", b"127.0.0.1:8443"),
    (b"user-agent", b"h2load nghttp2/1.52.0"),
]
PER_READ = 10


def client_reads(requests: int, varied: bool) -> list[bytes]:
    """What the client sends: the preface and SETTINGS, then reads of ``PER_READ`` requests;
    ``varied``: each with a path of its own, which the client's encoder indexes (so the
    dynamic table changes with every block, and no block repeats: the HPACK memo never
    answers)."""
    encoder = hpack.Encoder()
    reads = [PREFACE + settings_frame({})]
    stream_id = 1
    for _ in range(requests // PER_READ):
        frames = [window_update(0, PER_READ * len(BODY))] if stream_id > 1 else []
        for _ in range(PER_READ):
            fields = REQUEST
            if varied:
                fields = [*REQUEST[:1], (b":path", b"/api/v1/symbols?n=%d" % stream_id)]
                fields += REQUEST[2:]
            block = encoder.encode(fields)
            frames.append(frame_header(len(block), 0x1, 0x5, stream_id) + block)
            stream_id += 2
        reads.append(b"".join(frames))
    return reads


def run_core(reads: list[bytes]) -> int:
    core = H2Core(
        max_concurrent_streams=128,
        max_header_list_size=16384,
        max_frame_size=16384,
        max_header_block=32768,
    )
    block = LiteralEncoder().encode(RESPONSE)
    sent = 0
    for data in reads:
        for event in core.receive(data):
            if isinstance(event, RequestReceived):
                core.send_headers(event.stream_id, block, False)
                core.send_data(event.stream_id, BODY, True)
        sent += len(core.take_output())
    return sent


class _Literal:
    """``hpack.Encoder`` as h2 drives it, without indexing (what the edge gave h2)."""

    header_table_size = 4096

    def __init__(self) -> None:
        self._encoder = LiteralEncoder()

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return self._encoder.encode(headers)


def run_h2(reads: list[bytes]) -> int:
    import h2.config
    import h2.connection
    import h2.events

    config = h2.config.H2Configuration(
        client_side=False,
        header_encoding=None,
        validate_inbound_headers=True,
        normalize_inbound_headers=True,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )
    conn = h2.connection.H2Connection(config=config)
    conn.encoder = _Literal()  # type: ignore[assignment]
    conn.initiate_connection()
    sent = 0
    for data in reads:
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                conn.send_headers(event.stream_id, RESPONSE, end_stream=False)
                conn.send_data(event.stream_id, BODY, end_stream=True)
        sent += len(conn.data_to_send())
    return sent


def measure(
    name: str, run: Callable[[list[bytes]], int], reads: list[bytes], args: argparse.Namespace
) -> float:
    """Best CPU µs per request over the rounds; each round serves ``args.requests`` requests
    on connections of ``len(reads)`` reads each (the same client bytes for every one)."""
    per_connection = (len(reads) - 1) * PER_READ
    connections = max(1, args.requests // per_connection)
    requests = connections * per_connection
    best = float("inf")
    for i in range(args.rounds):
        started = time.process_time()
        sent = sum(run(reads) for _ in range(connections))
        per = (time.process_time() - started) / requests * 1e6
        best = min(best, per)
        print(f"{name:<12} round {i + 1}: {per:7.2f} us/request ({sent // requests} B out each)")
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--per-connection", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        import h2  # noqa: F401 (a test dependency only)
    except ImportError:
        have_h2 = False
    else:
        have_h2 = True
    for scenario, varied in (("same request", False), ("varied paths", True)):
        print(f"-- {scenario}")
        reads = client_reads(args.per_connection, varied)
        ours = measure("edge.h2core", run_core, reads, args)
        if not have_h2:
            print(f"best: edge.h2core {ours:.2f} us/request (h2 not installed: no comparison)")
            continue
        theirs = measure("h2 library", run_h2, reads, args)
        print(f"best: edge.h2core {ours:.2f} us/request, h2 {theirs:.2f} ({theirs / ours:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
