"""Test helpers for the edge: real processes on 127.0.0.1 free ports, configs, raw sockets.

Also an echo origin of our own (``python -m tests.edge_support echo --port N --region R``),
because the sample origin has no header echo: it answers ``/echo`` with the request it saw,
records every request it receives (``GET /_seen``, not itself recorded), and has endpoints that
misbehave on purpose (chunked streams, dying mid-body, slow answers, large bodies).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def poll_until(check: Callable[[], T], *, within: float = 10.0, every: float = 0.02) -> T:
    """Call ``check`` until it returns something truthy; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last  # type: ignore[no-any-return]
        time.sleep(every)
    raise AssertionError(f"condition not met within {within}s (last: {last!r})")


class Proc:
    """A child process whose stderr goes to a file we can search."""

    def __init__(self, argv: list[str], log_path: Path, name: str) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=env
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, within: float = 15.0) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            if self.popen.poll() is not None and not regex.search(self.log_text()):
                raise AssertionError(f"{self.name} exited:\n{self.log_text()[-3000:]}")
            return regex.search(self.log_text())

        return poll_until(found, within=within)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def wait(self, within: float) -> int:
        return self.popen.wait(timeout=within)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; always by PID."""
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(timeout=5)
        self._log.close()


class Origin(Proc):
    def __init__(self, region: str, tmp: Path, *, echo: bool = False, port: int | None = None):
        self.region = region
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if echo:
            argv = [
                sys.executable,
                "-m",
                "tests.edge_support",
                "echo",
                "--region",
                region,
                "--port",
                str(self.port),
            ]
        else:
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
        super().__init__(argv, tmp / f"origin-{region}-{self.port}.log", f"origin {region}")

    def ready(self) -> Origin:
        poll_until(lambda: _port_open(self.port), within=15)
        return self

    def control(self, switches: dict[str, Any] | None = None) -> dict[str, Any]:
        """GET (or PUT ``switches`` to) the sample origin's /_control."""
        method = "GET" if switches is None else "PUT"
        body = b"" if switches is None else json.dumps(switches).encode()
        status, _, data = http_request(
            self.port, method, "/_control", body=body, headers={"content-type": "application/json"}
        )
        assert status == 200, (status, data)
        result: dict[str, Any] = json.loads(data)
        return result

    def seen(self) -> list[dict[str, Any]]:
        """Requests the echo origin received."""
        status, _, data = http_request(self.port, "GET", "/_seen")
        assert status == 200
        result: list[dict[str, Any]] = json.loads(data)
        return result


