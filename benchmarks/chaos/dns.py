"""Reliability scenarios of issue 21 for GeoDNS, with figures:

    python -m benchmarks.chaos.dns [cost] [flood] [fuzz] [failover] [half-down]
                                   [--packets N] [--repo PATH] [--json FILE]

* ``cost`` (defect 4): the server's CPU per query, read from ``/proc/PID/stat`` over thousands
  of queries of each kind: a cached geo answer, the apex SOA / NS / ANY, a glue address,
  REFUSED (outside the zone), NXDOMAIN (random names), and a query that takes the strict path
  (an EDNS cookie).  Each kind twice: the same bytes repeated (the reply memo), and with the
  name's case randomized (0x20: no memo, the answer is built).  ``--repo`` runs the server of
  another work tree (``git archive`` of an older commit) for before/after figures.
* ``flood`` (defect 4, test 12): one /24 floods expensive questions (apex SOA/NS/ANY, glue,
  REFUSED, BADVERS, the strict path) at a fixed rate while 20 clients in other networks ask
  for geo answers at 50 q/s each; their answered share and p99, the flood's amplification
  (bytes out / bytes in) and the server's CPU.  Rate limiting at its defaults.
* ``fuzz`` (test 12): mutated real queries (bit flips, truncation, length lies, compression
  pointer loops, huge counts, EDNS/ECS garbage) over UDP from 256 networks (so that every
  packet is answered as the rate limit allows: the parser and both answer paths see all of
  them) and over TCP (pipelined, with length lies), a valid query after every batch that must
  be answered correctly; then one /24 floods mutated packets to measure amplification under
  rate limiting.  Figures: sent, answered, crashes (the process gone, or a handler that raised),
  probes retried and lost.  ``--packets`` sets the total (default 1,000,000).
* ``failover`` (test 3): three regions, each a real sample origin process, default health
  settings (checks every 10 s, 2 s while changing, fall 3); the nearest region's origin is
  SIGKILLed while a client polls every 100 ms: seconds until answers switch (bound: 30 s +
  the check interval), and whether they ever switched back (flapping).
* ``half-down`` (test 4): four regions with real origins; 2, 3 then 4 of them killed while
  clients on every continent keep asking: an empty answer is a failure (Route 53 answers as
  if all were healthy when none is: ``all_down: fail_open``).

Every scenario starts its own processes on loopback free ports and stops each by PID; the
project's tests (``tests/test_reliability_dns.py``) run these functions at CI size and assert
the bounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import yaml

from meridian.ports import free_port as free_port

ROOT = Path(__file__).resolve().parents[2]
ZONE = "meridian.test"
START_TIMEOUT = 20.0
POP_ADDRESSES = {
    "iad": "127.0.1.1",
    "gru": "127.0.1.2",
    "fra": "127.0.1.3",
    "sin": "127.0.1.4",
    "syd": "127.0.1.5",
}
#: Client subnets (ECS) on every continent, for the built-in country database.
WORLD_SUBNETS = (
    "200.160.2.0/24",  # Brazil
    "81.2.69.0/24",  # United Kingdom
    "8.8.8.0/24",  # United States
    "1.1.1.0/24",  # Australia
    "165.21.0.0/24",  # Singapore
    "5.9.0.0/24",  # Germany
    "41.0.0.0/24",  # South Africa
    "2001:4860:4860::/56",  # United States over IPv6
)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def percentile(values: list[float], share: float) -> float:
    """The ``share`` (0..100) percentile by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(share / 100.0 * len(ordered)) - 1))
    return ordered[rank]


# --------------------------------------------------------------------------------------------
# Processes


def wait_until(check: Callable[[], Any], within: float, what: str, every: float = 0.05) -> Any:
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {within}s waiting for {what} (last: {last!r})")


class Child:
    """A child process whose output goes to a file; stopped by PID."""

    def __init__(self, argv: list[str], log_path: Path, repo: Path = ROOT) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        env = {**os.environ, "PYTHONPATH": str(repo)}
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=repo, env=env
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def stop(self) -> int | None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


class DnsProcess(Child):
    """``python -m geodns`` of a work tree on free ports."""

    def __init__(self, config_path: Path, tmp: Path, repo: Path = ROOT, pop: str = "iad") -> None:
        self.port = free_port()
        self.admin_port = free_port()
        argv = [
            sys.executable,
            "-m",
            "geodns",
            "--config",
            str(config_path),
            "--pop",
            pop,
            "--listen",
            f"127.0.0.1:{self.port}",
            "--admin",
            f"127.0.0.1:{self.admin_port}",
        ]
        super().__init__(argv, tmp / f"geodns-{self.port}.log", repo)

    def ready(self) -> DnsProcess:
        def listening() -> bool:
            if not self.alive():
                raise AssertionError("geodns exited:\n" + self.log_text()[-3000:])
            return "dns_listening" in self.log_text()

        wait_until(listening, START_TIMEOUT, "geodns to listen")
        return self

    def cpu_seconds(self) -> float:
        """User + system CPU of the server so far (``/proc/PID/stat``)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    values[name] = float(value)
        return values

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.admin_port}/status"
        with urllib.request.urlopen(url, timeout=5) as response:
            data: dict[str, Any] = json.load(response)
        return data

    def metric_sum(self, prefix: str) -> float:
        return sum(v for k, v in self.metrics().items() if k.startswith(prefix))


class OriginProcess(Child):
    """The sample origin (``python -m meridian.origin``) of a region."""

    def __init__(self, region: str, tmp: Path) -> None:
        self.region = region
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            sys.executable,
            "-m",
            "meridian.origin",
            "--region",
            region,
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        super().__init__(argv, tmp / f"origin-{region}-{self.port}.log")

    def ready(self) -> OriginProcess:
        def up() -> bool:
            if not self.alive():
                raise AssertionError(f"origin {self.region} exited:\n{self.log_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_until(up, START_TIMEOUT, f"origin {self.region}")
        return self


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="meridian-chaos-dns-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def running(*children: Child) -> Iterator[None]:
    try:
        yield
    finally:
        for child in children:
            child.stop()


# --------------------------------------------------------------------------------------------
# The world


#: Regions: name -> (lat, lon, IPv4 answer, IPv6 answer or None).
REGIONS = {
    "us-east": (39.04, -77.49, "127.0.2.1", None),
    "eu-central": (50.11, 8.68, "127.0.2.2", "2001:db8::2"),
    "ap-southeast": (1.35, 103.82, "127.0.2.3", None),
    "sa-east": (-23.55, -46.63, "127.0.2.4", None),
}


def world(
    *,
    backends: dict[str, str] | None = None,
    rate_limit: dict[str, Any] | None = None,
    health: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A zone over five POPs and, with ``backends`` (region -> origin URL), names over those
    regions (health-checked); without, the regions exist but no name answers with them (no
    health check then changes an answer: the memo stays warm)."""
    regions = {}
    for name, url in (backends or {"us-east": "http://127.0.0.1:9"}).items():
        lat, lon, v4, v6 = REGIONS[name]
        regions[name] = {
            "location": {"lat": lat, "lon": lon},
            "backends": [url],
            "addresses": [v4] + ([v6] if v6 else []),
        }
    names: dict[str, Any] = {
        "api": {"targets": "pops", "answers": 1},
        "two": {"targets": "pops", "answers": 2},
    }
    if backends:
        names["origin"] = {"targets": "regions", "answers": 1}
        names["pair"] = {"targets": "regions", "answers": 2}
    config: dict[str, Any] = {
        "geo": {"database": "builtin"},
        "regions": regions,
        "pops": {
            name: {
                "location": {"lat": lat, "lon": lon},
                "addresses": [POP_ADDRESSES[name]],
            }
            for name, (lat, lon) in {
                "iad": (39.04, -77.49),
                "gru": (-23.55, -46.63),
                "fra": (50.11, 8.68),
                "sin": (1.35, 103.82),
                "syd": (-33.87, 151.21),
            }.items()
        },
        "dns": {
            "zone": ZONE,
            "soa": {
                "mname": "ns1.meridian.test",
                "rname": "hostmaster.meridian.test",
                "serial": 2026112101,
            },
            "ns": [
                {"name": "ns1.meridian.test", "addresses": ["127.0.0.53", "2001:db8::53"]},
                {"name": "ns2.meridian.test", "addresses": ["127.0.0.54"]},
                {"name": "ns.elsewhere.example"},
            ],
            "names": names,
        },
        "edge": {
            "services": {"market": {}},
            "routes": [{"name": "default", "service": "market", "path_prefix": "/"}],
        },
    }
    if rate_limit is not None:
        config["dns"]["rate_limit"] = rate_limit
    if health is not None:
        config["health"] = health
    return config


