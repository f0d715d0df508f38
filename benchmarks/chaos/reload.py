"""Reliability test 1 of issue 21: config reloads under continuous load lose no request.

    python -m benchmarks.chaos.reload [--reloads 50] [--invalid 5] [--workers 2]
                                      [--clients 8] [--json FILE]

An edge with ``--workers N`` in front of the sample origin serves keep-alive clients without
pause (cache hits, misses and routed requests).  Meanwhile the config file is rewritten and
the edge's supervisor sent SIGHUP ``--reloads`` times; ``--invalid`` of them (spread evenly)
are broken in a different way each (bad YAML, an unknown service, a wrong type, the POP
removed, a negative duration).  Each valid reload changes what the workers do (routes, cache
rules, compression) and is waited for until every worker has adopted it; each invalid one
until the supervisor has rejected it.

Figures: requests sent / answered / failed (a failure is a connection error, a timeout or a
status other than 200), reloads accepted / rejected, requests answered while a reload was in
progress, worker restarts (must be 0), and the generation every worker runs at the end (must
be the last accepted one).  Loopback only; every process started is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from benchmarks.compare import (
    REPO,
    Cpus,
    Processes,
    free_port,
    say,
    start_origin,
    tcp_accepts,
    wait_until,
)

#: A cached ticker, uncached answers, and a path whose route is renamed by every reload.
PATHS = (
    "/api/v1/ticker/BTC-USD",
    "/api/v1/whoami",
    "/api/v1/depth/ETH-USD",
    "/api/v1/trades/BTC-USD",
)
#: How the invalid configs are broken, in turn: (what, change to the document or raw text).
INVALID = (
    "invalid YAML",
    "a route to an unknown service",
    "a pool size that is not a number",
    "the POP removed",
    "a negative drain timeout",
)


@dataclass
class Figures:
    workers: int
    clients: int
    reloads: int
    sent: int = 0
    answered: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    accepted: int = 0
    rejected: int = 0
    #: Requests answered while a reload was under way (SIGHUP sent, not yet adopted by all).
    answered_during_reloads: int = 0
    #: Reloads during which at least one request was answered.
    reloads_under_load: int = 0
    worker_restarts: int = 0
    final_generations: dict[str, int] = field(default_factory=dict)
    expected_generation: int = 0
    reload_ms_median: float = 0.0
    reload_ms_max: float = 0.0
    latency_ms_p99: float = 0.0
    seconds: float = 0.0


def document(origin: str, generation: int) -> dict[str, Any]:
    """A valid config; what changes with ``generation`` is what a reload changes."""
    rules = [{"path_prefix": "/api/v1/ticker/", "ttl": f"{1 + generation % 3}s"}]
    return {
        "regions": {
            "eu-central": {"location": {"lat": 50.11, "lon": 8.68}, "backends": [origin]},
        },
        "pops": {
            "fra": {"location": {"lat": 50.11, "lon": 8.68}, "addresses": ["127.0.1.3"]},
            "iad": {"location": {"lat": 39.04, "lon": -77.49}, "addresses": ["127.0.1.1"]},
        },
        "dns": {
            "zone": "meridian.test",
            "soa": {"mname": "ns1.meridian.test", "rname": "h.meridian.test"},
            "ns": [{"name": "ns1.meridian.test", "addresses": ["127.0.0.1"]}],
            "names": {"api": {"targets": "pops"}},
        },
        "health": {"interval": "1s", "timeout": "500ms", "fall": 2, "rise": 1},
        "edge": {
            "services": {"market": {}},
            "routes": [
                {"name": f"r{generation}", "service": "market", "path_prefix": "/api/v1/trades/"},
                {"name": "api", "service": "market", "path_prefix": "/"},
            ],
            "access_log": False,
            "drain_timeout": "5s",
            "pool_size": 32 + generation % 2,
            "cache": {"rules": rules},
            "compression": {"enabled": generation % 2 == 0},
        },
    }


def invalid_text(origin: str, generation: int, kind: int) -> str:
    data = document(origin, generation)
    what = INVALID[kind % len(INVALID)]
    if what == "invalid YAML":
        return yaml.safe_dump(data, sort_keys=False) + "edge: {routes: [oops\n"
    if what == "a route to an unknown service":
        data["edge"]["routes"][0]["service"] = "nowhere"
    elif what == "a pool size that is not a number":
        data["edge"]["pool_size"] = "lots"
    elif what == "the POP removed":
        del data["pops"]["fra"]
    elif what == "a negative drain timeout":
        data["edge"]["drain_timeout"] = "-5s"
    return yaml.safe_dump(data, sort_keys=False)


def write_atomically(path: Path, text: str) -> None:
    """Never a half-written file: that would be one more rejected reload than planned."""
    temporary = path.with_suffix(".new")
    temporary.write_text(text)
    os.replace(temporary, path)


class Load:
    """Keep-alive clients requesting without pause; every request counted exactly once."""

    def __init__(self, port: int, clients: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.clients = clients
        self.sent = 0
        self.answered = 0
        self.failed = 0
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        connector = aiohttp.TCPConnector(limit=self.clients)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(*(self._client(session, n) for n in range(self.clients)))

    async def _client(self, session: aiohttp.ClientSession, number: int) -> None:
        count = number
        while not self.stopping.is_set():
            path = PATHS[count % len(PATHS)]
            count += 1
            self.sent += 1
            started = time.perf_counter()
            try:
                async with session.get(self.base + path) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._fail(f"{path}: {type(exc).__name__}: {exc}")
                continue
            if status != 200:
                self._fail(f"{path}: status {status}")
                continue
            self.answered += 1
            self.latencies.append(time.perf_counter() - started)

    def _fail(self, what: str) -> None:
        self.failed += 1
        if len(self.failures) < 20:
            self.failures.append(what)


class Log:
    """The edge's log, read as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def text(self) -> str:
        return self.path.read_text(errors="replace")

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.text()))


