"""The benchmark runners' own pieces: what they measure with and how they report it (the load
runs themselves are in benchmarks/, not in the test suite)."""

from __future__ import annotations

import http.client
import ipaddress
import select
import subprocess
import sys
from pathlib import Path

import dns.edns
import dns.message

from benchmarks.compare import (
    HTTP_SCENARIOS,
    Measurement,
    Report,
    dns_query,
    http_table,
    per_unit_us,
    session_cpu_seconds,
    session_cpu_split,
)
from tests.edge_support import ROOT, Origin, processes

BURN = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"


def test_session_cpu_counts_every_process_of_the_session() -> None:
    # A parent that burns 0.3 s and a child in the same session that burns 0.3 s more.
    child = BURN + "import time; time.sleep(30)\n"
    script = (
        f"import subprocess, sys, time\n{BURN}"
        f"subprocess.Popen([sys.executable, '-c', {child!r}])\ntime.sleep(30)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = 50
        seen = 0.0
        for _ in range(deadline):
            seen = session_cpu_seconds(process.pid)
            if seen >= 0.55:
                break
            subprocess.run(["sleep", "0.1"], check=True)
        assert 0.55 <= seen < 5.0
        user, system = session_cpu_split(process.pid)  # BURN's clock reads are system time
        assert user > 0 and system > 0 and user + system >= seen
        assert session_cpu_seconds(2**22 + 12345) == 0.0  # no such session
    finally:
        subprocess.run(["pkill", "-KILL", "-s", str(process.pid)], check=False)
        process.wait(timeout=10)


def test_per_unit_microseconds() -> None:
    assert per_unit_us(0.5, 100_000) == 5.0
    assert per_unit_us(1.0, 0) == 0.0


def test_dns_query_carries_the_client_subnet() -> None:
    wire = dns_query("api.meridian.test", ipaddress.ip_network("203.0.113.0/24"), query_id=7)
    message = dns.message.from_wire(wire)
    assert message.id == 7 and str(message.question[0].name) == "api.meridian.test."
    (option,) = message.options
    assert isinstance(option, dns.edns.ECSOption)
    assert (option.address, option.srclen, option.scopelen) == ("203.0.113.0", 24, 0)
    assert dns.message.from_wire(dns_query("api.meridian.test", None)).options == ()


def test_http_table_reports_medians_cpu_and_the_ratio_to_nginx() -> None:
    report = Report("http", {})
    scenario = HTTP_SCENARIOS[0]
    for round_number, (ours, theirs) in enumerate(((40_000, 20_000), (50_000, 25_000), (1, 1))):
        for peer, rps in (("meridian", ours), ("nginx", theirs)):
            values = {
                "rps": float(rps),
                "cpu_us": 20.0,
                "p50_ms": 1.0,
                "p99_ms": 2.0,
                "errors": 0.0,
                "origin_requests": 3.0,
            }
            report.measurements.append(
                Measurement("http", scenario.name, peer, round_number, values)
            )
    table = http_table(report, ["meridian", "nginx", "varnish"], [scenario])
    meridian_row = next(line for line in table.splitlines() if "| meridian |" in line)
    assert "| 40,000 | 20.0 |" in meridian_row and "| 2.00x |" in meridian_row
    varnish_row = next(line for line in table.splitlines() if "| varnish |" in line)
    assert "pending" in varnish_row and "(not run)" in varnish_row


def test_the_python_floor_proxy_misses_once_then_answers_from_its_store(tmp_path: Path) -> None:
    """The yardstick ``benchmarks.compare`` runs as ``python-floor`` really proxies and caches:
    the origin's answer on a miss, the same bytes from its store on the next request."""
    with processes() as procs:
        origin = Origin("eu-central", tmp_path)
        procs.append(origin)
        origin.ready()
        argv = [sys.executable, "-m", "benchmarks.floor_proxy", "--listen", "127.0.0.1:0"]
        floor = subprocess.Popen(
            [*argv, "--origin", f"127.0.0.1:{origin.port}"],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        try:
            assert floor.stdout is not None
            ready, _, _ = select.select([floor.stdout], [], [], 20)
            assert ready, "the floor proxy did not say where it listens"
            port = int(floor.stdout.readline().decode().rsplit(":", 1)[1])
            answers = []
            for _ in range(2):
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                connection.request("GET", "/api/v1/ticker/BTC-USD?u=1")
                response = connection.getresponse()
                answers.append((response.status, response.getheader("X-Cache"), response.read()))
                connection.close()
        finally:
            floor.terminate()
            floor.wait(10)
    (status, first, body), (again, second, stored) = answers
    assert (status, first, again, second) == (200, "MISS", 200, "HIT")
    assert b'"symbol"' in body and stored == body
