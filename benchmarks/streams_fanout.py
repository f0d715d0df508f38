"""The stream fan-out alone, in one process: CPU per delivered message, whatever the lag.

    python -m benchmarks.streams_fanout                      # fake transports (user space)
    python -m benchmarks.streams_fanout --sockets            # real loopback TCP sockets
    python -m benchmarks.streams_fanout --sockets --rx-cpu 1 # the receivers' TCP input on CPU 1

``benchmarks.streams`` measures the whole path, but on a machine it shares its figures move
with the lag: a starved edge falls behind, and a backlog coalesces frames into fewer writes.
This script fixes the coalescing instead.  It builds the edge's hub (``edge.streams.hub``)
with its write batch, ``--clients`` subscribers on ``--channels-per-client`` of
``--channels`` channels (client ``i`` on channels ``i .. i+K-1`` mod C, as the benchmark
does), then publishes ``--rounds`` rounds of one message per channel in one of two shapes:

* ``phases``: one channel's message per event-loop iteration (channels ticking at their own
  instants): every delivery is a write of its own;
* ``lockstep``: every channel's message in one iteration: each client's K frames go out in one
  write.

Writes go to a C-level no-op (``deque(maxlen=1).append``) by default, so the figure is the
edge's own user-space work per delivery; with ``--sockets`` each subscriber writes to a
non-blocking loopback TCP socket drained by a child process (pinned to the other core where
there are two), so the figure includes the kernel's send path.  On loopback the kernel runs
the receiving socket's TCP input in the sender's context, so ``--sockets`` also charges the
receiver's side to the edge (about half of the send's kernel time, by perf); ``--rx-cpu 1``
steers loopback's receive processing to CPU 1 for the run (RPS, as ``benchmarks.streams``
does), so the figure is the sender's side alone, as with clients on other machines.

What this says about the lag of ``benchmarks.streams``: one core makes at most
``messages_per_core_second`` deliveries a second at the shape's messages per write.  A load
above that (with one message per write) leaves the edge's core full, and it falls behind until
its backlog (origin messages waiting unread in its upstream sockets) coalesces enough frames
per write to cost what the core can pay: the lag is that backlog.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from benchmarks.compare import bench_lock
from benchmarks.streams import loopback_rx_on
from edge.streams.hub import Hub
from edge.streams.queue import Subscriber, WriteBatch
from edge.streams.stats import StreamStats
from meridian.config import EdgeStreams, StreamChannel

STREAMS = EdgeStreams(
    channels=(StreamChannel("trades:*"),),
    max_connections_per_ip=0,
    max_subscriptions_per_ip=0,
    max_subscriptions_per_connection=128,
)


def _payload(channel: str, seq: int) -> bytes:
    """An origin message of the usual size (about 150 bytes)."""
    data = {"id": seq, "price": 67250.12, "size": 0.123456, "side": "buy"}
    document = {"channel": channel, "seq": seq, "ts": time.time(), "data": data}
    return json.dumps(document, separators=(",", ":")).encode()


def _ignore(_name: str) -> None:
    """The hub's upstream callbacks: there is no upstream here."""


def _write_syscalls() -> int:
    with open("/proc/self/io") as io:
        for line in io:
            if line.startswith("syscw:"):
                return int(line.split()[1])
    return 0


