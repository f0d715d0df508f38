"""Reliability tests of issue 21 for the edge's upstream side, with figures:

    python -m benchmarks.chaos.upstream [failover] [coalesce] [stale] [slowloris] [uploads]
                                         [--json FILE]

* ``failover`` (test 2): under steady load (no-store GETs, every one forwarded), one backend
  of four is SIGKILLed and another black-holed (SIGSTOPped: the kernel still completes TCP
  handshakes on its listening socket, nobody reads); default health settings (checks every
  10 s, fall 3, timeout 2 s), outlier detection and timeouts.  Figures: seconds until each is
  out of rotation (bound: 30 s) and the client errors (bound: 1%).
* ``coalesce`` (test 5): 1,000 concurrent misses for one key while the origin takes 2 s to
  answer: the origin counts the requests it received (must be 1).
* ``stale`` (test 6): a ticker cached with ``stale-if-error: 3s`` (a cache rule) and an origin
  that starts answering 503: stale answers while within the bound, the error after it.
* ``slowloris`` (test 10): 5,000 connections from a child process trickle request heads, small
  bodies and large bodies (70 KiB sent, then a byte at a time), reconnecting whenever the edge
  closes one; meanwhile legitimate keep-alive clients (cache hits, misses, small POSTs) measure
  their latency (bound: p99 < 1 s).
* ``uploads`` (defect 3): 70 POSTs trickling small bodies on the default pool of 64 while GETs
  flow: no backend ejected, no request crossing regions, no client error.

Every scenario starts its own sample origins and edge on loopback free ports and stops each
process by PID on the way out; the project's tests (``tests/test_reliability_upstream.py``)
run these functions and assert the bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from meridian.ports import free_port as free_port

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
START_TIMEOUT = 20.0
#: Where the sample origin and the edge are placed (the edge is POP fra: eu-central is nearest).
NEAR = ("eu-central", 50.11, 8.68)
FAR = ("us-east", 39.04, -77.49)
POPS = {
    "fra": {"location": {"lat": 50.11, "lon": 8.68}, "addresses": ["127.0.1.3"]},
    "iad": {"location": {"lat": 39.04, "lon": -77.49}, "addresses": ["127.0.1.1"]},
}


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Figures


def percentile(values: list[float], share: float) -> float:
    """The ``share`` (0..100) percentile by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(share / 100.0 * len(ordered)) - 1))
    return ordered[rank]


@dataclass
class Samples:
    """What clients saw: a request is answered when a response came, an error when it was not
    a success (status >= 400, no response, a timeout)."""

    sent: int = 0
    answered: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    regions: Counter[str] = field(default_factory=Counter)

    def record(self, status: int | None, seconds: float, region: str | None = None) -> None:
        self.sent += 1
        self.latencies.append(seconds)
        if status is None:
            self.errors += 1
            self.statuses["none"] += 1
            return
        self.answered += 1
        self.statuses[str(status)] += 1
        if status >= 400:
            self.errors += 1
        if region is not None:
            self.regions[region] += 1

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99)

    @property
    def error_share(self) -> float:
        return self.errors / self.sent if self.sent else 0.0


@dataclass
class Figures:
    scenario: str
    sent: int = 0
    answered: int = 0
    errors: int = 0
    #: Requests the origins received for the measured paths.
    forwarded: int = 0
    p99_ms: float = 0.0
    #: Seconds from the fault until the backend was out of rotation, by what was done to it.
    out_of_rotation_s: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, scenario: str, samples: Samples, forwarded: int = 0) -> Figures:
        return cls(
            scenario,
            sent=samples.sent,
            answered=samples.answered,
            errors=samples.errors,
            forwarded=forwarded,
            p99_ms=round(samples.p99 * 1000, 1),
            extra={"statuses": dict(samples.statuses)},
        )

    def line(self) -> str:
        parts = [
            f"{self.scenario}: sent={self.sent} answered={self.answered} errors={self.errors}",
            f"forwarded={self.forwarded} p99={self.p99_ms}ms",
        ]
        for what, seconds in self.out_of_rotation_s.items():
            parts.append(f"out_of_rotation[{what}]={seconds:.1f}s")
        for key, value in self.extra.items():
            parts.append(f"{key}={json.dumps(value, sort_keys=True)}")
        return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Processes


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOOPBACK, port)) == 0