def write_world(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def query(
    name: str,
    rdtype: str = "A",
    *,
    ecs: str | None = None,
    edns: bool = True,
    cookie: bool = False,
    version: int = 0,
    ident: int = 0,
) -> bytes:
    import ipaddress

    options: list[dns.edns.Option] = []
    if ecs is not None:
        network = ipaddress.ip_network(ecs, strict=False)
        options.append(dns.edns.ECSOption(str(network.network_address), network.prefixlen))
    if cookie:
        options.append(dns.edns.CookieOption(os.urandom(8), b""))
    if edns:
        message = dns.message.make_query(name, rdtype, use_edns=version, options=options)
    else:
        message = dns.message.make_query(name, rdtype, use_edns=False)
    message.id = ident
    return message.to_wire()


def random_case(wire: bytes, rng: random.Random) -> bytes:
    """DNS 0x20: the question name's letters in random case (defeats any memo of bytes)."""
    out = bytearray(wire)
    offset = 12
    while out[offset]:
        length = out[offset]
        for i in range(offset + 1, offset + 1 + length):
            if 97 <= out[i] <= 122 and rng.random() < 0.5:
                out[i] -= 32
        offset += 1 + length
    return bytes(out)


# --------------------------------------------------------------------------------------------
# Cost per query (defect 4)


def _cost_kinds() -> dict[str, Callable[[random.Random, bool], bytes]]:
    """Kind -> a query maker: (rng, vary) -> wire; ``vary`` defeats the reply memo (the name in
    random case; for NXDOMAIN a random name each time)."""

    def fixed(wire: bytes) -> Callable[[random.Random, bool], bytes]:
        return lambda rng, vary: random_case(wire, rng) if vary else wire

    nxdomain = query(f"x.{ZONE}")
    # Random names built beforehand: a slow client would put fewer queries in each of the
    # server's wake-ups and inflate its CPU per query with the wake-ups' own cost.
    names = random.Random(5)
    random_names = [query(f"r{names.getrandbits(40):x}.{ZONE}") for _ in range(30_000)]
    return {
        "cached A": fixed(query(f"api.{ZONE}", ecs="8.8.8.0/24")),
        "SOA": fixed(query(ZONE, "SOA")),
        "NS": fixed(query(ZONE, "NS")),
        "ANY": fixed(query(ZONE, "ANY")),
        "glue A": fixed(query(f"ns1.{ZONE}", "A")),
        "REFUSED": fixed(query("www.example.com", "A")),
        "NXDOMAIN": lambda rng, vary: (
            random_names[rng.randrange(len(random_names))] if vary else nxdomain
        ),
        "strict path (cookie)": fixed(query(f"api.{ZONE}", cookie=True)),
    }


def _exchange(
    port: int, make: Callable[[int], bytes], count: int, window: int = 16, timeout: float = 2.0
) -> int:
    """Send ``count`` queries keeping ``window`` outstanding; returns how many were answered."""
    answered = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sent = 0
        outstanding = 0
        while sent < count or outstanding:
            while sent < count and outstanding < window:
                wire = make(sent)
                sock.sendto(struct.pack("!H", sent & 0xFFFF) + wire[2:], ("127.0.0.1", port))
                sent += 1
                outstanding += 1
            try:
                sock.recv(65535)
            except TimeoutError:
                outstanding = 0  # lost: go on
                continue
            answered += 1
            outstanding -= 1
    return answered


@dataclass
class CostFigures:
    #: Kind -> server CPU microseconds per query, the same bytes repeated.
    repeated_us: dict[str, float] = field(default_factory=dict)
    #: Kind -> server CPU microseconds per query, name in random case (no reply memo).
    random_case_us: dict[str, float] = field(default_factory=dict)
    queries_per_kind: int = 0


def measure_cost(count: int = 20_000, repo: Path = ROOT) -> CostFigures:
    """Server CPU per query for each kind (rate limiting off: what answering costs)."""
    figures = CostFigures(queries_per_kind=count)
    with workdir() as tmp:
        path = write_world(tmp / "world.yaml", world(rate_limit={"enabled": False}))
        server = DnsProcess(path, tmp, repo).ready()
        with running(server):
            for kind, make in _cost_kinds().items():
                for table, vary in ((figures.repeated_us, False), (figures.random_case_us, True)):
                    rng = random.Random(7)

                    def build(
                        i: int,
                        make: Callable[[random.Random, bool], bytes] = make,
                        vary: bool = vary,
                        rng: random.Random = rng,
                    ) -> bytes:
                        return make(rng, vary)

                    _exchange(server.port, build, 500)  # warm up (memo, places)
                    before = server.cpu_seconds()
                    answered = _exchange(server.port, build, count)
                    spent = server.cpu_seconds() - before
                    table[kind] = round(spent / max(answered, 1) * 1e6, 1)
                say(
                    f"cost {kind}: {figures.repeated_us[kind]} us repeated, "
                    f"{figures.random_case_us[kind]} us random case"
                )
    return figures


# --------------------------------------------------------------------------------------------
# Expensive-query flood from one network (defect 4, test 12)


def _flood_mix(rng: random.Random) -> bytes:
    """One expensive question, the name in random case (no reply memo helps an attacker)."""
    pick = rng.randrange(10)
    if pick == 0:
        wire = query(ZONE, "SOA")
    elif pick == 1:
        wire = query(ZONE, "NS")
    elif pick == 2:
        wire = query(ZONE, "ANY")
    elif pick == 3:
        wire = query(f"ns1.{ZONE}", "A", edns=False)
    elif pick == 4:
        wire = query(f"w{rng.getrandbits(32):x}.example.com", "A")
    elif pick == 5:
        wire = query(f"api.{ZONE}", "ANY", ecs=rng.choice(WORLD_SUBNETS))
    elif pick == 6:
        wire = query(f"api.{ZONE}", cookie=True)
    elif pick == 7:
        wire = query(f"api.{ZONE}", version=1)  # BADVERS
    elif pick == 8:
        wire = query(f"r{rng.getrandbits(40):x}.{ZONE}")  # NXDOMAIN, a random name
    else:
        wire = query(ZONE, "TXT", cookie=True)
    wire = random_case(wire, rng)
    return struct.pack("!H", rng.getrandbits(16)) + wire[2:]


@dataclass
class FlooderFigures:
    sent: int = 0
    bytes_in: int = 0
    replies: int = 0
    bytes_out: int = 0
    truncated: int = 0


def run_flooder(
    port: int, network: str, rate: float, seconds: float, make: str, seed: int = 1
) -> FlooderFigures:
    """Send ``rate`` packets a second for ``seconds`` from 8 addresses of ``network`` (a /24,
    as ``127.0.9``); count what comes back (bytes out of the server, as the victim of a
    reflection would receive them)."""
    rng = random.Random(seed)
    mutator = Mutator(seed) if make == "fuzz" else None
    socks = []
    for host in range(1, 9):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"{network}.{host}", 0))
        sock.setblocking(False)
        socks.append(sock)
    figures = FlooderFigures()
    tick = 0.005
    per_tick = rate * tick
    credit = 0.0
    started = time.monotonic()
    next_tick = started
    try:
        while True:
            now = time.monotonic()
            if now - started >= seconds:
                break
            credit += per_tick
            while credit >= 1.0:
                credit -= 1.0
                wire = mutator.packet() if mutator is not None else _flood_mix(rng)
                sock = socks[figures.sent % len(socks)]
                with contextlib.suppress(BlockingIOError):
                    sock.sendto(wire, ("127.0.0.1", port))
                    figures.sent += 1
                    figures.bytes_in += len(wire)
            _drain(socks, figures)
            next_tick += tick
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            _drain(socks, figures)
            time.sleep(0.01)
    finally:
        for sock in socks:
            sock.close()
    return figures


