"""The miss path (a request that goes to the origin), as the lean version of it behaves: what
the origin receives, how the answer is framed, the total deadline enforced by the connection
sweep, and the plain-number metrics.  Real processes, real sockets."""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.edge_support import (
    LOCATIONS,
    Client,
    Edge,
    Origin,
    parse_response,
    poll_until,
    processes,
    read_until_close,
    region,
    write_config,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edge-miss")
    with processes() as procs:
        origin = Origin("eu-central", tmp, echo=True)
        procs.append(origin)
        origin.ready()
        config = write_config(
            tmp / "edge.yaml",
            {"eu-central": region(*LOCATIONS["eu-central"], [origin.url], "eu")},
            edge={
                # first_byte longer than total: only the total deadline can end a slow answer.
                "timeouts": {"connect": "1s", "first_byte": "10s", "total": "1s"},
            },
        )
        edge = Edge(config, "fra", tmp)
        procs.append(edge)
        edge.ready()
        yield edge, origin


def _keep_alive_exchange(port: int, raw: bytes, count: int) -> list[bytes]:
    """Send the same request ``count`` times on one connection, one at a time."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for _ in range(count):
            sock.sendall(raw)
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(
                next(
                    line.split(b":", 1)[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
            )
            while len(body) < length:
                body += sock.recv(65536)
            answers.append(head + b"\r\n\r\n" + body)
    return answers


def test_a_fill_sends_the_client_lines_in_order_and_nothing_more(world):
    edge, origin = world
    # The same bytes three times on one connection: the first is parsed, the next ones are
    # replayed from the memoised head (whose upstream lines are built once, then copied).
    raw = b"GET /echo?lines HTTP/1.1\r\nHost: a.example\r\nX-B: 2\r\nX-A: 1\r\n\r\n"
    answers = _keep_alive_exchange(edge.port, raw, 3)
    seen = [r for r in origin.seen() if r["path"] == "/echo?lines"]
    assert len(seen) == 3
    ids = []
    for answer, received in zip(answers, seen, strict=True):
        status, headers, _ = parse_response(answer)
        assert status == 200
        assert headers["x-cache"] == "MISS"
        names = [name for name, _ in received["headers"]]
        # aiohttp adds nothing of its own (User-Agent, Accept, Accept-Encoding, Content-Type),
        # and the lines keep the client's order; the edge's own come last, the request ID
        # last of all.
        assert names == [
            "host",
            "x-b",
            "x-a",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "via",
            "x-request-id",
        ]
        values = dict(received["headers"])
        assert values["host"] == "a.example"
        assert values["via"] == "1.1 meridian-fra"
        assert values["x-request-id"] == headers["x-request-id"]
        ids.append(values["x-request-id"])
    assert len(set(ids)) == 3  # a new request ID each time, also on the memoised head


def test_a_forwarded_post_gets_no_header_the_client_did_not_send(world):
    edge, _ = world
    client = Client(edge.port)
    status, _, body = client.request("POST", "/echo?post-lines", body=b"abc")
    client.close()
    assert status == 200
    names = [name for name, _ in json.loads(body)["headers"]]
    assert "content-type" not in names and "user-agent" not in names
    # The client's lines in order, then the framing of the body the edge sends.
    assert names[-2:] == ["x-request-id", "content-length"]
    assert json.loads(body)["body_length"] == 3


def test_small_uncached_answers_keep_their_length_on_a_keep_alive_connection(world):
    edge, _ = world
    raw = b"GET /echo?small HTTP/1.1\r\nHost: a\r\n\r\n"
    for answer in _keep_alive_exchange(edge.port, raw, 50):
        status, headers, body = parse_response(answer)
        assert status == 200
        assert "transfer-encoding" not in headers
        assert int(headers["content-length"]) == len(body)
        assert json.loads(body)["path"] == "/echo?small"


def test_an_answer_slower_than_the_total_deadline_is_a_504(world):
    edge, _ = world
    started = time.monotonic()
    client = Client(edge.port)
    status, headers, body = client.get("/slow?seconds=3")
    elapsed = time.monotonic() - started
    assert status == 504
    assert json.loads(body)["reason"] == "deadline_exceeded"
    assert headers["x-cache"] == "MISS"
    # total 1 s, enforced by the connection sweep: up to one sweep interval (0.25 s) late.
    assert 0.9 <= elapsed < 2.0
    # The connection is still good for the next request.
    assert client.get("/echo?after-deadline")[0] == 200
    client.close()


def test_a_body_streaming_past_the_total_deadline_is_cut(world):
    edge, _ = world
    raw = b"GET /stream?chunks=8&size=100&delay=0.3 HTTP/1.1\r\nHost: a\r\n\r\n"
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as sock:
        sock.sendall(raw)
        response = read_until_close(sock, 5)
    elapsed = time.monotonic() - started
    assert response.startswith(b"HTTP/1.1 200")
    assert not response.endswith(b"0\r\n\r\n")  # truncated: the client can tell
    assert elapsed < 2.0


def test_miss_metrics_are_plain_numbers_on_scrape(world):
    edge, _ = world
    client = Client(edge.port)
    for _ in range(3):
        assert client.get("/echo?metrics")[0] == 200
    client.close()
    assert edge.metric("meridian_edge_upstream_duration_seconds_count", region="eu-central") >= 3
    assert edge.metric("meridian_edge_upstream_duration_seconds_bucket", le="+Inf") >= 3
    _, text = edge.admin("/metrics")
    lines = text.decode().splitlines()
    assert "# TYPE meridian_edge_in_flight_requests gauge" in lines
    # Nothing is in flight once the answers are in (the scrape itself is on the admin port).
    assert edge.metric("meridian_edge_in_flight_requests") == 0
    assert any(ln.startswith("meridian_edge_upstream_active_requests{") for ln in lines)
    # Every upstream request ends released (a fill abandoned at the deadline runs on in the
    # background until the slow origin answers, then lets go of its connection).
    poll_until(lambda: edge.metric("meridian_edge_upstream_active_requests") == 0, within=10)


def test_a_miss_has_its_access_line(world):
    edge, _ = world
    client = Client(edge.port)
    _, headers, _ = client.get("/echo?access-miss")
    client.close()
    rid = headers["x-request-id"]
    line = poll_until(
        lambda: next(
            (ln for ln in edge.log_text().splitlines() if f"request_id={rid} " in ln),
            None,
        )
    )
    assert "event=access method=GET path=/echo status=200 " in line
    assert " cache=MISS region=eu-central backend=http://127.0.0.1:" in line
    assert " attempts=1 upstream_ms=" in line
    upstream_ms = float(line.split(" upstream_ms=")[1].split()[0])
    total_ms = float(line.split(" total_ms=")[1].split()[0])
    assert 0 < upstream_ms <= total_ms
    assert line.endswith(" client=127.0.0.1")