class Edge(Proc):
    def __init__(self, config: Path, pop: str, tmp: Path, *, workers: int = 1) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        argv = [
            sys.executable,
            "-m",
            "edge",
            "--config",
            str(config),
            "--pop",
            pop,
            "--listen",
            f"127.0.0.1:{self.port}",
            "--admin",
            f"127.0.0.1:{self.admin_port}",
        ]
        if workers > 1:
            argv += ["--workers", str(workers)]
        super().__init__(argv, tmp / f"edge-{pop}-{self.port}.log", f"edge {pop}")
        self.base = f"http://127.0.0.1:{self.port}"

    def ready(self) -> Edge:
        self.wait_for_log(r"event=edge_listening")
        return self

    def admin(self, path: str) -> tuple[int, bytes]:
        status, _, body = http_request(self.admin_port, "GET", path)
        return status, body

    def status(self) -> dict[str, Any]:
        code, body = self.admin("/status")
        assert code == 200
        result: dict[str, Any] = json.loads(body)
        return result

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        _, body = self.admin("/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --------------------------------------------------------------------------------------------
# Config


def region(lat: float, lon: float, backends: list[str], residency: str | None = None) -> dict:
    spec: dict[str, Any] = {"location": {"lat": lat, "lon": lon}, "backends": backends}
    if residency:
        spec["residency"] = residency
    return spec


POPS = {
    "fra": {"location": {"lat": 50.11, "lon": 8.68}, "addresses": ["127.0.1.3"]},
    "iad": {"location": {"lat": 39.04, "lon": -77.49}, "addresses": ["127.0.1.1"]},
    "sin": {"location": {"lat": 1.35, "lon": 103.82}, "addresses": ["127.0.1.4"]},
}
LOCATIONS = {
    "eu-central": (50.11, 8.68),
    "eu-west": (53.35, -6.26),
    "us-east": (39.04, -77.49),
    "ap-southeast": (1.35, 103.82),
}


def write_config(
    path: Path,
    regions: dict[str, dict],
    *,
    edge: dict[str, Any] | None = None,
    health: dict[str, Any] | None = None,
    outlier: dict[str, Any] | None = None,
) -> Path:
    edge_section: dict[str, Any] = {
        "services": {"market": {}},
        "routes": [{"name": "api", "service": "market", "path_prefix": "/"}],
    }
    edge_section.update(edge or {})
    document = {
        "regions": regions,
        "pops": POPS,
        "dns": {
            "zone": "meridian.test",
            "soa": {"mname": "ns1.meridian.test", "rname": "h.meridian.test"},
            "ns": [{"name": "ns1.meridian.test", "addresses": ["127.0.0.1"]}],
            "names": {"api": {"targets": "pops"}},
        },
        "health": {
            "interval": "1s",
            "fast_interval": "500ms",
            "timeout": "500ms",
            "fall": 2,
            "rise": 1,
            **(health or {}),
        },
        "outlier": outlier or {},
        "edge": edge_section,
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------
# Raw HTTP


def http_request(
    port: int,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection (Connection: close); returns status, headers, body."""
    headers = {"Host": "127.0.0.1", **(headers or {})}
    lines = [f"{method} {path} HTTP/1.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    return parse_response(raw_exchange(port, raw, timeout=timeout))


def raw_exchange(port: int, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send ``data`` and read until the server closes (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_until_close(sock, timeout)


def read_until_close(sock: socket.socket, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    chunks = []
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/"):
        raise ValueError(f"not an HTTP response: {raw[:200]!r}")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return status, headers, body


def dechunk(data: bytes) -> bytes:
    out = []
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(data[:size])
        if len(data) < size + 2:
            raise ValueError("truncated chunked body")
        data = data[size + 2 :]


def statuses(raw: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    """Collects processes and stops every one of them by PID, whatever happens."""
    started: list[Proc] = []
    try:
        yield started
    finally:
        for proc in reversed(started):
            with contextlib.suppress(Exception):
                proc.stop()


# --------------------------------------------------------------------------------------------
# The echo origin


def _echo_app(region: str) -> Any:
    from aiohttp import web

    seen: list[dict[str, Any]] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path not in ("/_seen", "/healthz"):
            seen.append(
                {
                    "method": request.method,
                    "path": request.path_qs,
                    "headers": [[k, v] for k, v in request.raw_headers_str()],
                }
            )
        response: web.StreamResponse = await handler(request)
        response.headers["X-Origin-Region"] = region
        return response

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.path_qs,
                "version": f"{request.version.major}.{request.version.minor}",
                "headers": [[k, v] for k, v in request.raw_headers_str()],
                "body_length": len(body),
                "body_sha": __import__("hashlib").sha256(body).hexdigest(),
                "chunked": request.headers.get("Transfer-Encoding") == "chunked",
            },
            headers={
                "Cache-Control": "no-store",
                "Connection": "x-private",
                "X-Private": "hop",
                "Keep-Alive": "timeout=5",
            },
        )

    async def stream(request: web.Request) -> web.StreamResponse:
        count = int(request.query.get("chunks", "5"))
        size = int(request.query.get("size", "1000"))
        delay = float(request.query.get("delay", "0"))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(count):
            await response.write(bytes([65 + i % 26]) * size)
            if delay:
                await asyncio.sleep(delay)
        await response.write_eof()
        return response

    async def die_mid_body(request: web.Request) -> web.StreamResponse:
        chunked = request.query.get("chunked") == "1"
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = 100_000
        await response.prepare(request)
        await response.write(b"x" * 10_000)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("seconds", "1")))
        return web.Response(text="slow done", headers={"Cache-Control": "no-store"})

    async def big(request: web.Request) -> web.Response:
        size = int(request.query.get("size", str(1 << 20)))
        return web.Response(body=b"b" * size, content_type="application/octet-stream")

    async def seen_handler(request: web.Request) -> web.Response:
        return web.json_response(seen)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="status")

    app = web.Application(middlewares=[record], client_max_size=64 << 20)
    app.router.add_get("/_seen", seen_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/stream", stream)
    app.router.add_get("/die", die_mid_body)
    app.router.add_get("/slow", slow)
    app.router.add_get("/big", big)
    app.router.add_get("/status/{code}", status)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def _raw_headers_str(self: Any) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw_headers]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["echo"])
    parser.add_argument("--region", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    from aiohttp import web

    web.BaseRequest.raw_headers_str = _raw_headers_str  # type: ignore[attr-defined]
    web.run_app(
        _echo_app(args.region), host="127.0.0.1", port=args.port, print=None, access_log=None
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
