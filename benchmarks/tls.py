"""TLS and HTTP/2 at the edge against nginx, one run, the same certificate and origin.

    python -m benchmarks.tls [--seconds 10] [--json out.json] [--scenarios handshakes]
        [--clients 4] [--peers meridian,nginx]

The sample origin (``meridian.origin``) behind, in turn, the Meridian edge (one worker, TLS
listener, access log off) and nginx (one worker, ``listen ... ssl http2``, ``proxy_cache``,
access log off), both with one ECDSA P-256 certificate made at start by ``openssl req``.
Scenarios, each against both servers:

* ``handshakes``: new TLS 1.3 handshakes, no request (``openssl s_time -new``, two clients,
  ``--clients`` more: two synchronous clients leave both servers short of a full core, so the
  rate then measures handshake latency too; with four or more the servers saturate);
* ``h1-tls-hit``: HTTP/1.1 over TLS, 2 KB cache hits (``h2load --h1``, 64 connections);
* ``h2-hit``: HTTP/2 over TLS, 2 KB cache hits (``h2load``, 64 connections x 10 streams);
* ``h2-br-hit``: the same with ``Accept-Encoding: br`` (Meridian serves its stored Brotli
  variant; nginx without a Brotli module sends identity, so compare Meridian with itself).

For each: the rate the client saw and the server's CPU per operation (user + system seconds
of the server's processes, from /proc, over the operations): on a shared machine the CPU
figure is the one to compare.  Servers are pinned to CPU 0, clients to the others (taskset).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from benchmarks.compare import (
    Processes,
    free_port,
    one_pop_config,
    session_cpu_seconds,
    tcp_accepts,
    wait_until,
)

PATH = "/api/v1/symbols"  # 2107 bytes of JSON, public, max-age=300
SCENARIOS = ("h1-tls-hit", "h2-hit", "h2-br-hit", "handshakes")


@dataclass
class Result:
    server: str
    scenario: str
    operations: int
    seconds: float
    rate: float
    cpu_us_per_op: float
    failed: int


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise SystemExit(f"{name} is needed (apt-get install nghttp2-client nginx openssl)")
    return found


def _cores() -> tuple[list[str], list[str]]:
    """taskset prefixes: the server on CPU 0, clients on the rest (none on one CPU)."""
    count = os.cpu_count() or 1
    if count < 2 or shutil.which("taskset") is None:
        return [], []
    return ["taskset", "-c", "0"], ["taskset", "-c", f"1-{count - 1}"]


def make_certificate(workdir: Path) -> tuple[Path, Path]:
    cert, key = workdir / "bench.crt", workdir / "bench.key"
    subprocess.run(
        [
            _tool("openssl"),
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=bench.meridian.test",
            "-addext",
            "subjectAltName=DNS:bench.meridian.test,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def meridian_config(workdir: Path, origin: int, tls_port: int, cert: Path, key: Path) -> Path:
    tls = {
        "listen": f"127.0.0.1:{tls_port}",
        "certificates": [{"cert": str(cert), "key": str(key)}],
    }
    document = one_pop_config("us-east", "iad", (39.04, -77.49), "127.0.1.1", origin, {"tls": tls})
    path = workdir / "meridian.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


NGINX_CONF = """
{user}
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    proxy_cache_path {workdir}/cache keys_zone=hits:16m max_size=256m;
    ssl_session_cache shared:SSL:8m;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://127.0.0.1:{origin};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache hits;
            add_header X-Cache $upstream_cache_status;
        }}
    }}
}}
"""


def h2load(url: str, requests: int, *, h1: bool, streams: int, headers: list[str]) -> Counts:
    """``requests`` requests from 64 connections (a fixed count, not ``-D``: see RESULTS)."""
    _, client = _cores()
    argv = [*client, _tool("h2load"), "-c", "64", "-n", str(requests)]
    argv += ["--h1"] if h1 else ["-m", str(streams)]
    for header in headers:
        argv += ["-H", header]
    run = subprocess.run([*argv, url], capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    done = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed", out
    )
    finished = re.search(r"finished in ([\d.]+)(m?s)", out)
    twoxx = re.search(r"status codes: (\d+) 2xx", out)
    if done is None or finished is None or twoxx is None:
        raise RuntimeError(f"h2load said: {out[-800:]}")
    seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    succeeded = int(twoxx.group(1))
    return Counts(succeeded, requests - succeeded, seconds)


@dataclass
class Counts:
    succeeded: int
    failed: int
    seconds: float


def s_time(port: int, seconds: float, clients: int = 2) -> int:
    """New TLS 1.3 handshakes from ``clients`` ``openssl s_time -new`` clients in parallel."""
    _, client = _cores()
    argv = [*client, _tool("openssl"), "s_time", "-connect", f"127.0.0.1:{port}", "-new"]
    argv += ["-time", str(int(seconds))]
    runs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    total = 0
    for run in runs:
        out, _ = run.communicate(timeout=seconds + 60)
        found = re.search(r"(\d+) connections in [\d.]+s", out)
        if found is None:
            raise RuntimeError(f"s_time said: {out[-400:]}")
        total += int(found.group(1))
    return total


def measure(server: str, leader: int, port: int, args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    url = f"https://127.0.0.1:{port}{PATH}"
    for scenario, h1, streams, headers in (
        ("h1-tls-hit", True, 1, []),
        ("h2-hit", False, 10, []),
        ("h2-br-hit", False, 10, ["accept-encoding: br"]),
    ):
        if scenario not in args.scenarios:
            continue
        before = session_cpu_seconds(leader)
        counts = h2load(url, args.requests, h1=h1, streams=streams, headers=headers)
        cpu = session_cpu_seconds(leader) - before
        ok = max(counts.succeeded, 1)
        results.append(
            Result(
                server,
                scenario,
                counts.succeeded,
                counts.seconds,
                counts.succeeded / counts.seconds,
                cpu / ok * 1e6,
                counts.failed,
            )
        )
    if "handshakes" not in args.scenarios:
        return results
    before = session_cpu_seconds(leader)
    handshakes = s_time(port, args.seconds, args.clients)
    cpu = session_cpu_seconds(leader) - before
    results.append(
        Result(
            server,
            "handshakes",
            handshakes,
            args.seconds,
            handshakes / args.seconds,
            cpu / max(handshakes, 1) * 1e6,
            0,
        )
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per handshake run")
    parser.add_argument("--requests", type=int, default=60_000, help="per h2load run")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--peers", default="meridian,nginx")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"a subset of {','.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--clients", type=int, default=2, help="openssl s_time clients for handshakes"
    )
    args = parser.parse_args(argv)
    args.scenarios = args.scenarios.split(",")
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"--scenarios: unknown {','.join(sorted(unknown))}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    procs = Processes(workdir)
    server_cores, _ = _cores()
    results: list[Result] = []
    try:
        cert, key = make_certificate(workdir)
        origin_port = free_port()
        origin = procs.start(
            "origin",
            [
                sys.executable,
                "-m",
                "meridian.origin",
                "--region",
                "us-east",
                "--port",
                str(origin_port),
                "--log-level",
                "warning",
            ],
        )
        wait_until(tcp_accepts(origin_port), origin, "origin port")
        peers = args.peers.split(",")
        if "meridian" in peers:
            tls_port = free_port()
            config = meridian_config(workdir, origin_port, tls_port, cert, key)
            edge = procs.start(
                "meridian",
                [
                    *server_cores,
                    sys.executable,
                    "-m",
                    "edge",
                    "--config",
                    str(config),
                    "--pop",
                    "iad",
                    "--listen",
                    f"127.0.0.1:{free_port()}",
                    "--admin",
                    f"127.0.0.1:{free_port()}",
                ],
            )
            wait_until(tcp_accepts(tls_port), edge, "TLS port")
            _warm(tls_port)
            print(f"meridian key exchange: {key_exchange(tls_port)}", flush=True)
            results += measure("meridian", edge.process.pid, tls_port, args)
            procs.stop(edge)
        if "nginx" in peers:
            port = free_port()
            conf = workdir / "nginx.conf"
            conf.write_text(
                NGINX_CONF.format(
                    # Its workers write the cache in our private directory.
                    user="user root;" if os.geteuid() == 0 else "",
                    workdir=workdir,
                    port=port,
                    cert=cert,
                    key=key,
                    origin=origin_port,
                )
            )
            nginx = procs.start(
                "nginx", [*server_cores, _tool("nginx"), "-p", str(workdir), "-c", str(conf)]
            )
            wait_until(tcp_accepts(port), nginx, "TLS port")
            _warm(port)
            print(f"nginx key exchange: {key_exchange(port)}", flush=True)
            results += measure("nginx", nginx.process.pid, port, args)
            procs.stop(nginx)
    finally:
        procs.stop_all()
    _report(results)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


def key_exchange(port: int) -> str:
    """The TLS 1.3 group a default ``openssl`` client gets, and whether it was asked to retry
    (a HelloRetryRequest costs a round trip and a second key share: the comparison is only
    fair when both servers answer the client's first share)."""
    run = subprocess.run(
        [_tool("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-msg"],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )
    found = re.search(r"Server Temp Key: ([^\n]+)", run.stdout)
    hellos = run.stdout.count(", ServerHello")
    retry = " after a HelloRetryRequest" if hellos > 1 else ""
    return (found.group(1) if found else "unknown") + retry


def _warm(port: int) -> None:
    for encoding in ("identity", "br", "identity"):
        subprocess.run(
            [
                "curl",
                "-sk",
                "-o",
                "/dev/null",
                "-H",
                f"accept-encoding: {encoding}",
                f"https://127.0.0.1:{port}{PATH}",
            ],
            check=True,
            timeout=30,
        )


def _report(results: list[Result]) -> None:
    head = ("scenario", "server", "ops", "ops/s", "CPU us/op", "failed")
    print("{:<12} {:<9} {:>9} {:>9} {:>10} {:>7}  vs nginx (CPU)".format(*head))
    nginx = {r.scenario: r for r in results if r.server == "nginx"}
    for r in results:
        base = nginx.get(r.scenario)
        ratio = (
            f"{base.cpu_us_per_op / r.cpu_us_per_op:.2f}x"
            if base and r.server != "nginx" and r.cpu_us_per_op
            else ""
        )
        row = (r.scenario, r.server, r.operations, r.rate, r.cpu_us_per_op, r.failed, ratio)
        print("{:<12} {:<9} {:>9} {:>9.0f} {:>10.1f} {:>7}  {}".format(*row))


if __name__ == "__main__":
    sys.exit(main())
