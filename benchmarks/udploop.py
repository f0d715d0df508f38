"""The GeoDNS UDP read loop in one process, over real loopback sockets: CPU per query.

    python -m benchmarks.udploop [--batches 4000] [--rounds 3] [--plain]

``benchmarks.dnspath`` times the answer path alone; this adds what it leaves out, the loop
that reads a batch of datagrams and sends the replies (``recvmmsg``/``sendmmsg``, or
``recvfrom``/``sendto`` with ``--plain``).  A real :class:`geodns.server.DnsServer` (the test
world of ``tests.dns_support``), not started: its UDP socket is bound here and its read loop
is called by hand after 16 client sockets (as ``benchmarks.compare`` runs dnsperf) have sent
one batch of queries; the clients drain the replies between calls, outside the clock.

Prints, per scenario, CPU µs per query of the loop call alone (user + system, and user
alone: the kernel's share is the same for any Python loop) - this thread only.  Scenarios
as in ``benchmarks.compare dns``: no-ecs (a memoized answer per sender), ecs-varied (10,000
/24s repeating, each sent once before the clock starts), ecs-unique (a new /24 per query);
and no-ecs-new: no ECS, each query from a sender never seen before (127.x.y.z).
``--answer-only``: the batch loop's Python alone (see :func:`answer_only`).
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import resource
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.compare import dns_query, public_blocks
from geodns import mmsg
from geodns.server import DnsServer
from meridian.config import HostPort
from meridian.lifecycle import ConfigHolder
from tests import dns_support

SCENARIOS = ("no-ecs", "ecs-varied", "ecs-unique", "no-ecs-new")
CLIENTS = 16
#: The "varied" subnets (``benchmarks.compare``'s VARIED_SUBNETS); the warm-up sends each.
VARIED = 10_000


#: Where the next "unique" subnets start: never one an earlier run sent.
_unique_start = 1_000_000


def _queries(scenario: str, count: int, rng: random.Random) -> list[bytes]:
    global _unique_start
    if scenario.startswith("no-ecs"):
        plain = dns_query("api.meridian.test", None)
        return [plain] * count
    head = dns_query("api.meridian.test", ipaddress.IPv4Network("0.0.0.0/24"))[:-3]
    if scenario == "ecs-varied":  # each of the 10,000 in turn, in a shuffled order
        blocks, _ = public_blocks(0, VARIED)
        rng.shuffle(blocks)
        return [head + blocks[n % VARIED].to_bytes(3, "big") for n in range(count)]
    blocks, _unique_start = public_blocks(_unique_start, count)
    return [head + block.to_bytes(3, "big") for block in blocks]


def _clients(count: int, host: str) -> list[socket.socket]:
    """``count`` client sockets on ``host``, or on ``host`` + 1..count if it ends in a dot."""
    clients = []
    for k in range(count):
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind((f"{host}{k + 1}" if host.endswith(".") else host, 0))
        client.setblocking(False)
        clients.append(client)
    return clients


def _thread_cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime, usage.ru_utime


def run(
    server: DnsServer, scenario: str, batches: int, batch: int, plain: bool
) -> tuple[float, float]:
    """CPU seconds (all, user) per query of the read loop over ``batches`` batches."""
    address = server.udp_address
    assert address is not None
    clients = _clients(CLIENTS, "127.0.0.1")
    queries = _queries(scenario, batches * batch, random.Random(19))
    loop = server._udp_readable if plain else server._udp_readable_batched
    spent = user = 0.0
    answered = 0
    try:
        for n in range(batches):
            if scenario == "no-ecs-new":  # every query from a sender never seen before
                for client in clients:
                    client.close()
                clients = _clients(batch, f"127.{(n >> 8) & 255}.{n & 255}.")
            for k in range(batch):
                ident = (k & 0xFFFF).to_bytes(2, "big")
                clients[k % len(clients)].sendto(ident + queries[n * batch + k][2:], address)
            before, before_user = _thread_cpu()
            loop()
            after, after_user = _thread_cpu()
            spent += after - before
            user += after_user - before_user
            for client in clients:
                while True:
                    try:
                        client.recv(4096)
                    except BlockingIOError:
                        break
                    answered += 1
    finally:
        for client in clients:
            client.close()
    if answered != batches * batch:
        raise SystemExit(f"{scenario}: {answered} replies to {batches * batch} queries")
    return spent / answered, user / answered


def answer_only(server: DnsServer, scenario: str, calls: int) -> float:
    """User CPU seconds per query of :meth:`mmsg.DatagramBatch.answer` alone: one batch of
    the scenario's queries received once (after a pass that fills the memos), then answered
    ``calls`` times with ``recvmmsg`` and ``sendmmsg`` stubbed out and the slots restored
    before each call (the replies are written over the queries); the restore is timed
    apart and taken off.  For ecs-unique the shared memo is emptied before each call, so
    every query takes the known-shape path.  Steadier than the socket loop: no kernel."""
    batch = server._batch
    assert batch is not None and server.udp_address is not None
    clients = _clients(CLIENTS, "127.0.0.1")
    queries = _queries(scenario, batch_size := mmsg.BATCH, random.Random(5))
    for _ in range(2):  # the first pass computes and memoizes, the second reads them back
        for k, query in enumerate(queries):
            clients[k % CLIENTS].sendto(query, server.udp_address)
        if scenario == "ecs-unique":
            server._shared.clear()
        batch.answer(server._shared, server._by_client, server._hits, server._answer_slot)
    for k, query in enumerate(queries):
        clients[k % CLIENTS].sendto(query, server.udp_address)
    assert batch.receive() == batch_size
    for client in clients:
        client.close()
    saved = bytes(batch._in.bytes)
    slots = batch._in.bytes
    receive, flush = batch.receive, batch._flush
    batch.receive = lambda: batch_size  # type: ignore[method-assign]
    batch._flush = lambda count: []  # type: ignore[method-assign]
    shared = server._shared
    unique = scenario == "ecs-unique"
    try:
        started = time.process_time()
        for _ in range(calls):
            slots[:] = saved
            if unique:
                shared.clear()
            batch.answer(shared, server._by_client, server._hits, server._answer_slot)
        spent = time.process_time() - started
        started = time.process_time()
        for _ in range(calls):
            slots[:] = saved
            if unique:
                shared.clear()
        spent -= time.process_time() - started
    finally:
        batch.receive, batch._flush = receive, flush  # type: ignore[method-assign]
    return spent / (calls * batch_size)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=mmsg.BATCH)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--plain", action="store_true", help="recvfrom/sendto, not mmsg")
    parser.add_argument(
        "--answer-only", action="store_true", help="DatagramBatch.answer alone, no kernel"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = dns_support.write_config(Path(tmp) / "dns.yaml", dns_support.base_config())
        holder = ConfigHolder.from_file(str(path))
        server = DnsServer(holder, "iad", listen=HostPort("127.0.0.1", 0), admin=None, tcp=False)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.setblocking(False)
        server._udp = sock
        server._sendto = sock.sendto
        server._batch = None if args.plain else mmsg.DatagramBatch(sock)
        server.udp_address = sock.getsockname()[:2]
        try:
            for scenario in args.scenarios.split(",") if args.answer_only else ():
                if scenario == "no-ecs-new":
                    continue  # one batch repeated: its senders are not new after the first
                per_query = [answer_only(server, scenario, 2000) * 1e6 for _ in range(args.rounds)]
                figures = " ".join(f"{u:.3f}" for u in per_query)
                print(
                    f"{scenario:11} answer() alone best {min(per_query):.3f} µs/query user CPU"
                    f"   rounds: {figures}"
                )
            for scenario in args.scenarios.split(",") if not args.answer_only else ():
                rounds = []
                for _ in range(args.rounds):
                    server._forget_replies()
                    warm = VARIED // args.batch + 1 if scenario == "ecs-varied" else 50
                    run(server, scenario, warm, args.batch, args.plain)  # warm: shapes, memo
                    cpu, user = run(server, scenario, args.batches, args.batch, args.plain)
                    rounds.append((cpu * 1e6, user * 1e6))
                best = min(rounds)
                figures = " ".join(f"{c:.2f}/{u:.2f}" for c, u in rounds)
                print(
                    f"{scenario:11} best {best[0]:.2f} µs/query CPU ({best[1]:.2f} user)"
                    f"   rounds (all/user): {figures}"
                )
        finally:
            sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