async def wait_for(check: Any, what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _drive(
    edge_pid: int,
    log: Log,
    config: Path,
    origin: str,
    load: Load,
    figures: Figures,
    invalid: int,
    gap: float,
) -> None:
    every = max(1, figures.reloads // max(1, invalid)) if invalid else 0
    bad_at = {every * k + every // 2 for k in range(invalid)} if invalid else set()
    generation = 1
    durations: list[float] = []
    for index in range(figures.reloads):
        await asyncio.sleep(gap)  # the load runs between reloads too
        answered = load.answered
        started = time.monotonic()
        if index in bad_at:
            before = log.count(r"event=config_reload_rejected")
            write_atomically(config, invalid_text(origin, generation + 1, figures.rejected))
            os.kill(edge_pid, signal.SIGHUP)
            await wait_for(
                lambda b=before: log.count(r"event=config_reload_rejected") > b,
                "a rejection",
            )
            figures.rejected += 1
        else:
            generation += 1
            write_atomically(config, yaml.safe_dump(document(origin, generation), sort_keys=False))
            os.kill(edge_pid, signal.SIGHUP)
            adopted = rf"event=config_adopted .*generation={generation} "
            await wait_for(
                lambda a=adopted: log.count(a) >= figures.workers,
                f"generation {generation} in every worker",
            )
            figures.accepted += 1
        durations.append(time.monotonic() - started)
        during = load.answered - answered
        figures.answered_during_reloads += during
        figures.reloads_under_load += during > 0
    figures.expected_generation = generation
    figures.reload_ms_median = round(statistics.median(durations) * 1000, 1)
    figures.reload_ms_max = round(max(durations) * 1000, 1)


def status(admin_port: int) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/status", timeout=5) as reply:
        result: dict[str, Any] = json.load(reply)
    return result


def run_reloads(
    *,
    reloads: int = 50,
    invalid: int = 5,
    workers: int = 2,
    clients: int = 8,
    gap: float = 0.05,
    workdir: Path | None = None,
) -> Figures:
    """Run the scenario once; returns its figures (raises if the edge cannot start)."""
    figures = Figures(workers=workers, clients=clients, reloads=reloads)
    # The servers run from this checkout (first on the path, before any installed copy).
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(REPO) + (os.pathsep + previous if previous else "")
    try:
        return _run(figures, invalid, gap, workdir)
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous


def _run(figures: Figures, invalid: int, gap: float, workdir: Path | None) -> Figures:
    workers = figures.workers
    with tempfile.TemporaryDirectory(prefix="meridian-chaos-reload-") as scratch:
        directory = workdir or Path(scratch)
        processes = Processes(directory)
        try:
            origin = start_origin(processes, Cpus([], []))
            origin_url = f"http://{origin.addr}"
            config = directory / "edge.yaml"
            write_atomically(config, yaml.safe_dump(document(origin_url, 1), sort_keys=False))
            port, admin_port = free_port(), free_port()
            edge = processes.start(
                "edge",
                [
                    sys.executable,
                    "-m",
                    "meridian.cli",
                    "edge",
                    "--config",
                    str(config),
                    "--pop",
                    "fra",
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--admin",
                    f"127.0.0.1:{admin_port}",
                    "--workers",
                    str(workers),
                ],
            )
            log = Log(edge.log_path)
            wait_until(tcp_accepts(port), edge, "edge listener")
            wait_until(lambda: log.count(r"event=edge_listening") >= workers, edge, "workers")
            figures.seconds = asyncio.run(
                _scenario(edge.process.pid, log, config, origin_url, port, figures, invalid, gap)
            )
            figures.worker_restarts = log.count(r"event=worker_exited")
            answer = status(admin_port)
            figures.final_generations = {"0": int(answer["config"]["generation"])}
            for slot, sibling in answer.get("workers", {}).items():
                figures.final_generations[slot] = int(sibling.get("generation", -1))
        finally:
            processes.stop_all()
    return figures


async def _scenario(
    edge_pid: int,
    log: Log,
    config: Path,
    origin: str,
    port: int,
    figures: Figures,
    invalid: int,
    gap: float,
) -> float:
    load = Load(port, figures.clients)
    started = time.monotonic()
    clients = asyncio.create_task(load.run())
    try:
        await wait_for(lambda: load.answered > 50, "the load to start")
        await _drive(edge_pid, log, config, origin, load, figures, invalid, gap)
        answered = load.answered
        await wait_for(lambda: load.answered > answered + 50, "the load after the last reload")
    finally:
        load.stopping.set()
        await clients
    figures.sent, figures.answered, figures.failed = load.sent, load.answered, load.failed
    figures.failures = load.failures
    if load.latencies:
        ordered = sorted(load.latencies)
        figures.latency_ms_p99 = round(ordered[int(len(ordered) * 0.99)] * 1000, 2)
    return round(time.monotonic() - started, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos.reload")
    parser.add_argument("--reloads", type=int, default=50)
    parser.add_argument("--invalid", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    figures = run_reloads(
        reloads=args.reloads, invalid=args.invalid, workers=args.workers, clients=args.clients
    )
    say(
        f"edge --workers {figures.workers}, {figures.clients} keep-alive clients, "
        f"{figures.seconds} s"
    )
    say(
        f"requests: sent {figures.sent}, answered {figures.answered}, failed {figures.failed}"
        f" (p99 {figures.latency_ms_p99} ms)"
    )
    say(
        f"reloads: {figures.reloads} (accepted {figures.accepted}, rejected {figures.rejected});"
        f" each {figures.reload_ms_median} ms median, {figures.reload_ms_max} ms max, until"
        " every worker had adopted it"
    )
    say(
        f"answered during reloads: {figures.answered_during_reloads}"
        f" ({figures.reloads_under_load}/{figures.reloads} reloads with traffic answered)"
    )
    say(
        f"worker restarts: {figures.worker_restarts}; generation at the end: "
        f"{figures.final_generations} (expected {figures.expected_generation})"
    )
    for failure in figures.failures:
        say(f"  failure: {failure}")
    if args.json:
        args.json.write_text(json.dumps(asdict(figures), indent=2))
    ok = (
        figures.failed == 0
        and figures.sent == figures.answered
        and figures.worker_restarts == 0
        and set(figures.final_generations.values()) == {figures.expected_generation}
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
