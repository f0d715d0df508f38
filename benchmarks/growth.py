"""Growth figures (issue 8): how Meridian holds up as the cache, the connection count and the
zone grow.

    python -m benchmarks.growth keys|connections|dns|all [--duration 5s] [--rounds 2]
                                [--keys 1000,100000,1000000] [--fill-budget 900s]
                                [--conns 100,1000,10000] [--names 10,10000] [--json FILE]

keys: one edge (cache rule forcing a 1 h TTL on the ticker, so nothing expires) is filled
      with distinct query strings (``?k=1..N``, wrk) through ``FixedOrigin`` (pre-built 2 KB
      answers: the fill runs at the edge's miss rate, about 1,200-2,000 misses/s on one core),
      level after level, until the edge's ``meridian_cache_entries`` reaches N; at each level
      wrk hits keys picked at random among the N cached ones, and the edge's RSS is read from
      /proc.  Memory per cached object = RSS growth / keys added (after the fill, before the
      hits: a hit adds the entry's pre-built response, about the body's size again).  The fill
      of a level stops at ``--fill-budget``: the level then reports the keys it reached.
connections: identity hits of one key with wrk ``-c 100/1000/10000`` (one thread, keep-alive),
      Meridian and nginx interleaved; RLIMIT_NOFILE is raised to its hard limit first.
dns:  Meridian GeoDNS serving a generated zone of 10 or 10,000 names (every name nearest-POP),
      dnsperf over the same number of distinct queries (10,000 ECS /24s spread over the names),
      and the same names without ECS; servers interleaved per round.

Loopback only; servers on the first core, load on the other; each load run holds
``/tmp/meridian-bench.lock``; every process started is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import re
import resource
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from email.utils import formatdate
from pathlib import Path
from typing import Any, cast

import yaml

from benchmarks.compare import (
    CONFIGS,
    DEMO_CONFIG,
    REPO,
    Cpus,
    HttpScenario,
    Installer,
    Nginx,
    Origin,
    Proc,
    Processes,
    Topology,
    Unavailable,
    _framed,
    cache_shares,
    dns_query,
    dns_ready,
    edge_cache_counts,
    free_port,
    http_get,
    machine_description,
    meridian_available,
    meridian_dns_config,
    public_blocks,
    run_dnsperf,
    run_wrk,
    say,
    server_argv,
    shares_text,
    start_origin,
    tcp_accepts,
    wait_until,
    write_query_file,
    write_wrk_script,
)
from meridian.units import parse_duration

TICKER = "/api/v1/ticker/BTC-USD"
_CACHE_ENTRIES = re.compile(r"^meridian_cache_entries ([0-9.e+]+)$", re.MULTILINE)
#: The fixed origin's body: a ticker-like JSON document of about 2 KB (the sample origin's
#: ticker is 1,962 bytes).
FIXED_BODY = (
    json.dumps(
        {
            "symbol": "BTC-USD",
            "status": "trading",
            "book": [{"price": f"{68000 + i}.25", "size": f"0.{i:08d}"} for i in range(47)],
        },
        separators=(",", ":"),
    ).encode()
    + b"\n"
)
#: wrk connections of a key fill run, and how many keys a run re-requests from the previous
#: one's end (any hole left by the requests in flight when it stopped is below that).
FILL_CONNECTIONS = 64
FILL_OVERLAP = 4 * FILL_CONNECTIONS
#: Distinct queries in each DNS growth run, whatever the zone size.
DNS_DISTINCT = 10_000


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; children (servers, wrk) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no VmRSS for {pid}")


def start_edge(
    processes: Processes, cpus: Cpus, workdir: Path, origin: Origin, *, long_ttl: bool
) -> tuple[Proc, int, int]:
    """The Meridian edge in front of ``origin``; with ``long_ttl`` the ticker is kept 1 h and
    the cache may hold several GiB (for the key-count levels).  Returns (proc, port, admin)."""
    command = meridian_available("edge")
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    for region in data["regions"].values():
        region["backends"] = [f"http://{origin.addr}"]
    if long_ttl:
        cache = data["edge"]["cache"]
        cache["memory"] = "12GiB"
        cache["rules"] = [
            {"path_prefix": "/api/v1/ticker/", "ttl": "1h", "force_ttl": True},
            *cache["rules"],
        ]
    port, admin = free_port(), free_port()
    config = workdir / f"edge-{port}.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    proc = processes.start(
        f"meridian-edge-{port}", server_argv(command, config, port, admin), cpus.server
    )
    wait_until(tcp_accepts(port), proc, f"TCP {port}")
    return proc, port, admin


class FixedOrigin(asyncio.Protocol):
    """An origin that costs next to nothing: every request (GET, keep-alive, pipelined or not)
    is answered with the same pre-built 200 (``FIXED_BODY``, ``Cache-Control: public,
    max-age=3600``, a current Date).  The key-count fill runs through it, so the fill rate is
    the edge's miss rate rather than the sample origin's (aiohttp, sharing a core with wrk)."""

    response = b""
    second = -1

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    @classmethod
    def current(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:  # Date changes once a second: rebuild the bytes then
            cls.second = now
            date = formatdate(now, usegmt=True).encode()
            cls.response = (
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b'cache-control: public, max-age=3600\r\netag: "fixed-2k"\r\n'
                b"last-modified: Sat, 21 Nov 2026 00:00:00 GMT\r\ndate: %s\r\n"
                b"content-length: %d\r\n\r\n%s" % (date, len(FIXED_BODY), FIXED_BODY)
            )
        return cls.response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        complete = buffer.count(b"\r\n\r\n")  # requests without bodies: GET only
        if complete and self.transport is not None:
            self.transport.write(self.current() * complete)
            buffer = buffer[buffer.rindex(b"\r\n\r\n") + 4 :]
        self.buffer = buffer


def serve_fixed_origin(port: int, seconds: float) -> int:
    """Run ``FixedOrigin`` on 127.0.0.1:port for at most ``seconds`` (a bounded process even if
    nobody stops it), printing one ``listening`` line once it accepts."""

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(FixedOrigin, "127.0.0.1", port, backlog=1024)
        print(f"event=listening addr=127.0.0.1:{port}", flush=True)
        async with server:
            await asyncio.sleep(seconds)

    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:  # pragma: no cover - uvloop is a dependency of the edge
        asyncio.run(serve())
    return 0


def fixed_origin_command(port: int, lifetime: float) -> list[str]:
    """The command line of a ``FixedOrigin`` process on ``port`` that exits after ``lifetime``."""
    return [
        sys.executable,
        "-c",
        "import sys; sys.path.insert(0, sys.argv[1]); from benchmarks.growth import main; "
        "raise SystemExit(main(sys.argv[2:]))",
        str(REPO),
        "origin",
        "--port",
        str(port),
        "--lifetime",
        f"{lifetime:.0f}s",
    ]


def start_fixed_origin(processes: Processes, cpus: Cpus, lifetime: float) -> Origin:
    """``FixedOrigin`` in its own process, on the load core (next to wrk: it costs little)."""
    port = free_port()
    proc = processes.start(f"fixed-origin-{port}", fixed_origin_command(port, lifetime), cpus.load)
    wait_until(tcp_accepts(port), proc, f"TCP {port}")
    return Origin(proc, port)


def edge_cache_entries(admin_port: int) -> int:
    """The edge's L1 entry count (``meridian_cache_entries``, from its /metrics)."""
    status, body, _ = http_get(admin_port, "/metrics")
    match = _CACHE_ENTRIES.search(body.decode()) if status == 200 else None
    if match is None:
        raise OSError(f"/metrics answered {status} without meridian_cache_entries")
    return int(float(match.group(1)))


