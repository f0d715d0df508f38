"""Cache controls a CDN operator expects, over real sockets (issue 20): targeted cache control
(CDN-Cache-Control, Surrogate-Control) and ranges answered from cache.

One edge process (target list ``meridian, cdn, surrogate``) in front of a scripted origin that
runs in a thread of the test process: each test registers the responses of its own paths, and
the origin counts requests and records their headers per path.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from meridian.ports import free_port
from tests.edge_support import LOCATIONS, Client, Edge, http_request, processes, region
from tests.edge_support import write_config as _write_config


@dataclass
class Script:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    seen: list[dict[str, str]] = field(default_factory=list)


class ScriptedOrigin:
    """An HTTP/1.1 origin answering each path as scripted (``/healthz``: 200)."""

    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.port = free_port()
        scripts = self.scripts

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                script = scripts.get(self.path)
                if script is None:
                    self._send(200 if self.path == "/healthz" else 404, [], b"ok")
                    return
                script.seen.append({k.lower(): v for k, v in self.headers.items()})
                self._send(script.status, script.headers, script.body)

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def script(
        self, path: str, headers: list[tuple[str, str]], body: bytes = b"", status: int = 200
    ) -> Script:
        self.scripts[path] = script = Script(status, headers, body)
        return script

    def __enter__(self) -> ScriptedOrigin:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Edge, ScriptedOrigin]]:
    tmp: Path = tmp_path_factory.mktemp("edge-cache-controls")
    with ScriptedOrigin() as origin, processes() as procs:
        config = _write_config(
            tmp / "edge.yaml",
            {"us-east": region(*LOCATIONS["us-east"], [f"http://127.0.0.1:{origin.port}"])},
            edge={
                "cache": {"memory": 1 << 22, "targets": ["meridian", "cdn", "surrogate"]},
                "compression": {"enabled": False},
            },
        )
        edge = Edge(config, "iad", tmp)
        procs.append(edge)
        edge.ready()
        yield edge, origin


# --------------------------------------------------------------------------------------------
# Targeted cache control


def test_cdn_cache_control_decides_for_the_edge_and_is_removed(world):
    edge, origin = world
    # Browsers must not store it; the edge may, for a minute.
    script = origin.script(
        "/t/cdn",
        [("Cache-Control", "no-store"), ("CDN-Cache-Control", "max-age=60")],
        b"edge-only",
    )
    client = Client(edge.port)
    for expected in ("MISS", "HIT", "HIT"):
        status, headers, body = client.get("/t/cdn")
        assert (status, headers["x-cache"], body) == (200, expected, b"edge-only")
        assert headers["cache-control"] == "no-store"
        assert "cdn-cache-control" not in headers
    assert len(script.seen) == 1
    # The slow path (Connection: close) builds the same bytes.
    status, headers, _ = http_request(edge.port, "GET", "/t/cdn")
    assert headers["x-cache"] == "HIT" and "cdn-cache-control" not in headers


def test_the_first_target_in_the_list_wins(world):
    edge, origin = world
    script = origin.script(
        "/t/order",
        [
            ("Cache-Control", "max-age=60"),
            ("CDN-Cache-Control", "max-age=60"),
            ("Meridian-Cache-Control", "no-store"),
            ("Surrogate-Control", "max-age=60"),
        ],
        b"x",
    )
    client = Client(edge.port)
    for _ in range(2):
        status, headers, _ = client.get("/t/order")
        assert (status, headers["x-cache"]) == (200, "MISS")
        assert not {"meridian-cache-control", "cdn-cache-control", "surrogate-control"} & set(
            headers
        )
        assert headers["cache-control"] == "max-age=60"  # the browser's own is passed on
    assert len(script.seen) == 2


def test_surrogate_control_alone_makes_a_response_cacheable(world):
    edge, origin = world
    script = origin.script("/t/surrogate", [("Surrogate-Control", "max-age=3600")], b"s")
    client = Client(edge.port)
    assert client.get("/t/surrogate")[1]["x-cache"] == "MISS"
    _, headers, _ = client.get("/t/surrogate")
    assert headers["x-cache"] == "HIT" and "surrogate-control" not in headers
    assert len(script.seen) == 1


def test_an_invalid_targeted_field_falls_back_to_cache_control(world):
    edge, origin = world
    script = origin.script(
        "/t/invalid", [("Cache-Control", "no-store"), ("CDN-Cache-Control", "max-age =60")]
    )
    client = Client(edge.port)
    for _ in range(2):
        assert client.get("/t/invalid")[1]["x-cache"] == "MISS"
    assert len(script.seen) == 2