def _drain(socks: list[socket.socket], figures: FlooderFigures) -> None:
    for sock in socks:
        while True:
            try:
                data = sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ICMP unreachable from an earlier send: nothing to count
                continue
            figures.replies += 1
            figures.bytes_out += len(data)
            if len(data) > 2 and data[2] & 0x02:
                figures.truncated += 1


@dataclass
class ClientFigures:
    sent: int = 0
    answered: int = 0
    wrong: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def answered_share(self) -> float:
        return self.answered / self.sent if self.sent else 0.0

    def p(self, share: float) -> float:
        return percentile(self.latencies, share)


def run_clients(
    port: int, clients: int, rate: float, seconds: float, timeout: float = 1.0
) -> ClientFigures:
    """``clients`` resolvers, each from its own /24 (127.0.20.1, 127.0.21.1, ...), each asking
    ``rate`` geo questions a second (ECS subnets over the world); an answer later than
    ``timeout`` counts as lost."""
    figures = ClientFigures()
    selector = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    for i in range(clients):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"127.0.{20 + i}.1", 0))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, len(socks))
        socks.append(sock)
    wires = [query(f"api.{ZONE}", ecs=s) for s in WORLD_SUBNETS]
    pending: dict[tuple[int, int], float] = {}
    interval = 1.0 / rate
    started = time.monotonic()
    next_send = [started + i * interval / clients for i in range(clients)]
    ident = 0
    try:
        while True:
            now = time.monotonic()
            if now - started >= seconds and not pending:
                break
            for i, sock in enumerate(socks):
                if now - started < seconds and now >= next_send[i]:
                    next_send[i] += interval
                    ident = (ident + 1) & 0xFFFF
                    wire = wires[ident % len(wires)]
                    sock.sendto(struct.pack("!H", ident) + wire[2:], ("127.0.0.1", port))
                    pending[(i, ident)] = now
                    figures.sent += 1
            for key, sent_at in list(pending.items()):
                if now - sent_at > timeout:
                    del pending[key]
            wait = max(0.0, min(next_send) - time.monotonic())
            for selected, _ in selector.select(min(wait, 0.01)):
                index = selected.data
                sock = socks[index]
                while True:
                    try:
                        data = sock.recv(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    key = (index, struct.unpack("!H", data[:2])[0])
                    sent_at = pending.pop(key, -1.0)
                    if sent_at < 0:
                        continue  # late (already counted lost) or a duplicate
                    figures.answered += 1
                    figures.latencies.append(time.monotonic() - sent_at)
                    if data[3] & 0x0F or data[2] & 0x02 or data[7] == 0:
                        figures.wrong += 1  # an error, a truncation or no answer record
    finally:
        selector.close()
        for sock in socks:
            sock.close()
    return figures


@dataclass
class FloodFigures:
    flood_rate: float = 0.0
    seconds: float = 0.0
    flood: dict[str, int] = field(default_factory=dict)
    amplification: float = 0.0
    clients_sent: int = 0
    clients_answered_pct: float = 0.0
    clients_wrong: int = 0
    clients_p50_ms: float = 0.0
    clients_p99_ms: float = 0.0
    #: Server CPU while flooded, as a share of one core.
    server_cpu_share: float = 0.0
    #: Computed answers, and queries limited before anything was computed (server metrics).
    computed: float = 0.0
    rate_limited: float = 0.0
    cost_limited: float = 0.0


def measure_flood(
    flood_rate: float = 5000.0,
    seconds: float = 10.0,
    clients: int = 20,
    client_rate: float = 50.0,
    repo: Path = ROOT,
) -> FloodFigures:
    """An expensive-query flood from 127.0.9.0/24 at ``flood_rate`` while ``clients`` other
    networks ask at ``client_rate`` each; rate limiting at its defaults."""
    figures = FloodFigures(flood_rate=flood_rate, seconds=seconds)
    with workdir() as tmp:
        path = write_world(tmp / "world.yaml", world())
        server = DnsProcess(path, tmp, repo).ready()
        with running(server):
            out = tmp / "flooder.json"
            flooder = Child(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.chaos.dns",
                    "flooder",
                    "--port",
                    str(server.port),
                    "--network",
                    "127.0.9",
                    "--rate",
                    str(flood_rate),
                    "--seconds",
                    str(seconds),
                    "--out",
                    str(out),
                ],
                tmp / "flooder.log",
            )
            with running(flooder):
                time.sleep(1.0)  # the flood is on before the clients start
                cpu_before, wall_before = server.cpu_seconds(), time.monotonic()
                seen = run_clients(server.port, clients, client_rate, seconds - 2.0)
                cpu = server.cpu_seconds() - cpu_before
                wall = time.monotonic() - wall_before
                flooder.popen.wait(seconds + 30)
            if not out.exists():
                raise AssertionError("flooder failed:\n" + flooder.log_text()[-2000:])
            flood = FlooderFigures(**json.loads(out.read_text()))
            figures.flood = asdict(flood)
            figures.amplification = round(flood.bytes_out / max(flood.bytes_in, 1), 3)
            figures.clients_sent = seen.sent
            figures.clients_answered_pct = round(100.0 * seen.answered_share, 2)
            figures.clients_wrong = seen.wrong
            figures.clients_p50_ms = round(seen.p(50) * 1000, 2)
            figures.clients_p99_ms = round(seen.p(99) * 1000, 2)
            figures.server_cpu_share = round(cpu / wall, 2)
            metrics = server.metrics()
            figures.computed = sum(
                v for k, v in metrics.items() if k.startswith("meridian_dns_queries_total")
            ) - sum(v for k, v in metrics.items() if k.startswith("meridian_dns_memo_hits_total"))
            figures.rate_limited = sum(
                v for k, v in metrics.items() if k.startswith("meridian_dns_rate_limited_total")
            )
            figures.cost_limited = sum(
                v for k, v in metrics.items() if k.startswith("meridian_dns_cost_limited_total")
            )
    say(
        f"flood {flood_rate:.0f} q/s: clients answered {figures.clients_answered_pct}% "
        f"p99 {figures.clients_p99_ms} ms, amplification {figures.amplification}, "
        f"server CPU {figures.server_cpu_share}"
    )
    return figures


