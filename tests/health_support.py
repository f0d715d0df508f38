"""Helpers for the health engine tests: configs, real processes (origin, redis-server), waiting.

Every process is started on a free loopback port and stopped by PID in a ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from meridian import log
from meridian.config import Config, parse_config
from meridian.health import HealthMonitor
from meridian.ports import free_port as free_port

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 15.0


def make_config(
    regions: dict[str, list[str]],
    *,
    min_healthy: dict[str, int] | None = None,
    pops: dict[str, str | None] | None = None,
    health: dict[str, Any] | None = None,
    outlier: dict[str, Any] | None = None,
) -> Config:
    """A valid config: ``regions`` maps names to backend URLs, ``pops`` names to health URLs."""
    pops = {"p1": None} if pops is None else pops
    data: dict[str, Any] = {
        "regions": {
            name: {
                "location": {"lat": 0.0, "lon": float(i)},
                "backends": urls,
                "min_healthy": (min_healthy or {}).get(name, 1),
            }
            for i, (name, urls) in enumerate(regions.items())
        },
        "pops": {
            name: {
                "location": {"lat": 1.0, "lon": float(i)},
                "addresses": [f"127.0.1.{i + 1}"],
                **({"health_url": url} if url else {}),
            }
            for i, (name, url) in enumerate(pops.items())
        },
        "dns": {
            "zone": "meridian.test",
            "soa": {"mname": "ns1.meridian.test", "rname": "hostmaster.meridian.test"},
            "ns": [{"name": "ns1.meridian.test", "addresses": ["127.0.0.1"]}],
            "names": {"api": {"targets": "pops"}},
        },
        "edge": {
            "services": {"market": {}},
            "routes": [{"name": "default", "service": "market"}],
        },
        "health": health or {},
        "outlier": outlier or {},
    }
    return parse_config(data)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((LOOPBACK, port)) == 0


def _check_started(
    process: subprocess.Popen[bytes], what: str, logfile: Path, started: float
) -> None:
    if process.poll() is not None:
        raise RuntimeError(f"{what} exited with {process.returncode}: {logfile.read_text()}")
    if time.monotonic() - started > START_TIMEOUT:
        raise RuntimeError(f"{what} did not start listening: {logfile.read_text()}")


def _kill(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@dataclass
class ServerProcess:
    """A child server on a fixed loopback port that can be killed and started again."""

    name: str
    port: int
    command: Callable[[int], list[str]]
    logdir: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _logs: list[Any] = field(default_factory=list)
    _logfile: Path = Path(os.devnull)
    _spawned: float = 0.0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def spawn(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        self._logfile = self.logdir / f"{self.name}-{self.starts}.log"
        out = self._logfile.open("wb")
        self._logs.append(out)
        self.process = subprocess.Popen(
            self.command(self.port), stdout=out, stderr=subprocess.STDOUT, cwd=REPO
        )
        self._spawned = time.monotonic()

    def start(self) -> None:
        """Spawn and block until it listens (for fixtures, before any event loop work)."""
        self.spawn()
        assert self.process is not None
        while not _port_open(self.port):
            _check_started(self.process, self.name, self._logfile, self._spawned)
            time.sleep(0.01)  # waiting on a child process, outside any event loop

    async def restart(self) -> None:
        """Spawn again on the same port and wait, without blocking the event loop."""
        self.spawn()
        assert self.process is not None
        while not await asyncio.to_thread(_port_open, self.port):
            _check_started(self.process, self.name, self._logfile, self._spawned)
            await asyncio.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL: no goodbye, sockets die with the process."""
        _kill(self.process)

    def close(self) -> None:
        self.kill()
        for out in self._logs:
            out.close()


def origin_command(region: str) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        return [
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

    return command


def redis_command(port: int) -> list[str]:
    return [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        LOOPBACK,
        "--save",
        "",
        "--appendonly",
        "no",
        "--loglevel",
        "warning",
    ]


@contextlib.contextmanager
def server_processes(
    command: Callable[[int], list[str]], count: int, name: str
) -> Iterator[list[ServerProcess]]:
    """``count`` started servers, each on its own free port; killed by PID on the way out."""
    with tempfile.TemporaryDirectory(prefix=f"meridian-{name}-") as tmp:
        servers = [
            ServerProcess(f"{name}{i}", free_port(), command, Path(tmp)) for i in range(count)
        ]
        try:
            for server in servers:
                server.start()
            yield servers
        finally:
            for server in servers:
                server.close()


async def wait_for(
    condition: Callable[[], bool], within: float, what: str, poll: float = 0.005
) -> float:
    """Poll ``condition`` until it holds; return the seconds it took.  Fails after ``within``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(poll)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def blackhole() -> AsyncIterator[str]:
    """A TCP server that accepts connections and never answers; yields its base URL."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


@contextlib.contextmanager
def captured_logs() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Capture structured log lines as JSON; yields a function returning the events so far."""
    buffer = io.StringIO()
    log.configure("info", "json", buffer)
    try:
        yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines() if line]
    finally:
        log.configure("info", "logfmt", sys.stderr)


def sample(
    registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None
) -> float | None:
    value = registry.get_sample_value(name, labels or {})
    return None if value is None else float(value)


@contextlib.asynccontextmanager
async def running_monitor(
    config: Config, **options: Any
) -> AsyncIterator[tuple[HealthMonitor, CollectorRegistry]]:
    """A started HealthMonitor with its own registry; stopped on the way out."""
    registry = CollectorRegistry()
    monitor = HealthMonitor(config, registry=registry, **options)
    await monitor.start()
    try:
        yield monitor, registry
    finally:
        await monitor.stop()


def state_of(monitor: HealthMonitor, target: str) -> str:
    return str(monitor.status()["targets"][target]["state"])