def _drain(listener: socket.socket, count: int) -> int:
    """A child process: accepts ``count`` connections and reads them until they close."""
    pid = os.fork()
    if pid:
        return pid
    conns = [socket.create_connection(listener.getsockname()) for _ in range(count)]
    poller = select.epoll()
    by_fd = {}
    for conn in conns:
        conn.setblocking(False)
        poller.register(conn.fileno(), select.EPOLLIN)
        by_fd[conn.fileno()] = conn
    open_conns = count
    while open_conns:
        for fd, _ in poller.poll():
            try:
                if not by_fd[fd].recv(1 << 20):
                    poller.unregister(fd)
                    open_conns -= 1
            except BlockingIOError:
                pass
    os._exit(0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = [f"trades:S{c}" for c in range(args.channels)]
    stats = StreamStats(time.time)
    hub = Hub(STREAMS, clock=time.monotonic, stats=stats, on_open=_ignore, on_close=_ignore)
    deferred: list[Callable[[], None]] = []
    batch = WriteBatch(deferred.append)
    sink: deque[bytes] = deque(maxlen=1)
    sockets: list[socket.socket] = []
    child = 0
    writes: Callable[[bytes], object]
    if args.sockets:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        child = _drain(listener, args.clients)
        if (os.cpu_count() or 1) >= 2:
            os.sched_setaffinity(child, {1})
            os.sched_setaffinity(0, {0})
        for _ in range(args.clients):
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setblocking(False)
            sockets.append(conn)
        listener.close()
    for i in range(args.clients):
        # write(2), as the edge's transports do (and /proc/self/io counts).
        writes = functools.partial(os.write, sockets[i].fileno()) if args.sockets else sink.append
        sub: Subscriber[Any] = Subscriber(
            writes, lambda code, reason: None, "10.0.0.1", 1 << 20, stats, batch=batch
        )
        for k in range(args.channels_per_client):
            name = names[(i + k) % args.channels]
            hub.join(sub, name)
            hub.start(sub, name, None)
    payloads = {name: [_payload(name, seq) for seq in range(1, 3)] for name in names}

    def end_of_iteration() -> None:
        while deferred:
            deferred.pop()()

    end_of_iteration()
    before = stats.messages_out
    usage0, syscw0 = resource.getrusage(resource.RUSAGE_SELF), _write_syscalls()
    for round_ in range(args.rounds):
        seq = round_ + 1
        for name in names:
            hub.publish(name, payloads[name][seq % 2], seq, time.time())
            if not args.lockstep:
                end_of_iteration()
        end_of_iteration()
        if args.sockets:
            time.sleep(0.002)  # the drain keeps up: no socket fills, no queue
    usage1, syscw1 = resource.getrusage(resource.RUSAGE_SELF), _write_syscalls()
    delivered = stats.messages_out - before
    user = usage1.ru_utime - usage0.ru_utime
    system = usage1.ru_stime - usage0.ru_stime
    for conn in sockets:
        conn.close()
    if child:
        os.waitpid(child, 0)
    return {
        "shape": "lockstep" if args.lockstep else "phases",
        "transport": "loopback TCP" if args.sockets else "no-op",
        "clients": args.clients,
        "channels": args.channels,
        "channels_per_client": args.channels_per_client,
        "delivered": delivered,
        "messages_per_write": delivered / (syscw1 - syscw0) if syscw1 > syscw0 else 0.0,
        "user_us_per_message": user / delivered * 1e6,
        "system_us_per_message": system / delivered * 1e6,
        "cpu_us_per_message": (user + system) / delivered * 1e6,
        "messages_per_core_second": delivered / (user + system) if user + system else 0.0,
        "queued": sum(len(s.queue) for c in hub.channels.values() for s in c.everyone()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.streams_fanout", description=__doc__
    )
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--channels", type=int, default=20)
    parser.add_argument("--channels-per-client", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--lockstep", action="store_true", help="every channel in one iteration")
    parser.add_argument("--sockets", action="store_true", help="loopback TCP, not a no-op")
    parser.add_argument(
        "--rx-cpu",
        type=int,
        default=None,
        help="with --sockets: loopback's receive processing on this CPU (RPS; root; restored)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.channels_per_client <= args.channels:
        parser.error("--channels-per-client must be 1..--channels")
    if args.rx_cpu is not None and not (args.sockets and 0 <= args.rx_cpu < (os.cpu_count() or 1)):
        parser.error("--rx-cpu needs --sockets and a CPU of this machine")
    if args.sockets:
        with bench_lock("the fan-out benchmark"), loopback_rx_on(args.rx_cpu):
            figures = run(args)
        figures["loopback_rx_cpu"] = "writer's" if args.rx_cpu is None else args.rx_cpu
    else:
        figures = run(args)
    for key, value in figures.items():
        print(f"{key:28s} {value:,.2f}" if isinstance(value, float) else f"{key:28s} {value}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