# --------------------------------------------------------------------------------------------
# Fuzz (test 12)


def _seed_corpus() -> list[bytes]:
    """Real, valid queries of every shape the server answers: the fuzzer mutates these."""
    corpus = []
    for name in (f"api.{ZONE}", f"two.{ZONE}", f"origin.{ZONE}"):
        for rdtype in ("A", "AAAA", "ANY"):
            corpus.append(query(name, rdtype))
            corpus.append(query(name, rdtype, edns=False))
            corpus.append(query(name, rdtype, ecs="200.160.2.0/24"))
            corpus.append(query(name, rdtype, ecs="2001:4860:4860::/56"))
    for name, rdtype in (
        (ZONE, "SOA"),
        (ZONE, "NS"),
        (ZONE, "ANY"),
        (f"ns1.{ZONE}", "A"),
        (f"ns1.{ZONE}", "AAAA"),
        (f"nope.{ZONE}", "A"),
        (f"api.{ZONE}", "MX"),
        ("example.com", "A"),
        (ZONE, "AXFR"),
    ):
        corpus.append(query(name, rdtype))
        corpus.append(query(name, rdtype, edns=False, ident=1))
    corpus.append(query(f"api.{ZONE}", cookie=True))
    corpus.append(query(f"api.{ZONE}", ecs="8.8.8.0/24", cookie=True))
    corpus.append(query(f"api.{ZONE}", version=1))
    return corpus


