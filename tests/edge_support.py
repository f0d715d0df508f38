"""Test helpers for the edge: real processes on 127.0.0.1 free ports, configs, raw sockets.

Also an echo origin of our own (``python -m tests.edge_support echo --port N --region R``),
because the sample origin has no header echo: it answers ``/echo`` with the request it saw,
records every request it receives (``GET /_seen``, not itself recorded), and has endpoints that
misbehave on purpose (chunked streams, dying mid-body, slow answers, large bodies).  For the
cache and compression tests it also has ``/cc/...`` (caching headers chosen by the query
string, a per-URL counter in the body, and on purpose the classic unkeyed-header behaviours a
poisoning attack exploits), ``/gz`` (an origin-gzipped body) and ``/bomb`` (a gzip bomb).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
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

from meridian.ports import free_port as free_port

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
#: Seconds a started server has to come up: generous, since CI's two loaded cores can take
#: over 15 s to import and configure an edge.  A bound on start-up, not a speed check.
START_PATIENCE = 45.0


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
    def __init__(
        self,
        region: str,
        tmp: Path,
        *,
        echo: bool = False,
        port: int | None = None,
        update_interval: float | None = None,
    ):
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
            if update_interval is not None:
                argv += ["--update-interval", str(update_interval)]
        super().__init__(argv, tmp / f"origin-{region}-{self.port}.log", f"origin {region}")

    def ready(self) -> Origin:
        poll_until(lambda: _port_open(self.port), within=START_PATIENCE)
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

    def seen_for(self, path: str) -> list[dict[str, Any]]:
        """Requests the echo origin received for ``path`` (path and query, exactly)."""
        return [r for r in self.seen() if r["path"] == path]

    def count(self, path: str) -> int:
        """The sample origin's request counter for ``path``."""
        paths: dict[str, int] = self.control()["requests"]["paths"]
        return paths.get(path, 0)


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
        self.wait_for_log(r"event=edge_listening", within=START_PATIENCE)
        return self

    def admin(self, path: str) -> tuple[int, bytes]:
        status, _, body = http_request(self.admin_port, "GET", path)
        return status, body

    def status(self) -> dict[str, Any]:
        code, body = self.admin("/status")
        assert code == 200
        result: dict[str, Any] = json.loads(body)
        return result

    def purge(
        self, document: dict[str, Any] | None = None, token: str | None = None, **query: str
    ) -> tuple[int, dict[str, Any]]:
        """POST /purge on the admin listener (``query`` goes in the query string)."""
        headers = {"content-type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        path = "/purge"
        if query:
            path += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        status, _, body = http_request(
            self.admin_port,
            "POST",
            path,
            headers=headers,
            body=json.dumps(document or {}).encode(),
        )
        return status, json.loads(body)

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


class Client:
    """One keep-alive HTTP/1.1 connection to the edge (a cache hit on it takes the fast
    path); reconnects after the edge closes.  Sends ``Accept-Encoding: identity`` unless the
    caller sets Accept-Encoding."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.port = port
        self.host = host
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        if self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        sent = {"Host": self.host, **(headers or {})}
        try:
            self._conn.request(method, path, body=body, headers=sent)
            response = self._conn.getresponse()
            data = response.read()
        except (http.client.HTTPException, OSError):
            self.close()
            raise
        result = {k.lower(): v for k, v in response.getheaders()}
        if response.will_close:
            self.close()
        return response.status, result, data

    def get(self, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path, {k.replace("_", "-"): v for k, v in headers.items()})

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


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
        content_type = request.query.get("ctype", "application/octet-stream")
        response = web.StreamResponse(headers={"Content-Type": content_type})
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
        if request.query.get("cacheable") == "1":
            response.headers["Cache-Control"] = "public, max-age=60"
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

    counts: dict[str, int] = {}

    async def cacheable(request: web.Request) -> web.Response:
        """Caching headers from the query: cc (Cache-Control), etag, vary, tag
        (Surrogate-Key), cookie (a Set-Cookie), size (padding); a counter per URL in the
        body.  Deliberately naive about unkeyed headers, like many real origins: it serves
        X-Original-URL / X-Rewrite-URL instead of the path, believes X-Forwarded-Host and
        X-HTTP-Method-Override, and reflects them in the body."""
        query = request.query
        key = request.path_qs
        counts[key] = counts.get(key, 0) + 1
        etag = query.get("etag")
        headers = {"Cache-Control": query.get("cc", "public, max-age=60")}
        if etag:
            headers["ETag"] = f'"{etag}"'
            if request.headers.get("If-None-Match", "").strip('W/"') == etag:
                return web.Response(status=304, headers=headers)
        if "vary" in query:
            headers["Vary"] = query["vary"]
        if "tag" in query:
            headers["Surrogate-Key"] = query["tag"]
        if "cookie" in query:
            headers["Set-Cookie"] = "session=s3cret; Path=/"
        document = {
            "n": counts[key],
            "path": request.headers.get("X-Original-URL")
            or request.headers.get("X-Rewrite-URL")
            or request.path_qs,
            "method": request.headers.get("X-HTTP-Method-Override", request.method),
            "host": request.headers.get("X-Forwarded-Host", request.host),
            "host_header": request.host,
            "variant": request.headers.get("X-Variant"),
            "pad": "p" * int(query.get("size", "0")),
        }
        return web.json_response(document, headers=headers)

    async def gzipped(request: web.Request) -> web.Response:
        """A JSON body the origin gzipped itself (Content-Encoding: gzip)."""
        body = json.dumps({"symbol": "BTC-USD", "rows": [[i, i * 2] for i in range(400)]})
        return web.Response(
            body=__import__("gzip").compress(body.encode(), mtime=0),
            headers={
                "Content-Type": "application/json",
                "Content-Encoding": "gzip",
                "Cache-Control": request.query.get("cc", "no-store"),
                "Vary": "Accept-Encoding",
            },
        )

    bombs: dict[int, bytes] = {}

    async def bomb(request: web.Request) -> web.Response:
        """A gzip bomb: ``mb`` MiB of zeros (default 256) in a body of about 0.1% of that."""
        megabytes = int(request.query.get("mb", "256"))
        if megabytes not in bombs:
            compressor = __import__("zlib").compressobj(9, 8, 31)
            block = bytes(1 << 20)
            parts = [compressor.compress(block) for _ in range(megabytes)]
            parts.append(compressor.flush())
            bombs[megabytes] = b"".join(parts)
        return web.Response(
            body=bombs[megabytes],
            headers={
                "Content-Type": "application/json",
                "Content-Encoding": "gzip",
                "Cache-Control": request.query.get("cc", "no-store"),
            },
        )

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
    app.router.add_route("*", "/cc/{tail:.*}", cacheable)
    app.router.add_get("/gz", gzipped)
    app.router.add_get("/bomb", bomb)
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
