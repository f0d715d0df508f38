"""The edge proxy end to end: real edge process, real echo origin, raw sockets.

Proxy semantics (hop-by-hop, forwarding headers, request IDs), streaming both ways, keep-alive
and pipelining, every client timeout and limit, request smuggling, and the edge's own errors.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time

import pytest

from tests.edge_support import (
    LOCATIONS,
    Edge,
    Origin,
    free_port,
    parse_response,
    poll_until,
    processes,
    read_until_close,
    region,
    statuses,
    write_config,
)

TRUSTED_CLIENT = "127.0.0.2"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edge-proxy")
    with processes() as procs:
        origin = Origin("eu-central", tmp, echo=True)
        procs.append(origin)
        origin.ready()
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
        config = write_config(
            tmp / "edge.yaml",
            {
                "eu-central": region(*LOCATIONS["eu-central"], [origin.url], "eu"),
                "ap-southeast": region(*LOCATIONS["ap-southeast"], [dead]),
            },
            edge={
                "services": {
                    "market": {"regions": ["eu-central"]},
                    "gone": {"regions": ["ap-southeast"]},
                },
                "routes": [
                    {"name": "gone", "service": "gone", "path_prefix": "/gone/"},
                    {"name": "api", "service": "market", "path_prefix": "/"},
                ],
                "trusted_proxies": [f"{TRUSTED_CLIENT}/32"],
                "timeouts": {
                    "connect": "1s",
                    "first_byte": "1500ms",
                    "total": "3s",
                    "client_idle": "1s",
                    "client_header": "1s",
                    "client_body": "1s",
                },
                "limits": {
                    "max_url": 1024,
                    "max_header_bytes": 4096,
                    "max_headers": 30,
                    "max_body": 100_000,
                },
            },
        )
        edge = Edge(config, "fra", tmp)
        procs.append(edge)
        edge.ready()
        yield edge, origin


def _request(edge: Edge, raw: bytes, source: str | None = None, timeout: float = 5.0) -> bytes:
    with socket.socket() as sock:
        if source:
            sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", edge.port))
        sock.sendall(raw)
        return read_until_close(sock, timeout)


def _echo(edge: Edge, extra: str = "", source: str | None = None, path: str = "/echo"):
    raw = f"GET {path} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n{extra}\r\n".encode()
    status, headers, body = parse_response(_request(edge, raw, source))
    return status, headers, json.loads(body) if body.startswith(b"{") else body


def _seen_paths(origin: Origin) -> list[str]:
    return [r["path"] for r in origin.seen()]


def test_hop_by_hop_headers_are_stripped_and_forwarding_headers_added(world):
    edge, _ = world
    status, headers, echoed = _echo(
        edge,
        "Keep-Alive: timeout=99\r\nTE: trailers\r\nConnection: close, X-Secret\r\n"
        "X-Secret: 1\r\nProxy-Authorization: Basic Zm9v\r\nUpgrade: h2c\r\n"
        "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil.test\r\n"
        "X-Odd:   spaced\tvalue  \r\nX-Case: MiXeD\r\n",
    )
    assert status == 200
    sent = {name.lower(): value for name, value in echoed["headers"]}
    for gone in ("keep-alive", "te", "x-secret", "proxy-authorization", "upgrade"):
        assert gone not in sent, gone
    assert sent["x-forwarded-for"] == "127.0.0.1"  # the spoofed value is replaced
    assert sent["x-forwarded-host"] == "api.test"
    assert sent["x-forwarded-proto"] == "http"
    assert sent["via"] == "1.1 meridian-fra"
    assert sent["x-odd"] == "spaced\tvalue"  # aiohttp's parser trims outer whitespace only
    assert sent["x-case"] == "MiXeD"
    assert sent["host"] == "api.test"
    # The origin's hop-by-hop response headers (Connection: x-private, X-Private, Keep-Alive)
    # are stripped; the edge's own are added.
    assert "x-private" not in headers and "keep-alive" not in headers
    assert headers["x-cache"] == "MISS"
    assert headers["x-meridian-region"] == "eu-central"
    assert headers["via"] == "1.1 meridian-fra"
    assert headers["x-origin-region"] == "eu-central"
    # A request ID was generated, sent upstream and echoed.
    assert sent["x-request-id"] == headers["x-request-id"] and len(headers["x-request-id"]) == 24


def test_forwarding_headers_from_a_trusted_proxy_are_extended(world):
    edge, _ = world
    _, _, echoed = _echo(
        edge,
        "X-Forwarded-For: 198.51.100.7\r\nX-Forwarded-Proto: https\r\n"
        "X-Forwarded-Host: api.example\r\n",
        source=TRUSTED_CLIENT,
    )
    sent = {name.lower(): value for name, value in echoed["headers"]}
    assert sent["x-forwarded-for"] == f"198.51.100.7, {TRUSTED_CLIENT}"
    assert sent["x-forwarded-proto"] == "https"
    assert sent["x-forwarded-host"] == "api.example"


def test_a_client_request_id_is_propagated_and_echoed(world):
    edge, _ = world
    _, headers, echoed = _echo(edge, "X-Request-Id: trade-42-abc\r\n")
    sent = {name.lower(): value for name, value in echoed["headers"]}
    assert sent["x-request-id"] == "trade-42-abc"
    assert headers["x-request-id"] == "trade-42-abc"
    assert "request_id=trade-42-abc" in poll_until(
        lambda: "trade-42-abc" in edge.log_text() and edge.log_text()
    )


def test_request_bodies_stream_upstream_chunked_and_with_length(world):
    edge, _ = world
    payload = bytes(range(256)) * 300  # 76,800 bytes
    chunks = [payload[i : i + 7000] for i in range(0, len(payload), 7000)]
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    raw = (
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" + body
    )
    status, _, data = parse_response(_request(edge, raw))
    echoed = json.loads(data)
    assert status == 200
    assert echoed["body_length"] == len(payload)
    assert echoed["body_sha"] == hashlib.sha256(payload).hexdigest()
    assert echoed["chunked"] is True  # streamed on, not buffered into a Content-Length
    raw = (
        b"PUT /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % len(payload)
    ) + payload
    status, _, data = parse_response(_request(edge, raw))
    echoed = json.loads(data)
    assert (status, echoed["method"], echoed["body_length"]) == (200, "PUT", len(payload))
    assert ["content-length", str(len(payload))] in echoed["headers"]  # names go lower-case


def test_expect_100_continue_is_answered_by_the_edge(world):
    edge, _ = world
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"hello")
        status, _, data = parse_response(read_until_close(sock, 5))
    assert status == 200 and json.loads(data)["body_length"] == 5


def test_chunked_responses_stream_to_the_client(world):
    edge, _ = world
    raw = b"GET /stream?chunks=4&size=3000 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    response = _request(edge, raw)
    status, headers, body = parse_response(response)
    assert status == 200
    assert headers["transfer-encoding"] == "chunked"
    assert body == b"A" * 3000 + b"B" * 3000 + b"C" * 3000 + b"D" * 3000
    assert response.endswith(b"0\r\n\r\n")


def test_large_responses_keep_their_length(world):
    edge, _ = world
    status, headers, body = parse_response(
        _request(edge, b"GET /big?size=3000000 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    )
    assert (status, headers["content-length"], len(body)) == (200, "3000000", 3_000_000)


@pytest.mark.parametrize("chunked", [False, True])
def test_an_origin_dying_mid_body_closes_the_client_connection(world, chunked):
    edge, _ = world
    path = "/die?chunked=1" if chunked else "/die"
    raw = f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode()  # keep-alive requested
    started = time.monotonic()
    response = _request(edge, raw, timeout=5)
    assert time.monotonic() - started < 4, "the edge must close, not leave the client hanging"
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    if chunked:
        assert b"transfer-encoding: chunked" in head
        assert not body.endswith(b"0\r\n\r\n")  # no last chunk: visibly truncated
    else:
        assert b"content-length: 100000" in head
        assert len(body) < 100_000


def test_keep_alive_and_pipelined_requests_are_answered_in_order(world):
    edge, _ = world
    raw = (
        b"".join(f"GET /echo?n={i} HTTP/1.1\r\nHost: a\r\n\r\n".encode() for i in range(5))
        + b"GET /echo?n=last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    response = _request(edge, raw)
    assert statuses(response) == [200] * 6
    paths = [
        json.loads(part)["path"]
        for part in (
            chunk.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1")[0]
            for chunk in response.split(b"HTTP/1.1 200 OK")[1:]
        )
    ]
    assert paths == [*(f"/echo?n={i}" for i in range(5)), "/echo?n=last"]


def test_idle_keep_alive_connections_are_closed(world):
    edge, _ = world
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
        started = time.monotonic()
        data = read_until_close(sock, 5)  # returns when the edge closes the idle connection
        elapsed = time.monotonic() - started
    assert statuses(data) == [200]
    assert 0.9 < elapsed < 3.0  # client_idle is 1 s, swept every 0.25 s


def test_a_slow_header_gets_408_and_never_reaches_the_origin(world):
    edge, origin = world
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as sock:
        sock.sendall(b"GET /slowloris HTTP/1.1\r\nHost: a\r\nX-A: b")
        started = time.monotonic()
        data = read_until_close(sock, 5)
    assert statuses(data) == [408]
    assert b'"reason":"client_header_timeout"' in data
    assert time.monotonic() - started < 2.5
    assert "/slowloris" not in _seen_paths(origin)


def test_a_stalled_body_gets_408(world):
    edge, _ = world
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as sock:
        sock.sendall(b"POST /stall HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789")
        data = read_until_close(sock, 5)
    assert statuses(data) == [408]
    assert b"client_body_timeout" in data


@pytest.mark.parametrize(
    ("raw", "status", "marker"),
    [
        (b"GET /u" + b"x" * 1100 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, "/ux"),
        (
            b"GET /hdrbytes HTTP/1.1\r\nHost: a\r\nX-Big: " + b"y" * 5000 + b"\r\n\r\n",
            431,
            "/hdrbytes",
        ),
        (
            b"GET /hdrcount HTTP/1.1\r\nHost: a\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(40))
            + b"\r\n",
            431,
            "/hdrcount",
        ),
        (
            b"POST /bodylen HTTP/1.1\r\nHost: a\r\nContent-Length: 200000\r\n\r\n" + b"z" * 1000,
            413,
            "/bodylen",
        ),
    ],
    ids=["url-414", "header-bytes-431", "header-count-431", "content-length-413"],
)
def test_limits_are_answered_by_the_edge_and_never_forwarded(world, raw, status, marker):
    edge, origin = world
    response = _request(edge, raw)
    assert statuses(response) == [status]
    assert not any(p.startswith(marker) for p in _seen_paths(origin))


def test_a_chunked_body_over_the_limit_gets_413(world):
    edge, _ = world
    chunk = b"z" * 50_000
    raw = (
        b"POST /bigchunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 3
        + b"0\r\n\r\n"
    )
    response = _request(edge, raw)
    assert statuses(response) == [413]


SMUGGLING = {
    "cl-te": b"POST /smuggle HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
    "te-cl": b"POST /smuggle HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 6\r\n\r\n0\r\n\r\nG",
    "duplicate-cl": b"POST /smuggle HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
    b"Content-Length: 5\r\n\r\nhello",
    "differing-cl": b"POST /smuggle HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
    b"Content-Length: 11\r\n\r\nhello world",
    "cl-list": b"POST /smuggle HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello",
    "obs-fold": b"GET /smuggle HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
    "obs-fold-te": b"POST /smuggle HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n"
    b" chunked\r\n\r\n0\r\n\r\n",
    "bad-chunk-size": b"POST /smuggle HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nhello\r\n0\r\n\r\n",
    "chunk-size-overflow": b"POST /smuggle HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"\r\nfffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
    "negative-chunk-size": b"POST /smuggle HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked"
    b"\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
    "te-gzip-chunked": b"POST /smuggle HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked"
    b"\r\n\r\n0\r\n\r\n",
    "te-space-before-colon": b"POST /smuggle HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked"
    b"\r\n\r\n0\r\n\r\n",
    "te-http10": b"POST /smuggle HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    "bare-lf": b"GET /smuggle HTTP/1.1\nHost: a\n\n",
    "duplicate-host": b"GET /smuggle HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "missing-host": b"GET /smuggle HTTP/1.1\r\n\r\n",
}


@pytest.mark.parametrize("name", list(SMUGGLING))
def test_smuggling_vectors_are_rejected_with_400_and_never_reach_the_origin(world, name):
    edge, origin = world
    before = _seen_paths(origin).count("/smuggle")
    # A valid request follows on the same connection: it must never be parsed from the
    # leftovers of the ambiguous one.
    response = _request(edge, SMUGGLING[name] + b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
    assert statuses(response) == [400], response[:300]
    assert b"connection: close" in response
    assert b"x-cache: BYPASS" in response and b"age: 0" in response
    assert _seen_paths(origin).count("/smuggle") == before
    assert b"/after" not in response


def test_a_refused_backend_gives_a_502_json_naming_pop_and_reason(world):
    edge, _ = world
    status, headers, body = parse_response(
        _request(edge, b"GET /gone/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    )
    if status == 503:  # health checks already marked the region down; also a correct answer
        assert headers["retry-after"] == "5"
        assert json.loads(body)["reason"] == "no_healthy_region"
        return
    assert status == 502
    assert headers["content-type"] == "application/json"
    document = json.loads(body)
    assert document["pop"] == "fra" and document["reason"] == "upstream_connect"
    assert document["request_id"] == headers["x-request-id"]


def test_no_healthy_region_gives_503_with_retry_after(world):
    edge, _ = world

    def answer():
        raw = b"GET /gone/y HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        status, headers, body = parse_response(_request(edge, raw))
        return (status, headers, body) if status == 503 else None

    _status, headers, body = poll_until(answer, within=10, every=0.2)
    assert headers["retry-after"] == "5"
    assert json.loads(body) == {**json.loads(body), "pop": "fra", "reason": "no_healthy_region"}


def test_a_slow_origin_gives_504(world):
    edge, _ = world
    started = time.monotonic()
    status, _, body = parse_response(
        _request(edge, b"GET /slow?seconds=4 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    )
    elapsed = time.monotonic() - started
    assert status == 504
    reason = json.loads(body)["reason"]
    assert reason in ("upstream_timeout", "deadline_exceeded")
    assert elapsed < 3.5  # first_byte 1.5 s, total 3 s


def test_metrics_and_readiness(world):
    edge, _ = world
    assert edge.admin("/readyz")[0] == 200
    assert edge.admin("/healthz")[0] == 200
    assert (
        edge.metric(
            "meridian_edge_requests_total",
            route="api",
            status="200",
            cache="MISS",
            region="eu-central",
        )
        > 0
    )
    assert edge.metric("meridian_edge_errors_total", status="400") > 0
    assert edge.metric("meridian_edge_request_duration_seconds_count", route="api") > 0
    assert edge.metric("meridian_edge_upstream_duration_seconds_count", region="eu-central") > 0
    assert edge.metric("meridian_edge_process_resident_memory_bytes") > 0
    assert edge.metric("meridian_edge_latency_target_seconds") == 0.05
    status = edge.status()
    assert status["pop"] == "fra"
    assert status["routes"][1] == {"route": "api", "service": "market", "regions": ["eu-central"]}


def test_access_log_has_one_line_per_request(world):
    edge, _ = world
    _, headers, _ = _echo(edge, path="/echo?access-log-check")
    rid = headers["x-request-id"]
    line = poll_until(
        lambda: next(
            (
                ln
                for ln in edge.log_text().splitlines()
                if f"request_id={rid}" in ln and "event=access" in ln
            ),
            None,
        )
    )
    for field in (
        "method=GET",
        "path=/echo",
        "status=200",
        "cache=MISS",
        "region=eu-central",
        "backend=http://127.0.0.1:",
        "upstream_ms=",
        "total_ms=",
    ):
        assert field in line