class Mutator:
    """Mutations of real queries, seeded (the same seed: the same packets)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.corpus = _seed_corpus()

    def packet(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.2:
            return self._valid()
        data = bytearray(rng.choice(self.corpus))
        data[0:2] = struct.pack("!H", rng.getrandbits(16))
        for _ in range(1 if rng.random() < 0.7 else rng.randint(2, 3)):
            data = self._mutate(data)
        return bytes(data[:65535])

    def _mutate(self, data: bytearray) -> bytearray:
        rng = self.rng
        kind = rng.randrange(14)
        size = len(data)
        if kind == 0 and size:  # bit flips
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(size)] ^= 1 << rng.randrange(8)
        elif kind == 1 and size:  # bytes overwritten
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(size)] = rng.getrandbits(8)
        elif kind == 2:  # truncation
            data = data[: rng.randrange(max(size, 1))]
        elif kind == 3:  # junk appended or inserted
            junk = rng.randbytes(rng.randint(1, 64))
            at = size if rng.random() < 0.5 else rng.randrange(size + 1)
            data[at:at] = junk
        elif kind == 4 and size >= 12:  # huge or lying counts
            for at in rng.sample((4, 6, 8, 10), rng.randint(1, 4)):
                data[at : at + 2] = struct.pack("!H", rng.choice((0, 1, 2, 255, 0xFFFF)))
        elif kind == 5 and size > 13:  # a label length that lies
            data[12] = rng.choice((63, 64, 0x3F, 0xFF, size & 0xFF, rng.getrandbits(8)))
        elif kind == 6 and size >= 17:  # the question name: a pointer loop
            end = data.index(0, 12) + 1 if 0 in data[12:] else size
            loop = rng.choice((b"\xc0\x0c", b"\x01a\xc0\x0c", b"\xc0\x0e\xc0\x0c", b"\xff\xff"))
            data[12:end] = loop
        elif kind == 7 and size >= 12:  # an additional record whose owner loops
            record = b"\xc0" + bytes([len(data) & 0xFF]) + struct.pack("!HHIH", 1, 1, 0, 4)
            data += record + b"\x7f\x00\x00\x01"
            data[10:12] = struct.pack("!H", (((data[10] << 8) | data[11]) + 1) & 0xFFFF)
        elif kind == 8 and size >= 12:  # EDNS garbage: an OPT of random shape, maybe several
            data += self._opt()
            data[10:12] = struct.pack("!H", (((data[10] << 8) | data[11]) + 1) & 0xFFFF)
        elif kind == 9 and size >= 12:  # header flags: opcode, QR, TC, rcode, Z
            data[2] = rng.getrandbits(8)
            data[3] = rng.getrandbits(8)
        elif kind == 10:  # two queries spliced
            other = rng.choice(self.corpus)
            data = data[: rng.randrange(size + 1)] + other[rng.randrange(len(other)) :]
        elif kind == 11:  # random bytes of any length
            data = bytearray(rng.randbytes(rng.choice((0, 1, 11, 12, 13, 17, 40, 100, 600))))
        elif kind == 12 and size > 12:  # the type and class
            end = data.find(0, 12)
            if 0 <= end < size - 4:
                data[end + 1 : end + 5] = rng.randbytes(4)
        elif kind == 13:  # the longest name (255 octets) or just past it
            labels = b"".join(b"\x3f" + b"a" * 63 for _ in range(3)) + b"\x3d" + b"b" * 61
            data[12:] = labels + rng.choice((b"\x00", b"\x01c\x00")) + b"\x00\x01\x00\x01"
        return data

    def _valid(self) -> bytes:
        """A well-formed question of any kind (names, types, classes, ECS, case, DO, payload):
        these exercise the answer paths rather than the parser's rejections."""
        rng = self.rng
        names = (f"api.{ZONE}", f"two.{ZONE}", ZONE, f"ns1.{ZONE}", f"ns2.{ZONE}", "example.com")
        name = rng.choice((*names, f"n{rng.getrandbits(20)}.{ZONE}", f"x.api.{ZONE}"))
        rdtype = dns.rdatatype.RdataType.make(
            rng.choice((1, 1, 28, 255, 6, 2, 15, 16, 65, 252, 251, 0, rng.getrandbits(16)))
        )
        rdclass = dns.rdataclass.RdataClass.make(rng.choice((1, 1, 1, 1, 3, 255)))
        options: list[dns.edns.Option] = []
        if rng.random() < 0.5:
            if rng.random() < 0.7:
                prefix = rng.randint(0, 32)
                value = rng.getrandbits(32) & ((0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF)
                address = socket.inet_ntoa(struct.pack("!I", value))
            else:
                prefix = rng.randint(0, 128)
                value = rng.getrandbits(128) & ((1 << 128) - (1 << (128 - prefix)))
                address = socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))
            options.append(dns.edns.ECSOption(address, prefix))
        if rng.random() < 0.3:
            message = dns.message.make_query(name, rdtype, rdclass, use_edns=False)
        else:
            message = dns.message.make_query(
                name,
                rdtype,
                rdclass,
                use_edns=0,
                payload=rng.choice((0, 512, 1232, 4096)),
                options=options,
                want_dnssec=rng.random() < 0.3,
            )
        message.id = rng.getrandbits(16)
        return random_case(message.to_wire(), rng)

    def _opt(self) -> bytes:
        rng = self.rng
        options = b""
        for _ in range(rng.randint(0, 3)):
            code = rng.choice((8, 8, 8, 10, 12, 3, rng.getrandbits(16)))
            if code == 8:
                family = rng.choice((1, 2, 0, 3, 0xFFFF))
                source = rng.choice((0, 24, 32, 33, 56, 128, 129, 255))
                scope = rng.choice((0, 0, 24, 255))
                address = rng.randbytes(rng.randint(0, 20))
                body = struct.pack("!HBB", family, source, scope) + address
            else:
                body = rng.randbytes(rng.randint(0, 40))
            length = len(body) if rng.random() < 0.8 else rng.getrandbits(16)
            options += struct.pack("!HH", code, length) + body
        rdlength = len(options) if rng.random() < 0.8 else rng.getrandbits(16)
        payload = rng.choice((0, 512, 1232, 4096, 65535))
        version = 0 if rng.random() < 0.8 else rng.getrandbits(8)
        owner = b"\x00" if rng.random() < 0.9 else b"\x01a\x00"
        return owner + struct.pack("!HHBBHH", 41, payload, 0, version, 0x8000, rdlength) + options


@dataclass
class FuzzFigures:
    udp_sent: int = 0
    udp_answered: int = 0
    tcp_connections: int = 0
    tcp_sent: int = 0
    tcp_answered: int = 0
    tcp_length_lies: int = 0
    #: Valid queries sent between batches, and those not answered (or answered wrongly).
    probes: int = 0
    probes_lost: int = 0
    #: UDP probes sent a second time after 3 s without their answer, as a resolver retries
    #: (a datagram dropped on a loaded machine is UDP, not the server); lost only if both are.
    probe_retries: int = 0
    #: Replies that did not parse (dnspython), among a sample.
    unparseable: int = 0
    #: UDP replies by rcode (``TC`` for truncated ones).
    rcodes: dict[str, int] = field(default_factory=dict)
    #: The server process gone, and queries whose handler raised (answered SERVFAIL).
    crashed: bool = False
    handler_errors: float = 0.0
    #: Server counters: replies rate limited, queries over their network's compute budget,
    #: TCP connections it closed (overdue messages, limits).
    rate_limited: float = 0.0
    cost_limited: float = 0.0
    tcp_closed: float = 0.0
    seconds: float = 0.0
    #: Bytes out / bytes in over the whole UDP fuzz (256 networks, under the limits).
    udp_amplification: float = 0.0
    #: The flood phase: one /24 sending mutated packets as fast as the server takes them.
    flood_sent: int = 0
    flood_replies: int = 0
    flood_amplification: float = 0.0

    @property
    def sent(self) -> int:
        return self.udp_sent + self.tcp_sent + self.flood_sent


