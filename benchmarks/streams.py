"""Market streams at the edge: N WebSocket clients, C channels at R messages/s each.

    python -m benchmarks.streams --clients 10000 --channels 20 --rate 10 --duration 20
    python -m benchmarks.streams ... --lockstep                # every channel ticks together
    python -m benchmarks.streams ... --channels-per-client 1   # the one-channel figure
    python -m benchmarks.streams --clients 2000 --nginx        # the same clients through nginx 1:1

The arithmetic of the goal (issue 15): 20 channels x 10 messages/s = 200 messages/s published;
200,000 messages/s delivered to 10,000 clients is 1,000 deliveries per published message, so
each channel fans out to 1,000 clients: every client subscribes to 2 channels (20,000
subscriptions, 20 deliveries a second per client).  That is the default
(``--channels-per-client 2``); client ``i`` subscribes to channels ``i .. i+K-1`` (mod C), so
every channel has ``N * K / C`` subscribers.  Expected delivery rate: ``N * K * R``.

The origin's channels tick at independent phases (each at its own offset in the tick interval,
from a hash of its name), as real instruments do; ``--lockstep`` makes them all tick at the
same instant, which hands the edge every channel's fan-out (N * K writes) in one burst: the
worst case for the lag, the best case for coalescing one client's frames into one write.

Starts a sample origin and an edge (one worker) with ``edge.streams``, then ``--loadgens``
load generator processes (default 1) sharing the clients, on the cores other than the edge's
(the edge on CPU 0, the load generators round robin on CPUs 1.., the origin on CPU 1); the run
drives them over their stdin, so the window is the same for all and for the edge's readings.
The load generators connect the clients (idle: the edge's RSS is read, for the memory per idle
client), subscribe them to ``trades:SYMBOL`` channels (no conflation, every message counts),
let it settle, then count for ``--duration`` seconds: messages delivered per second (frames
counted from their headers, not parsed) and the delivery lag (origin timestamp -> received,
merged from every generator's histogram; it includes the load generator's own queueing).

So that one load generator can take 200,000 messages/s, most clients are cheap to receive:
every ``--probe-every``th client is a probe, read as soon as anything arrives, and every
message it gets is a lag sample; the others are read only once ``--bulk-lowat`` bytes wait in
their socket (SO_RCVLOWAT: one read per some 24 frames instead of one per frame) and give no
lag sample (their reads are late on purpose).  Their frames all count, those waiting unread in
their sockets at the window's start and end included (FIONREAD): clients subscribed together
fill up together, so leaving them out made the count depend on where in that cycle the window
fell (-13% at 1,000 clients, +4% at 10,000).  ``--probe-every 1`` reads every client at once
and samples every ``LAG_SAMPLE``th message.

The lag is split by hop: origin timestamp -> the origin's write (its own count per ms,
``publish_late_ms`` in its ``/_control``), the bytes written by the origin that wait unread in
the edge's upstream sockets (``ss``, four times a second; also as publishing time), origin
timestamp -> edge arrival and -> edge write (the edge's histograms, as bucket bounds), and the
clients' own reading.

Beside them: the CPU seconds of the edge, the origin and each load generator over the window
(from /proc/PID/stat), and how busy each core was (/proc/stat), softirq apart: on loopback
the kernel runs the TCP input of the socket written to as softirq on the writer's core,
charged to no process, so the edge's own CPU share understates its core's load (at 200,000
deliveries/s about 15-20% of the core is the clients' side of TCP).  ``--rx-cpu 1`` steers
loopback's receive processing to CPU 1 for the run (RPS; root; put back after), so the edge's
core pays for its sends only, as with clients on other machines.  The run says what limited it
(``limited_by``): a load generator or its core, the server's core full (its CPU and the
softirq), or a server that waited for a CPU (/proc/PID/schedstat: other processes on the
machine).  With ``--nginx`` the clients instead go through nginx's WebSocket proxy
(Debian nginx, ``proxy_pass`` + Upgrade) straight to the origin's stream endpoint, 1:1, and
the origin's open subscriptions are counted.

Figures are printed as a table and one JSON line.  The run holds the machine's benchmark lock
(``benchmarks.compare.bench_lock``).  On a shared machine the rates are noisy, and so is
everything else once the edge waits for a CPU: a starved edge falls behind, and its backlog
coalesces frames into fewer writes (``messages per write system call``), which lowers the CPU
per message while the lag grows.  ``benchmarks.streams_fanout`` measures the fan-out with its
coalescing fixed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.compare import bench_lock, one_pop_config
from meridian.origin import SYMBOLS
from meridian.origin_streams import Feed

#: Every LAG_SAMPLE-th message's lag is measured by the load generator.
LAG_SAMPLE = 8
_HANDSHAKE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame (mask key 0: valid, and the payload is unchanged)."""
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, 0x80 | size))
    else:
        head = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    return head + b"\x00\x00\x00\x00" + payload


