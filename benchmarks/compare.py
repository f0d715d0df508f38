"""Side-by-side figures, measured in one run so that the ratios hold on a noisy machine.

    python -m benchmarks.compare http|dns|all [--duration 10s] [--rounds 3] [--connections 64]
                                              [--json out.json] [--peers meridian,nginx,...]

HTTP: the sample origin behind, in turn, the Meridian edge, nginx (proxy_cache + Brotli module)
and Varnish, all configured for the same caching of the same routes, driven by wrk (one thread,
fixed keep-alive connections) after a warm-up, rounds interleaved A B C A B C.

DNS: Meridian GeoDNS, gdnsd (plugin_geoip, City auto mode) and PowerDNS (geoip backend) serving
the same zone and POP topology from config/demo.yaml, driven by dnsperf with EDNS client-subnet
varied per query (the query files are written in dnsperf's binary format, one ECS per query).

With two or more cores, servers run on the first core and load generators (and the origin) on
the others.  Everything runs on 127.0.0.1, every wait has a deadline, and every process started
is stopped by PID at the end.  A peer that cannot be installed or started is reported with one
``skipped: ...`` line and the run goes on without it.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import http.client
import ipaddress
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meridian.ports import free_port as free_port
from meridian.units import parse_duration

REPO = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "configs"
DEMO_CONFIG = REPO / "config" / "demo.yaml"
MMDB_NAME = "ipfire-country-city.mmdb"
MMDB_CANDIDATES = (
    REPO / "meridian" / "data" / MMDB_NAME,
    REPO.parent / "shared" / "geodata" / MMDB_NAME,
)
CENTROIDS_CANDIDATES = (
    REPO / "meridian" / "data" / "country_centroids.csv",
    REPO.parent / "shared" / "geodata" / "country_centroids.csv",
)
START_DEADLINE = 30.0
STOP_DEADLINE = 10.0
WARMUP_SECONDS = 2.0
#: Distinct ECS /24s in the "varied" query file: a realistic resolver population.
VARIED_SUBNETS = 10_000
#: dnsperf sockets and queries in flight: enough to saturate one server core on loopback, few
#: enough that the latency figure is not all queueing inside dnsperf.
DNSPERF_CLIENTS = 16
DNSPERF_OUTSTANDING = int(os.environ.get("BENCH_DNSPERF_OUTSTANDING", "100"))
#: Queries per second the "unique ECS" file is sized for (gdnsd's ceiling on this kind of box).
UNIQUE_QPS_BUDGET = 150_000
APT_PACKAGES = {
    "wrk": "wrk",
    "dnsperf": "dnsperf",
    "nginx": "nginx",
    "varnishd": "varnish",
    "gdnsd": "gdnsd",
    "pdns_server": "pdns-server",
}
NGINX_BROTLI_MODULE = Path("/usr/lib/nginx/modules/ngx_http_brotli_filter_module.so")
#: The machine's benchmark lock (the same file ``flock /tmp/meridian-bench.lock CMD`` takes): one
#: load run at a time on a machine shared with other benchmarks.  Taken around each load run.
BENCH_LOCK = Path(os.environ.get("BENCH_LOCK", "/tmp/meridian-bench.lock"))
#: How long to wait for another benchmark to release the lock before giving up.
LOCK_DEADLINE = float(os.environ.get("BENCH_LOCK_WAIT", "900"))


def say(line: str) -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------------------------
# Processes


class Unavailable(Exception):
    """A peer or tool that cannot run here; the message is the reason shown to the user."""


@dataclass
class Cpus:
    """Which cores servers and load generators are pinned to (none: no pinning)."""

    server: list[int]
    load: list[int]

    @classmethod
    def detect(cls) -> Cpus:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2 or shutil.which("taskset") is None:
            return cls([], [])
        return cls(cores[:1], cores[1:])

    def describe(self) -> str:
        if not self.server:
            return "not pinned (fewer than 2 cores or no taskset)"
        return f"servers on core {_cpulist(self.server)}, load generators on {_cpulist(self.load)}"


@contextmanager
def bench_lock(what: str) -> Iterator[None]:
    """Hold the machine-wide benchmark lock (flock(2), as flock(1) takes it) for one load run."""
    with BENCH_LOCK.open("a") as handle:
        end = time.monotonic() + LOCK_DEADLINE
        waited = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    say(f"  waiting for {BENCH_LOCK} (another benchmark runs) before {what}")
                    waited = True
                if time.monotonic() > end:
                    raise RuntimeError(
                        f"{BENCH_LOCK} still held after {LOCK_DEADLINE:.0f}s"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cpulist(cores: Sequence[int]) -> str:
    return ",".join(map(str, cores))


def pinned(command: Sequence[str], cores: Sequence[int]) -> list[str]:
    return ["taskset", "-c", _cpulist(cores), *command] if cores else list(command)


class Processes:
    """Every process this run started; ``stop_all`` ends each by its PID (TERM, then KILL)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, command: Sequence[str], cores: Sequence[int] = ()) -> Proc:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as log_file:
            # Own session: a daemon's workers (nginx, varnishd's child) share our child's PGID,
            # so stopping can reach them through the group we created, never by name.
            process = subprocess.Popen(
                pinned(command, cores),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,
            )
        self.running.append((name, process))
        return Proc(name, process, log_path)

    def stop(self, proc: Proc) -> None:
        _terminate(proc.process)
        self.running = [(n, p) for n, p in self.running if p is not proc.process]

    def stop_all(self) -> None:
        for _, process in reversed(self.running):
            _terminate(process)
        self.running.clear()


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def session_cpu_seconds(leader: int) -> float:
    """User + system CPU seconds of every live process in the session ``leader`` started (a
    server and its workers: nginx's, varnishd's child), from /proc.  A figure that holds on a
    shared machine better than a rate does: what one request or query cost the server."""
    return sum(session_cpu_split(leader))


def session_cpu_split(leader: int) -> tuple[float, float]:
    """``session_cpu_seconds`` as (user, system): the system part is the kernel's work for the
    server (its sockets), the user part the server's own code."""
    user = system = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[3]) == leader:  # field 6, the session ID
            user += int(fields[11])  # utime
            system += int(fields[12])  # stime
    return user / _CLOCK_TICKS, system / _CLOCK_TICKS


