"""Helpers for the GeoDNS tests: configs, a server subprocess, a controllable health endpoint."""

from __future__ import annotations

import copy
import http.server
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.query
import dns.rdatatype
import yaml

from meridian.ports import free_port as free_port

REPO = Path(__file__).resolve().parent.parent
CITY_TEST_DB = REPO / "tests" / "data" / "GeoIP2-City-Test.mmdb"

POP_ADDRESSES = {
    "iad": "127.0.1.1",
    "gru": "127.0.1.2",
    "fra": "127.0.1.3",
    "sin": "127.0.1.4",
    "syd": "127.0.1.5",
}


def base_config(health_base: str | None = None) -> dict[str, Any]:
    """The demo world with fast health checks; POP health URLs point at ``health_base``."""
    pops: dict[str, Any] = {
        "iad": {"location": {"lat": 39.04, "lon": -77.49}, "addresses": ["127.0.1.1"]},
        "gru": {"location": {"lat": -23.55, "lon": -46.63}, "addresses": ["127.0.1.2"]},
        "fra": {
            "location": {"lat": 50.11, "lon": 8.68},
            "addresses": ["127.0.1.3"],
            "residency": "eu",
        },
        "sin": {"location": {"lat": 1.35, "lon": 103.82}, "addresses": ["127.0.1.4"]},
        "syd": {"location": {"lat": -33.87, "lon": 151.21}, "addresses": ["127.0.1.5"]},
    }
    if health_base is not None:
        for name, pop in pops.items():
            pop["health_url"] = f"{health_base}/pop/{name}"
    backend = f"{health_base}/ok" if health_base else "http://127.0.0.1:9"
    return {
        "geo": {
            "database": "builtin",
            "default_location": {"lat": 39.04, "lon": -77.49, "country": "US", "continent": "NA"},
            "overrides": [
                # A client placed in Ireland (an eu-data country) but nearer London than Frankfurt.
                {
                    "network": "10.1.0.0/16",
                    "location": {"lat": 53.35, "lon": -6.26, "country": "IE", "continent": "EU"},
                },
                {"network": "10.2.0.0/16", "pop": "syd"},
            ],
        },
        "health": {
            "interval": "500ms",
            "fast_interval": "200ms",
            "timeout": "300ms",
            "fall": 2,
            "rise": 1,
            "jitter": 0,
            "path": "/",
        },
        "regions": {
            "us-east": {
                "location": {"lat": 39.04, "lon": -77.49},
                "backends": [backend],
                "addresses": ["127.0.2.1"],
            },
            "eu-central": {
                "location": {"lat": 50.11, "lon": 8.68},
                "backends": [backend + "?eu"],
                "addresses": ["127.0.2.2", "2001:db8::2"],
                "residency": "eu",
            },
            "ap-southeast": {
                "location": {"lat": 1.35, "lon": 103.82},
                "backends": [backend + "?ap"],
                "addresses": ["127.0.2.3"],
            },
        },
        "pops": pops,
        "residency": {
            "eu-data": {
                "zone": "eu",
                "countries": ["DE", "FR", "IE", "NL"],
                "on_failure": "fallback",
            }
        },
        "dns": {
            "zone": "meridian.test",
            "ttl": "30s",
            "min_ttl": "5s",
            "soa": {
                "mname": "ns1.meridian.test",
                "rname": "hostmaster.meridian.test",
                "serial": 2026112101,
            },
            "ns": [
                {"name": "ns1.meridian.test", "addresses": ["127.0.0.53", "2001:db8::53"]},
                {"name": "ns.elsewhere.example"},
            ],
            "names": {
                "api": {"targets": "pops", "answers": 1},
                "origin": {"targets": "regions", "answers": 1},
                "two": {"targets": "pops", "answers": 2},
                "deep.sub": {"targets": "pops", "answers": 1},
            },
            "all_down": "fail_open",
            "rate_limit": {"enabled": False},
        },
        "edge": {
            "services": {"market": {}},
            "routes": [{"name": "default", "service": "market", "path_prefix": "/"}],
        },
    }