class StreamClient(asyncio.Protocol):
    """A small WebSocket client: handshake, masked commands, unmasked server frames parsed
    into ``messages`` (or handed to ``on_message``)."""

    def __init__(
        self,
        path: str = "/stream",
        on_message: Callable[[bytes], None] | None = None,
        keep: bool = True,
        sample: int = 1,
    ) -> None:
        self.path = path
        #: Called with every ``sample``-th message.
        self.on_message = on_message
        self.sample = sample
        self.keep = keep
        self.messages: list[bytes] = []
        self.buffer = bytearray()
        self.upgraded = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.close_reason = ""
        self.status = 0
        self.transport: asyncio.Transport | None = None
        self.received = 0
        #: Bytes of the data frames counted in ``received`` (their mean size: ``unread_frames``).
        self.received_bytes = 0
        self.arrived = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(_HANDSHAKE.format(path=self.path).encode())  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_result(False)
        if not self.lost.done():
            self.lost.set_result(None)
        self.arrived.set()

    def send_json(self, document: object) -> None:
        assert self.transport is not None
        self.transport.write(client_frame(json.dumps(document).encode()))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.upgraded.done():
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(buffer[9:12])
            del buffer[: end + 4]
            self.upgraded.set_result(self.status == 101)
        start = 0
        size_total = len(buffer)
        while size_total - start >= 2:
            frame_start = start
            first, size = buffer[start], buffer[start + 1] & 0x7F
            offset = start + 2
            if size == 126:
                if size_total - start < 4:
                    break
                size = int.from_bytes(buffer[start + 2 : start + 4], "big")
                offset = start + 4
            elif size == 127:
                if size_total - start < 10:
                    break
                size = int.from_bytes(buffer[start + 2 : start + 10], "big")
                offset = start + 10
            if size_total < offset + size:
                break
            opcode = first & 0x0F
            start = offset + size
            if opcode in (0x1, 0x2):  # the origin itself (``--nginx``) sends binary frames
                self.received += 1
                self.received_bytes += start - frame_start
                sampled = self.on_message is not None and self.received % self.sample == 0
                if sampled or self.keep:  # else counted without a copy
                    payload = bytes(buffer[offset:start])
                    if sampled and self.on_message is not None:
                        self.on_message(payload)
                    if self.keep:
                        self.messages.append(payload)
                continue
            payload = bytes(buffer[offset:start])
            if opcode == 0x9 and self.transport is not None:
                self.transport.write(client_frame(payload, 0xA))
            elif opcode == 0x8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.close_reason = payload[2:].decode("utf-8", "replace")
        del buffer[:start]
        self.arrived.set()

    def documents(self) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self.messages]

    async def wait_for(self, count: int, within: float = 10.0) -> None:
        """Until ``count`` text messages arrived (or the connection ended)."""
        async with asyncio.timeout(within):
            while self.received < count and not self.lost.done():
                self.arrived.clear()
                await self.arrived.wait()


async def connect(port: int, path: str = "/stream", **kwargs: Any) -> StreamClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: StreamClient(path, **kwargs), "127.0.0.1", port
    )
    if not await client.upgraded:
        raise ConnectionError(f"upgrade refused: {client.status}")
    return client


# --------------------------------------------------------------------------------------------
# Load generator (its own process)


def _ts(payload: bytes) -> float:
    at = payload.find(b'"ts":')
    if at < 0:
        return 0.0
    end = payload.find(b",", at)
    return float(payload[at + 5 : end])


#: Lag histogram buckets per second (0.1 ms): load generators report counts, the run merges.
LAG_BUCKETS_PER_SECOND = 10_000