def wrk_keys_script(workdir: Path, name: str, first: int, last: int, *, sequential: bool) -> Path:
    """wrk script over ``?k=first..last``: in order once (fill), or uniformly at random (hits)."""
    script = workdir / f"wrk-{name}.lua"
    if sequential:
        # Keys in order, wrapping round (never past ``last``); the thread stops once every key
        # of the range has been answered.
        pick = "local k = first + counter % (last - first + 1)\n  counter = counter + 1"
        stop = f"""response = function(status, headers, body)
  answered = answered + 1
  if answered >= {last - first + 1} then wrk.thread:stop() end
end
"""
    else:
        pick = "local k = math.random(first, last)"
        stop = ""
    lua = (CONFIGS / "wrk.lua").read_text()
    done = lua[lua.index("done = function") :]
    script.write_text(
        f"""wrk.method = "GET"
local first, last = {first}, {last}
counter = 0
answered = 0
math.randomseed(os.time())
request = function()
  {pick}
  return wrk.format(nil, "{TICKER}?k=" .. k)
end
{stop}{done}"""
    )
    return script


# --------------------------------------------------------------------------------------------
# Keys


def run_keys(
    args: argparse.Namespace, processes: Processes, cpus: Cpus, workdir: Path, wrk: str
) -> dict[str, Any]:
    # The origin lives (at most) as long as the whole run can: every level's fill budget and
    # measured rounds, plus slack.
    lifetime = len(args.keys) * (args.fill_budget + args.rounds * (args.duration + 60) + 120)
    origin = start_fixed_origin(processes, cpus, lifetime)
    proc, port, admin = start_edge(processes, cpus, workdir, origin, long_ttl=True)
    pid = proc.process.pid
    time.sleep(1.0)
    base_rss = rss_mib(pid)
    say(f"keys: edge pid {pid} on 127.0.0.1:{port}, RSS at start {base_rss:.1f} MiB")
    levels: list[dict[str, float]] = []
    filled = 0
    rate = 500.0  # misses/s, until measured
    for target in args.keys:
        counts_before = edge_cache_counts(admin)
        # wrk runs (-c64 keep-alive) over the keys in order, each sized from the miss rate so
        # far (wrk's thread stops sending once its range is answered, but the run lasts its
        # -d), until the edge holds ``target`` entries or the fill budget is spent.  Progress is
        # the edge's own entry count (``meridian_cache_entries``), not a count of misses.  A
        # run cut by its -d may leave holes among its last requests in flight (at most
        # FILL_CONNECTIONS keys), so the next run starts FILL_OVERLAP keys back (hits, cheap).
        spent = 0.0
        while filled < target and spent < args.fill_budget:
            # At most 30 s a run: the rate estimate improves, and others get the lock between.
            seconds = min(args.fill_budget - spent, 30.0, max(2.0, (target - filled) / rate * 1.1))
            first = max(1, filled + 1 - FILL_OVERLAP)
            script = wrk_keys_script(workdir, "fill", first, target, sequential=True)
            values = run_wrk(wrk, port, script, seconds, FILL_CONNECTIONS, cpus)
            spent += values["duration_s"]
            entries = edge_cache_entries(admin)
            rate = max(50.0, (entries - filled) / values["duration_s"])
            stalled = entries <= filled
            filled = min(target, entries)
            say(f"  fill: {filled:,} keys ({rate:,.0f} new entries/s)")
            if stalled:
                # Nothing new: the keys still missing are holes below this run's range (a
                # failed fetch, say).  The level stays at what the edge holds; the hit rounds
                # show any such key as a MISS.
                say(f"  fill: no new entries; the level holds {filled:,} keys")
                break
        counts = edge_cache_counts(admin)
        misses = counts.get("MISS", 0.0) - counts_before.get("MISS", 0.0)
        fill_seconds = spent
        time.sleep(1.0)
        rss = rss_mib(pid)
        script = wrk_keys_script(workdir, f"hit-{filled}", 1, filled, sequential=False)
        rounds = []
        for _ in range(args.rounds):
            before = edge_cache_counts(admin)
            values = run_wrk(wrk, port, script, args.duration, 64, cpus)
            after = edge_cache_counts(admin)
            total = sum(after.values()) - sum(before.values())
            values["hit_pct"] = (
                100.0 * (after.get("HIT", 0.0) - before.get("HIT", 0.0)) / total if total else 0.0
            )
            rounds.append(values)
        rps = sorted(r["rps"] for r in rounds)[len(rounds) // 2]
        level = {
            "target_keys": float(target),
            "keys": float(filled),
            "fill_seconds": fill_seconds,
            "fill_misses": misses,
            "rss_mib": rss,
            "rss_growth_mib": rss - base_rss,
            "bytes_per_object": (rss - base_rss) * 2**20 / filled if filled else 0.0,
            "hit_rps": rps,
            "hit_p50_ms": sorted(r["p50_ms"] for r in rounds)[len(rounds) // 2],
            "hit_p99_ms": sorted(r["p99_ms"] for r in rounds)[len(rounds) // 2],
            "hit_pct": min(r["hit_pct"] for r in rounds),
            "errors": sum(r["errors"] for r in rounds),
        }
        levels.append(level)
        say(
            f"  {filled:>9,} keys: RSS {rss:,.0f} MiB (+{level['rss_growth_mib']:,.0f}), "
            f"{level['bytes_per_object']:,.0f} B/object, hits {rps:,.0f} req/s "
            f"p99 {level['hit_p99_ms']:.2f} ms, hit ratio {level['hit_pct']:.1f}%"
        )
        if filled < target and fill_seconds >= args.fill_budget:
            say(f"  fill budget ({args.fill_budget:g}s) reached at {filled:,} of {target:,} keys")
            break
    processes.stop(proc)
    processes.stop(origin.proc)
    return {"base_rss_mib": base_rss, "levels": levels}


# --------------------------------------------------------------------------------------------
# Connections


def run_connections(
    args: argparse.Namespace, processes: Processes, cpus: Cpus, workdir: Path, wrk: str
) -> dict[str, Any]:
    installer = Installer()
    origin = start_origin(processes, cpus)
    servers: dict[str, int] = {}
    _, port, admin = start_edge(processes, cpus, workdir, origin, long_ttl=False)
    servers["meridian"] = port
    try:
        nginx = Nginx(workdir, origin, Topology.from_demo())
        nginx.start(processes, cpus, installer)
        servers["nginx"] = nginx.port
    except Unavailable as exc:
        say(f"skipped: nginx not available: {exc}")
    scenario = HttpScenario("ticker-identity", "identity hit", TICKER, {})
    script = write_wrk_script(workdir, scenario, "conns")
    for port_ in servers.values():  # warm-up
        run_wrk(wrk, port_, script, 2, 100, cpus)
    rows: list[dict[str, Any]] = []
    for round_number in range(1, args.rounds + 1):
        for connections in args.conns:
            for name, port_ in servers.items():
                before = edge_cache_counts(admin) if name == "meridian" else None
                # Opening 10,000 connections takes wrk a moment: a longer run keeps that small.
                seconds = args.duration * (2 if connections >= 5000 else 1)
                values = run_wrk(wrk, port_, script, seconds, connections, cpus)
                shares = ""
                if before is not None:
                    shares = shares_text(cache_shares(before, edge_cache_counts(admin)))
                rows.append(
                    {
                        "server": name,
                        "connections": connections,
                        "round": round_number,
                        "cache_shares": shares,
                        **values,
                    }
                )
                say(
                    f"  round {round_number} c={connections:<6} {name:9} {values['rps']:>9,.0f} "
                    f"req/s  p50 {values['p50_ms']:.2f} ms  p99 {values['p99_ms']:.2f} ms  "
                    f"errors {values['errors']:.0f}  {shares}"
                )
    if "nginx" in servers:
        shutil_rmtree(nginx.cache_dir)
    processes.stop_all()
    return {"servers": list(servers), "rows": rows}


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# DNS


def dns_config(workdir: Path, names: int, health_backend: str) -> Path:
    data = meridian_dns_config(health_backend)
    generated = {f"n{i:05d}": {"targets": "pops", "answers": 1} for i in range(names)}
    data["dns"]["names"] = {**data["dns"]["names"], **generated}
    path = workdir / f"dns-{names}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def dns_queries(workdir: Path, names: int, ecs: bool) -> Path:
    """DNS_DISTINCT distinct queries over ``names`` generated names (with ECS: the distinct
    /24s spread over the names; without: the names repeated)."""
    path = workdir / f"q-{names}-{'ecs' if ecs else 'plain'}.bin"
    blocks, _ = public_blocks(0, DNS_DISTINCT)
    rng = random.Random(7)
    order = list(range(DNS_DISTINCT))
    rng.shuffle(order)

    def records() -> Iterator[bytes]:
        for i in order:
            name = f"n{i % names:05d}.meridian.test"
            if ecs:
                block = blocks[i]
                subnet = ipaddress.IPv4Network(((block << 8), 24))
                yield _framed(dns_query(name, subnet))
            else:
                yield _framed(dns_query(name, None))

    write_query_file(path, records())
    return path


def run_dns_growth(
    args: argparse.Namespace, processes: Processes, cpus: Cpus, workdir: Path, dnsperf: str
) -> dict[str, Any]:
    command = meridian_available("dns")
    origin = start_origin(processes, cpus)  # answers the regions' health checks
    servers: dict[int, int] = {}
    for names in args.names:
        port = free_port()
        proc = processes.start(
            f"meridian-dns-{names}",
            [
                *command,
                "--config",
                str(dns_config(workdir, names, origin.addr)),
                "--pop",
                "iad",
                "--listen",
                f"127.0.0.1:{port}",
                "--admin",
                f"127.0.0.1:{free_port()}",
            ],
            cpus.server,
        )
        wait_until(dns_ready(port), proc, f"UDP {port}", deadline=120)
        servers[names] = port
        say(f"dns: {names:,} names on 127.0.0.1:{port}, RSS {rss_mib(proc.process.pid):.0f} MiB")
    files = {(n, e): dns_queries(workdir, n, e) for n in args.names for e in (False, True)}
    for (names, _ecs), query_file in files.items():  # warm-up: every distinct query seen once
        run_dnsperf(dnsperf, servers[names], query_file, 2, False, cpus)
    rows: list[dict[str, Any]] = []
    for round_number in range(1, args.rounds + 1):
        for ecs in (False, True):
            for names, port in servers.items():
                values = run_dnsperf(dnsperf, port, files[(names, ecs)], args.duration, False, cpus)
                rows.append({"names": names, "ecs": ecs, "round": round_number, **values})
                say(
                    f"  round {round_number} {'ECS' if ecs else 'plain':5} names={names:<6} "
                    f"{values['qps']:>9,.0f} q/s  avg {values['latency_avg_ms']:.3f} ms  "
                    f"lost {values['lost']:.0f}"
                )
    processes.stop_all()
    return {"distinct_queries": DNS_DISTINCT, "rows": rows}


# --------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.growth", description=__doc__)
    parser.add_argument("what", choices=("keys", "connections", "dns", "all", "origin"))
    parser.add_argument("--duration", default="5s", help="each measured run (default 5s)")
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds (default 2)")
    parser.add_argument("--keys", default="1000,100000,1000000", help="cached-key levels")
    parser.add_argument(
        "--fill-budget", default="900s", help="longest fill of one key level (default 900s)"
    )
    parser.add_argument("--conns", default="100,1000,10000", help="wrk connection levels")
    parser.add_argument("--names", default="10,10000", help="zone sizes (names)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    # ``origin`` is internal: the fixed origin the keys fill runs through (``FixedOrigin``).
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--lifetime", default="1h", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.duration = parse_duration(args.duration)
    args.fill_budget = parse_duration(args.fill_budget)
    args.lifetime = parse_duration(args.lifetime)
    args.keys, args.conns, args.names = _ints(args.keys), _ints(args.conns), _ints(args.names)
    if not 1 <= args.duration <= 120 or not 1 <= args.rounds <= 10:
        parser.error("--duration must be 1s..2m and --rounds 1..10")
    if not 1 <= args.fill_budget <= 1800:
        parser.error("--fill-budget must be 1s..30m")
    if any(not 1 <= k <= 10_000_000 for k in args.keys) or args.keys != sorted(args.keys):
        parser.error("--keys: ascending levels of 1..10,000,000")
    if any(not 1 <= c <= 15_000 for c in args.conns):
        parser.error("--conns: 1..15000 each")
    if any(not 1 <= n <= 100_000 for n in args.names):
        parser.error("--names: 1..100000 each")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.what == "origin":
        return serve_fixed_origin(args.port, args.lifetime)
    nofile = raise_nofile()
    cpus = Cpus.detect()
    machine = machine_description()
    say(f"machine: {machine['cpu']}, {machine['cores']} cores, kernel {machine['kernel']}")
    say(f"{cpus.describe()}; open files limit {nofile}")
    installer = Installer()
    result: dict[str, Any] = {
        "machine": machine,
        "command": "python -m benchmarks.growth "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "pinning": cpus.describe(),
        "nofile": nofile,
    }
    if max(args.conns) + 100 > nofile:
        say(f"warning: open files limit {nofile} is below {max(args.conns)} connections")
    with tempfile.TemporaryDirectory(prefix="meridian-growth-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        processes = Processes(workdir)
        stack.callback(processes.stop_all)
        try:
            if args.what in ("keys", "connections", "all"):
                wrk = installer.require("wrk")
                if args.what in ("keys", "all"):
                    result["keys"] = run_keys(args, processes, cpus, workdir, wrk)
                if args.what in ("connections", "all"):
                    result["connections"] = run_connections(args, processes, cpus, workdir, wrk)
            if args.what in ("dns", "all"):
                dnsperf = installer.require("dnsperf")
                result["dns"] = run_dns_growth(args, processes, cpus, workdir, dnsperf)
        except KeyboardInterrupt:
            say("interrupted: stopping everything")
            return 130
    say("")
    say(tables(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        say(f"\nwrote {args.json}")
    return 0


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return (
        ordered[len(ordered) // 2]
        if len(ordered) % 2
        else sum(ordered[len(ordered) // 2 - 1 : len(ordered) // 2 + 1]) / 2
    )


def tables(result: dict[str, Any]) -> str:
    out: list[str] = []
    if "keys" in result:
        out += [
            "cached keys (identity ticker, 1 h TTL; hits over random keys, wrk -t1 -c64):",
            "| keys cached | fill s | RSS MiB | RSS growth MiB | bytes/object | hit req/s "
            "| p50 ms | p99 ms | hit ratio |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for lv in result["keys"]["levels"]:
            out.append(
                f"| {lv['keys']:,.0f} | {lv['fill_seconds']:.0f} | {lv['rss_mib']:,.0f} | "
                f"{lv['rss_growth_mib']:,.0f} | {lv['bytes_per_object']:,.0f} | "
                f"{lv['hit_rps']:,.0f} | {lv['hit_p50_ms']:.2f} | {lv['hit_p99_ms']:.2f} | "
                f"{lv['hit_pct']:.1f}% |"
            )
        out.append("")
    if "connections" in result:
        rows = result["connections"]["rows"]
        out += [
            "concurrent keep-alive connections (identity ticker hit, wrk -t1 -cN, median):",
            "| connections | server | req/s | p50 ms | p99 ms | errors | vs nginx |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for c in sorted({r["connections"] for r in rows}):
            base = _median(
                [r["rps"] for r in rows if r["connections"] == c and r["server"] == "nginx"]
                or [0.0]
            )
            for server in result["connections"]["servers"]:
                sel = [r for r in rows if r["connections"] == c and r["server"] == server]
                rps = _median([r["rps"] for r in sel])
                ratio = f"{rps / base:.2f}x" if base else "-"
                p50 = _median([r["p50_ms"] for r in sel])
                out.append(
                    f"| {c:,} | {server} | {rps:,.0f} | {p50:.2f} | "
                    f"{_median([r['p99_ms'] for r in sel]):.2f} | "
                    f"{sum(r['errors'] for r in sel):,.0f} | {ratio} |"
                )
        out.append("")
    if "dns" in result:
        rows = result["dns"]["rows"]
        out += [
            f"zone size (Meridian GeoDNS, {result['dns']['distinct_queries']:,} distinct queries "
            "repeating, median):",
            "| names | queries | q/s | avg latency ms | lost |",
            "|---:|---|---:|---:|---:|",
        ]
        for ecs in (False, True):
            for names in sorted({r["names"] for r in rows}):
                sel = [r for r in rows if r["names"] == names and r["ecs"] == ecs]
                out.append(
                    f"| {names:,} | {'ECS /24 varied' if ecs else 'no ECS'} | "
                    f"{_median([r['qps'] for r in sel]):,.0f} | "
                    f"{_median([r['latency_avg_ms'] for r in sel]):.3f} | "
                    f"{sum(r['lost'] for r in sel):,.0f} |"
                )
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