def raise_nofile(wanted: int) -> int:
    """Raise this process's soft descriptor limit towards ``wanted`` (children inherit it);
    returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft


def http_get(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class Stack:
    """The processes of one scenario, each stopped by PID on the way out (SIGCONT first: a
    black-holed origin is a stopped one)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[tuple[subprocess.Popen[bytes], Any]] = []

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def spawn(self, name: str, argv: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log_path = self.workdir / f"{name}.log"
        out = log_path.open("wb")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.started.append((popen, out))
        return popen, log_path

    def close(self) -> None:
        for popen, out in reversed(self.started):
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(popen.pid, signal.SIGCONT)
                    os.kill(popen.pid, signal.SIGTERM)
                try:
                    popen.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(popen.pid, signal.SIGKILL)
                    popen.wait(timeout=5)
            out.close()
        self.started.clear()

    def origin(self, name: str, region: str) -> Origin:
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "meridian.origin",
            "--region",
            region,
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        popen, _ = self.spawn(f"origin-{name}", argv)
        deadline = time.monotonic() + START_TIMEOUT
        while not port_open(port):
            if popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"origin {name} did not start")
            time.sleep(0.02)
        return Origin(name, port, popen)

    def edge(self, config: Path, pop: str = "fra") -> Edge:
        port, admin = free_port(), free_port()
        argv = [
            sys.executable,
            "-m",
            "edge",
            "--config",
            str(config),
            "--pop",
            pop,
            "--listen",
            f"{LOOPBACK}:{port}",
            "--admin",
            f"{LOOPBACK}:{admin}",
        ]
        popen, log_path = self.spawn(f"edge-{port}", argv)
        edge = Edge(port, admin, popen, log_path)
        deadline = time.monotonic() + START_TIMEOUT
        while "event=edge_listening" not in edge.log_text():
            if popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"edge did not start:\n{edge.log_text()[-2000:]}")
            time.sleep(0.05)
        return edge


@dataclass
class Origin:
    name: str
    port: int
    popen: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def control(self, switches: dict[str, Any] | None = None) -> dict[str, Any]:
        body = None if switches is None else json.dumps(switches).encode()
        status, data = http_get(self.port, "GET" if body is None else "PUT", "/_control", body)
        if status != 200:
            raise RuntimeError(f"origin {self.name} /_control: {status}")
        result: dict[str, Any] = json.loads(data)
        return result

    def count(self, path: str) -> int:
        return int(self.control()["requests"]["paths"].get(path, 0))

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)