def session_rss_mib(leader: int) -> float:
    """The resident memory (VmRSS) of every live process in the session ``leader`` started,
    MiB (a server and its workers; pages a fork shares are counted in each)."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                session = int(stat.read().rsplit(b")", 1)[1].split()[3])
        except OSError:
            continue  # exited meanwhile
        if session == leader:
            total += process_rss_mib(int(entry.name))
    return total


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # Workers left in the group we created (the session leader is our child's PID).
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            output = self.log_tail() or "no output"
            raise Unavailable(f"{self.name} exited with {self.process.returncode}: {output}")


def wait_until(
    ready: Callable[[], bool], proc: Proc, what: str, deadline: float = START_DEADLINE
) -> None:
    end = time.monotonic() + deadline
    while not ready():
        proc.check_alive()
        if time.monotonic() > end:
            raise Unavailable(
                f"{proc.name} not ready after {deadline:.0f}s ({what}): {proc.log_tail()}"
            )
        time.sleep(0.05)


def tcp_accepts(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    return check


# --------------------------------------------------------------------------------------------
# Tools


class Installer:
    """Finds a binary, installing its Debian package with apt-get when it is absent."""

    def __init__(self) -> None:
        self.updated = False

    def require(self, binary: str) -> str:
        found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
        if found:
            return found
        package = APT_PACKAGES.get(binary, binary)
        self.install(package)
        found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
        if not found:
            raise Unavailable(f"{package} installed but {binary} not found")
        return found

    def install(self, package: str) -> None:
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            raise Unavailable(f"{package} not installed and apt-get is not usable (need root)")
        say(f"installing {package} with apt-get ...")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            if not self.updated:
                subprocess.run(
                    ["apt-get", "update", "-q"],
                    env=env,
                    check=True,
                    timeout=300,
                    capture_output=True,
                )
                self.updated = True
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", package],
                env=env,
                check=True,
                timeout=600,
                capture_output=True,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise Unavailable(f"apt-get install {package} failed: {exc}") from None


def one_pop_config(
    region: str,
    pop: str,
    location: tuple[float, float],
    pop_address: str,
    origin_port: int,
    edge: dict[str, Any],
) -> dict[str, Any]:
    """A Meridian config of one region (the origin on loopback) and one POP beside it, every
    path routed to one service; ``edge`` adds to the edge section (TLS, streams...)."""
    lat, lon = location
    return {
        "regions": {
            region: {
                "location": {"lat": lat, "lon": lon},
                "backends": [f"http://127.0.0.1:{origin_port}"],
            }
        },
        "pops": {pop: {"location": {"lat": lat, "lon": lon}, "addresses": [pop_address]}},
        "dns": {
            "zone": "meridian.test",
            "soa": {"mname": "ns1.meridian.test", "rname": "h.meridian.test"},
            "ns": [{"name": "ns1.meridian.test", "addresses": ["127.0.0.1"]}],
            "names": {"api": {"targets": "pops"}},
        },
        "edge": {
            "services": {"market": {}},
            "routes": [{"name": "api", "service": "market", "path_prefix": "/"}],
            "access_log": False,
            **edge,
        },
    }


def meridian_command() -> list[str]:
    """How to run the ``meridian`` CLI from this checkout."""
    script = shutil.which("meridian")
    if script:
        return [script]
    if (REPO / "meridian" / "__main__.py").exists():
        return [sys.executable, "-m", "meridian"]
    return [sys.executable, "-m", "meridian.cli"]


def meridian_available(subcommand: str) -> list[str]:
    """The command prefix for ``meridian SUBCOMMAND``, or Unavailable with the CLI's own reason."""
    command = [*meridian_command(), subcommand]
    try:
        result = subprocess.run(
            [*command, "--help"], capture_output=True, text=True, timeout=30, cwd=REPO, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(str(exc)) from None
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip().splitlines()
        raise Unavailable(output[-1] if output else f"exit {result.returncode}")
    return command


def find_first(candidates: Sequence[Path], what: str) -> Path:
    for path in candidates:
        if path.exists():
            return path
    raise Unavailable(f"{what} not found in {', '.join(map(str, candidates))}")


def fill(template: str, values: dict[str, str]) -> str:
    """Replace ``@@NAME@@`` placeholders; an unfilled one is a bug in the runner, not the user's."""
    for name, value in values.items():
        template = template.replace(f"@@{name}@@", value)
    leftover = re.search(r"@@[A-Z_]+@@", template)
    if leftover:
        raise RuntimeError(f"placeholder {leftover.group(0)} left unfilled")
    return template


# --------------------------------------------------------------------------------------------
# Topology (from config/demo.yaml) shared by every peer


@dataclass(frozen=True)
class Site:
    name: str
    lat: float
    lon: float
    address: str


@dataclass(frozen=True)
class Topology:
    pops: list[Site]
    regions: list[Site]
    default_pop: str
    default_region: str
    serial: int

    @classmethod
    def from_demo(cls) -> Topology:
        data = yaml.safe_load(DEMO_CONFIG.read_text())

        def sites(section: dict[str, Any]) -> list[Site]:
            return [
                Site(
                    name,
                    float(s["location"]["lat"]),
                    float(s["location"]["lon"]),
                    str(s["addresses"][0]),
                )
                for name, s in section.items()
            ]

        pops, regions = sites(data["pops"]), sites(data["regions"])
        # Clients the database cannot place go where demo.yaml's default_location is.
        default = data.get("geo", {}).get("default_location") or {"lat": 39.04, "lon": -77.49}
        return cls(
            pops=pops,
            regions=regions,
            default_pop=nearest(pops, default["lat"], default["lon"]).name,
            default_region=nearest(regions, default["lat"], default["lon"]).name,
            serial=int(data["dns"]["soa"].get("serial", 1)),
        )


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(a))


def nearest(sites: Sequence[Site], lat: float, lon: float) -> Site:
    return min(sites, key=lambda s: great_circle_km(lat, lon, s.lat, s.lon))


def _default_first(sites: list[Site], default: str) -> list[Site]:
    return sorted(sites, key=lambda s: s.name != default)


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class Measurement:
    kind: str  # "http" or "dns"
    scenario: str
    peer: str
    round: int
    values: dict[str, float]
    notes: dict[str, str] = field(default_factory=dict)


@dataclass
class Report:
    kind: str
    settings: dict[str, Any]
    measurements: list[Measurement] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    probes: dict[str, dict[str, str]] = field(default_factory=dict)

    def skip(self, peer: str, reason: str) -> None:
        self.skipped[peer] = reason
        say(f"skipped: {peer} not available: {reason}")

    def medians(self, scenario: str, peer: str) -> dict[str, float] | None:
        rows = [m for m in self.measurements if m.scenario == scenario and m.peer == peer]
        if not rows:
            return None
        keys = rows[0].values.keys()
        return {k: statistics.median(r.values[k] for r in rows) for k in keys}


