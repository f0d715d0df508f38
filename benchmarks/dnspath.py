"""The GeoDNS UDP path in one process: CPU per query, without sockets.

    python -m benchmarks.dnspath [--queries 200000] [--rounds 3]

A real :class:`geodns.server.DnsServer` (the test world of ``tests.dns_support``, the built-in
database), not started: datagrams go straight into ``handle_datagram`` - the function the
UDP read loop calls per datagram - and the replies it queues are dropped.  Scenarios:

* ecs-memo    - 256 ECS /24 subnets in turn (the reply memo answers after the first pass);
* ecs-unique  - a new random ECS /24 per query (the known-shape path: one range lookup);
* client      - no ECS, a new random IPv4 sender per query (the compiled fast path);
* client-memo - no ECS, 256 senders in turn (the per-client memo).

Prints CPU µs per query (``time.process_time``: this process only, so other work on the
machine moves it little) per round and the best round.  What it leaves out: the kernel's
socket work and the read loop, which ``benchmarks.compare dns`` measures end to end.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dns.edns
import dns.message

from geodns.server import DnsServer
from meridian.config import HostPort
from meridian.lifecycle import ConfigHolder
from tests import dns_support

SCENARIOS = ("ecs-memo", "ecs-unique", "client", "client-memo")


def _query(subnet: str | None) -> bytes:
    options: list[dns.edns.Option] = [dns.edns.ECSOption(subnet, 24)] if subnet else []
    message = dns.message.make_query(
        "api.meridian.test", "A", use_edns=0 if subnet is not None else False, options=options
    )
    message.id = 0
    data: bytes = message.to_wire()
    return data


def _feed(scenario: str, queries: int, rng: random.Random) -> list[tuple[bytes, tuple[Any, ...]]]:
    """The datagrams of one round (built before the clock starts)."""
    out: list[tuple[bytes, tuple[Any, ...]]] = []
    with_ecs = _query("0.0.0.0")
    plain = _query(None)
    subnets = [rng.getrandbits(24).to_bytes(3, "big") for _ in range(256)]
    senders = [(f"100.{rng.randrange(256)}.{rng.randrange(256)}.1", 5300) for _ in range(256)]
    for n in range(queries):
        ident = (n & 0xFFFF).to_bytes(2, "big")
        if scenario == "ecs-memo":
            out.append((ident + with_ecs[2:-3] + subnets[n & 255], ("127.0.0.1", 5300)))
        elif scenario == "ecs-unique":
            subnet = rng.getrandbits(24).to_bytes(3, "big")
            out.append((ident + with_ecs[2:-3] + subnet, ("127.0.0.1", 5300)))
        elif scenario == "client":
            sender = f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.1"
            out.append((ident + plain[2:], (sender, 5300)))
        else:
            out.append((ident + plain[2:], senders[n & 255]))
    return out


def _run(handle: Callable[[bytes, tuple[Any, ...]], None], server: DnsServer, feed: Any) -> float:
    outbox = server._outbox
    started = time.process_time()
    for n, (data, addr) in enumerate(feed):
        handle(data, addr)
        if n & 1023 == 0:
            outbox.clear()
    elapsed = time.process_time() - started
    outbox.clear()
    return elapsed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = dns_support.write_config(Path(tmp) / "dns.yaml", dns_support.base_config())
        holder = ConfigHolder.from_file(str(path))
        server = DnsServer(holder, "iad", listen=HostPort("127.0.0.1", 0), admin=None, tcp=False)
        rng = random.Random(18)
        for scenario in args.scenarios.split(","):
            best = float("inf")
            rounds = []
            for _ in range(args.rounds):
                server._forget_replies()
                feed = _feed(scenario, args.queries, rng)
                _run(server.handle_datagram, server, feed[:2000])  # warm: shapes, memo
                per_query = _run(server.handle_datagram, server, feed) / args.queries * 1e6
                rounds.append(per_query)
                best = min(best, per_query)
            figures = " ".join(f"{r:.2f}" for r in rounds)
            print(f"{scenario:12} best {best:.2f} µs/query CPU   rounds: {figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