async def loadgen(args: argparse.Namespace) -> None:
    """One load generator process: ``--clients`` clients (global numbers from ``--first``,
    which decide their channels), driven by the run over stdin, one command a line:
    ``subscribe``, ``start`` (the window opens), ``stop`` (it closes: the result line) and
    ``end``.  With ``--nginx`` each client opens its own stream through nginx to the origin
    (the channel in the URL), and ``subscribe`` does nothing."""
    channels = [f"trades:{name}" for name in list(SYMBOLS)[: args.channels]]
    lags: Counter[int] = Counter()
    counting = False

    def on_message(payload: bytes) -> None:
        if counting and payload.startswith(b'{"channel"'):
            lag = max(0.0, time.time() - _ts(payload))
            lags[int(lag * LAG_BUCKETS_PER_SECOND)] += 1

    def say(**fields: Any) -> None:
        print(json.dumps(fields), flush=True)

    def path(number: int) -> str:
        return f"/stream?channel={channels[number % len(channels)]}" if args.nginx else "/stream"

    def probe(number: int) -> bool:
        return bool(number % args.probe_every == 0)

    clients: list[StreamClient] = []
    for start in range(0, args.clients, 200):
        numbers = range(args.first + start, args.first + min(start + 200, args.clients))
        batch = [
            connect(
                args.port,
                path(number),
                on_message=on_message if probe(number) else None,
                keep=False,
                sample=1 if args.probe_every > 1 else LAG_SAMPLE,
            )
            for number in numbers
        ]
        clients.extend(await asyncio.gather(*batch))
        for number, client in zip(numbers, clients[-len(numbers) :], strict=True):
            if args.bulk_lowat and not probe(number) and client.transport is not None:
                # Readable only once this many bytes wait: one read per many frames.
                sock = client.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, args.bulk_lowat)
    say(phase="connected", clients=len(clients))
    before, started, cpu0 = 0.0, 0.0, 0.0
    while command := (await asyncio.to_thread(sys.stdin.readline)).strip():
        if command == "subscribe":
            for i, client in enumerate(clients) if not args.nginx else ():
                for k in range(args.channels_per_client):
                    channel = channels[(args.first + i + k) % len(channels)]
                    client.send_json({"op": "subscribe", "channel": channel})
            say(phase="subscribed")
        elif command == "start":
            counting = True
            before = sum(c.received for c in clients) + unread_frames(clients)
            started, cpu0 = time.perf_counter(), time.process_time()
            say(phase="started")
        elif command == "stop":
            counting = False
            say(
                phase="result",
                delivered=round(sum(c.received for c in clients) + unread_frames(clients) - before),
                seconds=time.perf_counter() - started,
                lags={str(k): v for k, v in lags.items()},
                closed=sum(1 for c in clients if c.lost.done()),
                loadgen_cpu=time.process_time() - cpu0,
            )
        elif command == "end":
            break
    for client in clients:
        if client.transport is not None:
            client.transport.close()


def unread_frames(clients: list[StreamClient]) -> float:
    """The data frames that have reached the clients' sockets but are not read yet (bytes
    waiting in the kernel, FIONREAD, and in the clients' buffers, over the mean frame size).
    A client read only once ``--bulk-lowat`` bytes wait holds up to that many unread, and
    clients subscribed together fill up together: counting them keeps the window's count
    from depending on where in that cycle the window starts and ends."""
    frames = sum(c.received for c in clients)
    if not frames:
        return 0.0
    size = sum(c.received_bytes for c in clients) / frames
    waiting = 0
    for client in clients:
        waiting += len(client.buffer)
        sock = client.transport.get_extra_info("socket") if client.transport else None
        if sock is not None and not client.lost.done():
            with contextlib.suppress(OSError, ValueError):
                waiting += int.from_bytes(
                    fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"), sys.byteorder
                )
    return waiting / size


def merge_results(results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The load generators' result lines as one: counts added, lag histograms merged into
    p50/p99/max, the busiest generator's CPU share (one at a full core limits the run)."""
    lags: Counter[int] = Counter()
    for result in results:
        lags.update({int(k): v for k, v in result["lags"].items()})
    total = sum(lags.values())
    ordered = sorted(lags.items())

    def pct(q: float) -> float:
        seen = 0
        for bucket, count in ordered:
            seen += count
            if seen >= q * total:
                return (bucket + 1) / LAG_BUCKETS_PER_SECOND * 1000
        return float("nan")

    delivered = sum(r["delivered"] for r in results)
    cpu = [r["loadgen_cpu"] for r in results]
    return {
        "delivered": delivered,
        "seconds": seconds,
        # Each generator's count over its own window (from its "start" to its "stop").
        "rate": sum(r["delivered"] / r["seconds"] for r in results if r["seconds"]),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": (ordered[-1][0] + 1) / LAG_BUCKETS_PER_SECOND * 1000 if ordered else float("nan"),
        "lag_samples": total,
        "closed": sum(r["closed"] for r in results),
        "loadgens": len(results),
        "loadgen_cpu": sum(cpu),
        "loadgen_cpu_share": max(cpu) / seconds if seconds else 0.0,
    }


# --------------------------------------------------------------------------------------------
# The run: origin, edge (or nginx), load generator; /proc readings of the server process


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pinned(cpu: int, argv: list[str]) -> list[str]:
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(cpu), *argv]
    return argv


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _waited_seconds(pid: int) -> float:
    """Seconds ``pid`` has spent runnable but waiting for a CPU (/proc/PID/schedstat): on a
    shared machine, the time other processes took from it."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _write_syscalls(pid: int) -> int:
    """Write system calls ``pid`` has made (/proc/PID/io ``syscw``): per delivered message,
    how well frames were coalesced, whatever else runs on the machine."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("syscw:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