def machine_description() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def tool_versions(binaries: Sequence[str]) -> dict[str, str]:
    probes = {
        "wrk": ["wrk", "-v"],
        "dnsperf": ["dnsperf", "-h"],
        "nginx": ["nginx", "-v"],
        "varnishd": ["varnishd", "-V"],
        "gdnsd": ["gdnsd", "-V"],
        "pdns_server": ["pdns_server", "--version"],
    }
    versions: dict[str, str] = {}
    for binary in binaries:
        if binary not in probes or not shutil.which(binary, path=os.environ["PATH"] + ":/usr/sbin"):
            continue
        try:
            result = subprocess.run(
                probes[binary], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        text = result.stdout + result.stderr
        match = re.search(r"(\d+\.\d+(?:\.\d+)?)", text)
        versions[binary] = match.group(1) if match else "?"
    return versions


# --------------------------------------------------------------------------------------------
# HTTP


@dataclass(frozen=True)
class HttpScenario:
    name: str
    label: str
    path: str
    headers: dict[str, str]
    unique: bool = False
    #: Each request carries header values never sent before (User-Agent, Cookie, X-Request-Id),
    #: as browsers and SDKs do: no memo of request bytes can answer it.
    varied: bool = False
    #: Requests spread at random over this many distinct cached keys (0: one key); the keys
    #: are filled once, before the first measured run.
    keys: int = 0
    method: str = "GET"
    #: The request body (sent with every request), if any.
    body: str = ""


#: Scenario (g)'s order: a limit order as exchange SDKs send it (about 300 bytes of JSON).
ORDER_BODY = (
    '{"symbol":"BTC-USD","side":"buy","type":"limit","price":"64250.50","quantity":"0.0125",'
    '"time_in_force":"GTC","client_order_id":"c-7f3e9a2b-4d1c-4e8f-9b6a-2c5d8e1f0a3b",'
    '"post_only":true,"reduce_only":false,"self_trade_prevention":"cancel_newest",'
    '"account":"acct-000123","tags":["bench","wrk"],"meta":{"source":"api","version":"v1"}}'
)


#: Distinct keys of scenario (f): far more than any memo of request heads holds.
SPREAD_KEYS = 100_000
#: Cache sizes every peer gets, so that (f)'s keys all fit (~4 KB each at most).
PEER_CACHE_MIB = 1024

HTTP_SCENARIOS = (
    HttpScenario("ticker-identity", "(a) 2 KB ticker hit, identity", "/api/v1/ticker/BTC-USD", {}),
    HttpScenario(
        "ticker-br",
        "(b) 2 KB ticker hit, br",
        "/api/v1/ticker/BTC-USD",
        # What browsers send; a peer without Brotli answers gzip (the table shows the encoding).
        {"Accept-Encoding": "gzip, deflate, br"},
    ),
    HttpScenario(
        "depth-gzip",
        "(c) 50 KB depth hit, gzip",
        "/api/v1/depth/BTC-USD",
        {"Accept-Encoding": "gzip"},
    ),
    HttpScenario(
        "miss", "(d) miss to origin (unique query)", "/api/v1/ticker/BTC-USD", {}, unique=True
    ),
    HttpScenario(
        "ticker-varied",
        "(e) 2 KB ticker hit, new header values per request",
        "/api/v1/ticker/BTC-USD",
        {"Accept": "application/json", "Accept-Language": "en-US,en;q=0.9"},
        varied=True,
    ),
    HttpScenario(
        "spread-100k",
        f"(f) hits spread over {SPREAD_KEYS:,} cached keys",
        # The symbols list: public, max-age=300 at the origin (a 5m rule at the edge), so the
        # spread keys stay fresh for a whole run; the query string makes each key distinct.
        "/api/v1/symbols",
        {},
        varied=True,
        keys=SPREAD_KEYS,
    ),
    HttpScenario(
        "orders-post",
        "(g) forwarded POST /api/v1/orders, 300 B JSON",
        # Answered by the origin every time (201, never cached): the pass-through cost.
        "/api/v1/orders",
        {"Content-Type": "application/json"},
        method="POST",
        body=ORDER_BODY,
    ),
)


@dataclass
class Origin:
    proc: Proc
    port: int

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def requests_total(self) -> int:
        status, body, _ = http_get(self.port, "/_control")
        if status != 200:
            return -1
        return int(json.loads(body)["requests"]["total"])


def http_get(
    port: int,
    path: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    body: bytes | None = None,
) -> tuple[int, bytes, dict[str, str]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        return response.status, body, {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def start_origin(processes: Processes, cpus: Cpus) -> Origin:
    proc = processes.start(
        "origin",
        [sys.executable, "-m", "meridian.origin", "--region", "bench", "--port", "0"],
        cpus.load,
    )
    ports: list[int] = []

    def listening() -> bool:
        match = re.search(r"event=listening .*addr=127\.0\.0\.1:(\d+)", proc.log_tail(50))
        if match:
            ports.append(int(match.group(1)))
        return bool(ports)

    wait_until(listening, proc, "listening line")
    return Origin(proc, ports[0])


class HttpPeer:
    name = "?"
    #: The request methods this peer proxies (None: all of them).
    methods: frozenset[str] | None = None

    def __init__(self, workdir: Path, origin: Origin, topology: Topology) -> None:
        self.workdir = workdir / self.name
        self.workdir.mkdir()
        self.origin = origin
        self.topology = topology
        self.port = free_port()
        self.proc: Proc | None = None
        #: The peer's cache size (``--cache-mib``): room for every key by default.
        self.cache_mib = PEER_CACHE_MIB

    def start(self, processes: Processes, cpus: Cpus, installer: Installer) -> Proc:
        raise NotImplementedError

    def cache_counts(self) -> dict[str, float] | None:
        """Responses answered so far by cache status, from the peer's own metrics (if any)."""
        return None


#: Seconds a scrape of the edge's /metrics is retried for.
SCRAPE_PATIENCE = 10.0
_EDGE_REQUESTS = re.compile(r"^meridian_edge_requests_total\{([^}]*)\} ([0-9.e+]+)$", re.MULTILINE)
_CACHE_LABEL = re.compile(r'cache="([^"]*)"')


def edge_cache_counts(admin_port: int) -> dict[str, float]:
    """``meridian_edge_requests_total`` summed by its ``cache`` label (HIT, MISS, STALE, ...).

    Retried for a few seconds: right after a run with 10,000 connections the edge may still
    be closing them when the scrape arrives (seen as a reset)."""
    deadline = time.monotonic() + SCRAPE_PATIENCE
    while True:
        try:
            status, body, _ = http_get(admin_port, "/metrics")
            if status != 200:
                raise OSError(f"/metrics answered {status}")
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    counts: dict[str, float] = {}
    for labels, value in _EDGE_REQUESTS.findall(body.decode()):
        label = _CACHE_LABEL.search(labels)
        cache = label.group(1) if label else "?"
        counts[cache] = counts.get(cache, 0.0) + float(value)
    return counts


def hit_share(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    """(HIT share, HIT+STALE share) of the responses between two scrapes, in percent."""
    shares = cache_shares(before, after)
    return shares.get("HIT", 0.0), shares.get("HIT", 0.0) + shares.get("STALE", 0.0)


def cache_shares(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Share of each cache status (HIT, STALE, MISS, ...) between two scrapes, in percent."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    total = sum(delta.values())
    if total <= 0:
        return {}
    return {k: 100.0 * v / total for k, v in delta.items() if v > 0}


def shares_text(shares: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.1f}%" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]))


def server_argv(command: Sequence[str], config: Path, port: int, admin: int) -> list[str]:
    """``command`` (``meridian edge``, ``meridian dns``, or a profiler around ``-m edge``)
    serving ``config`` as POP iad on loopback ``port``, its admin listener on ``admin``."""
    return [
        *command,
        "--config",
        str(config),
        "--pop",
        "iad",
        "--listen",
        f"127.0.0.1:{port}",
        "--admin",
        f"127.0.0.1:{admin}",
    ]


class MeridianEdge(HttpPeer):
    name = "meridian"

    def cache_counts(self) -> dict[str, float] | None:
        return edge_cache_counts(self.admin_port)

    def configure(self, data: dict[str, Any]) -> None:
        """Changes to the demo config this peer runs with."""

    def start(self, processes: Processes, cpus: Cpus, installer: Installer) -> Proc:
        command = meridian_available("edge")
        data = yaml.safe_load(DEMO_CONFIG.read_text())
        for region in data["regions"].values():
            region["backends"] = [f"http://{self.origin.addr}"]
        data["edge"]["cache"]["memory"] = f"{self.cache_mib}MiB"
        data["edge"]["access_log"] = False  # as nginx here (access_log off)
        self.configure(data)
        admin_port = self.admin_port = free_port()
        config = self.workdir / "edge.yaml"
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        proc = processes.start(
            "meridian-edge", server_argv(command, config, self.port, admin_port), cpus.server
        )
        wait_until(tcp_accepts(self.port), proc, f"TCP {self.port}")
        return proc


class Nginx(HttpPeer):
    name = "nginx"

    def start(self, processes: Processes, cpus: Cpus, installer: Installer) -> Proc:
        nginx = installer.require("nginx")
        if not NGINX_BROTLI_MODULE.exists():
            raise Unavailable(
                f"{NGINX_BROTLI_MODULE} missing (apt-get install libnginx-mod-http-brotli-filter)"
            )
        # tmpfs for the cache when there is one: Meridian and Varnish cache in memory.
        shm = Path("/dev/shm")
        cache_dir = Path(tempfile.mkdtemp(prefix="nginx-cache-", dir=shm if shm.is_dir() else None))
        self.cache_dir = cache_dir
        conf = self.workdir / "nginx.conf"
        conf.write_text(
            fill(
                (CONFIGS / "nginx.conf").read_text(),
                {
                    "WORKDIR": str(self.workdir),
                    "CACHE_DIR": str(cache_dir),
                    "ORIGIN": self.origin.addr,
                    "LISTEN": f"127.0.0.1:{self.port}",
                    "CACHE_MIB": str(self.cache_mib),
                },
            )
        )
        proc = processes.start(
            "nginx", [nginx, "-p", str(self.workdir), "-c", str(conf)], cpus.server
        )
        wait_until(tcp_accepts(self.port), proc, f"TCP {self.port}")
        return proc


class Varnish(HttpPeer):
    name = "varnish"

    def start(self, processes: Processes, cpus: Cpus, installer: Installer) -> Proc:
        varnishd = installer.require("varnishd")
        vcl = self.workdir / "default.vcl"
        vcl.write_text(
            fill(
                (CONFIGS / "varnish.vcl").read_text(),
                {
                    "ORIGIN_HOST": "127.0.0.1",
                    "ORIGIN_PORT": str(self.origin.port),
                },
            )
        )
        proc = processes.start(
            "varnish",
            [
                varnishd,
                "-F",
                "-j",
                "none",
                "-n",
                str(self.workdir / "work"),
                "-a",
                f"127.0.0.1:{self.port}",
                "-f",
                str(vcl),
                "-s",
                f"malloc,{self.cache_mib}m",
                "-T",
                "none",
            ],
            cpus.server,
        )
        wait_until(tcp_accepts(self.port), proc, f"TCP {self.port}")
        return proc


class MeridianLimited(MeridianEdge):
    """The edge with a request rate limit on every route, per client, that the load never
    reaches (wrk is one client): what checking a limit costs (issue 22: within 5%)."""

    name = "meridian-limited"

    def configure(self, data: dict[str, Any]) -> None:
        data["edge"]["rate_limits"] = {"bench": {"rate": "10000000/s", "burst": 100000}}


class PythonFloor(HttpPeer):
    """``benchmarks.floor_proxy``: the least a Python caching proxy on the edge's event loop and
    parser does per request (a yardstick for the miss path, not an edge)."""

    name = "python-floor"
    methods = frozenset({"GET"})

    def start(self, processes: Processes, cpus: Cpus, installer: Installer) -> Proc:
        command = [sys.executable, str(REPO / "benchmarks" / "floor_proxy.py")]
        listen, origin = f"127.0.0.1:{self.port}", self.origin.addr
        proc = processes.start(
            "python-floor", [*command, "--listen", listen, "--origin", origin], cpus.server
        )
        wait_until(tcp_accepts(self.port), proc, f"TCP {self.port}")
        return proc


def serves(peer: HttpPeer, scenario: HttpScenario) -> bool:
    """Whether ``peer`` is measured on ``scenario`` (a yardstick may proxy GETs only)."""
    return peer.methods is None or scenario.method in peer.methods


#: Peers run only when named (``--peers``): variants of another peer, yardsticks.
OPT_IN_PEERS: frozenset[str] = frozenset({"meridian-limited", "python-floor"})
HTTP_PEERS: dict[str, type[HttpPeer]] = {
    "meridian": MeridianEdge,
    "meridian-limited": MeridianLimited,
    "python-floor": PythonFloor,
    "nginx": Nginx,
    "varnish": Varnish,
}


def fresh_script(
    workdir: Path, scenario: HttpScenario, run_id: str, scripts: dict[str, Path]
) -> Path:
    """The wrk script for one run: for a unique-query scenario a new one per run, so that no
    run repeats a query an earlier run (or warm-up) already cached; the shared one otherwise."""
    if scenario.unique:
        return write_wrk_script(workdir, scenario, run_id)
    return scripts[scenario.name]


def write_wrk_script(workdir: Path, scenario: HttpScenario, run_id: str) -> Path:
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in scenario.headers.items())
    script = workdir / f"wrk-{scenario.name}.lua"
    script.write_text(
        fill(
            (CONFIGS / "wrk.lua").read_text(),
            {
                "PATH": scenario.path,
                "METHOD": scenario.method,
                # A Lua long string: the JSON's quotes need no escaping.
                "BODY": f"[[{scenario.body}]]" if scenario.body else "nil",
                "HEADERS": headers,
                "UNIQUE": "true" if scenario.unique else "false",
                "VARIED": "true" if scenario.varied else "false",
                "KEYS": str(scenario.keys),
                "FILL": "false",
                "RUN_ID": run_id,
            },
        )
    )
    return script


def fill_keys(
    wrk: str, port: int, scenario: HttpScenario, workdir: Path, cpus: Cpus, connections: int
) -> float:
    """Request each of ``scenario``'s keys once, in order (wrk runs until every key was sent);
    returns the seconds it took.  Keys already cached answer as hits, so a repeat is cheap."""
    script = workdir / f"wrk-{scenario.name}-fill.lua"
    script.write_text(
        write_wrk_script(workdir, scenario, "fill")
        .read_text()
        .replace("local fill = false", "local fill = true")
    )
    started = time.monotonic()
    deadline = started + 600.0
    sent = 0
    while sent < scenario.keys and time.monotonic() < deadline:
        # Every run starts again at key 1: the keys an earlier run filled are hits by now.
        sent = int(run_wrk(wrk, port, script, 10.0, connections, cpus)["requests"])
    return time.monotonic() - started


def server_cpu(proc: Proc | None) -> float:
    return session_cpu_seconds(proc.process.pid) if proc is not None else 0.0


def server_cpu_split(proc: Proc | None) -> tuple[float, float]:
    """``server_cpu`` as (user, system) seconds."""
    return session_cpu_split(proc.process.pid) if proc is not None else (0.0, 0.0)


def per_unit_us(cpu_seconds: float, count: float) -> float:
    """Microseconds of server CPU per request or query (0 when nothing was counted)."""
    return cpu_seconds * 1e6 / count if count > 0 else 0.0


def settle(origin: Origin, quiet: float = 1.0, limit: float = 10.0) -> None:
    """Wait until the origin has seen no new request for ``quiet`` seconds (at most
    ``limit``): what a miss run left in flight finishes before the next run starts."""
    deadline = time.monotonic() + limit
    last = origin.requests_total()
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = origin.requests_total()
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            return


def run_wrk(
    wrk: str, port: int, script: Path, seconds: float, connections: int, cpus: Cpus
) -> dict[str, float]:
    command = pinned(
        [
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "5s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}",
        ],
        cpus.load,
    )
    with bench_lock("wrk"):
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
    match = re.search(r"^WRKJSON (\{.*\})$", result.stdout, re.MULTILINE)
    if result.returncode != 0 or not match:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr.strip()[-300:]}")
    raw = json.loads(match.group(1))
    duration = raw["duration_us"] / 1e6
    errors = sum(raw[k] for k in raw if k.startswith("errors_"))
    return {
        "rps": raw["requests"] / duration,
        "duration_s": duration,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "requests": raw["requests"],
        "errors": errors,
        "mib_per_s": raw["bytes"] / duration / 2**20,
    }


def probe_http(port: int, scenario: HttpScenario) -> dict[str, str]:
    """Two requests: the second shows what the measured requests get (status, encoding, cache)."""
    notes: dict[str, str] = {}
    for attempt in range(2):
        path = scenario.path + (
            f"?miss=probe-{time.time_ns()}-{attempt}" if scenario.unique else ""
        )
        status, body, headers = http_get(
            port, path, scenario.headers, scenario.method, scenario.body.encode() or None
        )
        cache = headers.get("x-cache") or headers.get("x-cache-status") or "-"
        notes = {
            "status": str(status),
            "encoding": headers.get("content-encoding", "identity"),
            "bytes": str(len(body)),
            "cache": cache,
        }
    return notes


def run_http(args: argparse.Namespace, report: Report, stack: ExitStack, workdir: Path) -> None:
    cpus = Cpus.detect()
    installer = Installer()
    processes = Processes(workdir)
    stack.callback(processes.stop_all)
    try:
        wrk = installer.require("wrk")
    except Unavailable as exc:
        report.skip("http benchmark", f"wrk: {exc}")
        return
    topology = Topology.from_demo()
    origin = start_origin(processes, cpus)
    say(f"origin: 127.0.0.1:{origin.port} ({cpus.describe()})")

    peers: list[HttpPeer] = []
    for name in args.peers_http:
        peer = HTTP_PEERS[name](workdir, origin, topology)
        peer.cache_mib = args.cache_mib
        try:
            peer.proc = peer.start(processes, cpus, installer)
        except Unavailable as exc:
            report.skip(f"{name} {'edge' if name == 'meridian' else ''}".strip(), str(exc))
            continue
        say(f"started: {name} on 127.0.0.1:{peer.port}")
        peers.append(peer)
        if isinstance(peer, Nginx):
            stack.callback(shutil.rmtree, peer.cache_dir, True)
    if not peers:
        return

    run_id = f"{int(time.time())}"
    scripts = {s.name: write_wrk_script(workdir, s, run_id) for s in args.http_scenarios}
    for scenario in args.http_scenarios:
        for peer in peers:
            if not serves(peer, scenario):
                continue
            try:
                report.probes.setdefault(scenario.name, {})[peer.name] = json.dumps(
                    probe_http(peer.port, scenario)
                )
            except OSError as exc:
                report.probes.setdefault(scenario.name, {})[peer.name] = json.dumps(
                    {"status": f"error: {exc}"}
                )
            if scenario.keys:
                seconds = fill_keys(wrk, peer.port, scenario, workdir, cpus, args.connections)
                say(
                    f"filled: {scenario.keys:,} keys of {scenario.name} in {peer.name} "
                    f"in {seconds:.0f} s"
                )
            script = fresh_script(workdir, scenario, f"{run_id}-w-{peer.name}", scripts)
            run_wrk(wrk, peer.port, script, WARMUP_SECONDS, args.connections, cpus)

    for round_number in range(1, args.rounds + 1):
        for scenario in args.http_scenarios:
            for peer in peers:  # A B C for each scenario, every round: drift hits all alike
                if not serves(peer, scenario):
                    continue
                before = origin.requests_total()
                counts_before = peer.cache_counts()
                user_before, system_before = server_cpu_split(peer.proc)
                origin_cpu_before = server_cpu(origin.proc)
                script = fresh_script(
                    workdir, scenario, f"{run_id}-{round_number}-{peer.name}", scripts
                )
                values = run_wrk(wrk, peer.port, script, args.duration, args.connections, cpus)
                user_after, system_after = server_cpu_split(peer.proc)
                values["cpu_us"] = per_unit_us(
                    user_after + system_after - user_before - system_before, values["requests"]
                )
                # The kernel's part (sockets): alike for every peer on the same traffic, so what
                # differs between them is mostly their own code's (user) part.
                values["system_cpu_us"] = per_unit_us(
                    system_after - system_before, values["requests"]
                )
                if scenario.unique:
                    # Misses still in flight when wrk stopped must not land in the next run.
                    settle(origin)
                values["origin_requests"] = origin.requests_total() - before
                # The origin shares the load generators' core: when that core is the limit (misses
                # through a fast proxy), a peer's rate depends on what each request costs there.
                values["origin_cpu_us"] = per_unit_us(
                    server_cpu(origin.proc) - origin_cpu_before, values["origin_requests"]
                )
                counts_after = peer.cache_counts()
                # Resident memory at the round's end: with a small --cache-mib and a long
                # miss run, whether memory levels off once the cache evicts.
                assert peer.proc is not None
                values["rss_mib"] = session_rss_mib(peer.proc.process.pid)
                notes: dict[str, str] = {}
                if counts_before is not None and counts_after is not None:
                    # The peer's own count of what it answered from cache during the run.
                    values["hit_pct"], values["hit_or_stale_pct"] = hit_share(
                        counts_before, counts_after
                    )
                    notes["cache_shares"] = shares_text(cache_shares(counts_before, counts_after))
                report.measurements.append(
                    Measurement("http", scenario.name, peer.name, round_number, values, notes)
                )
                hits = f"  ({notes['cache_shares']})" if notes.get("cache_shares") else ""
                say(
                    f"  round {round_number} {scenario.name:16} {peer.name:9} "
                    f"{values['rps']:>9.0f} req/s  cpu {values['cpu_us']:5.1f} us/req "
                    f"(kernel {values['system_cpu_us']:4.1f})  "
                    f"p50 {values['p50_ms']:.2f} ms  p99 {values['p99_ms']:.2f} ms  "
                    f"errors {values['errors']:.0f}  origin {values['origin_requests']:.0f}"
                    f" ({values['origin_cpu_us']:.0f} us/req)  rss {values['rss_mib']:.1f} MiB"
                    f"{hits}"
                )
    # The same probe once more after the load: a peer that stopped caching under load shows here.
    for scenario in args.http_scenarios:
        for peer in peers:
            if not serves(peer, scenario):
                continue
            with suppress(OSError):
                report.probes.setdefault(f"{scenario.name}@end", {})[peer.name] = json.dumps(
                    probe_http(peer.port, scenario)
                )
    processes.stop_all()


# --------------------------------------------------------------------------------------------
# DNS


QTYPE_A = 1
OPT_ECS = 8


def dns_query(
    name: str, subnet: ipaddress.IPv4Network | ipaddress.IPv6Network | None, query_id: int = 0
) -> bytes:
    """A wire-format A query with EDNS(0) and, when given, an edns-client-subnet option."""
    header = struct.pack("!HHHHHH", query_id, 0x0000, 1, 0, 0, 1)  # RD clear: authoritative
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    options = b""
    if subnet is not None:
        family = 1 if subnet.version == 4 else 2
        prefix = subnet.prefixlen
        address = subnet.network_address.packed[: (prefix + 7) // 8]
        ecs = struct.pack("!HBB", family, prefix, 0) + address
        options = struct.pack("!HH", OPT_ECS, len(ecs)) + ecs
    opt = b"\0" + struct.pack("!HHIH", 41, 1232, 0, len(options)) + options
    return header + qname + struct.pack("!HH", QTYPE_A, 1) + opt


#: Ranges that never hold a public client (RFC 6890 and multicast/reserved), in /24 blocks.
_NOT_PUBLIC = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/3",
)
#: Odd, so i -> i * _SPREAD mod 2**24 is a bijection: consecutive indexes give scattered,
#: never-repeating /24s, and disjoint index ranges give disjoint sets of subnets.
_SPREAD = 0x9E3779


def _not_public_blocks() -> bytearray:
    flags = bytearray(1 << 24)
    for cidr in _NOT_PUBLIC:
        network = ipaddress.IPv4Network(cidr)
        first = int(network.network_address) >> 8
        last = int(network.broadcast_address) >> 8
        flags[first : last + 1] = b"\1" * (last - first + 1)
    return flags


def public_blocks(start: int, count: int) -> tuple[list[int], int]:
    """``count`` distinct public IPv4 /24s (as address >> 8) from index ``start`` on, and the
    index to continue from."""
    not_public = _not_public_blocks()
    blocks: list[int] = []
    index = start
    while len(blocks) < count:
        block = (index * _SPREAD) & 0xFFFFFF
        index += 1
        if not not_public[block]:
            blocks.append(block)
    return blocks, index


def write_query_file(path: Path, records: Iterator[bytes]) -> None:
    """dnsperf's binary input (-B): each message prefixed by its 2-byte length, as on TCP."""
    with path.open("wb") as out:
        out.writelines(records)


def _framed(message: bytes) -> bytes:
    return struct.pack("!H", len(message)) + message


def ecs24_queries(blocks: Sequence[int], seed: int) -> Iterator[bytes]:
    """Framed queries, one per /24 block, for the API name (90%) or the origin name (10%)."""
    # Everything but the 3 address bytes is the same for a given name: build it once.
    heads = {}
    for name in ("api.meridian.test", "origin.meridian.test"):
        framed = _framed(dns_query(name, ipaddress.IPv4Network("0.0.0.0/24")))
        heads[name] = framed[:-3]
    rng = random.Random(seed)
    api, origin = heads["api.meridian.test"], heads["origin.meridian.test"]
    for block in blocks:
        yield (api if rng.random() < 0.9 else origin) + block.to_bytes(3, "big")


@dataclass(frozen=True)
class DnsScenario:
    name: str
    label: str
    #: Query file writer: (path, round index) -> number of queries.
    once: bool  # dnsperf -n 1: run through the file once (unique subnets never repeat)


DNS_SCENARIOS = (
    DnsScenario("no-ecs", "no ECS (resolver address only)", once=False),
    DnsScenario("ecs-varied", f"ECS varied ({VARIED_SUBNETS:,} /24s, repeating)", once=False),
    DnsScenario("ecs-unique", "ECS unique per query (cold answer cache)", once=True),
)


#: Where each server's "unique ECS" subnets start: past the varied set the warm-up used.
UNIQUE_START = 1_000_000


def build_query_file(
    workdir: Path, scenario: DnsScenario, start: int, duration: float
) -> tuple[Path, int]:
    """The query file for ``scenario`` and, for unique subnets, the index to continue from."""
    path = workdir / f"queries-{scenario.name}-{start}.bin"
    if scenario.name == "no-ecs":
        rng = random.Random(1)
        names = [
            "api.meridian.test" if rng.random() < 0.9 else "origin.meridian.test"
            for _ in range(1000)
        ]
        write_query_file(path, (_framed(dns_query(n, None)) for n in names))
        return path, start
    if scenario.name == "ecs-varied":
        blocks, _ = public_blocks(0, VARIED_SUBNETS)
        write_query_file(path, ecs24_queries(blocks, 2))
        return path, start
    blocks, next_start = public_blocks(start, int(UNIQUE_QPS_BUDGET * duration))
    write_query_file(path, ecs24_queries(blocks, 3))
    return path, next_start


_DNSPERF_FIELDS = {
    "sent": r"Queries sent:\s+(\d+)",
    "completed": r"Queries completed:\s+(\d+)",
    "lost": r"Queries lost:\s+(\d+)",
    "qps": r"Queries per second:\s+([\d.]+)",
    "latency_avg_s": r"Average Latency \(s\):\s+([\d.]+)",
    "latency_max_s": r"Average Latency \(s\):.*max ([\d.]+)",
    "latency_stddev_s": r"Latency StdDev \(s\):\s+([\d.]+)",
    "run_time_s": r"Run time \(s\):\s+([\d.]+)",
}


def run_dnsperf(
    dnsperf: str, port: int, query_file: Path, seconds: float, once: bool, cpus: Cpus
) -> dict[str, float]:
    command = [
        dnsperf,
        "-s",
        "127.0.0.1",
        "-p",
        str(port),
        "-d",
        str(query_file),
        "-B",
        "-l",
        str(max(1, round(seconds))),
        "-c",
        str(DNSPERF_CLIENTS),
        "-T",
        "1",
        "-q",
        str(DNSPERF_OUTSTANDING),
        "-t",
        "2",
    ]
    if once:
        command += ["-n", "1"]
    with bench_lock("dnsperf"):
        result = subprocess.run(
            pinned(command, cpus.load),
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        )
    values: dict[str, float] = {}
    for key, pattern in _DNSPERF_FIELDS.items():
        match = re.search(pattern, result.stdout)
        if match:
            values[key] = float(match.group(1))
    if result.returncode != 0 or "qps" not in values:
        raise RuntimeError(f"dnsperf failed ({result.returncode}): {result.stderr.strip()[-300:]}")
    codes = re.search(r"Response codes:\s+(.*)", result.stdout)
    noerror = re.search(r"NOERROR (\d+)", codes.group(1)) if codes else None
    values["noerror"] = float(noerror.group(1)) if noerror else 0.0
    values["latency_avg_ms"] = values.pop("latency_avg_s", 0.0) * 1000
    values["latency_max_ms"] = values.pop("latency_max_s", 0.0) * 1000
    values["latency_stddev_ms"] = values.pop("latency_stddev_s", 0.0) * 1000
    return values


def udp_answer(port: int, name: str, subnet: ipaddress.IPv4Network | None) -> str:
    """The A records a server gives for ``name`` from ``subnet``; rcode name on failure."""
    query_id = random.randrange(1 << 16)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        sock.sendto(dns_query(name, subnet, query_id), ("127.0.0.1", port))
        data = sock.recv(4096)
    return _parse_a_records(data, query_id)


def _parse_a_records(data: bytes, query_id: int) -> str:
    ident, flags, qd, an, _, _ = struct.unpack("!HHHHHH", data[:12])
    if ident != query_id:
        return "bad-id"
    rcode = flags & 0xF
    if rcode:
        return f"rcode{rcode}"
    offset = 12
    for _ in range(qd):
        offset = _skip_name(data, offset) + 4
    addresses: list[str] = []
    for _ in range(an):
        offset = _skip_name(data, offset)
        rtype, _, _, length = struct.unpack("!HHIH", data[offset : offset + 10])
        offset += 10
        if rtype == QTYPE_A and length == 4:
            addresses.append(socket.inet_ntoa(data[offset : offset + 4]))
        offset += length
    return ",".join(sorted(addresses)) or "empty"


def _skip_name(data: bytes, offset: int) -> int:
    while True:
        length = data[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:
            return offset + 2
        offset += length + 1


def dns_ready(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return udp_answer(port, "api.meridian.test", None) not in ("empty",)
        except OSError:
            return False

    return check


PROBE_ADDRESSES = (
    "8.8.8.8",
    "1.1.1.1",
    "80.80.80.80",
    "200.160.2.3",
    "77.88.8.8",
    "114.114.114.114",
    "139.130.4.5",
    "193.0.6.139",
    "196.216.2.1",
    "200.3.14.10",
    "203.0.113.5",
)


#: ``--geo-db``: the database every DNS peer locates clients with (default: the shipped one).
_DNS_DATABASE: list[Path] = []


def dns_database() -> Path:
    if _DNS_DATABASE:
        return _DNS_DATABASE[0]
    return find_first(MMDB_CANDIDATES, MMDB_NAME)


def process_rss_mib(pid: int) -> float:
    """A process's resident set (VmRSS), MiB; 0 when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


class DnsPeer:
    name = "?"

    def __init__(self, workdir: Path, topology: Topology) -> None:
        self.workdir = workdir / self.name
        self.workdir.mkdir()
        self.topology = topology
        self.port = free_port()
        self.proc: Proc | None = None

    def start(self, processes: Processes, cpus: Cpus, installer: Installer) -> Proc:
        raise NotImplementedError


def meridian_dns_config(health_backend: str) -> dict[str, Any]:
    """demo.yaml as GeoDNS runs it in a benchmark: like the peers, every target stays up.

    ``health_backend`` (HOST:PORT of a live sample origin) takes the place of every region's
    backends: GeoDNS health-checks the regions behind ``origin.meridian.test``, and checks
    failing against demo ports where nothing listens would mark them down part-way through a
    run (a health change also empties GeoDNS's reply memo), which gdnsd and PowerDNS, checking
    nothing, never see."""
    data: dict[str, Any] = yaml.safe_load(DEMO_CONFIG.read_text())
    data.setdefault("geo", {})["database"] = str(dns_database())
    # A load generator on one address is one "client": the peers have no rate limit either.
    data["dns"]["rate_limit"] = {"enabled": False}
    for pop in data["pops"].values():
        pop.pop("health_url", None)  # no edge runs here; every POP counts as up, as in gdnsd
    for region in data["regions"].values():
        region["backends"] = [f"http://{health_backend}"]
    return data


class MeridianDns(DnsPeer):
    name = "meridian"
    #: HOST:PORT of the sample origin that answers the regions' health checks (run_dns sets it).
    health_backend = ""

    def start(self, processes: Processes, cpus: Cpus, installer: Installer) -> Proc:
        command = meridian_available("dns")
        data = meridian_dns_config(self.health_backend)
        config = self.workdir / "dns.yaml"
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        proc = processes.start(
            "meridian-dns", server_argv(command, config, self.port, free_port()), cpus.server
        )
        wait_until(dns_ready(self.port), proc, f"UDP {self.port}")
        return proc


class Gdnsd(DnsPeer):
    name = "gdnsd"

    def start(self, processes: Processes, cpus: Cpus, installer: Installer) -> Proc:
        gdnsd = installer.require("gdnsd")
        mmdb = dns_database()
        topo = self.topology
        pops = _default_first(topo.pops, topo.default_pop)
        regions = _default_first(topo.regions, topo.default_region)
        (self.workdir / "zones").mkdir()
        (self.workdir / "config").write_text(
            fill(
                (CONFIGS / "gdnsd" / "config").read_text(),
                {
                    "LISTEN": f"127.0.0.1:{self.port}",
                    "WORKDIR": str(self.workdir),
                    "MMDB": str(mmdb),
                    "POP_NAMES": ", ".join(s.name for s in pops),
                    "POP_COORDS": ", ".join(f"{s.name} => [{s.lat}, {s.lon}]" for s in pops),
                    "POP_ADDRESSES": ", ".join(f"{s.name} => {s.address}" for s in pops),
                    "REGION_NAMES": ", ".join(s.name for s in regions),
                    "REGION_COORDS": ", ".join(f"{s.name} => [{s.lat}, {s.lon}]" for s in regions),
                    "REGION_ADDRESSES": ", ".join(f"{s.name} => {s.address}" for s in regions),
                },
            )
        )
        (self.workdir / "zones" / "meridian.test").write_text(
            fill((CONFIGS / "gdnsd" / "zone").read_text(), {"SERIAL": str(topo.serial)})
        )
        proc = processes.start("gdnsd", [gdnsd, "-c", str(self.workdir), "start"], cpus.server)
        wait_until(dns_ready(self.port), proc, f"UDP {self.port}")
        return proc


class PowerDns(DnsPeer):
    name = "pdns"

    def start(self, processes: Processes, cpus: Cpus, installer: Installer) -> Proc:
        pdns = installer.require("pdns_server")
        if not _pdns_geoip_backend_present():
            installer.install("pdns-backend-geoip")
            if not _pdns_geoip_backend_present():
                raise Unavailable("pdns-backend-geoip installed but libgeoipbackend.so not found")
        mmdb = dns_database()
        (self.workdir / "geo-zones.yaml").write_text(
            fill(
                (CONFIGS / "pdns" / "geo-zones.yaml").read_text(),
                {"SERIAL": str(self.topology.serial), "RECORDS": self._records()},
            )
        )
        (self.workdir / "pdns.conf").write_text(
            fill(
                (CONFIGS / "pdns" / "pdns.conf").read_text(),
                {
                    "MMDB": str(mmdb),
                    "WORKDIR": str(self.workdir),
                    "ADDRESS": "127.0.0.1",
                    "PORT": str(self.port),
                },
            )
        )
        proc = processes.start("pdns", [pdns, f"--config-dir={self.workdir}"], cpus.server)
        wait_until(dns_ready(self.port), proc, f"UDP {self.port}")
        return proc

    def _records(self) -> str:
        """Nearest POP and region per country and continent, from the database's centroids."""
        centroids = find_first(CENTROIDS_CANDIDATES, "country_centroids.csv")
        by_continent: dict[str, list[tuple[float, float]]] = {}
        places: dict[str, tuple[float, float]] = {}
        with centroids.open(newline="") as f:
            for row in csv.DictReader(f):
                lat, lon = float(row["lat"]), float(row["lon"])
                places[row["iso_code"].lower()] = (lat, lon)
                by_continent.setdefault(row["continent_code"].lower(), []).append((lat, lon))
        for continent, points in by_continent.items():
            if continent not in places:  # continent-only ranges (EU, AP): the continent's mean
                places[continent] = (
                    statistics.fmean(p[0] for p in points),
                    statistics.fmean(p[1] for p in points),
                )
        lines: list[str] = []
        topo = self.topology
        for label, (lat, lon) in sorted(places.items()):
            lines.append(
                f"    {label}.api.meridian.test:\n      - a: {nearest(topo.pops, lat, lon).address}"
            )
            lines.append(
                f"    {label}.origin.meridian.test:\n"
                f"      - a: {nearest(topo.regions, lat, lon).address}"
            )
        default_pop = next(s for s in topo.pops if s.name == topo.default_pop)
        default_region = next(s for s in topo.regions if s.name == topo.default_region)
        lines.append(f"    default.api.meridian.test:\n      - a: {default_pop.address}")
        lines.append(f"    default.origin.meridian.test:\n      - a: {default_region.address}")
        return "\n".join(lines)


def _pdns_geoip_backend_present() -> bool:
    return (
        any(Path("/usr/lib").glob("*/pdns/libgeoipbackend.so"))
        or Path("/usr/lib/pdns/libgeoipbackend.so").exists()
    )


DNS_PEERS: dict[str, type[DnsPeer]] = {"meridian": MeridianDns, "gdnsd": Gdnsd, "pdns": PowerDns}


def run_dns(args: argparse.Namespace, report: Report, stack: ExitStack, workdir: Path) -> None:
    cpus = Cpus.detect()
    installer = Installer()
    processes = Processes(workdir)
    stack.callback(processes.stop_all)
    try:
        dnsperf = installer.require("dnsperf")
    except Unavailable as exc:
        report.skip("dns benchmark", f"dnsperf: {exc}")
        return
    topology = Topology.from_demo()
    if args.geo_db is not None:
        _DNS_DATABASE[:] = [args.geo_db]
    say(f"dns: {cpus.describe()}; geo database {dns_database()}")
    peers: list[DnsPeer] = []
    for name in args.peers_dns:
        peer = DNS_PEERS[name](workdir, topology)
        if isinstance(peer, MeridianDns):
            origin = start_origin(processes, cpus)  # answers the regions' health checks
            peer.health_backend = origin.addr
        try:
            peer.proc = peer.start(processes, cpus, installer)
        except Unavailable as exc:
            report.skip(f"{name} dns" if name == "meridian" else name, str(exc))
            continue
        say(f"started: {name} on 127.0.0.1:{peer.port} (udp)")
        peers.append(peer)
    if not peers:
        return

    # Same answers from every peer for the same clients, or the comparison means nothing.
    for name in ("api", "origin"):
        for address in PROBE_ADDRESSES:
            subnet = ipaddress.IPv4Network(f"{address}/24", strict=False)
            for peer in peers:
                try:
                    answer = udp_answer(peer.port, f"{name}.meridian.test", subnet)
                except OSError as exc:
                    answer = f"error: {exc}"
                report.probes.setdefault(f"{name} {address}/24", {})[peer.name] = answer

    repeating = {
        s.name: build_query_file(workdir, s, 0, args.duration)[0]
        for s in DNS_SCENARIOS
        if not s.once
    }
    for peer in peers:  # warm-up: caches, sockets, and any lazy start-up work
        run_dnsperf(dnsperf, peer.port, repeating["ecs-varied"], WARMUP_SECONDS, False, cpus)
    unique_start = UNIQUE_START
    for round_number in range(1, args.rounds + 1):
        for scenario in args.dns_scenarios:
            if scenario.once:
                # Fresh subnets each round, shared by the peers: no server sees one twice.
                query_file, unique_start = build_query_file(
                    workdir, scenario, unique_start, args.duration
                )
            else:
                query_file = repeating[scenario.name]
            for peer in peers:
                cpu_before = server_cpu(peer.proc)
                values = run_dnsperf(
                    dnsperf, peer.port, query_file, args.duration, scenario.once, cpus
                )
                values["cpu_us"] = per_unit_us(
                    server_cpu(peer.proc) - cpu_before, values.get("completed", 0.0)
                )
                if peer.proc is not None:
                    values["rss_mib"] = process_rss_mib(peer.proc.process.pid)
                report.measurements.append(
                    Measurement("dns", scenario.name, peer.name, round_number, values)
                )
                say(
                    f"  round {round_number} {scenario.name:11} {peer.name:9} "
                    f"{values['qps']:>9.0f} q/s  cpu {values['cpu_us']:5.1f} us/query  "
                    f"avg {values['latency_avg_ms']:.3f} ms  "
                    f"lost {values['lost']:.0f}  rss {values.get('rss_mib', 0.0):.0f} MiB"
                )
            if scenario.once:
                query_file.unlink()
    processes.stop_all()


# --------------------------------------------------------------------------------------------
# Tables


def http_table(report: Report, peers: Sequence[str], scenarios: Sequence[HttpScenario]) -> str:
    rows = [
        "| scenario | peer | encoding | cache | req/s | server CPU us/req | p50 ms | p99 ms "
        "| vs nginx | errors | origin req | hits (own metrics) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scenario in scenarios:
        base = report.medians(scenario.name, "nginx")
        for peer in peers:
            med = report.medians(scenario.name, peer)
            if med is None:
                reason = report.skipped.get(peer) or report.skipped.get(f"{peer} edge") or "not run"
                rows.append(
                    f"| {scenario.label} | {peer} | | | pending | | | | | | ({_short(reason)}) |"
                )
                continue
            probe = json.loads(report.probes.get(scenario.name, {}).get(peer, "{}"))
            end = json.loads(report.probes.get(f"{scenario.name}@end", {}).get(peer, "{}"))
            encoding, cache = probe.get("encoding", "?"), probe.get("cache", "?")
            if end and end.get("encoding", encoding) != encoding:
                encoding = f"{encoding} -> {end.get('encoding')}"
            if end and end.get("cache", cache) != cache:
                cache = f"{cache} / {end.get('cache')}"
            ratio = f"{med['rps'] / base['rps']:.2f}x" if base and base["rps"] else "-"
            hits = f"{med['hit_pct']:.1f}%" if "hit_pct" in med else "-"
            rows.append(
                f"| {scenario.label} | {peer} | {encoding} | {cache} | {med['rps']:,.0f} | "
                f"{med.get('cpu_us', 0.0):.1f} | {med['p50_ms']:.2f} | {med['p99_ms']:.2f} | "
                f"{ratio} | {med['errors']:.0f} | "
                f"{med['origin_requests']:,.0f} | {hits} |"
            )
    return "\n".join(rows)


def dns_table(report: Report, peers: Sequence[str], scenarios: Sequence[DnsScenario]) -> str:
    rows = [
        "| queries | server | q/s | server CPU us/query | avg latency ms | lost | NOERROR "
        "| vs gdnsd | vs pdns |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scenario in scenarios:
        base = report.medians(scenario.name, "gdnsd")
        pdns = report.medians(scenario.name, "pdns")
        for peer in peers:
            med = report.medians(scenario.name, peer)
            if med is None:
                reason = report.skipped.get(peer) or report.skipped.get(f"{peer} dns") or "not run"
                rows.append(
                    f"| {scenario.label} | {peer} | pending | | | | | ({_short(reason)}) | |"
                )
                continue
            ratio = f"{med['qps'] / base['qps']:.2f}x" if base and base["qps"] else "-"
            vs_pdns = f"{med['qps'] / pdns['qps']:.2f}x" if pdns and pdns["qps"] else "-"
            noerror = 100.0 * med["noerror"] / med["completed"] if med["completed"] else 0.0
            rows.append(
                f"| {scenario.label} | {peer} | {med['qps']:,.0f} | {med.get('cpu_us', 0.0):.1f} | "
                f"{med['latency_avg_ms']:.3f} | "
                f"{med['lost']:,.0f} | {noerror:.1f}% | {ratio} | {vs_pdns} |"
            )
    return "\n".join(rows)


def probe_table(report: Report, peers: Sequence[str]) -> str:
    present = [p for p in peers if any(p in v for v in report.probes.values())]
    if not present:
        return ""
    rows = [
        "| name, client subnet | " + " | ".join(present) + " |",
        "|---|" + "---|" * len(present),
    ]
    for where, answers in report.probes.items():
        rows.append(f"| {where} | " + " | ".join(answers.get(p, "-") for p in present) + " |")
    return "\n".join(rows)


def _short(text: str, limit: int = 60) -> str:
    text = text.replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="Measure Meridian against nginx/Varnish (http) and gdnsd/PowerDNS (dns).",
    )
    parser.add_argument("what", choices=("http", "dns", "all"))
    parser.add_argument("--duration", default="10s", help="each measured run (default 10s)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument(
        "--cache-mib",
        type=int,
        default=PEER_CACHE_MIB,
        help=f"http: each peer's cache size in MiB (default {PEER_CACHE_MIB}: every key fits); "
        "a small one with a long miss run shows whether memory levels off while it evicts",
    )
    parser.add_argument(
        "--peers",
        default="",
        help="comma-separated subset, e.g. nginx,varnish,gdnsd (default: all)",
    )
    parser.add_argument(
        "--scenarios", default="", help="comma-separated subset of scenario names (default: all)"
    )
    parser.add_argument(
        "--geo-db",
        type=Path,
        default=None,
        help="dns: the MaxMind database every peer uses (default: the shipped one); e.g. "
        "one written by python -m benchmarks.geodb_synth (PowerDNS's country records then "
        "no longer match: compare with --peers meridian,gdnsd)",
    )
    args = parser.parse_args(argv)
    args.duration = parse_duration(args.duration)
    if not 1 <= args.duration <= 600 or not 1 <= args.rounds <= 20:
        parser.error("--duration must be 1s..10m and --rounds 1..20")
    if not 1 <= args.connections <= 20_000:
        parser.error("--connections must be 1..20000")
    if not 1 <= args.cache_mib <= 65_536:
        parser.error("--cache-mib must be 1..65536")
    wanted = {p for p in args.peers.split(",") if p}
    unknown = wanted - set(HTTP_PEERS) - set(DNS_PEERS)
    if unknown:
        parser.error(f"unknown peers: {', '.join(sorted(unknown))}")
    args.peers_http = [p for p in HTTP_PEERS if (p in wanted if wanted else p not in OPT_IN_PEERS)]
    args.peers_dns = [p for p in DNS_PEERS if not wanted or p in wanted]
    names = {s for s in args.scenarios.split(",") if s}
    args.http_scenarios = [s for s in HTTP_SCENARIOS if not names or s.name in names]
    args.dns_scenarios = [s for s in DNS_SCENARIOS if not names or s.name in names]
    known = {s.name for s in HTTP_SCENARIOS} | {s.name for s in DNS_SCENARIOS}
    if names - known:
        parser.error(f"unknown scenarios: {', '.join(sorted(names - known))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_description()
    cpus = Cpus.detect()
    settings = {
        "duration_s": args.duration,
        "rounds": args.rounds,
        "connections": args.connections,
        "warmup_s": WARMUP_SECONDS,
        "pinning": cpus.describe(),
        "command": "python -m benchmarks.compare "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    say(
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"kernel {machine['kernel']}, {machine['date']}"
    )
    reports: list[Report] = []
    # Each part stops its own processes through its ExitStack, also on Ctrl-C.
    with tempfile.TemporaryDirectory(prefix="meridian-bench-") as tmp:
        workdir = Path(tmp)
        try:
            if args.what in ("http", "all"):
                report = Report("http", settings)
                reports.append(report)
                (workdir / "http").mkdir()
                with ExitStack() as http_stack:
                    run_http(args, report, http_stack, workdir / "http")
            if args.what in ("dns", "all"):
                report = Report("dns", settings)
                reports.append(report)
                (workdir / "dns").mkdir()
                with ExitStack() as dns_stack:
                    run_dns(args, report, dns_stack, workdir / "dns")
        except KeyboardInterrupt:
            say("interrupted: stopping everything")
            return 130
    versions = tool_versions(list(APT_PACKAGES))
    for report in reports:
        say("")
        if report.kind == "http":
            say(
                f"HTTP: wrk -t1 -c{args.connections}, {args.rounds} rounds x {args.duration:g}s, "
                f"median of rounds; {cpus.describe()}"
            )
            say(http_table(report, args.peers_http, args.http_scenarios))
        else:
            say(
                f"DNS: dnsperf -c{DNSPERF_CLIENTS} -q{DNSPERF_OUTSTANDING}, {args.rounds} rounds "
                f"x {args.duration:g}s, median of rounds; {cpus.describe()}"
            )
            say(dns_table(report, args.peers_dns, args.dns_scenarios))
            probes = probe_table(report, args.peers_dns)
            if probes:
                say("\nanswers by name and client subnet (must agree):")
                say(probes)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "versions": versions,
                    "settings": settings,
                    "reports": [
                        {
                            "kind": r.kind,
                            "skipped": r.skipped,
                            "probes": r.probes,
                            "measurements": [asdict(m) for m in r.measurements],
                        }
                        for r in reports
                    ],
                },
                indent=2,
            )
        )
        say(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