@dataclass
class Edge:
    port: int
    admin_port: int
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        status, data = http_get(self.admin_port, "GET", "/status")
        if status != 200:
            raise RuntimeError(f"edge /status: {status}")
        result: dict[str, Any] = json.loads(data)
        return result

    def target(self, url: str) -> dict[str, Any]:
        found: dict[str, Any] = self.status()["health"]["targets"][url]
        return found

    def metric(self, name: str, **labels: str) -> float:
        _, body = http_get(self.admin_port, "GET", "/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if not (line.startswith(name + "{") or line.startswith(name + " ")):
                continue
            if all(f'{key}="{value}"' in line for key, value in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


def write_config(
    path: Path,
    regions: dict[str, list[str]],
    *,
    health: dict[str, Any] | None = None,
    outlier: dict[str, Any] | None = None,
    edge: dict[str, Any] | None = None,
) -> Path:
    """A config of ``regions`` (name -> backend URLs; names from ``NEAR``/``FAR``) with the
    defaults of ``meridian.config`` for everything not given."""
    where = {NEAR[0]: NEAR[1:], FAR[0]: FAR[1:]}
    edge_section: dict[str, Any] = {
        "services": {"market": {}},
        "routes": [{"name": "api", "service": "market", "path_prefix": "/"}],
        "access_log": False,
    }
    edge_section.update(edge or {})
    document = {
        "regions": {
            name: {"location": {"lat": where[name][0], "lon": where[name][1]}, "backends": urls}
            for name, urls in regions.items()
        },
        "pops": POPS,
        "dns": {
            "zone": "meridian.test",
            "soa": {"mname": "ns1.meridian.test", "rname": "h.meridian.test"},
            "ns": [{"name": "ns1.meridian.test", "addresses": ["127.0.0.1"]}],
            "names": {"api": {"targets": "pops"}},
        },
        "health": health or {},
        "outlier": outlier or {},
        "edge": edge_section,
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


async def wait_for(check: Any, within: float, what: str, every: float = 0.1) -> Any:
    """Await ``check()`` (run in a thread) until truthy; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await asyncio.to_thread(check)
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {within:g}s waiting for {what} (last: {last!r})")


# --------------------------------------------------------------------------------------------
# Clients


async def steady_load(
    session: aiohttp.ClientSession,
    base: str,
    requests: list[tuple[str, str, bytes | None]],
    samples: Samples,
    stop: asyncio.Event,
    *,
    pause: float = 0.0,
) -> None:
    """One client: ``requests`` (method, path, body) in turn until ``stop``."""
    turn = 0
    while not stop.is_set():
        method, path, body = requests[turn % len(requests)]
        turn += 1
        started = time.perf_counter()
        status: int | None = None
        region: str | None = None
        try:
            async with session.request(method, base + path, data=body) as response:
                await response.read()
                status = response.status
                region = response.headers.get("X-Meridian-Region")
        except (aiohttp.ClientError, TimeoutError):
            status = None
        samples.record(status, time.perf_counter() - started, region)
        if pause:
            await asyncio.sleep(pause)


def client_session(timeout: float = 30.0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=timeout),
        skip_auto_headers=("Accept-Encoding",),
    )


# --------------------------------------------------------------------------------------------
# Test 2: a killed and a black-holed backend leave rotation


async def failover(workdir: Path, *, clients: int = 8, after: float = 3.0) -> Figures:
    """Four backends in the nearest region, default health/outlier/timeouts; one SIGKILLed,
    one black-holed (SIGSTOP) under steady load."""
    path = "/api/v1/whoami"  # no-store: every request is forwarded
    with Stack(workdir) as stack:
        origins = [stack.origin(f"b{i}", NEAR[0]) for i in range(4)]
        config = write_config(workdir / "edge.yaml", {NEAR[0]: [o.url for o in origins]})
        edge = stack.edge(config)
        killed, holed = origins[0], origins[1]
        samples = Samples()
        stop = asyncio.Event()
        gets: list[tuple[str, str, bytes | None]] = [("GET", path, None)]
        async with client_session() as session:
            load = [
                asyncio.create_task(
                    steady_load(session, edge.base, gets, samples, stop, pause=0.02)
                )
                for _ in range(clients)
            ]
            await wait_for(lambda: samples.answered >= 200, 20, "steady load")
            before_kill = await asyncio.to_thread(killed.count, path)
            fault = time.monotonic()
            killed.signal(signal.SIGKILL)
            holed.signal(signal.SIGSTOP)
            out: dict[str, float] = {}

            def check() -> bool:
                targets = edge.status()["health"]["targets"]
                for what, origin in (("killed", killed), ("black_holed", holed)):
                    if what not in out and not targets[origin.url]["usable"]:
                        out[what] = time.monotonic() - fault
                return len(out) == 2

            await wait_for(check, 40, "both faulty backends out of rotation", every=0.1)
            await asyncio.sleep(after)
            stop.set()
            await asyncio.gather(*load)
        holed.signal(signal.SIGCONT)
        forwarded = before_kill
        for origin in origins[1:]:
            forwarded += await asyncio.to_thread(origin.count, path)
        states = {
            what: edge.target(origin.url)["state"]
            for what, origin in (("killed", killed), ("black_holed", holed))
        }
        figures = Figures.of("failover", samples, forwarded)
        figures.out_of_rotation_s = {k: round(v, 2) for k, v in out.items()}
        figures.extra["states"] = states
        figures.extra["error_share"] = round(samples.error_share, 5)
        return figures


# --------------------------------------------------------------------------------------------
# Test 5: concurrent misses for one key are one upstream request


async def coalesce(workdir: Path, *, clients: int = 1000, origin_delay_ms: int = 2000) -> Figures:
    path = "/api/v1/ticker/ETH-USD"
    raise_nofile(clients * 2 + 1024)
    with Stack(workdir) as stack:
        origin = stack.origin("o", NEAR[0])
        config = write_config(
            workdir / "edge.yaml",
            {NEAR[0]: [origin.url]},
            # The delay switch slows /healthz too: no check may fall in the test's window.
            health={"interval": "60s", "timeout": "5s", "jitter": 0},
        )
        edge = stack.edge(config)
        await wait_for(lambda: edge.target(origin.url)["state"] == "up", 10, "the origin up")
        await asyncio.to_thread(origin.control, {"delay_ms": origin_delay_ms})
        before = await asyncio.to_thread(origin.count, path)
        samples = Samples()
        bodies: Counter[bytes] = Counter()
        gate = asyncio.Event()
        async with client_session() as session:

            async def one() -> None:
                await gate.wait()
                started = time.perf_counter()
                try:
                    async with session.get(edge.base + path) as response:
                        bodies[await response.read()] += 1
                        samples.record(response.status, time.perf_counter() - started)
                except (aiohttp.ClientError, TimeoutError):
                    samples.record(None, time.perf_counter() - started)

            tasks = [asyncio.create_task(one()) for _ in range(clients)]
            await asyncio.sleep(0)
            gate.set()
            await asyncio.gather(*tasks)
        await asyncio.to_thread(origin.control, {})
        forwarded = await asyncio.to_thread(origin.count, path) - before
        figures = Figures.of("coalesce", samples, forwarded)
        figures.extra["distinct_bodies"] = len(bodies)
        return figures


# --------------------------------------------------------------------------------------------
# Test 6: stale-if-error holds to its bound


async def stale_if_error(
    workdir: Path, *, bound: float = 3.0, watch: float = 8.0, every: float = 0.1
) -> Figures:
    """The origin's tickers are fresh for 1 s (``max-age=1``); a rule adds
    ``stale-if-error``.  After the first fill the origin answers 503."""
    path = "/api/v1/ticker/BTC-USD"
    with Stack(workdir) as stack:
        origin = stack.origin("o", NEAR[0])
        config = write_config(
            workdir / "edge.yaml",
            {NEAR[0]: [origin.url]},
            health={"interval": "60s", "jitter": 0},
            edge={
                "cache": {
                    "rules": [{"path_prefix": "/api/v1/ticker/", "stale_if_error": f"{bound}s"}]
                }
            },
        )
        edge = stack.edge(config)
        await wait_for(lambda: edge.target(origin.url)["state"] == "up", 10, "the origin up")
        samples = Samples()
        #: (seconds since the fill, status, X-Cache, Age)
        seen: list[tuple[float, int | None, str, int]] = []
        async with client_session(timeout=10) as session:
            async with session.get(edge.base + path) as response:
                await response.read()
                filled = time.monotonic()
                fill_status = response.status
            await asyncio.to_thread(origin.control, {"status": 503})
            while time.monotonic() - filled < watch:
                started = time.perf_counter()
                try:
                    async with session.get(edge.base + path) as response:
                        await response.read()
                        status: int | None = response.status
                        cache = response.headers.get("X-Cache", "")
                        age = int(response.headers.get("Age", "0") or 0)
                except (aiohttp.ClientError, TimeoutError):
                    status, cache, age = None, "", 0
                samples.record(status, time.perf_counter() - started)
                seen.append((time.monotonic() - filled, status, cache, age))
                await asyncio.sleep(every)
        await asyncio.to_thread(origin.control, {})
        stale = [s for s in seen if s[1] == 200 and s[2] == "STALE"]
        errors = [s for s in seen if s[1] is None or s[1] >= 500]
        figures = Figures.of("stale_if_error", samples, await asyncio.to_thread(origin.count, path))
        figures.extra.update(
            fill_status=fill_status,
            stale_served=len(stale),
            errors_after_bound=len(errors),
            last_stale_at_s=round(max((s[0] for s in stale), default=-1.0), 2),
            last_stale_age=max((s[3] for s in stale), default=-1),
            first_error_at_s=round(min((s[0] for s in errors), default=-1.0), 2),
            fresh_or_stale_after_first_error=sum(
                1 for s in seen if s[1] == 200 and errors and s[0] > min(e[0] for e in errors)
            ),
            bound_s=bound,
        )
        return figures


# --------------------------------------------------------------------------------------------
# Test 10: slowloris


#: What each attacking connection sends first, by kind: a head that never ends, a small body
#: that never ends (buffered by the edge), a large one (streamed: 70 KiB, then a byte at a time).
_ATTACK_HEADS = (
    b"GET /api/v1/whoami HTTP/1.1\r\nHost: slow.test\r\nX-Slow: ",
    b"POST /api/v1/orders HTTP/1.1\r\nHost: slow.test\r\nContent-Type: application/json\r\n"
    b"Content-Length: 10000\r\n\r\n{",
    b"POST /api/v1/orders HTTP/1.1\r\nHost: slow.test\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000000\r\n\r\n{" + b" " * (70 * 1024),
)


async def _attacker(
    port: int, kind: int, until: float, interval: float, counts: Counter[str]
) -> None:
    rng = random.Random()
    while time.monotonic() < until:
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            counts["opened"] += 1
            counts["open"] += 1
            writer.write(_ATTACK_HEADS[kind])
            while time.monotonic() < until:
                try:
                    # Anything from the edge (its 408, 504, or the end): reconnect at once.
                    await asyncio.wait_for(reader.read(4096), interval * (0.5 + rng.random()))
                    break
                except TimeoutError:
                    pass
                writer.write(b"a")
                await writer.drain()
        except OSError:
            counts["failed"] += 1
            await asyncio.sleep(interval)
        finally:
            if writer is not None:
                counts["open"] -= 1
                writer.close()
        counts["reconnects"] += 1


async def slowloris_attack(port: int, connections: int, seconds: float, interval: float) -> None:
    """The attacker (a process of its own): ``connections`` trickling connections for
    ``seconds``; prints ``ready`` once they are all open, then a JSON line of counts."""
    raise_nofile(connections + 1024)
    counts: Counter[str] = Counter()
    until = time.monotonic() + seconds
    tasks = []
    for index in range(connections):
        tasks.append(asyncio.create_task(_attacker(port, index % 3, until, interval, counts)))
        if index % 250 == 249:  # in batches: the listen backlog is finite
            await asyncio.sleep(0.05)
    deadline = time.monotonic() + 30
    # Counts move in thousands of tasks: polling them is simpler than an event per change.
    while counts["open"] < connections * 0.98 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    print(json.dumps({"ready": True, "open": counts["open"]}), flush=True)
    peak = 0
    while time.monotonic() < until:
        peak = max(peak, counts["open"])
        await asyncio.sleep(0.2)
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({**counts, "peak_open": peak}), flush=True)


async def slowloris(
    workdir: Path,
    *,
    connections: int = 5000,
    hold: float = 15.0,
    clients: int = 4,
    interval: float = 2.0,
) -> Figures:
    raise_nofile(connections + 4096)
    requests: list[tuple[str, str, bytes | None]] = [
        ("GET", "/api/v1/ticker/BTC-USD", None),
        ("GET", "/api/v1/whoami", None),
        ("GET", "/api/v1/depth/ETH-USD", None),
        ("POST", "/api/v1/orders", b'{"symbol":"BTC-USD","qty":1}'),
    ]
    with Stack(workdir) as stack:
        origin = stack.origin("o", NEAR[0])
        config = write_config(workdir / "edge.yaml", {NEAR[0]: [origin.url]})
        edge = stack.edge(config)
        attack = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.chaos.upstream",
            "attack",
            "--port",
            str(edge.port),
            "--connections",
            str(connections),
            "--seconds",
            str(hold + 40),
            "--interval",
            str(interval),
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            assert attack.stdout is not None
            ready = json.loads(await asyncio.wait_for(attack.stdout.readline(), 60) or b"{}")
            before = await asyncio.to_thread(edge.status)
            samples = Samples()
            stop = asyncio.Event()
            async with client_session(timeout=30) as session:
                load = [
                    asyncio.create_task(
                        steady_load(session, edge.base, requests, samples, stop, pause=0.01)
                    )
                    for _ in range(clients)
                ]
                await asyncio.sleep(hold)
                open_during = (await asyncio.to_thread(edge.status))["connections"]
                stop.set()
                await asyncio.gather(*load)
        finally:
            with contextlib.suppress(ProcessLookupError):
                attack.kill()
            await attack.wait()
        forwarded = 0
        for _, counted, _ in requests:
            forwarded += await asyncio.to_thread(origin.count, counted)
        figures = Figures.of("slowloris", samples, forwarded)
        figures.extra.update(
            attack_open_at_start=ready.get("open", 0),
            edge_connections_during=open_during,
            edge_connections_before=before["connections"],
            ejections=edge.metric("meridian_outlier_ejections_total"),
        )
        return figures


# --------------------------------------------------------------------------------------------
# Defect 3: slow uploads do not eject a healthy backend


async def _trickle_post(port: int, size: int, step: int, pause: float) -> int | None:
    """A POST of ``size`` JSON bytes sent ``step`` bytes at a time; the status, or None."""
    body = b'{"pad":"' + b"x" * (size - 10) + b'"}'
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
    except OSError:
        return None
    try:
        writer.write(
            b"POST /api/v1/orders HTTP/1.1\r\nHost: up.test\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        for offset in range(0, len(body), step):
            writer.write(body[offset : offset + step])
            await writer.drain()
            await asyncio.sleep(pause)
        head = await asyncio.wait_for(reader.readline(), 30)
        match = re.match(rb"HTTP/1\.1 (\d{3}) ", head)
        return int(match.group(1)) if match else None
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()


async def slow_uploads(workdir: Path, *, uploads: int = 70, seconds: float = 6.0) -> Figures:
    """Uploads trickling small bodies (each over ``seconds``) on the default pool (64 per
    backend), while GETs flow; two regions, so an ejection would show as traffic crossing."""
    with Stack(workdir) as stack:
        near, far = stack.origin("near", NEAR[0]), stack.origin("far", FAR[0])
        config = write_config(
            workdir / "edge.yaml",
            {NEAR[0]: [near.url], FAR[0]: [far.url]},
            health={"interval": "2s", "fast_interval": "1s", "timeout": "1s"},
        )
        edge = stack.edge(config)
        samples = Samples()
        stop = asyncio.Event()
        size, step = 200, 10
        pause = seconds / (size / step)
        async with client_session() as session:
            load = [
                asyncio.create_task(
                    steady_load(
                        session,
                        edge.base,
                        [("GET", "/api/v1/whoami", None)],
                        samples,
                        stop,
                        pause=0.02,
                    )
                )
                for _ in range(2)
            ]
            posts = await asyncio.gather(
                *(_trickle_post(edge.port, size, step, pause) for _ in range(uploads))
            )
            stop.set()
            await asyncio.gather(*load)
        near_target = await asyncio.to_thread(edge.target, near.url)
        forwarded = await asyncio.to_thread(near.count, "/api/v1/whoami")
        figures = Figures.of("slow_uploads", samples, forwarded)
        figures.extra.update(
            post_statuses=dict(Counter(str(s) for s in posts)),
            regions=dict(samples.regions),
            near_state=near_target["state"],
            near_traffic_failures=near_target["traffic_failures"],
            ejections=edge.metric("meridian_outlier_ejections_total"),
            crossed=edge.metric("meridian_edge_failovers_total"),
        )
        return figures


# --------------------------------------------------------------------------------------------

SCENARIOS: dict[str, Callable[[Path], Coroutine[Any, Any, Figures]]] = {
    "failover": failover,
    "coalesce": coalesce,
    "stale": stale_if_error,
    "slowloris": slowloris,
    "uploads": slow_uploads,
}


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="meridian-chaos-upstream-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["attack"]:
        attack = argparse.ArgumentParser(prog="python -m benchmarks.chaos.upstream attack")
        attack.add_argument("--port", type=int, required=True)
        attack.add_argument("--connections", type=int, default=5000)
        attack.add_argument("--seconds", type=float, default=30.0)
        attack.add_argument("--interval", type=float, default=2.0)
        given = attack.parse_args(argv[1:])
        asyncio.run(slowloris_attack(given.port, given.connections, given.seconds, given.interval))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos.upstream")
    parser.add_argument("scenarios", nargs="*", help=f"any of {', '.join(SCENARIOS)} (all)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    results = []
    for name in args.scenarios or list(SCENARIOS):
        with _workdir() as workdir:
            say(f"== {name}")
            figures = asyncio.run(SCENARIOS[name](workdir))
            print(figures.line(), flush=True)
            results.append(asdict(figures))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