def with_many_answers(config: dict[str, Any], count: int = 120) -> dict[str, Any]:
    """Add a name whose answer (one POP with ``count`` addresses) cannot fit 1232 bytes."""
    config = copy.deepcopy(config)
    config["pops"]["big"] = {
        "location": {"lat": 0.0, "lon": 0.0},
        "addresses": [f"127.3.{i // 250}.{i % 250 + 1}" for i in range(count)],
    }
    config["dns"]["names"]["many"] = {"targets": "pops", "answers": 1, "candidates": ["big"]}
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class ServerProcess:
    """``python -m geodns`` on free ports; its stderr is collected line by line."""

    def __init__(self, config_path: Path, pop: str = "iad", extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.config_path = config_path
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [
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
                *extra,
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def log_has(self, text: str) -> list[str]:
        return [line for line in list(self.lines) if text in line]

    def wait_ready(self, timeout: float = 15.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError("server exited:\n" + "\n".join(self.lines))
            return bool(self.log_has("event=dns_listening"))

        wait_for(ready, timeout, "dns_listening")

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.admin_port}/status"
        with urllib.request.urlopen(url, timeout=5) as response:
            data: dict[str, Any] = json.load(response)
        return data

    def wait_health_stable(self, timeout: float = 10.0) -> None:
        """Until no health transition is pending (until then TTLs are shortened on purpose)."""

        def stable() -> bool:
            targets = self.status()["health"]["targets"]
            return all(t["ttl_hint"] is None for t in targets.values())

        wait_for(stable, timeout, "health to settle", step=0.05)

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def reload(self, timeout: float = 30.0) -> None:
        """SIGHUP, then wait until the server says it reloaded.  A reload rebuilds the zone
        and re-walks the geo database in a thread (seconds on a busy machine), so a test
        waits for it rather than guessing how long it takes."""
        before = len(self.log_has("dns_reloaded"))
        self.signal(signal.SIGHUP)
        wait_for(lambda: len(self.log_has("dns_reloaded")) > before, timeout, "the reload")

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._reader.join(2)
        return self.proc.returncode


@contextmanager
def running_server(
    config_path: Path, pop: str = "iad", extra: tuple[str, ...] = ()
) -> Iterator[ServerProcess]:
    server = ServerProcess(config_path, pop, extra)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def make_query(
    name: str,
    rdtype: str = "A",
    ecs: str | None = None,
    payload: int | None = 1232,
    want_dnssec: bool = False,
) -> dns.message.Message:
    options: list[dns.edns.Option] = []
    if ecs is not None:
        network = ipaddress.ip_network(ecs, strict=False)
        options.append(dns.edns.ECSOption(str(network.network_address), network.prefixlen))
    if payload is None:
        return dns.message.make_query(name, rdtype, use_edns=False)
    return dns.message.make_query(
        name, rdtype, use_edns=0, payload=payload, options=options, want_dnssec=want_dnssec
    )


def ask(
    port: int,
    name: str,
    rdtype: str = "A",
    *,
    ecs: str | None = None,
    tcp: bool = False,
    payload: int | None = 1232,
    timeout: float = 2.0,
) -> dns.message.Message:
    query = make_query(name, rdtype, ecs, payload)
    if tcp:
        return dns.query.tcp(query, "127.0.0.1", port=port, timeout=timeout)
    return dns.query.udp(query, "127.0.0.1", port=port, timeout=timeout)


def addresses(reply: dns.message.Message) -> list[str]:
    return sorted(
        rdata.address
        for rrset in reply.answer
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        for rdata in rrset
    )


def ecs_scope(reply: dns.message.Message) -> int | None:
    for option in reply.options:
        if isinstance(option, dns.edns.ECSOption):
            return int(option.scopelen)
    return None


def send_raw(port: int, data: bytes, timeout: float = 1.0) -> bytes | None:
    """One datagram out, the reply (or None if nothing came back within ``timeout``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(data, ("127.0.0.1", port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


class HealthEndpoint:
    """An HTTP server the test controls: ``/pop/NAME`` answers ``status[NAME]`` (200 by
    default), anything else 200."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {}
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code = 200
                if self.path.startswith("/pop/"):
                    code = owner.status.get(self.path.split("/")[2], 200)
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