#: /proc/stat's per-CPU columns: user nice system idle iowait irq softirq steal ...
_IDLE_COLUMNS = (3, 4)
_SOFTIRQ_COLUMN = 6


def core_ticks(stat: str, cpu: int) -> tuple[int, int, int]:
    """(busy, softirq, total) clock ticks of ``cpu`` from the text of /proc/stat.  Busy is
    everything but idle and iowait: every process on the core and the kernel's softirq work,
    which the processes' own utime+stime leave out (on loopback, the TCP input of the socket
    a process wrote to runs as softirq on the writer's core)."""
    prefix = f"cpu{cpu} "
    for line in stat.splitlines():
        if line.startswith(prefix):
            ticks = [int(field) for field in line.split()[1:]]
            total = sum(ticks[:8])  # guest time is already counted in user
            idle = sum(ticks[i] for i in _IDLE_COLUMNS)
            return total - idle, ticks[_SOFTIRQ_COLUMN], total
    raise ValueError(f"no cpu{cpu} line in /proc/stat")


def core_shares(before: tuple[int, int, int], after: tuple[int, int, int]) -> tuple[float, float]:
    """(busy, softirq) shares of a core between two ``core_ticks`` readings."""
    busy, softirq, total = (b - a for a, b in zip(before, after, strict=True))
    return (busy / total, softirq / total) if total > 0 else (0.0, 0.0)


#: Receive packet steering of loopback's one queue: a hexadecimal CPU mask, 0 for none.
LO_RPS = Path("/sys/class/net/lo/queues/rx-0/rps_cpus")


@contextlib.contextmanager
def loopback_rx_on(cpu: int | None, control: Path = LO_RPS) -> Iterator[None]:
    """With ``cpu``, loopback's receive processing (the TCP input of the socket written to)
    runs on that core for the block (RPS), not on the writer's: the server's core then pays
    for its sends only, as with clients on other machines.  The setting is machine-wide (it
    needs root), so the one found is put back, whatever happens."""
    if cpu is None:
        yield
        return
    before = control.read_text().strip()
    control.write_text(f"{1 << cpu:x}\n")
    try:
        yield
    finally:
        control.write_text(before + "\n")


def _core_ticks(cpu: int) -> tuple[int, int, int]:
    return core_ticks(Path("/proc/stat").read_text(), cpu)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _wait_port(port: int, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _http_get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    return raw.split(b"\r\n\r\n", 1)[1]


def _lag_buckets(admin_port: int, name: str = "delivery") -> dict[float, float]:
    """One of the edge's lag histograms: upper bound -> cumulative count."""
    out: dict[float, float] = {}
    prefix = f"meridian_edge_stream_{name}_lag_seconds_bucket{{"
    for line in _http_get(admin_port, "/metrics").decode().splitlines():
        if line.startswith(prefix):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(bound)] = float(line.rsplit(" ", 1)[1])
    return out


def _bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound (ms) of the bucket holding quantile ``q`` of the window's deliveries."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return float("nan")
    for bound, count in zip(bounds, counts, strict=True):
        if count >= q * counts[-1]:
            return bound * 1000
    return float("inf")


def ss_unread(text: str) -> int:
    """The bytes waiting unread in the receive queues listed by ``ss -tnH`` (Recv-Q, the
    first column of an established socket's line)."""
    total = 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit():
            total += int(fields[0])
    return total


