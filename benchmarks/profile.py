"""Where the time goes on the hot paths: the edge's cache hit and GeoDNS's memoized answer.

    python -m benchmarks.profile edge|dns|all [--duration 10s] [--top 25] [--out DIR]

edge: the sample origin and ``python -m cProfile -o edge.prof -m edge ...`` (server core), then
      wrk ``-t1 -c64`` for ``--duration`` on each of: the 2 KB ticker hit (identity), the same
      with ``Accept-Encoding: gzip, deflate, br``, and the 50 KB depth hit (gzip).
dns:  ``python -m cProfile -o dns.prof -m geodns ...`` serving the demo zone, then dnsperf with
      10,000 ECS /24s repeating (the warm, memoized path) for ``--duration``.

The server is stopped with SIGTERM (it drains and returns, so cProfile writes its file), and
the top functions by own time (tottime) and by cumulative time are printed with pstats.
cProfile slows Python function calls by roughly 1.5-2x: the shares are what to read, not the
absolute rates.  Each load run holds ``/tmp/meridian-bench.lock``.
"""

from __future__ import annotations

import argparse
import io
import json
import pstats
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from benchmarks.compare import (
    DEMO_CONFIG,
    HTTP_SCENARIOS,
    PEER_CACHE_MIB,
    Cpus,
    DnsScenario,
    Installer,
    Processes,
    build_query_file,
    dns_ready,
    edge_cache_counts,
    fill_keys,
    free_port,
    meridian_dns_config,
    probe_http,
    run_dnsperf,
    run_wrk,
    say,
    server_argv,
    start_origin,
    tcp_accepts,
    wait_until,
    write_wrk_script,
)
from meridian.units import parse_duration

HIT_SCENARIOS = ("ticker-identity", "ticker-br", "depth-gzip")


def _stop_and_wait(processes: Processes, proc: Any, path: Path) -> None:
    """SIGTERM via the normal stop (the server drains and exits); the profile must exist."""
    processes.stop(proc)
    end = time.monotonic() + 10
    while not path.exists() and time.monotonic() < end:
        time.sleep(0.1)
    if not path.exists():
        raise RuntimeError(f"{path} not written: {proc.log_tail()}")


def top_costs(path: Path, top: int, unit: str) -> dict[str, Any]:
    """Top functions by own and cumulative time; ``unit`` names the function called once per
    request or query (its call count divides the times into microseconds per request)."""
    stats = pstats.Stats(str(path))
    total = stats.total_tt  # type: ignore[attr-defined]
    rows: list[dict[str, Any]] = []
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    requests = max(
        (nc for (filename, _, func), (_, nc, _, _, _) in raw.items() if func == unit), default=0
    )
    per = 1e6 / max(requests, 1)
    for (filename, line, func), (cc, nc, tt, ct, _) in raw.items():
        rows.append(
            {
                "function": f"{_short_path(filename)}:{line}({func})",
                "calls": nc,
                "primitive_calls": cc,
                "tottime_s": tt,
                "cumtime_s": ct,
                "calls_per_request": nc / max(requests, 1),
                "own_us_per_request": tt * per,
                "cum_us_per_request": ct * per,
            }
        )
    by_own = sorted(rows, key=lambda r: r["tottime_s"], reverse=True)[:top]
    by_cum = sorted(rows, key=lambda r: r["cumtime_s"], reverse=True)[:top]
    text = io.StringIO()
    pstats.Stats(str(path), stream=text).sort_stats("tottime").print_stats(top)
    return {
        "total_s": total,
        "requests": requests,
        "total_us_per_request": total * per,
        "calls_per_request": sum(r["calls"] for r in rows) / max(requests, 1),
        "by_tottime": by_own,
        "by_cumtime": by_cum,
        "pstats": text.getvalue(),
    }


def cost_table(part: dict[str, Any], top: int) -> str:
    lines = [
        f"{part['requests']:,} requests; {part['total_us_per_request']:.1f} us and "
        f"{part['calls_per_request']:.0f} profiled calls per request (cProfile on)",
        f"{'own us/req':>10} {'cum us/req':>10} {'calls/req':>9}  function",
    ]
    for row in part["by_tottime"][:top]:
        lines.append(
            f"{row['own_us_per_request']:>10.2f} {row['cum_us_per_request']:>10.2f} "
            f"{row['calls_per_request']:>9.2f}  {row['function']}"
        )
    return "\n".join(lines)


