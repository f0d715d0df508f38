"""Routing and failover with the sample origin: nearest region, retry on another backend, no
retry of a POST, residency, and a whole region SIGKILLed under load with zero failed GETs."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter

import aiohttp
import pytest

from tests.edge_support import (
    LOCATIONS,
    Edge,
    Origin,
    http_request,
    poll_until,
    processes,
    region,
    write_config,
)

EU_HOST = "eu.api.test"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edge-failover")
    with processes() as procs:
        eu1, eu2, us1 = (
            Origin("eu-central", tmp),
            Origin("eu-central", tmp),
            Origin("us-east", tmp),
        )
        procs.extend([eu1, eu2, us1])
        for origin in (eu1, eu2, us1):
            origin.ready()
        config = write_config(
            tmp / "edge.yaml",
            {
                "us-east": region(*LOCATIONS["us-east"], [us1.url]),
                "eu-central": region(*LOCATIONS["eu-central"], [eu1.url, eu2.url], "eu"),
            },
            edge={
                "services": {"market": {}, "eu-only": {"residency": "eu"}},
                "routes": [
                    {"name": "eu", "service": "eu-only", "host": EU_HOST, "path_prefix": "/"},
                    {"name": "api", "service": "market", "path_prefix": "/"},
                ],
                "timeouts": {"connect": "500ms", "first_byte": "2s", "total": "5s"},
            },
            # Keep active checks slow so that the failover below is the edge's own doing.
            health={"interval": "5s", "fast_interval": "5s", "timeout": "1s"},
        )
        edge = Edge(config, "fra", tmp)
        procs.append(edge)
        edge.ready()
        yield edge, eu1, eu2, us1


def _get(edge: Edge, path: str, host: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    return http_request(edge.port, "GET", path, headers={"Host": host})


def test_requests_go_to_the_nearest_region_of_the_pop(world):
    edge, *_ = world
    status, headers, body = _get(edge, "/api/v1/whoami")
    assert status == 200
    assert json.loads(body) == {"region": "eu-central"}
    assert headers["x-meridian-region"] == "eu-central"
    assert headers["x-cache"] == "MISS"


def test_load_is_spread_over_the_backends_of_a_region(world):
    edge, eu1, eu2, _ = world
    # whoami is no-store: every request reaches an origin (a cached ticker would not).
    path = "/api/v1/whoami"
    before = [o.control()["requests"]["paths"].get(path, 0) for o in (eu1, eu2)]
    for _ in range(40):
        assert _get(edge, path)[0] == 200
    after = [o.control()["requests"]["paths"].get(path, 0) for o in (eu1, eu2)]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served) == 40 and min(served) >= 8  # P2C over equal load spreads


def test_a_failing_backend_is_retried_on_another_backend(world):
    edge, eu1, _eu2, _ = world
    retries_before = edge.metric("meridian_edge_retries_total", service="market")
    eu1.control({"drop": True})
    try:
        results = [_get(edge, "/api/v1/whoami") for _ in range(20)]
    finally:
        eu1.control({})
    assert [status for status, _, _ in results] == [200] * 20
    assert {json.loads(body)["region"] for _, _, body in results} == {"eu-central"}
    dropped = eu1.control()["requests"]["paths"].get("/api/v1/whoami", 0)
    assert dropped > 0  # some first attempts did land on the dropping backend...
    assert edge.metric("meridian_edge_retries_total", service="market") > retries_before  # ...and
    # were retried on eu2.


def test_a_post_is_never_retried(world):
    edge, eu1, eu2, _ = world
    counts = lambda: sum(  # noqa: E731
        o.control()["requests"]["paths"].get("/api/v1/orders", 0) for o in (eu1, eu2)
    )
    before = counts()
    eu1.control({"drop": True})
    eu2.control({"drop": True})
    try:
        status, headers, body = http_request(
            edge.port,
            "POST",
            "/api/v1/orders",
            body=b'{"symbol":"BTC-USD","qty":1}',
            headers={"Content-Type": "application/json"},
        )
    finally:
        eu1.control({})
        eu2.control({})
    assert status == 502
    assert json.loads(body)["reason"] == "upstream_reset"
    assert headers["x-cache"] == "BYPASS"
    assert counts() == before + 1  # exactly one attempt reached an origin


def test_an_eu_only_service_never_leaves_eu_regions(world):
    edge, eu1, eu2, us1 = world
    # Proxied requests only: the edge's health checks of us-east (/healthz) go on meanwhile.
    us_before = us1.control()["requests"]["paths"].get("/api/v1/whoami", 0)
    status, _, body = _get(edge, "/api/v1/whoami", host=EU_HOST)
    assert (status, json.loads(body)["region"]) == (200, "eu-central")
    eu1.control({"drop": True})
    eu2.control({"drop": True})
    try:
        status, _headers, body = _get(edge, "/api/v1/whoami", host=EU_HOST)
    finally:
        eu1.control({})
        eu2.control({})
    assert status == 502  # both EU backends failed; us-east would have answered
    assert json.loads(body)["pop"] == "fra"
    assert us1.control()["requests"]["paths"].get("/api/v1/whoami", 0) == us_before


async def test_killing_the_nearest_region_fails_over_with_zero_failed_gets(world):
    edge, eu1, eu2, _ = world
    regions: Counter[str] = Counter()
    failures: list[str] = []
    killed = asyncio.Event()
    after_kill: Counter[str] = Counter()

    async def client(session: aiohttp.ClientSession) -> None:
        while after_kill["us-east"] < 50:
            try:
                async with session.get(f"{edge.base}/api/v1/whoami") as response:
                    body = await response.read()
                    if response.status != 200:
                        failures.append(f"{response.status} {body[:200]!r}")
                        continue
                    where = json.loads(body)["region"]
                    regions[where] += 1
                    if killed.is_set():
                        after_kill[where] += 1
            except aiohttp.ClientError as exc:
                failures.append(repr(exc))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        clients = [asyncio.create_task(client(session)) for _ in range(4)]
        await asyncio.to_thread(poll_until, lambda: regions["eu-central"] >= 40, within=10)
        eu1.signal(signal.SIGKILL)
        eu2.signal(signal.SIGKILL)
        killed.set()
        await asyncio.wait_for(asyncio.gather(*clients), timeout=30)
    assert failures == []
    assert regions["eu-central"] >= 40 and after_kill["us-east"] >= 50
    assert (
        edge.metric("meridian_edge_failovers_total", from_region="eu-central", to_region="us-east")
        > 0
    )
    # The edge's passive reports take the dead backends out: later requests go straight to us-east.
    status = await asyncio.to_thread(edge.status)
    assert status["health"]


def test_when_ejection_takes_out_every_region_traffic_still_flows(tmp_path):
    """Passive ejection of the only backend of the only region is a guess from a few failed
    requests: once the origin answers again, requests reach it at once (panic, as Envoy's)
    instead of getting 503 for the whole ejection time (30 s here)."""
    with processes() as procs:
        origin = Origin("us-east", tmp_path)
        procs.append(origin)
        origin.ready()
        config = write_config(
            tmp_path / "edge.yaml",
            {"us-east": region(*LOCATIONS["us-east"], [origin.url])},
            # Active checks slow: only traffic can take the backend out during the test.
            health={"interval": "30s", "fast_interval": "30s", "timeout": "1s", "fall": 3},
            outlier={"consecutive_failures": 3, "base_ejection": "30s"},
        )
        edge = Edge(config, "iad", tmp_path)
        procs.append(edge)
        edge.ready()
        assert _get(edge, "/api/v1/whoami")[0] == 200
        origin.control({"drop": True})
        try:
            failed = [_get(edge, "/api/v1/whoami")[0] for _ in range(5)]
        finally:
            origin.control({})
        assert set(failed) == {502}
        assert edge.metric("meridian_outlier_ejections_total", target=origin.url) == 1
        assert edge.metric("meridian_region_up", region="us-east") == 0
        status, _, body = _get(edge, "/api/v1/whoami")
        assert status == 200 and json.loads(body)["region"] == "us-east"
