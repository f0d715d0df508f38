"""Rate limits end to end: a real edge process, a real echo origin, clients on their own
loopback addresses over real sockets.  (The cases one by one are in ``test_front_ratelimit``.)
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from tests.edge_support import (
    LOCATIONS,
    Edge,
    Origin,
    parse_response,
    poll_until,
    processes,
    region,
    write_config,
)


class Connection:
    """One keep-alive connection to the edge from ``source`` (a loopback address)."""

    def __init__(self, edge: Edge, source: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((source, 0))
        self.sock.settimeout(5.0)
        self.sock.connect(("127.0.0.1", edge.port))
        self.buffer = b""

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: api.test\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        status, headers, _ = parse_response(head + b"\r\n\r\n")
        length = int(headers["content-length"])
        while len(rest) < length:
            self.buffer = head + b"\r\n\r\n" + rest
            self._read()
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
        self.buffer = rest[length:]
        return status, headers, rest[:length]

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, "the edge closed the connection"
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def test_a_client_over_its_rate_gets_429_while_another_is_served(tmp_path: Path) -> None:
    with processes() as procs:
        origin = Origin("eu-central", tmp_path, echo=True)
        procs.append(origin)
        origin.ready()
        config = write_config(
            tmp_path / "edge.yaml",
            {"eu-central": region(*LOCATIONS["eu-central"], [origin.url])},
            # A rate low enough that the test's own pace never refills a request.
            edge={"rate_limits": {"per-client": {"rate": "1/m", "burst": 3}}},
        )
        edge = Edge(config, "fra", tmp_path)
        procs.append(edge)
        edge.ready()

        greedy = Connection(edge, "127.0.0.5")
        cached = "/cc/ticker?cc=public,max-age=60"
        # One fill, then hits answered on the fast path; then the miss path, then refusals.
        assert [greedy.get(cached)[0] for _ in range(2)] == [200, 200]
        assert greedy.get("/echo")[0] == 200
        status, headers, body = greedy.get(cached)
        assert status == 429
        assert 1 <= int(headers["retry-after"]) <= 60
        assert headers["ratelimit-policy"] == '"per-client";q=3;w=180'
        assert headers["ratelimit"] == f'"per-client";r=0;t={headers["retry-after"]}'
        assert headers["cache-control"] == "no-store"
        assert json.loads(body)["reason"] == "rate_limited"
        assert greedy.get("/echo")[0] == 429  # misses too: never forwarded

        # Another client on the same route is untouched, hits and misses alike.
        polite = Connection(edge, "127.0.0.6")
        assert polite.get(cached)[0] == 200
        assert polite.get("/echo")[0] == 200

        seen = [r["path"] for r in origin.seen()]
        assert seen.count("/echo") == 2  # the greedy client's refused /echo never arrived
        assert (
            edge.metric(
                "meridian_edge_rate_limit_requests_total", limit="per-client", outcome="limited"
            )
            == 2
        )
        assert (
            edge.metric(
                "meridian_edge_rate_limit_requests_total", limit="per-client", outcome="allowed"
            )
            == 5
        )
        edge.wait_for_log(r"event=rate_limited limit=per-client route=api client=127\.0\.0\.5")
        greedy.close()
        polite.close()


def test_two_edge_instances_sharing_redis_enforce_one_budget(tmp_path: Path) -> None:
    from edge.cache.testing import RedisServer

    with RedisServer() as redis_server, processes() as procs:
        origin = Origin("eu-central", tmp_path, echo=True)
        procs.append(origin)
        origin.ready()
        config = write_config(
            tmp_path / "edge.yaml",
            {"eu-central": region(*LOCATIONS["eu-central"], [origin.url])},
            edge={
                "cache": {"redis_url": redis_server.url},
                "rate_limits": {"pop": {"rate": "1/m", "burst": 4, "shared": True}},
            },
        )
        edges = [Edge(config, "fra", tmp_path), Edge(config, "fra", tmp_path)]
        for edge in edges:
            procs.append(edge)
        for edge in edges:
            edge.ready()
        first, second = (Connection(edge, "127.0.0.7") for edge in edges)
        cached = "/cc/shared?cc=public,max-age=60"
        statuses = [conn.get(cached)[0] for conn in (first, second, first, second, first)]
        assert statuses == [200, 200, 200, 200, 429]  # four in all, not four each
        assert second.get("/echo")[0] == 429
        assert Connection(edges[1], "127.0.0.8").get(cached)[0] == 200  # another client
        assert sum(e.metric("meridian_edge_rate_limit_fallbacks_total") for e in edges) == 0
        # Redis gone: each instance goes on limiting on its own, and says so.
        redis_server.kill()
        local = [first.get(cached)[0] for _ in range(5)]
        assert local == [200, 200, 200, 200, 429]
        assert edges[0].metric("meridian_edge_rate_limit_fallbacks_total", limit="pop") == 5
        edges[0].wait_for_log(r"event=rate_limit_local_fallback limit=pop")
        first.close()
        second.close()


def _answers(sock: socket.socket) -> bool:
    """Whether the edge answers a request on ``sock`` (a refused connection was reset)."""
    try:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: api.test\r\n\r\n")
        return sock.recv(12).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def test_connection_caps_hold_over_a_thousand_connections(tmp_path: Path) -> None:
    with processes() as procs:
        origin = Origin("eu-central", tmp_path, echo=True)
        procs.append(origin)
        origin.ready()
        config = write_config(
            tmp_path / "edge.yaml",
            {"eu-central": region(*LOCATIONS["eu-central"], [origin.url])},
            edge={"connection_limits": {"per_client": 40, "total": 600}},
        )
        edge = Edge(config, "fra", tmp_path)
        procs.append(edge)
        edge.ready()
        socks: list[socket.socket] = []
        try:
            # 1,000 connections from one address, then 700 from 70 others.
            for source in ["127.0.0.9"] * 1000 + [f"127.0.1.{i % 70 + 1}" for i in range(700)]:
                socks.append(_connect(edge, source))
            served = [_answers(sock) for sock in socks]
            assert sum(served[:1000]) == 40  # one client: its 40
            assert sum(served[1000:]) == 560  # the rest up to the total of 600
            assert (
                edge.metric("meridian_edge_connections_refused_total", reason="per_client") >= 960
            )
            assert edge.metric("meridian_edge_connections_refused_total", reason="total") >= 140
            edge.wait_for_log(r"event=connections_refused reason=per_client client=127\.0\.0\.9")
        finally:
            for sock in socks:
                sock.close()
        # Once the edge has seen them close, the client connects again.
        poll_until(lambda: _answers_anew(edge, "127.0.0.9"), within=10.0)


def _answers_anew(edge: Edge, source: str) -> bool:
    with _connect(edge, source) as sock:
        return _answers(sock)


def _connect(edge: Edge, source: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(5.0)
    sock.connect(("127.0.0.1", edge.port))
    return sock
