"""The status pages of issue 18: the pure parts (window, quantiles, availability, timeline) on an
injected clock, and a running edge's page rendered by headless Chromium, which must show every
region, show one down within a check interval of its origin dying, and log no error."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from edge.admin import RequestStats
from edge.statusboard import (
    Availability,
    StatusBoard,
    TrafficSample,
    TrafficWindow,
    combine_traffic,
    quantile,
    service_state,
)
from meridian.health import HealthMonitor
from meridian.health.checks import CheckOutcome
from meridian.health.monitor import TIMELINE_LENGTH
from tests import dns_support
from tests.browser_support import CHROMIUM, browser_page
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
from tests.health_support import make_config

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-purge-token-for-the-status-test"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------------------------
# Pure parts


def test_quantile_interpolates_inside_the_bucket_like_prometheus() -> None:
    bounds = (0.1, 0.2, 0.4)
    # 10 requests under 0.1 s, 10 between 0.1 and 0.2 s, none slower.
    assert quantile(0.5, [10, 10, 0, 0], bounds) == pytest.approx(0.1)
    assert quantile(0.75, [10, 10, 0, 0], bounds) == pytest.approx(0.15)
    assert quantile(0.99, [0, 0, 0, 5], bounds) == 0.4  # +Inf reads as the last bound
    assert quantile(0.5, [0, 0, 0, 0], bounds) is None


def _sample(at: float, requests: int, found: int, missed: int, **errors: float) -> TrafficSample:
    return TrafficSample(
        at, requests, found, missed, (requests, 0), (0.01,), errors, {"api": requests}
    )


def test_traffic_window_rates_span_the_window_and_stay_bounded() -> None:
    window = TrafficWindow(window=60.0, keep=8)
    assert window.summary()["requests_per_second"] == 0.0
    window.add(_sample(0.0, 0, 0, 0))
    window.add(_sample(10.0, 100, 45, 5, **{"502 upstream": 3.0}))
    summary = window.summary()
    assert summary["requests_per_second"] == 10.0
    assert summary["hit_ratio"] == 0.9
    assert summary["errors"] == {"502 upstream": 3.0}
    assert summary["top_routes"] == [{"route": "api", "per_second": 10.0}]
    assert summary["p50"] == pytest.approx(0.005)
    # Older samples leave once a newer one covers the window start; never more than ``keep``.
    for second in range(20, 400, 10):
        window.add(_sample(float(second), second * 10, 0, 0))
    assert len(window) <= 8
    assert window.summary()["window"] >= 60.0
    assert window.summary()["requests_per_second"] == 10.0


def _window(*samples: TrafficSample) -> TrafficWindow:
    window = TrafficWindow(window=60.0, keep=8)
    for sample in samples:
        window.add(sample)
    return window


def _histogram(at: float, requests: int, found: int, missed: int, slow: int) -> TrafficSample:
    """``requests`` of which ``slow`` took 0.1-0.2 s, the rest under 10 ms."""
    return TrafficSample(
        at,
        requests,
        found,
        missed,
        (requests - slow, slow, 0),
        (0.01, 0.2),
        {"502 upstream": float(slow)},
        {"api": requests - slow, "slow": slow},
    )


def test_workers_add_up_to_what_one_window_of_all_their_traffic_says() -> None:
    # Two workers over the same 10 s: the first fast and hitting, the second slow and missing.
    a = _window(_histogram(0.0, 0, 0, 0, 0), _histogram(10.0, 100, 99, 1, 0))
    b = _window(_histogram(0.0, 0, 0, 0, 0), _histogram(10.0, 20, 0, 20, 20))
    together = _window(_histogram(0.0, 0, 0, 0, 0), _histogram(10.0, 120, 99, 21, 20))
    combined = combine_traffic([a.summary(), b.summary()])
    expected = together.summary()
    for key in ("requests_per_second", "hit_ratio", "errors", "top_routes", "counts"):
        assert combined[key] == expected[key], key
    assert combined["p50"] == pytest.approx(expected["p50"])
    assert combined["p99"] == pytest.approx(expected["p99"])
    # Not any one worker's figures: p99 is the slow worker's range, the hit ratio neither's.
    assert combined["hit_ratio"] == round(99 / 120, 4)
    assert a.summary()["p99"] is not None and combined["p99"] > a.summary()["p99"]
    assert combined["workers"] == 2
    assert combine_traffic([a.summary()])["p50"] == a.summary()["p50"]
    # Before a worker has two samples it adds nothing.
    assert combine_traffic([a.summary(), _window().summary()])["counts"] == a.summary()["counts"]


def test_combining_reads_a_sibling_summary_as_hostile_input() -> None:
    good = _window(_histogram(0.0, 0, 0, 0, 0), _histogram(10.0, 100, 90, 10, 0)).summary()
    hostile: list[dict[str, Any]] = [
        {"counts": "nope"},
        {"requests_per_second": float("nan"), "counts": {"requests": -5, "found": "x"}},
        {"requests_per_second": True, "counts": {"buckets": list(range(10_000))}},
        {"errors": {str(n): 1 for n in range(10_000)}, "counts": {"route_rates": [1, 2]}},
        {"counts": {"route_rates": {f"r{n}": 1e300 for n in range(10_000)}}},
        {"counts": {"buckets": ["a", None], "bounds": [{}, []]}},
    ]
    combined = combine_traffic([good, *hostile])
    assert combined["requests_per_second"] == good["requests_per_second"]
    assert combined["hit_ratio"] == good["hit_ratio"]
    assert combined["p50"] == good["p50"]
    assert len(combined["errors"]) <= 64
    assert len(combined["counts"]["route_rates"]) <= 32
    json.dumps(combined, allow_nan=False)


def test_availability_counts_uptime_and_latency_per_hour_and_day_in_bounded_minutes() -> None:
    clock = Clock()
    availability = Availability(clock, minutes=24 * 60)
    # A day and a bit: down for the first 30 minutes, up since; 100 ms mean latency.
    for minute in range(25 * 60):
        availability.record("market", "down" if minute < 30 else "up")
        availability.latency("market", 10.0, 100)
        clock.now += 60.0
    hour = availability.over("market", 3600)
    day = availability.over("market", 86400)
    assert hour == {"uptime": 1.0, "latency": pytest.approx(0.1)}
    assert day["uptime"] == 1.0  # the down half hour is more than a day old
    assert len(availability._series["market"]) == 24 * 60
    clock.now += 60.0
    for _ in range(3):
        availability.record("market", "down")
    availability.record("market", "degraded")  # degraded users are served: counts as up
    assert availability.over("market", 60)["uptime"] == 0.25
    availability.forget([])
    assert availability.over("market", 3600) == {"uptime": None, "latency": None}


def test_service_state() -> None:
    up = {"a": True, "b": False}
    assert service_state(["a"], up.__getitem__) == "up"
    assert service_state(["a", "b"], up.__getitem__) == "degraded"
    assert service_state(["b"], up.__getitem__) == "down"
    assert service_state([], up.__getitem__) == "down"


def test_board_reads_request_stats_and_serves_the_public_document() -> None:
    clock = Clock()
    stats = RequestStats()
    regions = {"eu": True, "us": True}
    board = StatusBoard(
        clock,
        traffic=lambda: stats.traffic(clock(), {}),
        services=lambda: {"market": ["eu", "us"]},
        region_up=regions.__getitem__,
        route_latency=stats.route_latency,
        route_service=lambda: {"api": "market"},
    )
    board.sample()
    for _ in range(8):
        stats.observe("api", 200, "HIT", "eu", 0.002, 0.05)
    stats.observe("api", 200, "MISS", "eu", 0.3, 0.05)
    stats.observe("api", 200, "BYPASS", "eu", 0.3, 0.05)
    clock.now += 2.0
    regions["us"] = False
    board.sample()
    summary = board.window.summary()
    assert summary["requests_per_second"] == 5.0
    assert summary["hit_ratio"] == pytest.approx(8 / 9, abs=1e-4)
    assert summary["p50"] is not None and summary["p50"] <= 0.0025
    assert summary["p99"] is not None and 0.25 <= summary["p99"] <= 0.5
    public = board.public()["services"]["market"]
    assert public["state"] == "degraded"
    assert public["hour"]["uptime"] == 1.0
    assert public["hour"]["latency"] == pytest.approx((8 * 0.002 + 0.6) / 10)
    # A route removed by a reload leaves no state behind.
    stats._durations.clear()
    board.sample()
    assert board._last_latency == {}


def test_health_timeline_records_transitions_and_region_rollups_bounded() -> None:
    clock = Clock(100.0)
    url = "http://127.0.0.1:9"
    config = make_config({"r": [url]}, health={"fall": 1, "rise": 1})
    monitor = HealthMonitor(config, registry=CollectorRegistry(), clock=clock)
    for _ in range(5):
        monitor.report(url, False)
    timeline = monitor.status()["timeline"]
    assert [(e["target"], e["new"]) for e in timeline] == [(url, "ejected"), ("region:r", "down")]
    assert timeline[0]["regions"] == ["r"] and timeline[0]["source"] == "traffic"
    # A flapping backend (checks alternate): only the latest TIMELINE_LENGTH are kept.
    for index in range(TIMELINE_LENGTH * 2):
        clock.now += 1.0
        ok = index % 2 == 0
        monitor._on_check(url, CheckOutcome(ok, "status 200" if ok else "status 503", 0.001))
    timeline = monitor.status()["timeline"]
    assert len(timeline) == TIMELINE_LENGTH
    assert timeline[-2]["reason"].endswith("status 503") and timeline[-2]["source"] == "check"
    assert timeline[-1]["target"] == "region:r" and timeline[-1]["new"] == "down"


# --------------------------------------------------------------------------------------------
# A running edge in headless Chromium

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
INTERVAL = 1.0
REGIONS = ("eu-central", "us-east", "ap-southeast")


@pytest.fixture
def world(tmp_path: Path) -> Any:
    with processes() as procs:
        origins = {name: Origin(name, tmp_path) for name in REGIONS}
        procs.extend(origins.values())
        for origin in origins.values():
            origin.ready()
        config = write_config(
            tmp_path / "edge.yaml",
            {name: region(*LOCATIONS[name], [origins[name].url]) for name in REGIONS},
            edge={"cache": {"purge_token": TOKEN}},
            # fall 1: the first failed check takes the region down, so the page must follow
            # within one interval of the kill.
            health={"interval": f"{INTERVAL}s", "fast_interval": "500ms", "fall": 1},
        )
        edge = Edge(config, "fra", tmp_path)
        procs.append(edge)
        edge.ready()
        poll_until(lambda: all(r["up"] for r in edge.status()["health"]["regions"].values()))
        yield edge, origins


async def _region_states(page: Any) -> dict[str, str]:
    states: dict[str, str] = await page.evaluate(
        "Object.fromEntries([...document.querySelectorAll('[data-region]')]"
        ".map((r) => [r.dataset.region, r.dataset.state]))"
    )
    return states


@needs_chromium
async def test_status_page_shows_regions_and_a_region_going_down(
    world: Any, tmp_path: Path
) -> None:
    edge, origins = world
    for _ in range(20):
        assert http_request(edge.port, "GET", "/api/v1/ticker/BTC-USD")[0] == 200
    code, page_html = edge.admin("/")
    assert code == 200 and b"<script>" in page_html
    assert b"src=" not in page_html and b'href="http' not in page_html  # nothing fetched outside
    assert TOKEN.encode() not in page_html and TOKEN.encode() not in edge.admin("/status")[1]

    async with browser_page(tmp_path) as page:
        await page.navigate(f"http://127.0.0.1:{edge.admin_port}/")
        deadline = time.monotonic() + 10
        while await _region_states(page) != dict.fromkeys(REGIONS, "up"):
            assert time.monotonic() < deadline, await _region_states(page)
            await _pause()
        assert await page.evaluate("document.getElementById('pop').textContent") == "fra"
        assert await page.evaluate("document.getElementById('feed').textContent") == "live"
        # The requests above show once the board has two samples (one tick, 2 s).
        while await page.evaluate("document.getElementById('rps').textContent") == "0.0":
            assert time.monotonic() < deadline + 5
            await _pause()
        hit_ratio = await page.evaluate("document.getElementById('hit').textContent")
        assert hit_ratio.endswith("%")

        killed = time.monotonic()
        origins["us-east"].signal(signal.SIGKILL)
        while (await _region_states(page)).get("us-east") != "down":
            assert time.monotonic() - killed < 10, await _region_states(page)
            await _pause()
        took = time.monotonic() - killed
        print(f"\nregion down on the rendered page {took * 1000:.0f} ms after its origin died")
        # One check interval (plus its 10% jitter), the check's connect and the page update.
        assert took <= INTERVAL * 1.1 + 0.3
        states = await _region_states(page)
        assert states == {"eu-central": "up", "us-east": "down", "ap-southeast": "up"}
        banner = await page.evaluate("document.getElementById('banner').textContent")
        assert banner == "Down: us-east"
        timeline = await page.evaluate("document.getElementById('timeline').textContent")
        assert "region:us-east" in timeline
        shot = await page.screenshot(tmp_path / "status-page.png")
        assert shot.stat().st_size > 10_000
        # For the README: MERIDIAN_STATUS_SCREENSHOT=docs/status-page.png pytest -k status_page
        if target := os.environ.get("MERIDIAN_STATUS_SCREENSHOT"):
            shutil.copyfile(shot, ROOT / target)

        # A phone: nothing wider than the screen.
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            width=390,
            height=844,
            deviceScaleFactor=2,
            mobile=True,
        )
        await page.navigate(f"http://127.0.0.1:{edge.admin_port}/")
        deadline = time.monotonic() + 10
        while (await _region_states(page)).get("us-east") != "down":
            assert time.monotonic() < deadline
            await _pause()
        overflow = await page.evaluate("document.documentElement.scrollWidth - innerWidth")
        assert overflow <= 0
        await page.screenshot(tmp_path / "status-page-phone.png")

        await page.navigate(f"http://127.0.0.1:{edge.admin_port}/status/public")
        deadline = time.monotonic() + 10
        while not await page.evaluate("document.querySelectorAll('[data-service]').length"):
            assert time.monotonic() < deadline
            await _pause()
        market = await page.evaluate(
            "document.querySelector('[data-service=market]').dataset.state"
        )
        assert market == "degraded"
        text = await page.evaluate("document.body.textContent")
        assert "uptime: hour" in text and TOKEN not in text
        assert page.errors == []

    scaling = edge.status()["scaling"]
    assert scaling["memory_bytes"] > 0 and scaling["limits_from"] in (
        "cgroup v2",
        "cgroup v1",
        "host",
    )
    assert edge.metric("meridian_edge_scale_hint") == pytest.approx(scaling["scale_hint"], abs=0.5)
    code, body = edge.admin("/status/public")
    document = json.loads(body)
    assert code == 200 and document["services"]["market"]["state"] == "degraded"
    assert set(document["services"]["market"]) == {"state", "hour", "day"}

    # An open event stream does not hold the edge's shutdown (aiohttp would wait for it).
    with socket.create_connection(("127.0.0.1", edge.admin_port), timeout=5) as stream:
        stream.sendall(b"GET /status/events HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b"\n\n" not in first.partition(b"data: ")[2]:
            first += stream.recv(65536)
        assert b"text/event-stream" in first and b'"us-east"' in first
        stopping = time.monotonic()
        edge.signal(signal.SIGTERM)
        assert edge.wait(within=10) == 0
        assert time.monotonic() - stopping < 5


async def _pause() -> None:
    await asyncio.sleep(0.05)  # between two reads of the rendered page


@needs_chromium
async def test_geodns_status_page_shows_pops_answers_and_a_pop_going_down(tmp_path: Path) -> None:
    endpoint = dns_support.HealthEndpoint()
    try:
        config = dns_support.write_config(
            tmp_path / "dns.yaml", dns_support.base_config(endpoint.base)
        )
        with dns_support.running_server(config) as server:
            server.wait_health_stable()
            code, _, page_html = http_request(server.admin_port, "GET", "/")
            assert code == 200 and b"src=" not in page_html
            async with browser_page(tmp_path) as page:
                await page.navigate(f"http://127.0.0.1:{server.admin_port}/")
                pops = ("iad", "gru", "fra", "sin", "syd")
                deadline = time.monotonic() + 10
                while await _states(page, "pop") != dict.fromkeys(pops, "up"):
                    assert time.monotonic() < deadline, await _states(page, "pop")
                    await _pause()
                # Answers by POP: rates between two polls of /metrics.
                deadline = time.monotonic() + 10
                answers = ""
                while "iad" not in answers:
                    assert time.monotonic() < deadline, answers
                    dns_support.ask(server.port, "api.meridian.test")
                    answers = await page.evaluate("document.getElementById('answers').textContent")
                    await _pause()
                endpoint.status["gru"] = 503
                failed = time.monotonic()
                while (await _states(page, "pop")).get("gru") != "down":
                    assert time.monotonic() - failed < 10
                    await _pause()
                print(f"\nPOP down on the GeoDNS page {(time.monotonic() - failed) * 1000:.0f} ms")
                await page.screenshot(tmp_path / "geodns-status-page.png")
                assert page.errors == []
    finally:
        endpoint.close()


async def _states(page: Any, kind: str) -> dict[str, str]:
    states: dict[str, str] = await page.evaluate(
        f"Object.fromEntries([...document.querySelectorAll('[data-{kind}]')]"
        f".map((r) => [r.dataset.{kind}, r.dataset.state]))"
    )
    return states


@needs_chromium
async def test_with_workers_the_page_adds_up_requests_and_lists_each_worker(
    tmp_path: Path,
) -> None:
    with processes() as procs:
        origin = Origin("eu-central", tmp_path)
        procs.append(origin)
        origin.ready()
        config = write_config(
            tmp_path / "edge.yaml", {"eu-central": region(*LOCATIONS["eu-central"], [origin.url])}
        )
        edge = Edge(config, "fra", tmp_path, workers=2)
        procs.append(edge)
        edge.ready()
        poll_until(lambda: edge.status().get("workers", {}).get("1", {}).get("up"))
        async with browser_page(tmp_path) as page:
            await page.navigate(f"http://127.0.0.1:{edge.admin_port}/")
            deadline = time.monotonic() + 15
            rows = 0
            rps = 0.0
            while rows != 2 or rps <= 0:
                assert time.monotonic() < deadline, (rows, rps)
                # Fresh connections: the kernel spreads them over both workers.
                for _ in range(10):
                    http_request(edge.port, "GET", "/api/v1/ticker/BTC-USD")
                await _pause()
                rows = await page.evaluate("document.querySelectorAll('#workers tr').length - 1")
                rps = float(await page.evaluate("document.getElementById('rps').textContent"))
            sibling = edge.status()["workers"]["1"]
            assert "requests_per_second" in sibling["traffic"]
            assert "scale_hint" in sibling["scaling"]
            # One render: the headline requests/s is the sum of the workers' rows.
            shown = await page.evaluate(
                "[document.getElementById('rps').textContent,"
                " [...document.querySelectorAll('#workers tr')].slice(1)"
                ".map((r) => parseFloat(r.cells[2].textContent))]"
            )
            assert float(shown[0]) == pytest.approx(sum(shown[1]), abs=0.11), shown
            assert page.errors == []


def test_with_workers_the_status_adds_up_every_worker_traffic(tmp_path: Path) -> None:
    """A real two-worker edge: requests spread over both workers; /status's traffic (what the
    page shows) is the sum of the workers' windows, not worker 0's."""
    with processes() as procs:
        origin = Origin("eu-central", tmp_path)
        procs.append(origin)
        origin.ready()
        config = write_config(
            tmp_path / "edge.yaml", {"eu-central": region(*LOCATIONS["eu-central"], [origin.url])}
        )
        edge = Edge(config, "fra", tmp_path, workers=2)
        procs.append(edge)
        edge.ready()
        poll_until(lambda: edge.status().get("workers", {}).get("1", {}).get("up"))
        sent = 60
        for _ in range(sent):  # fresh connections: the kernel spreads them over both workers
            code, _, _ = http_request(edge.port, "GET", "/api/v1/ticker/BTC-USD")
            assert code == 200

        def counted() -> dict[str, Any] | None:
            document = edge.status()
            return document if document["traffic"]["counts"]["requests"] == sent else None

        # Each worker samples its window every SAMPLE_EVERY seconds, on its own timer.
        document = poll_until(counted, within=15, every=0.2)
        own = document["worker_traffic"]["counts"]
        sibling = document["workers"]["1"]["traffic"]["counts"]
        total = document["traffic"]
        assert own["requests"] > 0 and sibling["requests"] > 0, (own, sibling)
        assert total["counts"]["requests"] == own["requests"] + sibling["requests"] == sent
        # Each worker's L1 missed once: the hit ratio is all hits over all lookups.
        found = own["found"] + sibling["found"]
        looked_up = own["looked_up"] + sibling["looked_up"]
        assert looked_up == sent and found == sent - 2
        assert total["hit_ratio"] == round(found / looked_up, 4)
        assert total["counts"]["buckets"] == [
            a + b for a, b in zip(own["buckets"], sibling["buckets"], strict=True)
        ]
        assert total["p99"] == quantile(0.99, total["counts"]["buckets"], own["bounds"])
        rates = (
            document["worker_traffic"]["requests_per_second"]
            + document["workers"]["1"]["traffic"]["requests_per_second"]
        )
        assert total["requests_per_second"] == pytest.approx(rates, abs=0.002)
        assert total["workers"] == 2