PROBE_NAME = f"api.{ZONE}"
_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def _probe(ident: int) -> bytes:
    return struct.pack("!H", ident) + query(PROBE_NAME, ecs="8.8.8.0/24")[2:]


def _probe_ok(reply: bytes) -> bool:
    try:
        message = dns.message.from_wire(reply)
    except Exception:
        return False
    return bool(
        message.rcode() == dns.rcode.NOERROR
        and [r.address for rrset in message.answer for r in rrset] == [POP_ADDRESSES["iad"]]
    )


def fuzz_udp(port: int, count: int, figures: FuzzFigures, seed: int, batch: int = 100) -> None:
    """``count`` mutated packets in batches from 256 networks (127.64.0.1 ... 127.64.255.1),
    each batch followed by a valid probe from one of 16 other networks (127.66.0.1 ...): the
    server reads its one socket in order, so the probe's answer means the batch before it
    has been handled (and the fuzzing networks' limits never touch the probes)."""
    mutator = Mutator(seed)
    socks = []
    for i in range(256):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"127.64.{i}.1", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.setblocking(False)
        socks.append(sock)
    probes = []
    for i in range(16):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"127.66.{i}.1", 0))
        sock.settimeout(3.0)
        probes.append(sock)
    bytes_in = bytes_out = 0
    pending: list[tuple[socket.socket, socket.socket, int]] = []
    sample = random.Random(seed + 1)

    def settle(sock: socket.socket, probe: socket.socket, ident: int) -> None:
        # The probe's answer (the right one: a stale one may come late), then what the
        # batch before it got back, already queued on its socket.
        nonlocal bytes_out
        retried = False
        while True:
            try:
                data = probe.recv(65535)
            except TimeoutError:
                if retried:
                    figures.probes_lost += 1
                    break
                retried = True
                figures.probe_retries += 1
                probe.sendto(_probe(ident), ("127.0.0.1", port))
                continue
            if data[:2] == struct.pack("!H", ident) and _probe_ok(data):
                break
        while True:
            try:
                data = sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            bytes_out += len(data)
            figures.udp_answered += 1
            rcode = "TC" if data[2] & 0x02 else _RCODES.get(data[3] & 0x0F, "other")
            figures.rcodes[rcode] = figures.rcodes.get(rcode, 0) + 1
            if sample.random() < 0.01:
                try:
                    dns.message.from_wire(data)
                except Exception:
                    figures.unparseable += 1

    try:
        sent = 0
        number = 0
        while sent < count:
            sock = socks[number % len(socks)]
            probe = probes[number % len(probes)]
            ident = number & 0xFFFF
            number += 1
            for _ in range(min(batch, count - sent)):
                packet = mutator.packet()
                with contextlib.suppress(BlockingIOError):
                    sock.sendto(packet, ("127.0.0.1", port))
                    bytes_in += len(packet)
                sent += 1
            probe.sendto(_probe(ident), ("127.0.0.1", port))
            figures.probes += 1
            pending.append((sock, probe, ident))
            if len(pending) >= 2:  # two batches in flight: the server never waits for us
                settle(*pending.pop(0))
        for item in pending:
            settle(*item)
    finally:
        for sock in socks + probes:
            sock.close()
    figures.udp_sent += count
    figures.udp_amplification = round(bytes_out / max(bytes_in, 1), 3)


def _read_frames(sock: socket.socket, buffer: bytearray) -> list[bytes]:
    frames = []
    while len(buffer) >= 2 and len(buffer) >= 2 + ((buffer[0] << 8) | buffer[1]):
        end = 2 + ((buffer[0] << 8) | buffer[1])
        frames.append(bytes(buffer[2:end]))
        del buffer[:end]
    return frames


def fuzz_tcp(port: int, count: int, figures: FuzzFigures, seed: int, per: int = 50) -> None:
    """``count`` mutated messages over TCP, ``per`` pipelined on a connection and a probe after
    them; every 10th connection ends in a length that lies (longer or shorter than what
    follows, or zero) and is closed by us."""
    mutator = Mutator(seed)
    rng = random.Random(seed)
    sent = 0
    number = 0
    while sent < count:
        source = f"127.65.{number % 64}.{1 + number // 64 % 200}"
        number += 1
        figures.tcp_connections += 1
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((source, 0))
            sock.settimeout(5.0)
            sock.connect(("127.0.0.1", port))
            messages = [mutator.packet() for _ in range(min(per, count - sent))]
            sent += len(messages)
            figures.tcp_sent += len(messages)
            lie = number % 10 == 0
            stream = b"".join(struct.pack("!H", len(m)) + m for m in messages)
            if lie:
                figures.tcp_length_lies += 1
                body = mutator.packet()
                claimed = rng.choice((len(body) + rng.randint(1, 500), 0, max(len(body) - 5, 0)))
                sock.sendall(stream + struct.pack("!H", claimed) + body)
                # Count what was answered before the lie; then close (the server would
                # otherwise close it when the message is overdue).
                with contextlib.suppress(OSError):
                    sock.settimeout(0.2)
                    buffer = bytearray()
                    while True:
                        chunk = sock.recv(65535)
                        if not chunk:
                            break
                        buffer += chunk
                        figures.tcp_answered += len(_read_frames(sock, buffer))
                continue
            ident = number & 0xFFFF
            sock.sendall(stream + struct.pack("!H", len(_probe(ident))) + _probe(ident))
            figures.probes += 1
            buffer = bytearray()
            done = False
            while not done:
                try:
                    chunk = sock.recv(65535)
                except (TimeoutError, ConnectionError):
                    chunk = b""
                if not chunk:
                    figures.probes_lost += 1
                    break
                buffer += chunk
                for frame in _read_frames(sock, buffer):
                    if frame[:2] == struct.pack("!H", ident) and _probe_ok(frame):
                        done = True
                        break
                    figures.tcp_answered += 1