def _short_path(filename: str) -> str:
    for marker in ("/site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def profile_edge(
    args: argparse.Namespace, processes: Processes, cpus: Cpus, workdir: Path
) -> dict[str, Any]:
    wrk = Installer().require("wrk")
    origin = start_origin(processes, cpus)
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    for region in data["regions"].values():
        region["backends"] = [f"http://{origin.addr}"]
    data["edge"]["cache"]["memory"] = f"{PEER_CACHE_MIB}MiB"  # (f)'s keys all fit
    config = workdir / "edge.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    port, admin = free_port(), free_port()
    out = args.out / "edge.prof"
    out.unlink(missing_ok=True)
    profiled = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "edge"]
    proc = processes.start("edge-profiled", server_argv(profiled, config, port, admin), cpus.server)
    wait_until(tcp_accepts(port), proc, f"TCP {port}")
    runs: dict[str, Any] = {}
    scenarios = [s for s in HTTP_SCENARIOS if s.name in args.scenarios]
    for scenario in scenarios:
        script = write_wrk_script(workdir, scenario, "profile")
        if scenario.keys:
            filled = fill_keys(wrk, port, scenario, workdir, cpus, 64)
            say(f"  {scenario.name:16} {scenario.keys:,} keys filled in {filled:.0f} s")
        probe = probe_http(port, scenario)
        before = edge_cache_counts(admin)
        values = run_wrk(wrk, port, script, args.duration, 64, cpus)
        after = edge_cache_counts(admin)
        total = sum(after.values()) - sum(before.values())
        values["hit_pct"] = 100.0 * (after.get("HIT", 0) - before.get("HIT", 0)) / max(total, 1)
        runs[scenario.name] = {"probe": probe, **values}
        say(
            f"  {scenario.name:16} (profiled) {values['rps']:>8,.0f} req/s  "
            f"hit {values['hit_pct']:.1f}%  encoding {probe['encoding']}  cache {probe['cache']}"
        )
    _stop_and_wait(processes, proc, out)
    processes.stop(origin.proc)
    return {"runs": runs, **top_costs(out, args.top, "data_received")}


def profile_dns(
    args: argparse.Namespace, processes: Processes, cpus: Cpus, workdir: Path
) -> dict[str, Any]:
    dnsperf = Installer().require("dnsperf")
    origin = start_origin(processes, cpus)  # answers the regions' health checks
    data = meridian_dns_config(origin.addr)
    config = workdir / "dns.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    port = free_port()
    out = args.out / "dns.prof"
    out.unlink(missing_ok=True)
    profiled = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "geodns"]
    proc = processes.start(
        "dns-profiled", server_argv(profiled, config, port, free_port()), cpus.server
    )
    wait_until(dns_ready(port), proc, f"UDP {port}")
    varied = DnsScenario("ecs-varied", "ECS varied", once=False)
    query_file, _ = build_query_file(workdir, varied, 0, args.duration)
    run_dnsperf(dnsperf, port, query_file, 2, False, cpus)  # warm: every subnet seen once
    values = run_dnsperf(dnsperf, port, query_file, args.duration, False, cpus)
    say(f"  ecs-varied (profiled) {values['qps']:>8,.0f} q/s  lost {values['lost']:.0f}")
    _stop_and_wait(processes, proc, out)
    return {"run": values, **top_costs(out, args.top, "handle_datagram")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("what", choices=("edge", "dns", "all"))
    parser.add_argument("--duration", default="10s", help="each load run (default 10s)")
    parser.add_argument("--top", type=int, default=25, help="functions listed (default 25)")
    parser.add_argument(
        "--scenarios",
        default=",".join(HIT_SCENARIOS),
        help=f"edge: comma-separated hit scenarios (default {','.join(HIT_SCENARIOS)})",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/profile"))
    args = parser.parse_args(argv)
    args.duration = parse_duration(args.duration)
    args.scenarios = tuple(name for name in args.scenarios.split(",") if name)
    known = {s.name for s in HTTP_SCENARIOS}
    if unknown := [name for name in args.scenarios if name not in known]:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    if not 1 <= args.duration <= 120:
        parser.error("--duration must be 1s..2m")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    cpus = Cpus.detect()
    say(f"profile: {cpus.describe()}; profiles in {args.out}")
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="meridian-profile-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        processes = Processes(workdir)
        stack.callback(processes.stop_all)
        if args.what in ("edge", "all"):
            result["edge"] = profile_edge(args, processes, cpus, workdir)
        if args.what in ("dns", "all"):
            result["dns"] = profile_dns(args, processes, cpus, workdir)
    for name, part in result.items():
        say(f"\n== {name}: top {args.top} by own time, per request (warm-up included) ==")
        say(cost_table(part, args.top))
    summary = {k: {kk: vv for kk, vv in v.items() if kk != "pstats"} for k, v in result.items()}
    (args.out / "profile.json").write_text(json.dumps(summary, indent=2))
    say(f"wrote {args.out / 'profile.json'} and the .prof files (python -m pstats FILE)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