def _sample_unread(origin_port: int, seconds: float, sample: bool) -> list[int]:
    """Sleeps ``seconds``; meanwhile, four times a second, the bytes waiting unread in the
    server's sockets to the origin (``ss``: the kernel filters, so it is cheap): the hop
    between the origin's write and the server's read, seen directly."""
    end = time.monotonic() + seconds
    samples: list[int] = []
    ss = shutil.which("ss") if sample else None
    while (left := end - time.monotonic()) > 0:
        if ss is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                listing = subprocess.run(
                    [ss, "-tnH", "state", "established", f"( dport = :{origin_port} )"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                    check=True,
                )
                samples.append(ss_unread(listing.stdout))
        time.sleep(min(0.25, max(0.0, end - time.monotonic())) if ss else left)
    return samples


def _frame_size(channels: int) -> float:
    """The mean size of an origin message on the wire (payload and a 2-byte frame head)."""
    feed = Feed({s: (v.price, v.price_decimals) for s, v in SYMBOLS.items()}, 10.0, 1)
    names = [f"trades:{name}" for name in list(SYMBOLS)[:channels]]
    return sum(len(feed.message(name, 1_000_000_000)) + 2 for name in names) / len(names)


def _origin_late(origin_port: int) -> dict[str, int]:
    """The origin's count of messages per whole millisecond they were written late."""
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
        late: dict[str, int] = json.loads(_http_get(origin_port, "/_control"))["streams"][
            "publish_late_ms"
        ]
        return late
    return {}


def ms_quantile(before: dict[str, int], after: dict[str, int], q: float) -> float:
    """Quantile ``q`` (the bucket's upper bound, ms) of the counts per whole millisecond
    added between two readings."""
    counts = sorted((int(ms), n - before.get(ms, 0)) for ms, n in after.items())
    total = sum(n for _, n in counts)
    seen = 0
    for ms, n in counts:
        seen += n
        if total and seen >= q * total:
            return float(ms + 1)
    return float("nan")


def _edge_config(path: Path, origin_port: int) -> None:
    streams = {
        "channels": [
            {"pattern": "ticker:*", "slow_consumer": "conflate"},
            {"pattern": "trades:*"},
            {"pattern": "depth:*", "slow_consumer": "conflate"},
        ],
        "max_connections_per_ip": 0,
        "max_subscriptions_per_ip": 0,
    }
    config = one_pop_config(
        "eu-central", "fra", (50.11, 8.68), "127.0.1.3", origin_port, {"streams": streams}
    )
    path.write_text(json.dumps(config))  # JSON is YAML


def _nginx_config(path: Path, port: int, origin_port: int) -> None:
    tmp = path.parent
    path.write_text(
        f"""
worker_processes 1;
worker_rlimit_nofile 40000;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 30000; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /stream {{
            proxy_pass http://127.0.0.1:{origin_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""
    )


def _start_loadgens(
    args: argparse.Namespace, port: int, env: dict[str, str]
) -> list[subprocess.Popen[str]]:
    """``--loadgens`` load generator processes sharing the clients, on the cores other than
    the server's (core 0), round robin."""
    cores = os.cpu_count() or 1
    generators = []
    share, extra = divmod(args.clients, args.loadgens)
    first = 0
    for j in range(args.loadgens):
        count = share + (1 if j < extra else 0)
        argv = [
            sys.executable,
            "-m",
            "benchmarks.streams",
            "--loadgen",
            "--port",
            str(port),
            "--clients",
            str(count),
            "--first",
            str(first),
            "--channels",
            str(args.channels),
            "--channels-per-client",
            str(args.channels_per_client),
            "--probe-every",
            str(args.probe_every),
            "--bulk-lowat",
            str(args.bulk_lowat),
            *(["--nginx"] if args.nginx else []),
        ]
        cpu = 1 + j % (cores - 1) if cores >= 2 else 0
        generators.append(
            subprocess.Popen(
                _pinned(cpu, argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                text=True,
            )
        )
        first += count
    return generators


def _command(
    generators: list[subprocess.Popen[str]], command: str | None, answer: str | None
) -> list[dict[str, Any]]:
    """Sends ``command`` to every load generator, then reads each one's ``answer`` line."""
    if command is not None:
        for generator in generators:
            assert generator.stdin is not None
            generator.stdin.write(command + "\n")
            generator.stdin.flush()
    events = []
    for generator in generators if answer is not None else ():
        assert generator.stdout is not None
        for line in generator.stdout:
            event = json.loads(line)
            if event.get("phase") == answer:
                events.append(event)
                break
        else:
            raise RuntimeError(f"a load generator ended before {answer!r}")
    return events


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="streams-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    origin_port, port = _free_port(), _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    try:
        origin_argv = [
            sys.executable,
            "-m",
            "meridian.origin",
            "--region",
            "eu-central",
            "--port",
            str(origin_port),
            "--log-level",
            "warning",
            "--stream-rate",
            str(args.rate),
        ]
        if args.lockstep:
            origin_argv.append("--stream-lockstep")
        log = (tmp / "origin.log").open("wb")
        origin = subprocess.Popen(
            _pinned(args.origin_cpu, origin_argv), stdout=log, stderr=log, env=env
        )
        procs.append(origin)
        _wait_port(origin_port)
        if args.nginx:
            if not shutil.which("nginx"):
                raise SystemExit("nginx is not installed")
            conf = tmp / "nginx.conf"
            _nginx_config(conf, port, origin_port)
            server_argv = ["nginx", "-c", str(conf), "-p", str(tmp), "-g", "daemon off;"]
        else:
            conf = tmp / "edge.yaml"
            _edge_config(conf, origin_port)
            admin_port = _free_port()
            server_argv = [
                sys.executable,
                "-m",
                "edge",
                "--config",
                str(conf),
                "--pop",
                "fra",
                "--listen",
                f"127.0.0.1:{port}",
                "--admin",
                f"127.0.0.1:{admin_port}",
            ]
        log = (tmp / "server.log").open("wb")
        server = subprocess.Popen(_pinned(0, server_argv), stdout=log, stderr=log, env=env)
        procs.append(server)
        _wait_port(port)
        # nginx: the worker is the master's child (the one that serves).
        pid = server.pid
        if args.nginx:
            time.sleep(0.5)
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            pid = int(children[0]) if children else pid
        time.sleep(1.0)
        rss_start = _rss_kib(pid)
        generators = _start_loadgens(args, port, env)
        procs.extend(generators)  # type: ignore[arg-type]
        figures: dict[str, Any] = {
            "server": "nginx 1:1 proxy" if args.nginx else "meridian edge",
            "clients": args.clients,
            "channels": args.channels,
            "subscriptions_per_client": args.channels_per_client,
            "rate_per_channel": args.rate,
            "lockstep": args.lockstep,
            "expected_rate": args.clients * args.channels_per_client * args.rate,
            "origin_cpu": args.origin_cpu,
            "cpus": os.cpu_count(),
        }
        _command(generators, None, "connected")
        time.sleep(1.5)
        figures["idle_kib_per_client"] = (_rss_kib(pid) - rss_start) / args.clients
        time.sleep(0.5)
        _command(generators, "subscribe", "subscribed")
        time.sleep(args.warmup)
        # While every client is connected (they close at the end of the run).
        with contextlib.suppress(OSError, ValueError, KeyError):
            control = json.loads(_http_get(origin_port, "/_control"))
            figures["origin_connections"] = sum(control["streams"]["subscriptions"].values())
        lag_start: dict[float, float] = {}
        arrival_start: dict[float, float] = {}
        late_start = _origin_late(origin_port)
        if not args.nginx:
            lag_start = _lag_buckets(admin_port)
            arrival_start = _lag_buckets(admin_port, "arrival")
        cpu_start, origin_start = _cpu_seconds(pid), _cpu_seconds(origin.pid)
        cores_start = {core: _core_ticks(core) for core in _watched_cores()}
        waited_start, writes_start = _waited_seconds(pid), _write_syscalls(pid)
        started = time.perf_counter()
        _command(generators, "start", "started")
        unread = _sample_unread(origin_port, args.duration, not args.nginx)
        results = _command(generators, "stop", "result")
        late_end = _origin_late(origin_port)
        seconds = time.perf_counter() - started
        user, system = (b - a for a, b in zip(cpu_start, _cpu_seconds(pid), strict=True))
        cpu = user + system
        figures["server_cpu_share"] = cpu / seconds
        figures["server_cpu_s"] = cpu
        figures["server_cpu_system_share"] = system / cpu if cpu else 0.0
        figures["server_write_syscalls"] = _write_syscalls(pid) - writes_start
        figures["server_cpu_wait_share"] = (_waited_seconds(pid) - waited_start) / seconds
        figures["origin_cpu_share"] = (sum(_cpu_seconds(origin.pid)) - sum(origin_start)) / seconds
        for core, ticks in cores_start.items():
            busy, softirq = core_shares(ticks, _core_ticks(core))
            name = "edge_core" if core == 0 else f"core{core}"
            figures[f"{name}_busy_share"], figures[f"{name}_softirq_share"] = busy, softirq
        figures["rss_mib"] = _rss_kib(pid) / 1024
        figures["rss_kib_per_1000_clients"] = _rss_kib(pid) / args.clients * 1000
        if not args.nginx:
            lag_end = _lag_buckets(admin_port)
            figures["edge_lag_p50_ms_le"] = _bucket_quantile(lag_start, lag_end, 0.5)
            figures["edge_lag_p99_ms_le"] = _bucket_quantile(lag_start, lag_end, 0.99)
            arrival_end = _lag_buckets(admin_port, "arrival")
            figures["arrival_lag_p50_ms_le"] = _bucket_quantile(arrival_start, arrival_end, 0.5)
            figures["arrival_lag_p99_ms_le"] = _bucket_quantile(arrival_start, arrival_end, 0.99)
        figures["origin_late_p50_ms_le"] = ms_quantile(late_start, late_end, 0.5)
        figures["origin_late_p99_ms_le"] = ms_quantile(late_start, late_end, 0.99)
        if unread:
            # Bytes the origin delivered that the edge had not read yet, over the window; in
            # time, at the rate the origin publishes them.
            mean = sum(unread) / len(unread)
            per_second = args.channels * args.rate * _frame_size(args.channels)
            figures["upstream_unread_kib_mean"] = mean / 1024
            figures["upstream_unread_kib_max"] = max(unread) / 1024
            figures["upstream_unread_ms_mean"] = mean / per_second * 1000
        figures.update(merge_results(results, seconds))
        _command(generators, "end", None)
        for generator in generators:
            generator.wait(timeout=60)
        delivered = figures["delivered"]
        if delivered and cpu:
            figures["server_cpu_us_per_message"] = cpu / delivered * 1e6
            figures["messages_per_server_core_second"] = delivered / cpu
        if delivered and figures["server_write_syscalls"]:
            figures["messages_per_write"] = delivered / figures["server_write_syscalls"]
        figures["limited_by"] = limited_by(figures)
        return figures
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


#: A process using this share of a core over the window is taken as saturated; a server
#: that waited this share of it for a CPU was slowed by other processes (a shared machine).
SATURATED = 0.9
CONTENDED = 0.1


def _watched_cores() -> list[int]:
    """The server's core (0) and, with two or more, the load generators' first core (1)."""
    return [0, 1] if (os.cpu_count() or 1) >= 2 else [0]


def limited_by(figures: dict[str, Any]) -> str:
    """What held the delivered rate (or the lag) back: ``none`` when every expected message
    arrived and nothing was at a full core, else each saturated side.

    The server's core counts the server's own CPU and the core's softirq time: on loopback the
    kernel runs the TCP input of every socket the server writes to (the client's receive
    path) as softirq on the server's core, charged to no process.  A server whose core is full
    falls behind: its backlog (origin messages unread in its upstream sockets) is the lag, and
    coalesces frames into fewer writes until it costs what the core can pay.  A full load
    generator core (load generators, origin, the clients' side of the kernel) inflates the lag
    the clients measure, not the edge's own (``origin ts -> edge write``)."""
    sides = []
    own, softirq = figures.get("server_cpu_share", 0.0), figures.get("edge_core_softirq_share", 0.0)
    server = own + softirq  # (the kernel may charge a little softirq to both: at most "full")
    if figures.get("loadgen_cpu_share", 0.0) >= SATURATED:
        sides.append("load generator (at a full core: its rate and lag, not the server's)")
    elif figures.get("core1_busy_share", 0.0) >= SATURATED:
        sides.append("the load generators' core (full: the clients' lag, not the edge's)")
    if server >= SATURATED:
        sides.append(f"server (its core full: its own {own:.0%}, softirq {softirq:.0%})")
    elif (waited := figures.get("server_cpu_wait_share", 0.0)) >= CONTENDED:
        sides.append(f"CPU contention (the server waited for a CPU {waited:.0%} of the window)")
    if sides:
        return "; ".join(sides)
    if figures.get("rate", 0.0) < 0.97 * figures["expected_rate"]:
        return "neither at a full core (other processes on the machine?)"
    return "none"


def report(figures: dict[str, Any]) -> None:
    rows = [
        ("server", "server"),
        ("clients", "clients"),
        ("channels x rate", None),
        ("subscriptions per client", "subscriptions_per_client"),
        ("origin ticks", None),
        ("messages delivered/s", "rate"),
        ("  expected (clients x channels x rate)", "expected_rate"),
        ("lag p50 (ms)", "p50_ms"),
        ("lag p99 (ms)", "p99_ms"),
        ("lag max (ms)", "max_ms"),
        ("origin ts -> origin write p50 (ms, bound)", "origin_late_p50_ms_le"),
        ("origin ts -> origin write p99 (ms, bound)", "origin_late_p99_ms_le"),
        ("upstream unread at the edge (KiB, mean)", "upstream_unread_kib_mean"),
        ("  max", "upstream_unread_kib_max"),
        ("  in publishing time (ms, mean)", "upstream_unread_ms_mean"),
        ("origin ts -> edge write p50 (ms, bound)", "edge_lag_p50_ms_le"),
        ("origin ts -> edge write p99 (ms, bound)", "edge_lag_p99_ms_le"),
        ("  of which upstream p50 (ms, bound)", "arrival_lag_p50_ms_le"),
        ("  of which upstream p99 (ms, bound)", "arrival_lag_p99_ms_le"),
        ("server CPU share of a core", "server_cpu_share"),
        ("server CPU us per message", "server_cpu_us_per_message"),
        ("  of which in the kernel", "server_cpu_system_share"),
        ("messages per write system call", "messages_per_write"),
        ("server waiting for a CPU (share)", "server_cpu_wait_share"),
        ("server's core busy (all, with softirq)", "edge_core_busy_share"),
        ("  of which softirq (loopback TCP input)", "edge_core_softirq_share"),
        ("load generators' core busy", "core1_busy_share"),
        ("  of which softirq", "core1_softirq_share"),
        ("messages per server core-second", "messages_per_server_core_second"),
        ("server RSS (MiB)", "rss_mib"),
        ("server RSS per 1,000 clients (KiB)", "rss_kib_per_1000_clients"),
        ("idle memory per client (KiB)", "idle_kib_per_client"),
        ("origin connections", "origin_connections"),
        ("clients closed during the run", "closed"),
        ("load generators", "loadgens"),
        ("loopback receive processing on CPU", "loopback_rx_cpu"),
        ("lag samples (probe clients)", "lag_samples"),
        ("load generator CPU share (busiest)", "loadgen_cpu_share"),
        ("origin CPU share of a core", "origin_cpu_share"),
        ("limited by", "limited_by"),
    ]
    for label, key in rows:
        if key is None and label == "origin ticks":
            value: Any = "lockstep" if figures["lockstep"] else "independent phases"
        elif key is None:
            value = f"{figures['channels']} x {figures['rate_per_channel']}/s"
        else:
            value = figures.get(key, "-")
        if isinstance(value, float):
            value = f"{value:,.2f}"
        elif isinstance(value, int):
            value = f"{value:,}"
        print(f"{label:40s} {value}")
    print(json.dumps(figures))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streams", description=__doc__)
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--channels", type=int, default=20)
    parser.add_argument("--rate", type=float, default=10.0, help="messages/s per channel")
    parser.add_argument(
        "--channels-per-client",
        "--subscriptions",
        dest="channels_per_client",
        type=int,
        default=2,
        help="channels each client subscribes to (default 2: 1,000 subscribers per channel "
        "at 10,000 clients on 20 channels; edge only)",
    )
    parser.add_argument(
        "--lockstep", action="store_true", help="every origin channel ticks at the same instant"
    )
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--nginx", action="store_true", help="clients through nginx, 1:1")
    parser.add_argument(
        "--origin-cpu", type=int, default=1, help="the CPU the origin is pinned to (default 1)"
    )
    parser.add_argument(
        "--loadgens",
        type=int,
        default=1,
        help="load generator processes sharing the clients (on cores 1.., round robin)",
    )
    parser.add_argument(
        "--probe-every",
        type=int,
        default=50,
        help="every Nth client is a probe: read at once, its every message's lag sampled "
        "(default 50; 1: every client, every 8th message)",
    )
    parser.add_argument(
        "--bulk-lowat",
        type=int,
        default=4096,
        help="the other clients are read once this many bytes wait (SO_RCVLOWAT; 0: at once)",
    )
    parser.add_argument(
        "--rx-cpu",
        type=int,
        default=None,
        help="run loopback's receive processing on this CPU for the run (RPS on lo; root; "
        "restored after): the clients' TCP input off the edge's core, as with clients on "
        "other machines (default: the writer's core, the kernel's default)",
    )
    parser.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.channels <= len(SYMBOLS):
        parser.error(f"--channels must be 1..{len(SYMBOLS)}")
    if not 1 <= args.channels_per_client <= args.channels or (
        args.nginx and args.channels_per_client > 1
    ):
        parser.error("--channels-per-client must be 1..--channels (1 with --nginx)")
    if args.loadgens < 1 or args.probe_every < 1 or args.bulk_lowat < 0:
        parser.error("--loadgens and --probe-every must be at least 1, --bulk-lowat not negative")
    if args.rx_cpu is not None and not 0 <= args.rx_cpu < (os.cpu_count() or 1):
        parser.error(f"--rx-cpu must be 0..{(os.cpu_count() or 1) - 1}")
    if args.loadgen:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(loadgen(args))
        return 0
    with (
        bench_lock("the streams benchmark"),  # one load run on the machine at a time
        loopback_rx_on(args.rx_cpu),
    ):
        figures = run(args)
    figures["loopback_rx_cpu"] = "writer's" if args.rx_cpu is None else args.rx_cpu
    report(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