def fuzz_flood(port: int, count: int, figures: FuzzFigures, seed: int, batch: int = 200) -> None:
    """One /24 (127.0.77.0/24, four senders) sends ``count`` mutated packets as fast as the
    server takes them (a probe from an unlimited network after each batch paces it), under the
    default rate limits: bytes out over bytes in for that network is the amplification."""
    mutator = Mutator(seed)
    flood = []
    for host in range(1, 5):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"127.0.77.{host}", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.setblocking(False)
        flood.append(sock)
    # Pacing probes from four other networks (each well under its own rate limit).
    pacers = []
    for network in range(78, 82):
        pacer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        pacer.bind((f"127.0.{network}.1", 0))
        pacer.settimeout(3.0)
        pacers.append(pacer)
    bytes_in = bytes_out = replies = 0
    try:
        sent = 0
        number = 0
        while sent < count:
            for _ in range(min(batch, count - sent)):
                packet = mutator.packet()
                with contextlib.suppress(BlockingIOError):
                    flood[sent % 4].sendto(packet, ("127.0.0.1", port))
                    bytes_in += len(packet)
                sent += 1
            number += 1
            pacer = pacers[number % len(pacers)]
            pacer.sendto(_probe(number & 0xFFFF), ("127.0.0.1", port))
            with contextlib.suppress(TimeoutError):
                while pacer.recv(65535)[:2] != struct.pack("!H", number & 0xFFFF):
                    pass
            for sock in flood:
                while True:
                    try:
                        data = sock.recv(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        continue
                    replies += 1
                    bytes_out += len(data)
    finally:
        for sock in flood + pacers:
            sock.close()
    figures.flood_sent = count
    figures.flood_replies = replies
    figures.flood_amplification = round(bytes_out / max(bytes_in, 1), 3)


def measure_fuzz(
    packets: int = 1_000_000, tcp_share: float = 0.1, flood_share: float = 0.1, seed: int = 21
) -> FuzzFigures:
    """The whole fuzz run against one server (rate limiting at its defaults)."""
    figures = FuzzFigures()
    tcp_count = int(packets * tcp_share)
    flood_count = int(packets * flood_share)
    udp_count = packets - tcp_count - flood_count
    with workdir() as tmp:
        path = write_world(tmp / "world.yaml", world())
        server = DnsProcess(path, tmp).ready()
        with running(server):
            started = time.monotonic()
            fuzz_udp(server.port, udp_count, figures, seed)
            say(f"fuzz: {figures.udp_sent} UDP packets, {figures.udp_answered} answered")
            fuzz_tcp(server.port, tcp_count, figures, seed + 1)
            say(f"fuzz: {figures.tcp_sent} TCP messages, {figures.tcp_answered} answered")
            fuzz_flood(server.port, flood_count, figures, seed + 2)
            say(f"fuzz: flood of {figures.flood_sent}, amplification {figures.flood_amplification}")
            figures.seconds = round(time.monotonic() - started, 1)
            # Still serving, still alive?
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind(("127.0.79.1", 0))
                sock.settimeout(2.0)
                sock.sendto(_probe(7), ("127.0.0.1", server.port))
                try:
                    final_ok = _probe_ok(sock.recv(65535))
                except TimeoutError:
                    final_ok = False
            figures.crashed = not server.alive() or not final_ok
            if server.alive():
                metrics = server.metrics()
                for name, total in (
                    ("meridian_dns_errors_total", "handler_errors"),
                    ("meridian_dns_rate_limited_total", "rate_limited"),
                    ("meridian_dns_cost_limited_total", "cost_limited"),
                    ("meridian_dns_tcp_closed_total", "tcp_closed"),
                ):
                    value = sum(v for k, v in metrics.items() if k.startswith(name))
                    setattr(figures, total, value)
    return figures


# --------------------------------------------------------------------------------------------
# Region failover (test 3) and half the backends down (test 4)


def ask(
    port: int,
    name: str,
    rdtype: str = "A",
    ecs: str | None = None,
    source: str = "127.0.30.1",
    timeout: float = 1.0,
) -> dns.message.Message | None:
    """One query from ``source``; None when no answer came within ``timeout``."""
    wire = query(name, rdtype, ecs=ecs, ident=random.getrandbits(16))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.sendto(wire, ("127.0.0.1", port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65535)
            except TimeoutError:
                return None
            if data[:2] == wire[:2]:
                return dns.message.from_wire(data)
    return None


def answer_addresses(reply: dns.message.Message) -> list[str]:
    return sorted(
        str(rdata.address)
        for rrset in reply.answer
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        for rdata in rrset
    )


def region_of(address: str) -> str:
    for name, (_, _, v4, v6) in REGIONS.items():
        if address in (v4, v6):
            return name
    return address


@dataclass
class FailoverFigures:
    #: The health settings in force (the defaults).
    check_interval_s: float = 10.0
    fall: int = 3
    #: Seconds from the SIGKILL to the first answer naming another region.
    switch_s: float | None = None
    #: The bound: a dead backend out within 30 s, plus one check interval.
    bound_s: float = 40.0
    #: Seconds from the SIGKILL until the last answer naming the dead region expires in a
    #: resolver's cache (its time plus its TTL: TTLs shrink as the transition nears).
    stale_until_s: float | None = None
    #: Answer changes after the kill (1: one clean switch; more: flapping).
    switches: int = 0
    polls: int = 0
    lost: int = 0
    #: The region answered, by poll count, after the kill.
    answers: dict[str, int] = field(default_factory=dict)
    #: TTLs seen naming the dead region after the kill (shortened as the transition nears).
    ttls_while_dying: list[int] = field(default_factory=list)


def measure_failover(
    observe_after: float = 10.0, poll_every: float = 0.1, give_up: float = 60.0
) -> FailoverFigures:
    """Kill the origin of the region nearest to a Brazilian client (us-east); poll."""
    figures = FailoverFigures()
    client = "200.160.2.0/24"
    with workdir() as tmp:
        origins = {
            name: OriginProcess(name, tmp) for name in ("us-east", "eu-central", "ap-southeast")
        }
        with running(*origins.values()):
            for origin in origins.values():
                origin.ready()
            config = world(backends={name: o.url for name, o in origins.items()})
            path = write_world(tmp / "world.yaml", config)
            server = DnsProcess(path, tmp).ready()
            with running(server):

                def first() -> list[str] | None:
                    reply = ask(server.port, f"origin.{ZONE}", ecs=client)
                    return answer_addresses(reply) if reply is not None else None

                wait_until(lambda: first() == [REGIONS["us-east"][2]], 10.0, "us-east for Brazil")
                # The worst moment: us-east settled (checked every interval, no longer every
                # fast interval as after start) and just checked: the next check is a whole
                # interval away.
                target = origins["us-east"].url

                def health() -> dict[str, Any]:
                    found: dict[str, Any] = server.status()["health"]["targets"][target]
                    return found

                wait_until(
                    lambda: health()["consecutive_successes"] >= 2 and not health()["ttl_hint"],
                    30.0,
                    "us-east to settle",
                )
                seen = health()["last_check"]
                wait_until(
                    lambda: health()["last_check"] != seen,
                    figures.check_interval_s * 1.5 + 5,
                    "a check of us-east",
                    every=0.02,
                )
                killed = time.monotonic()
                origins["us-east"].kill()
                sequence: list[str] = []
                switched_at: float | None = None
                last_dead: float | None = None
                while True:
                    now = time.monotonic() - killed
                    if switched_at is not None and now > switched_at + observe_after:
                        break
                    if now > give_up:
                        break
                    reply = ask(server.port, f"origin.{ZONE}", ecs=client)
                    figures.polls += 1
                    if reply is None:
                        figures.lost += 1
                    else:
                        found = answer_addresses(reply)
                        region = region_of(found[0]) if found else "(empty)"
                        if region == "us-east":
                            ttl = reply.answer[0].ttl
                            figures.ttls_while_dying.append(ttl)
                            last_dead = max(last_dead or 0.0, now + ttl)
                        elif switched_at is None:
                            switched_at = now
                        previous = sequence[-1] if sequence else "us-east"
                        if region != previous:
                            figures.switches += 1
                        sequence.append(region)
                        figures.answers[region] = figures.answers.get(region, 0) + 1
                    time.sleep(poll_every)
                figures.switch_s = None if switched_at is None else round(switched_at, 2)
                figures.stale_until_s = None if last_dead is None else round(last_dead, 2)
                figures.ttls_while_dying = sorted(set(figures.ttls_while_dying))
    say(
        f"failover: switched after {figures.switch_s} s (bound {figures.bound_s} s), "
        f"{figures.switches} switch(es), answers {figures.answers}"
    )
    return figures


@dataclass
class HalfDownFigures:
    #: Stage (regions down of 4) -> queries asked, empty answers, lost, regions answered.
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def empty(self) -> int:
        return sum(int(stage["empty"]) for stage in self.stages.values())

    @property
    def lost(self) -> int:
        return sum(int(stage["lost"]) for stage in self.stages.values())

    @property
    def asked(self) -> int:
        return sum(int(stage["asked"]) for stage in self.stages.values())


FAST_HEALTH = {
    "interval": "500ms",
    "fast_interval": "200ms",
    "timeout": "300ms",
    "fall": 2,
    "rise": 1,
    "jitter": 0,
}


def measure_half_down(stage_seconds: float = 4.0) -> HalfDownFigures:
    """Four regions; kill 2, then 3, then all 4 origins while clients all over the world ask
    for A, AAAA and ANY of names over the regions (one answer, two answers)."""
    figures = HalfDownFigures()
    order = ("us-east", "sa-east", "eu-central", "ap-southeast")
    questions = [
        (name, rdtype, subnet)
        for name in (f"origin.{ZONE}", f"pair.{ZONE}")
        for rdtype in ("A", "AAAA", "ANY")
        for subnet in WORLD_SUBNETS
    ]
    with workdir() as tmp:
        origins = {name: OriginProcess(name, tmp) for name in order}
        with running(*origins.values()):
            for origin in origins.values():
                origin.ready()
            config = world(
                backends={name: o.url for name, o in origins.items()}, health=FAST_HEALTH
            )
            path = write_world(tmp / "world.yaml", config)
            server = DnsProcess(path, tmp).ready()
            with running(server):
                for down in (0, 2, 3, 4):
                    for name in order[:down]:
                        origins[name].kill()
                    stage: dict[str, Any] = {"asked": 0, "empty": 0, "lost": 0, "regions": {}}
                    examples: list[str] = []
                    until = time.monotonic() + stage_seconds
                    while time.monotonic() < until:
                        for index, (name, rdtype, subnet) in enumerate(questions):
                            # Each question from its own network: the clients are many
                            # resolvers, none near its rate limit.
                            source = f"127.0.{30 + index}.1"
                            reply = ask(server.port, name, rdtype, ecs=subnet, source=source)
                            stage["asked"] += 1
                            if reply is None:
                                stage["lost"] += 1
                                continue
                            found = answer_addresses(reply)
                            if reply.rcode() != dns.rcode.NOERROR or not found:
                                stage["empty"] += 1
                                if len(examples) < 3:
                                    examples.append(f"{name} {rdtype} {subnet}: {reply}")
                            for address in found:
                                region = region_of(address)
                                stage["regions"][region] = stage["regions"].get(region, 0) + 1
                    stage["examples"] = examples
                    figures.stages[f"{down} of 4 down"] = stage
                    say(f"half-down: {down} of 4 down: {stage}")
    return figures


def flooder_main(argv: list[str]) -> int:
    """The flood of ``measure_flood``, in its own process (its pace is not the clients')."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos.dns flooder")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--network", default="127.0.9")
    parser.add_argument("--rate", type=float, default=5000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--make", choices=["expensive", "fuzz"], default="expensive")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    figures = run_flooder(args.port, args.network, args.rate, args.seconds, args.make)
    args.out.write_text(json.dumps(asdict(figures)), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["flooder"]:
        return flooder_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos.dns")
    scenarios = ["cost", "flood", "fuzz", "failover", "half-down"]
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=" ".join(scenarios))
    parser.add_argument("--packets", type=int, default=1_000_000, help="fuzz: packets in all")
    parser.add_argument("--queries", type=int, default=20_000, help="cost: queries per kind")
    parser.add_argument("--repo", type=Path, default=ROOT, help="the work tree whose server runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - set(scenarios)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    results: dict[str, Any] = {}
    for scenario in args.scenarios or scenarios:
        if scenario == "cost":
            results["cost"] = asdict(measure_cost(args.queries, args.repo))
        elif scenario == "flood":
            results["flood"] = asdict(measure_flood(repo=args.repo))
        elif scenario == "fuzz":
            fuzz = measure_fuzz(args.packets)
            results["fuzz"] = {**asdict(fuzz), "sent": fuzz.sent}
        elif scenario == "failover":
            results["failover"] = asdict(measure_failover())
        elif scenario == "half-down":
            half = measure_half_down()
            results["half-down"] = {**asdict(half), "empty": half.empty, "lost": half.lost}
    text = json.dumps(results, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
