"""The edge cache end to end: real edge processes, real origins, a real redis-server.

Two edges (A and B) of POP iad share one Redis.  Origins: the sample origin (us-east, market
data, fault switches; bodies fixed for an hour so that revalidation gets 304s), the echo origin
(eu-central: ``/cc/...`` with caching headers chosen by the test, ``/die``), and a second
sample origin (ap-southeast, host ``lone.test``) that one test kills.  Rules give short TTLs
(300 ms) where a TTL must pass; nothing else waits on time.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import redis

from edge.cache.testing import RedisServer
from tests.edge_support import (
    LOCATIONS,
    Client,
    Edge,
    Origin,
    http_request,
    parse_response,
    poll_until,
    processes,
    read_until_close,
    region,
    write_config,
)

TOKEN = "t0ken-for-tests"
MEMORY = 1 << 20
SHORT = {"ttl": "300ms", "force_ttl": True}


def _edge_section(redis_url: str, *, extra_rule: dict[str, Any] | None = None) -> dict[str, Any]:
    rules = [
        {"path_prefix": "/cc/short/", **SHORT},
        {"path_prefix": "/api/v1/ticker/ETH-USD", **SHORT},
        {"path_prefix": "/api/v1/ticker/SOL-USD", **SHORT, "stale_while_revalidate": "30s"},
        {"path_prefix": "/api/v1/ticker/XRP-USD", **SHORT, "stale_if_error": "1500ms"},
        {"path_prefix": "/api/v1/ticker/DOGE-USD", **SHORT, "stale_if_error": "1500ms"},
        {"path_prefix": "/api/v1/depth/", "ttl": "30s", "force_ttl": True},
    ]
    if extra_rule:
        rules.append(extra_rule)
    return {
        "services": {
            "market": {"regions": ["us-east"]},
            "echo": {"regions": ["eu-central"]},
            "lone": {"regions": ["ap-southeast"]},
        },
        "routes": [
            {"name": "lone", "service": "lone", "host": "lone.test", "path_prefix": "/"},
            {"name": "echo", "service": "echo", "path_prefix": "/cc/"},
            {"name": "die", "service": "echo", "path_prefix": "/die"},
            {"name": "api", "service": "market", "path_prefix": "/"},
        ],
        "timeouts": {"connect": "500ms", "first_byte": "3s", "total": "6s"},
        "cache": {
            "memory": MEMORY,
            "max_object": 256 * 1024,
            "redis_url": redis_url,
            # As tests/redis_topology.py's sharing tests: a write past its deadline is dropped
            # by design, and on a loaded CI machine the default 50 ms dropped a shared entry.
            "redis_timeout": "1s",
            "purge_token": TOKEN,
            "rules": rules,
        },
    }


def _write(path: Path, redis_url: str, origins: dict[str, Origin], **kw: Any) -> Path:
    return write_config(
        path,
        {name: region(*LOCATIONS[name], [origin.url]) for name, origin in origins.items()},
        edge=_edge_section(redis_url, **kw),
        outlier={"enabled": False},
        # Some tests delay every origin answer (health checks included) by 1.5 s; checks must
        # not mark the region down meanwhile, or a coalesced fill races a region going down.
        health={"interval": "3s", "timeout": "2500ms"},
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edge-cache")
    with RedisServer() as redis, processes() as procs:
        origins = {
            "us-east": Origin("us-east", tmp, update_interval=3600),
            "eu-central": Origin("eu-central", tmp, echo=True),
            "ap-southeast": Origin("ap-southeast", tmp, update_interval=3600),
        }
        procs.extend(origins.values())
        for origin in origins.values():
            origin.ready()
        config = _write(tmp / "edge.yaml", redis.url, origins)
        a, b = Edge(config, "iad", tmp), Edge(config, "iad", tmp)
        procs.extend([a, b])
        a.ready()
        b.ready()
        yield {
            "a": a,
            "b": b,
            "market": origins["us-east"],
            "echo": origins["eu-central"],
            "lone": origins["ap-southeast"],
            "redis": redis,
            "config": config,
            "origins": origins,
        }


def _seen(echo: Origin, path: str) -> int:
    return len(echo.seen_for(path))


def _in_redis(world: dict[str, Any], path: str) -> None:
    """Wait for the L2 copy of ``path`` (an edge writes it after it answered the client)."""
    client = redis.Redis.from_url(world["redis"].url)
    try:
        poll_until(lambda: any(client.scan_iter(match=b"*e:*" + path.encode())), within=5)
    finally:
        client.close()


def test_miss_then_hit_with_age_and_the_filling_region(world):
    edge, market = world["a"], world["market"]
    client = Client(edge.port)
    before = market.count("/api/v1/symbols")
    status, first, body = client.get("/api/v1/symbols")
    assert (status, first["x-cache"], first["age"]) == (200, "MISS", "0")
    assert first["x-meridian-region"] == "us-east"
    status, hit, again = client.get("/api/v1/symbols")  # keep-alive: the fast path
    assert (status, hit["x-cache"], again) == (200, "HIT", body)
    assert int(hit["age"]) >= 0 and hit["x-meridian-region"] == "us-east"
    assert hit["content-length"] == str(len(body)) and hit["etag"] == first["etag"]
    # A Connection: close request takes the slow path; same answer, and it closes.
    status, closing, third = http_request(edge.port, "GET", "/api/v1/symbols")
    assert (status, closing["x-cache"], closing["connection"], third) == (200, "HIT", "close", body)
    # HTTP/1.0 with keep-alive: the same bytes, plus the Connection header 1.0 needs.
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as sock:
        sock.sendall(
            b"GET /api/v1/symbols HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n"
        )
        data = b""
        while len(data) < len(body) or b"\r\n\r\n" not in data:
            data += sock.recv(65536)
            if data.endswith(body):
                break
    status, old, again = parse_response(data)
    assert (status, old["x-cache"], old["connection"], again) == (200, "HIT", "keep-alive", body)
    assert market.count("/api/v1/symbols") == before + 1
    # HEAD is served from the stored GET.
    status, head, nothing = client.request("HEAD", "/api/v1/symbols")
    assert (status, head["x-cache"], head["content-length"], nothing) == (
        200,
        "HIT",
        str(len(body)),
        b"",
    )
    assert edge.metric("meridian_cache_hits_total", layer="l1") >= 3
    assert edge.metric("meridian_edge_requests_total", route="api", cache="HIT") >= 3
    # A hit's access line (formatted at the batch flush) has every field a miss's line has.
    _, traced, _ = client.get("/api/v1/symbols", X_Request_ID="trace-hit-1")
    assert traced["x-request-id"] == "trace-hit-1"  # a client's ID is echoed on hits too
    line = poll_until(
        lambda: next(
            (ln for ln in edge.log_text().splitlines() if "request_id=trace-hit-1" in ln), None
        )
    )
    for field in (
        "event=access",
        "method=GET",
        "path=/api/v1/symbols",
        "status=200",
        "bytes=",
        "cache=HIT",
        "region=us-east",
        "backend=-",
        "total_ms=",
        "client=127.0.0.1",
    ):
        assert field in line


def test_expiry_revalidates_with_a_conditional_request(world):
    edge, echo, market = world["a"], world["echo"], world["market"]
    client = Client(edge.port)
    path = "/cc/short/reval?etag=v1"
    assert client.get(path)[1]["x-cache"] == "MISS"
    ticker = "/api/v1/ticker/ETH-USD"
    before = market.count(ticker)
    status, miss, body = client.get(ticker)
    assert (status, miss["x-cache"]) == (200, "MISS")
    time.sleep(0.35)  # the 300 ms TTL passes
    status, headers, echoed = client.get(path)
    assert (status, headers["x-cache"], headers["etag"]) == (200, "REVALIDATED", '"v1"')
    assert json.loads(echoed)["n"] == 1  # the stored body, not a new one
    conditional = {k.lower(): v for k, v in echo.seen_for(path)[-1]["headers"]}
    assert conditional["if-none-match"] == '"v1"'
    status, headers, again = client.get(ticker)
    assert (status, headers["x-cache"], again) == (200, "REVALIDATED", body)
    assert market.count(ticker) == before + 2  # the fill and one conditional request
    status, headers, _ = client.get(ticker)
    assert headers["x-cache"] == "HIT"  # fresh again after the 304


def test_vary_keeps_one_variant_per_header_value(world):
    client = Client(world["a"].port)
    path = "/cc/long/vary?vary=X-Variant"
    seen = []
    for variant in ("a", "b", "a", "b", "A"):
        _, headers, body = client.get(path, X_Variant=variant)
        seen.append((headers["x-cache"], json.loads(body)["variant"]))
    assert seen == [("MISS", "a"), ("MISS", "b"), ("HIT", "a"), ("HIT", "b"), ("MISS", "A")]
    assert _seen(world["echo"], path) == 3


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/cc/long/private?cc=private,max-age%3D60", {}),
        ("/cc/long/no-store?cc=no-store", {}),
        ("/cc/long/auth?cc=max-age%3D60", {"Authorization": "Bearer user-1"}),
        ("/cc/long/cookie?cc=max-age%3D60&cookie=1", {}),
    ],
    ids=["private", "no-store", "authorization", "set-cookie"],
)
def test_uncacheable_responses_are_not_stored(world, path, headers):
    client = Client(world["a"].port)
    answers = [client.request("GET", path, headers) for _ in range(3)]
    assert [(s, h["x-cache"]) for s, h, _ in answers] == [(200, "MISS")] * 3
    assert [json.loads(body)["n"] for _, _, body in answers] == [1, 2, 3]
    if "Authorization" in headers:  # nothing stored for anonymous requests either
        _, anonymous, body = client.get(path)
        assert (anonymous["x-cache"], json.loads(body)["n"]) == ("MISS", 4)


def test_whoami_no_store_reaches_the_origin_every_time(world):
    client = Client(world["a"].port)
    market = world["market"]
    before = market.count("/api/v1/whoami")
    caches = [client.get("/api/v1/whoami")[1]["x-cache"] for _ in range(5)]
    assert caches == ["MISS"] * 5
    assert market.count("/api/v1/whoami") == before + 5


def test_an_unsafe_method_invalidates_the_uri(world):
    client = Client(world["a"].port)
    path = "/cc/long/invalidate"
    assert client.get(path)[1]["x-cache"] == "MISS"
    assert client.get(path)[1]["x-cache"] == "HIT"
    status, posted, body = client.request("POST", path, body=b"{}")
    assert (status, posted["x-cache"], json.loads(body)["method"]) == (200, "BYPASS", "POST")
    status, headers, body = client.get(path)
    assert (headers["x-cache"], json.loads(body)["n"]) == ("MISS", 3)
    # Edge B shares Redis: it never gets the invalidated copies (n 1 and 2) either.
    status, headers, body = Client(world["b"].port).get(path)
    assert status == 200 and json.loads(body)["n"] >= 3


async def test_stale_while_revalidate_refreshes_exactly_once(world):
    edge, market = world["a"], world["market"]
    path = "/api/v1/ticker/SOL-USD"
    before = await asyncio.to_thread(market.count, path)
    async with aiohttp.ClientSession() as session:
        async with session.get(edge.base + path) as response:
            assert response.headers["X-Cache"] == "MISS"
            body = await response.read()
        await asyncio.sleep(0.35)  # the 300 ms TTL passes; 30 s stale-while-revalidate

        async def one() -> tuple[str, bytes]:
            async with session.get(edge.base + path) as response:
                return response.headers["X-Cache"], await response.read()

        started = time.monotonic()
        answers = await asyncio.gather(*(one() for _ in range(50)))
        elapsed = time.monotonic() - started
    # Stale answers are the stored body; a HIT after the refresh may carry the origin's next
    # second's ticker.
    assert {answer for cache, answer in answers if cache == "STALE"} == {body}
    assert "STALE" in {cache for cache, _ in answers}
    assert {cache for cache, _ in answers} <= {"STALE", "HIT"}
    await asyncio.to_thread(poll_until, lambda: market.count(path) >= before + 2)
    await asyncio.sleep(0.05)
    refreshes = await asyncio.to_thread(market.count, path) - before - 1  # less the fill
    # One refresh for the 50 stale requests; on a machine so loaded that answering them took
    # longer than the TTL, the refreshed copy went stale in turn: one more per TTL passed.
    assert 1 <= refreshes <= 1 + int(elapsed / 0.3), (refreshes, elapsed)
    assert edge.metric("meridian_cache_stale_served_total", reason="while_revalidate") >= 1


def test_stale_if_error_serves_stale_within_the_window_then_the_error(world):
    edge, market = world["a"], world["market"]
    client = Client(edge.port)
    path = "/api/v1/ticker/XRP-USD"
    status, headers, body = client.get(path)
    assert (status, headers["x-cache"]) == (200, "MISS")
    stored_at = time.monotonic()
    market.control({"status": 503})
    try:
        time.sleep(0.35)  # past the 300 ms TTL, inside the 1.5 s stale-if-error window
        status, stale, again = client.get(path)
        assert (status, stale["x-cache"], again) == (200, "STALE", body)
        time.sleep(max(0.0, stored_at + 1.95 - time.monotonic()))  # the window ends
        status, failed, error = client.get(path)
    finally:
        market.control({})
    assert status == 503 and failed["x-cache"] == "MISS"
    assert b"injected" in error or b"no_healthy_region" in error
    assert edge.metric("meridian_cache_stale_served_total", reason="if_error") >= 1


def test_stale_if_error_when_the_origin_is_killed(world):
    edge, lone = world["a"], world["lone"]
    client = Client(edge.port, host="lone.test")
    path = "/api/v1/ticker/DOGE-USD"
    status, headers, body = client.get(path)
    assert (status, headers["x-cache"], headers["x-meridian-region"]) == (
        200,
        "MISS",
        "ap-southeast",
    )
    stored_at = time.monotonic()
    lone.signal(signal.SIGKILL)
    lone.wait(5)
    time.sleep(0.35)
    status, stale, again = client.get(path)
    assert (status, stale["x-cache"], stale["x-meridian-region"], again) == (
        200,
        "STALE",
        "ap-southeast",
        body,
    )
    assert int(stale["age"]) >= 0
    time.sleep(max(0.0, stored_at + 1.95 - time.monotonic()))
    status, failed, error = client.get(path)
    assert status in (502, 503) and json.loads(error)["pop"] == "iad"
    assert failed["x-cache"] == "MISS"


async def test_a_thousand_concurrent_misses_make_one_origin_request(world):
    edge, market = world["a"], world["market"]
    path = "/api/v1/depth/ADA-USD"
    before = await asyncio.to_thread(market.count, path)
    await asyncio.to_thread(market.control, {"delay_ms": 1500})
    try:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def one() -> tuple[int, str, bytes]:
                async with session.get(edge.base + path) as response:
                    return response.status, response.headers["X-Cache"], await response.read()

            answers = await asyncio.gather(*(one() for _ in range(1000)))
    finally:
        await asyncio.to_thread(market.control, {})
    assert {status for status, _, _ in answers} == {200}
    assert len({body for _, _, body in answers}) == 1
    caches = [cache for _, cache, _ in answers]
    assert caches.count("MISS") == 1 and caches.count("HIT") == 999
    assert await asyncio.to_thread(market.count, path) == before + 1
    assert edge.metric("meridian_cache_coalesced_waiters_total") >= 999


def test_unkeyed_headers_cannot_poison_what_others_get(world):
    edge, echo = world["a"], world["echo"]
    path = "/cc/long/poison"
    attacker = Client(edge.port)
    _, headers, body = attacker.get(
        path,
        X_Forwarded_Host="evil.test",
        X_Original_URL="/cc/long/admin",
        X_Rewrite_URL="/cc/long/admin",
        X_HTTP_Method_Override="DELETE",
        X_Forwarded_Scheme="nothttps",
        Forwarded="host=evil.test",
    )
    poisoned = json.loads(body)
    assert headers["x-cache"] == "MISS"
    assert (poisoned["path"], poisoned["method"], poisoned["host"]) == (path, "GET", "127.0.0.1")
    _, headers, body = Client(edge.port).get(path)
    assert headers["x-cache"] == "HIT" and json.loads(body) == poisoned
    sent = dict((k.lower(), v) for k, v in echo.seen_for(path)[0]["headers"])
    for dropped in ("x-original-url", "x-rewrite-url", "x-http-method-override", "forwarded"):
        assert dropped not in sent
    assert sent["x-forwarded-host"] == "127.0.0.1"
    # An absolute-form target's authority is the key's host and the one the origin sees.
    raw = b"GET http://victim.test/cc/long/absolute HTTP/1.1\r\nHost: evil.test\r\n\r\n"
    _, headers, body = parse_response(_exchange(edge.port, raw))
    assert json.loads(body)["host_header"] == "victim.test"
    _, headers, body = Client(edge.port, host="victim.test").get("/cc/long/absolute")
    assert headers["x-cache"] == "HIT" and json.loads(body)["host_header"] == "victim.test"
    _, headers, body = Client(edge.port, host="evil.test").get("/cc/long/absolute")
    assert headers["x-cache"] == "MISS" and json.loads(body)["host_header"] == "evil.test"


def _exchange(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
        return read_until_close(sock, 5)


def test_an_origin_dying_mid_body_leaves_nothing_cached(world):
    edge, echo = world["a"], world["echo"]
    path = "/die?cacheable=1"
    for attempt in (1, 2):
        with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())  # keep-alive
            started = time.monotonic()
            data = read_until_close(sock, 5)  # returns once the edge closes
            assert time.monotonic() - started < 4
        status, headers, body = parse_response(data)
        # Nothing was sent before the body was complete: a clean 502, then the close.
        assert (status, headers["connection"], headers["x-cache"]) == (502, "close", "MISS")
        assert json.loads(body)["reason"] == "upstream_broke_mid_body"
        assert _seen(echo, path) == attempt  # the second request went to the origin again


async def test_two_edges_share_entries_through_redis(world):
    a, b, echo = world["a"], world["b"], world["echo"]
    path = "/cc/long/shared"
    host = {"Host": "api.meridian.test"}  # one name for the POP's instances (ports differ)
    async with aiohttp.ClientSession(headers=host) as session:
        async with session.get(a.base + path) as response:
            assert response.headers["X-Cache"] == "MISS"
            body = await response.read()
        await asyncio.to_thread(_in_redis, world, path)
        async with session.get(b.base + path) as response:
            assert response.headers["X-Cache"] == "HIT"
            assert await response.read() == body
            assert response.headers["X-Meridian-Region"] == "eu-central"
    assert await asyncio.to_thread(_seen, echo, path) == 1
    assert await asyncio.to_thread(b.metric, "meridian_cache_hits_total", layer="l2") >= 1


async def test_only_if_cached_is_answered_from_redis_by_the_other_edge(world):
    """RFC 9111 5.2.1.7 in a POP: what edge A stored in Redis answers B's only-if-cached
    requests (HTTP/1.1 and h2c), a HIT; nothing anywhere is a 504; neither reaches the origin."""
    a, b, echo = world["a"], world["b"], world["echo"]
    name = "api.meridian.test"
    only = {"Host": name, "Cache-Control": "only-if-cached"}
    stored = {"h1": "/cc/long/only-if-cached/h1", "h2": "/cc/long/only-if-cached/h2"}
    bodies = {}
    for kind, path in stored.items():
        status, headers, bodies[kind] = Client(a.port, host=name).get(path)
        assert (status, headers["x-cache"]) == (200, "MISS")
        await asyncio.to_thread(_in_redis, world, path)
    l2_hits = await asyncio.to_thread(b.metric, "meridian_cache_hits_total", layer="l2")
    status, headers, body = Client(b.port).get(stored["h1"], **only)
    assert (status, headers["x-cache"], body) == (200, "HIT", bodies["h1"])
    missing = "/cc/long/only-if-cached/nowhere"
    async with httpx.AsyncClient(http1=False, http2=True, base_url=b.base, timeout=10) as h2c:
        response = await h2c.get(stored["h2"], headers=only)
        assert response.http_version == "HTTP/2"
        assert (response.status_code, response.headers["x-cache"]) == (200, "HIT")
        assert response.content == bodies["h2"]
        response = await h2c.get(missing, headers=only)
        assert (response.status_code, response.headers["x-cache"]) == (504, "MISS")
    assert Client(b.port).get(missing, **only)[0] == 504
    assert await asyncio.to_thread(b.metric, "meridian_cache_hits_total", layer="l2") >= (
        l2_hits + 2
    )
    assert [_seen(echo, path) for path in (*stored.values(), missing)] == [1, 1, 0]
    # The 504s left nothing behind: a plain request still fills.
    _, headers, _ = Client(b.port, host=name).get(missing)
    assert headers["x-cache"] == "MISS" and _seen(echo, missing) == 1


def _only_if_cached(edge: Edge, path: str) -> int:
    return Client(edge.port).get(path, Cache_Control="only-if-cached")[0]


def test_purge_by_url_prefix_and_tag_across_instances(world):
    a, b = world["a"], world["b"]
    paths = {
        "url": "/cc/long/purge/one",
        "pfx1": "/cc/long/purge/dir/1",
        "pfx2": "/cc/long/purge/dir/2",
        "tag1": "/cc/long/purge/t1?tag=grp-a",
        "tag2": "/cc/long/purge/t2?tag=grp-a%20grp-b",
        "tag3": "/cc/long/purge/t3?tag=grp-b",
    }
    for path in paths.values():
        assert Client(a.port).get(path)[1]["x-cache"] == "MISS"
        _in_redis(world, path)
        assert Client(b.port).get(path)[1]["x-cache"] == "HIT"  # from Redis, now in B's L1
        assert _only_if_cached(b, path) == 200

    assert a.purge({"url": "http://127.0.0.1/cc/long/purge/one"})[0] == 401
    assert a.purge({"url": "http://127.0.0.1/cc/long/purge/one"}, token="wrong")[0] == 403
    assert Client(a.port).get(paths["url"])[1]["x-cache"] == "HIT"

    def gone_everywhere(*names: str) -> None:
        for name in names:
            poll_until(lambda p=paths[name]: _only_if_cached(b, p) == 504, within=5)
            assert _only_if_cached(a, paths[name]) == 504
            _, headers, body = Client(b.port).get(paths[name])  # not from L2 either
            assert headers["x-cache"] == "MISS" and json.loads(body)["n"] == 2

    status, result = a.purge({"url": "http://127.0.0.1/cc/long/purge/one"}, token=TOKEN)
    assert status == 200 and result["local"] == 1 and result["propagated"] is True
    gone_everywhere("url")
    status, result = a.purge({"prefix": "/cc/long/purge/dir/"}, token=TOKEN)
    assert (status, result["local"]) == (200, 2)
    gone_everywhere("pfx1", "pfx2")
    status, _ = a.purge(token=TOKEN, tag="grp-a")  # PURGE-style query parameters work too
    assert status == 200
    gone_everywhere("tag1", "tag2")
    assert Client(a.port).get(paths["tag3"])[1]["x-cache"] == "HIT"
    assert _only_if_cached(b, paths["tag3"]) == 200


def test_sighup_reconfigures_the_cache_and_keeps_its_entries(world):
    a, redis = world["a"], world["redis"]
    client = Client(a.port)
    path = "/cc/long/reload"
    assert client.get(path)[1]["x-cache"] == "MISS"
    entries = a.metric("meridian_cache_entries")
    _write(
        world["config"],
        redis.url,
        world["origins"],
        extra_rule={"path_prefix": "/cc/reloaded/", **SHORT},
    )
    generation = a.metric("meridian_edge_config_generation")
    a.signal(signal.SIGHUP)
    poll_until(lambda: a.metric("meridian_edge_config_generation") == generation + 1)
    assert a.metric("meridian_cache_entries") >= entries
    assert _only_if_cached(a, path) == 200  # still in L1, not refetched from Redis
    assert client.get(path)[1]["x-cache"] == "HIT"


async def test_many_distinct_keys_stay_under_the_memory_bound(world):
    edge = world["a"]
    evictions = await asyncio.to_thread(edge.metric, "meridian_cache_evictions_total")
    connector = aiohttp.TCPConnector(limit=20)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> int:
            async with session.get(f"{edge.base}/cc/long/memory/{i}?size=3000") as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one(i) for i in range(500)))  # ~2 MB of entries
    assert set(statuses) == {200}
    stored = await asyncio.to_thread(edge.metric, "meridian_cache_bytes")
    assert 0 < stored <= MEMORY
    assert await asyncio.to_thread(edge.metric, "meridian_cache_evictions_total") > evictions + 100


async def test_redis_killed_mid_test_fails_no_request(world):
    a, redis = world["a"], world["redis"]
    results: list[int] = []
    errors: list[str] = []
    async with aiohttp.ClientSession() as session:

        async def worker(w: int) -> None:
            for i in range(40):
                # Past the kill, keys never asked for: their fills must get by without L2
                # (the first 25 are all stored in L1 by then, and would never ask Redis).
                key = (w * 7 + i) % 25 + (25 if i > 10 else 0)
                try:
                    url = f"{a.base}/cc/long/redis-kill/{key}"
                    async with session.get(url) as response:
                        await response.read()
                        results.append(response.status)
                except aiohttp.ClientError as exc:
                    errors.append(repr(exc))
                if w == 0 and i == 10:
                    redis.kill()

        await asyncio.gather(*(worker(w) for w in range(8)))
    assert errors == [] and results == [200] * 320
    await asyncio.to_thread(
        poll_until, lambda: a.metric("meridian_cache_redis_errors_total") > 0, within=10
    )


def test_replayed_request_heads_keep_each_requests_identity(world):
    """The protocol replays the parsed head of a chunk it has seen byte for byte: the client
    address, the request ID and the order of pipelined requests are still each request's."""
    edge, echo = world["a"], world["echo"]
    path = "/cc/long/replay?cc=no-store"
    raw = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    seen_ids = set()
    for source in ("127.0.0.1", "127.0.0.2", "127.0.0.2"):
        with socket.socket() as sock:
            sock.bind((source, 0))
            sock.settimeout(5)
            sock.connect(("127.0.0.1", edge.port))
            for _ in range(2):  # the second send on a connection is a replay
                sock.sendall(raw)
                data = b""
                while not data.endswith(b"}"):
                    data += sock.recv(65536)
                status, headers, _ = parse_response(data)
                assert (status, headers["x-cache"]) == (200, "MISS")
                seen_ids.add(headers["x-request-id"])
        # Pipelined copies of the same bytes in one chunk go through the parser, in order.
        with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as sock:
            sock.sendall(raw * 2 + raw.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            assert read_until_close(sock, 5).count(b"HTTP/1.1 200 OK") == 3
    assert len(seen_ids) == 6  # a new ID for every request
    forwarded = [
        dict((k.lower(), v) for k, v in r["headers"])["x-forwarded-for"]
        for r in echo.seen_for("/cc/long/replay?cc=no-store")
    ]
    assert forwarded.count("127.0.0.2") == 2 * 2 and forwarded.count("127.0.0.1") >= 2


def test_replayed_hits_follow_age_purges_and_count(world):
    """A request repeated byte for byte on a connection is answered from a memo of its last
    fresh hit: Age still ticks, a purge takes effect on the very next request, and every hit
    is counted and logged."""
    edge = world["a"]
    path = "/cc/long/hit-memo?cc=public,max-age%3D60"
    raw = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: memo-test\r\n\r\n".encode()
    hits_before = edge.metric("meridian_edge_requests_total", route="echo", cache="HIT")

    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as sock:

        def send() -> tuple[dict[str, str], dict[str, Any]]:
            sock.sendall(raw)
            data = b""
            while not data.endswith(b"}"):
                chunk = sock.recv(65536)
                assert chunk, "the edge closed the connection"
                data += chunk
            status, headers, body = parse_response(data)
            assert status == 200
            return headers, json.loads(body)

        first, body = send()
        assert first["x-cache"] == "MISS" and body["n"] == 1
        ages = []
        for _ in range(20):  # parsed, replayed, then answered from the hit memo
            headers, again = send()
            assert headers["x-cache"] == "HIT" and again == body
            ages.append(int(headers["age"]))
        time.sleep(1.1)
        later, _ = send()
        assert int(later["age"]) >= max(ages) + 1  # the memo does not freeze Age

        status, result = edge.purge({"url": f"http://127.0.0.1{path}"}, token=TOKEN)
        assert (status, result["local"]) == (200, 1)
        refilled, body = send()
        assert refilled["x-cache"] == "MISS" and body["n"] == 2  # not the purged bytes
        after, again = send()
        assert after["x-cache"] == "HIT" and again["n"] == 2

    hits = edge.metric("meridian_edge_requests_total", route="echo", cache="HIT") - hits_before
    assert hits == 22

    def access_lines() -> list[str]:
        return [
            line
            for line in edge.log_text().splitlines()
            if "event=access" in line and "path=/cc/long/hit-memo " in line
        ]

    poll_until(lambda: len(access_lines()) >= 24 or None)
    lines = access_lines()
    assert len(lines) == 24 and all("status=200" in line for line in lines)
    assert sum("cache=HIT" in line for line in lines) == 22


def _read_one(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One keep-alive response (Content-Length framed) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the edge closed the connection"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(parse_response(head + b"\r\n\r\n")[1]["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the edge closed the connection"
        body += chunk
    return parse_response(head + b"\r\n\r\n" + body)


def test_concurrent_misses_ask_the_cache_once_each(world):
    """The fast path's lookup of a request it cannot answer travels with that request to the
    slow path: requests arriving on many connections at once are each counted once."""
    edge = world["a"]
    before = edge.metric("meridian_cache_bypass_total", reason="request-no-store")
    sockets = [socket.create_connection(("127.0.0.1", edge.port), timeout=5) for _ in range(24)]
    try:
        for i, sock in enumerate(sockets):
            sock.sendall(
                f"GET /cc/long/once/{i} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Cache-Control: no-store\r\n\r\n".encode()
            )
        answers = [_read_one(sock) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    assert [status for status, _, _ in answers] == [200] * len(sockets)
    after = edge.metric("meridian_cache_bypass_total", reason="request-no-store")
    assert after - before == len(sockets)
