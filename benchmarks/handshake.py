"""The server's share of one TLS handshake, in process: OpenSSL's and ``_ssl``'s work alone.

    python -m benchmarks.handshake [--handshakes 2000] [--rounds 5] [--tls 1.3|1.2]
        [--variants bare,edge,edge-p256]

A client ``ssl.SSLObject`` and a server one talk over memory BIOs (no sockets, no event loop),
the client shaped like ``openssl s_time -new`` (default groups, so an X25519 key share, no
session offered).  Only the server's calls are timed (``time.thread_time``: CPU, not wall), so
the figure is what a server pays per new handshake for its context, whatever the client costs.
Contexts take turns in rounds (median and best reported), so a noisy neighbour hits them all.
Server contexts compared:

* ``bare``: ``ssl.SSLContext(PROTOCOL_TLS_SERVER)`` and the certificate, nothing else: what
  OpenSSL costs through Python's ``ssl`` (about what nginx pays, plus ``_ssl``'s wrapping);
* ``edge``: the edge's listening context (``edge.tls.TlsContexts``: its protocol policy and the
  SNI callback that switches to the certificate's context);
* ``edge-p256``: the edge's policy (``new_context``, no SNI callback) with what it had before,
  ``set_ecdh_curve("prime256v1")``: on OpenSSL 3 that call sets the *only* group, so a TLS 1.3
  client offering X25519 got a HelloRetryRequest, a second ClientHello and a P-256 exchange.

Round trips are the server's ``do_handshake`` calls that wanted more bytes (one per flight
the client had to send).  The socket path (accept, event loop, protocol objects) is measured
by ``benchmarks.tls`` against nginx; subtract this script's figure from that one to see it.
"""

from __future__ import annotations

import argparse
import contextlib
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.tls import make_certificate
from edge.tls import TlsContexts, TlsStats, new_context
from meridian.config import EdgeTls, HostPort, TlsCertificate

SERVER_NAME = "bench.meridian.test"


def _client(tls13: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls13:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    else:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def one_handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> tuple[int, int]:
    """(server CPU nanoseconds, server round trips) of one full handshake."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=SERVER_NAME)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    spent = 0
    trips = 0
    clock = time.thread_time_ns
    start = clock()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    spent += clock() - start
    for _ in range(8):
        flight = c_out.read()
        start = clock()
        s_in.write(flight)
        try:
            server.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
            trips += 1
        reply = s_out.read()
        spent += clock() - start
        if done:
            return spent, trips
        c_in.write(reply)
        with contextlib.suppress(ssl.SSLWantReadError):
            client.do_handshake()
    raise RuntimeError("the handshake did not finish in 8 flights")


def _edge_context(cert: Path, key: Path) -> ssl.SSLContext:
    tls = EdgeTls(
        listen=HostPort("127.0.0.1", 8443),
        certificates=(TlsCertificate(str(cert), str(key)),),
    )
    return TlsContexts(tls, str(cert.parent / "edge.yaml"), http2=True, stats=TlsStats()).listening


def _bare_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def _p256_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = new_context("TLSv1.2", ["h2", "http/1.1"])
    context.set_ecdh_curve("prime256v1")
    context.load_cert_chain(cert, key)
    return context


VARIANTS: dict[str, Callable[[Path, Path], ssl.SSLContext]] = {
    "bare": _bare_context,
    "edge": _edge_context,
    "edge-p256": _p256_context,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handshakes", type=int, default=2000, help="per context, all rounds")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved A B C A B C ...")
    parser.add_argument("--tls", choices=("1.3", "1.2"), default="1.3")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    cert, key = make_certificate(Path(tempfile.mkdtemp(prefix="bench-handshake-")))
    client = _client(args.tls == "1.3")
    servers = {name: VARIANTS[name](cert, key) for name in args.variants.split(",")}
    for server in servers.values():
        for _ in range(50):  # warm: provider caches, allocator
            one_handshake(client, server)
    per_round = max(args.handshakes // args.rounds, 1)
    rounds: dict[str, list[float]] = {name: [] for name in servers}
    trips: dict[str, int] = dict.fromkeys(servers, 0)
    for _ in range(args.rounds):  # interleaved, so that a noisy neighbour hits every context
        for name, server in servers.items():
            total_ns = 0
            for _ in range(per_round):
                spent, round_trips = one_handshake(client, server)
                total_ns += spent
                trips[name] += round_trips
            rounds[name].append(total_ns / per_round / 1000)
    print(f"TLS {args.tls}, {args.rounds} rounds of {per_round} handshakes, server side only")
    print("{:<10} {:>16} {:>10} {:>12}".format("context", "median us/hs", "min", "round trips"))
    for name, figures in rounds.items():
        median = statistics.median(figures)
        done = per_round * args.rounds
        print(f"{name:<10} {median:>16.1f} {min(figures):>10.1f} {trips[name] / done:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
