"""Cache controls a CDN operator expects, over real sockets (issue 20): targeted cache control
(CDN-Cache-Control, Surrogate-Control) and ranges answered from cache.

One edge process (target list ``meridian, cdn, surrogate``) in front of a scripted origin that
runs in a thread of the test process: each test registers the responses of its own paths, and
the origin counts requests and records their headers per path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
    #: Seconds the origin takes to answer (keeps a refresh in flight).
    delay: float = 0.0
    #: Headers of the 304 answering a conditional request (None: conditionals get the 200).
    not_modified: list[tuple[str, str]] | None = None


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
                time.sleep(script.delay)
                if script.not_modified is not None and "If-None-Match" in self.headers:
                    self._send(304, script.not_modified, b"")
                    return
                self._send(script.status, script.headers, script.body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                self.do_GET()

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                if status != 304:
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


TOKEN = "soft-purge-token"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Edge, ScriptedOrigin]]:
    tmp: Path = tmp_path_factory.mktemp("edge-cache-controls")
    with ScriptedOrigin() as origin, processes() as procs:
        config = _write_config(
            tmp / "edge.yaml",
            {"us-east": region(*LOCATIONS["us-east"], [f"http://127.0.0.1:{origin.port}"])},
            edge={
                "cache": {
                    "memory": 1 << 22,
                    "targets": ["meridian", "cdn", "surrogate"],
                    "purge_token": TOKEN,
                    "rules": [{"path_prefix": "/rfc/keep-cookie/", "store_set_cookie": True}],
                },
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


def test_targeted_fields_are_removed_from_responses_passed_through(world):
    edge, origin = world
    script = origin.script(
        "/t/pass",
        [("Cache-Control", "max-age=60"), ("CDN-Cache-Control", "no-store"), ("X-Kept", "1")],
        b"p",
    )
    status, headers, body = http_request(edge.port, "POST", "/t/pass", body=b"{}")
    assert (status, body, headers["x-kept"], headers["cache-control"]) == (
        200,
        b"p",
        "1",
        "max-age=60",
    )
    assert "cdn-cache-control" not in headers
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


# --------------------------------------------------------------------------------------------
# RFC 9111 details (item 4)


def test_must_understand_stores_understood_statuses_despite_no_store(world):
    edge, origin = world
    cc = [("Cache-Control", "must-understand, no-store, max-age=60")]
    understood = origin.script("/rfc/mu/200", cc, b"ok")
    unknown = origin.script("/rfc/mu/299", cc, b"odd", status=299)
    client = Client(edge.port)
    assert [client.get("/rfc/mu/200")[1]["x-cache"] for _ in range(2)] == ["MISS", "HIT"]
    assert [client.get("/rfc/mu/299")[1]["x-cache"] for _ in range(2)] == ["MISS", "MISS"]
    assert (len(understood.seen), len(unknown.seen)) == (1, 2)


def test_an_age_list_counts_its_first_member(world):
    edge, origin = world
    origin.script("/rfc/age", [("Cache-Control", "max-age=600"), ("Age", "10, 500")], b"a")
    client = Client(edge.port)
    client.get("/rfc/age")
    _, headers, _ = client.get("/rfc/age")
    assert headers["x-cache"] == "HIT"
    assert 10 <= int(headers["age"]) < 20  # 10 plus the time resident, not 500


def _validated(origin: ScriptedOrigin, path: str, not_modified: list[tuple[str, str]]) -> Script:
    """Stored stale at once (max-age=0, with a validator): the next request revalidates."""
    script = origin.script(
        path,
        [
            ("Cache-Control", "max-age=0"),
            ("ETag", '"v1"'),
            ("Content-MD5", "rL0Y20zC+Fzt72VPzMSk2A=="),
            ("X-Version", "1"),
        ],
        b"body",
    )
    script.not_modified = not_modified
    return script


def test_a_304_updates_the_stored_fields_but_not_content_md5(world):
    edge, origin = world
    script = _validated(
        origin,
        "/rfc/304",
        [
            ("Cache-Control", "max-age=60"),
            ("ETag", '"v1"'),
            ("Content-MD5", "N7UdGUp1E+RbVvZSTy1R8g=="),
            ("X-Version", "2"),
        ],
    )
    client = Client(edge.port)
    assert client.get("/rfc/304")[1]["x-cache"] == "MISS"
    for expected in ("REVALIDATED", "HIT"):
        status, headers, body = client.get("/rfc/304")
        assert (status, headers["x-cache"], body) == (200, expected, b"body")
        assert headers["x-version"] == "2"  # updated by the 304
        assert headers["content-md5"] == "rL0Y20zC+Fzt72VPzMSk2A=="  # a digest of the kept body
    assert len(script.seen) == 2 and script.seen[1]["if-none-match"] == '"v1"'


@pytest.mark.parametrize(
    ("path", "stored"), [("/rfc/drop-cookie/x", False), ("/rfc/keep-cookie/x", True)]
)
def test_a_set_cookie_from_a_304_reaches_the_client_that_revalidated(world, path, stored):
    edge, origin = world
    _validated(origin, path, [("Cache-Control", "max-age=60"), ("Set-Cookie", "session=abc")])
    client = Client(edge.port)
    assert client.get(path)[1]["x-cache"] == "MISS"
    _, headers, _ = client.get(path)
    assert (headers["x-cache"], headers.get("set-cookie")) == ("REVALIDATED", "session=abc")
    # Later hits carry it only where the rule stores Set-Cookie with the response.
    _, headers, _ = client.get(path)
    assert headers["x-cache"] == "HIT"
    assert headers.get("set-cookie") == ("session=abc" if stored else None)


# --------------------------------------------------------------------------------------------
# Ranges from cache

BODY = bytes(range(256)) * 40  # 10,240 bytes


def _ranged(origin: ScriptedOrigin, path: str) -> Script:
    return origin.script(
        path,
        [("Cache-Control", "max-age=600"), ("ETag", '"r1"'), ("Content-Type", "video/mp4")],
        BODY,
    )


def test_a_range_miss_fills_the_whole_object_and_answers_206(world):
    edge, origin = world
    script = _ranged(origin, "/r/miss")
    client = Client(edge.port)
    status, headers, body = client.get("/r/miss", Range="bytes=100-199")
    assert (status, headers["x-cache"]) == (206, "MISS")
    assert headers["content-range"] == "bytes 100-199/10240"
    assert body == BODY[100:200] and headers["content-length"] == "100"
    assert "range" not in script.seen[0]  # fetched whole, never a partial object
    status, headers, body = client.get("/r/miss", Range="bytes=-10")
    assert (status, headers["x-cache"], body) == (206, "HIT", BODY[-10:])
    status, headers, body = client.get("/r/miss")
    assert (status, headers["x-cache"], body) == (200, "HIT", BODY)
    assert len(script.seen) == 1


def test_several_ranges_come_as_multipart_byteranges(world):
    edge, origin = world
    _ranged(origin, "/r/multi")
    client = Client(edge.port)
    client.get("/r/multi")
    status, headers, body = client.get("/r/multi", Range="bytes=0-9, 5000-5009")
    assert status == 206 and headers["x-cache"] == "HIT"
    kind, _, boundary = headers["content-type"].partition("; boundary=")
    assert kind == "multipart/byteranges"
    parts = body.split(b"--" + boundary.encode())
    assert [p.rsplit(b"\r\n\r\n", 1)[-1] for p in parts[1:3]] == [
        BODY[0:10] + b"\r\n",
        BODY[5000:5010] + b"\r\n",
    ]
    assert b"content-range: bytes 5000-5009/10240" in parts[2]
    assert parts[-1] == b"--\r\n"


def test_unsatisfiable_ranges_are_416_and_hostile_ones_get_the_whole_body(world):
    edge, origin = world
    script = _ranged(origin, "/r/hostile")
    client = Client(edge.port)
    status, headers, body = client.get("/r/hostile", Range="bytes=20000-")
    assert (status, headers["content-range"], body) == (416, "bytes */10240", b"")
    many = "bytes=" + ",".join(f"{i}-{i}" for i in range(0, 170, 10))  # 17 ranges
    assert client.get("/r/hostile", Range=many)[:3:2] == (200, BODY)
    flood = "bytes=" + ",".join(["0-"] * 5)
    assert client.get("/r/hostile", Range=flood)[:3:2] == (200, BODY)
    assert client.get("/r/hostile", Range="bytes=9-1")[:3:2] == (200, BODY)
    assert len(script.seen) == 1


def test_if_range_needs_the_current_strong_etag(world):
    edge, origin = world
    _ranged(origin, "/r/if-range")
    client = Client(edge.port)
    client.get("/r/if-range")
    status, _, body = client.get("/r/if-range", Range="bytes=0-3", If_Range='"r1"')
    assert (status, body) == (206, BODY[:4])
    status, _, body = client.get("/r/if-range", Range="bytes=0-3", If_Range='"r0"')
    assert (status, body) == (200, BODY)
    # A conditional GET that matches is a 304 before any Range is looked at.
    status, _, body = client.get("/r/if-range", Range="bytes=0-3", If_None_Match='"r1"')
    assert (status, body) == (304, b"")


def test_a_range_on_an_uncacheable_response_gets_the_whole_body(world):
    edge, origin = world
    script = origin.script("/r/private", [("Cache-Control", "private")], BODY[:100])
    status, headers, body = Client(edge.port).get("/r/private", Range="bytes=0-9")
    assert (status, headers["x-cache"], body) == (200, "MISS", BODY[:100])
    assert "range" not in script.seen[0]


# --------------------------------------------------------------------------------------------
# Soft purge


def test_a_soft_purge_under_load_costs_one_origin_request_and_no_miss(world):
    edge, origin = world
    cc = [("Cache-Control", "max-age=600, stale-while-revalidate=60")]
    script = origin.script("/p/soft/hot", cc, b"v1")
    assert Client(edge.port).get("/p/soft/hot")[1]["x-cache"] == "MISS"
    script.headers, script.body, script.delay = cc, b"v2", 1.0
    status, document = edge.purge({"prefix": "/p/soft/", "soft": True}, token=TOKEN)
    assert (status, document["local"], document["soft"]) == (200, 1, True)

    def fetch(_: int) -> tuple[int, str, bytes]:
        status, headers, body = http_request(edge.port, "GET", "/p/soft/hot")
        return status, headers["x-cache"], body

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(fetch, range(200)))
    assert {(status, how) for status, how, _ in answers} <= {(200, "STALE"), (200, "HIT")}
    assert sum(how == "STALE" for _, how, _ in answers) > 0
    time.sleep(script.delay + 0.2)  # the one refresh lands
    status, headers, body = Client(edge.port).get("/p/soft/hot")
    assert (status, headers["x-cache"], body) == (200, "HIT", b"v2")
    assert len(script.seen) == 2  # the fill, then exactly one refresh


def test_a_hard_purge_still_removes(world):
    edge, origin = world
    script = origin.script("/p/hard/x", [("Cache-Control", "max-age=600")], b"h")
    client = Client(edge.port)
    client.get("/p/hard/x")
    status, document = edge.purge({"prefix": "/p/hard/"}, token=TOKEN)
    assert (status, document["local"], document["soft"]) == (200, 1, False)
    assert client.get("/p/hard/x")[1]["x-cache"] == "MISS"
    assert len(script.seen) == 2
    status, document = edge.purge({"prefix": "/p/hard/", "soft": "yes"}, token=TOKEN)
    assert status == 400 and "soft" in document["reason"]
