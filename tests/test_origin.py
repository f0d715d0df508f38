"""The sample origin, run as a real process and exercised over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

REPO = Path(__file__).resolve().parent.parent
START_DEADLINE = 15.0
STOP_DEADLINE = 5.0
_LISTENING = re.compile(r"event=listening .*addr=(\S+)")


@dataclass
class OriginProcess:
    process: subprocess.Popen[bytes]
    region: str
    url: str
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def running_origin(region: str, *extra_args: str) -> Iterator[OriginProcess]:
    """Start ``python -m meridian.origin`` on a free port; stop it by PID on the way out."""
    with tempfile.TemporaryDirectory(prefix="origin-test-") as tmp:
        log_path = Path(tmp) / "origin.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "meridian.origin",
                    "--region",
                    region,
                    "--port",
                    "0",
                    *extra_args,
                ],
                cwd=REPO,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + START_DEADLINE
            while True:
                match = _LISTENING.search(log_path.read_text(errors="replace"))
                if match:
                    break
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"origin did not start:\n{log_path.read_text(errors='replace')}")
                time.sleep(0.02)
            yield OriginProcess(process, region, f"http://{match.group(1)}", log_path)
        finally:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                try:
                    process.wait(STOP_DEADLINE)
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait()


@pytest.fixture(scope="module")
def origin() -> Iterator[OriginProcess]:
    with running_origin("us-east") as proc:
        yield proc


@pytest.fixture
async def http(origin: OriginProcess) -> AsyncIterator[aiohttp.ClientSession]:
    # auto_decompress off: the test must see exactly what the origin put on the wire.
    async with aiohttp.ClientSession(origin.url, auto_decompress=False) as session:
        await put_control(session, {"reset_counters": True})
        yield session
        await put_control(session, {})


async def put_control(session: aiohttp.ClientSession, body: dict[str, Any]) -> dict[str, Any]:
    async with session.put("/_control", json=body) as response:
        assert response.status == 200, await response.text()
        result: dict[str, Any] = await response.json()
        return result


async def get_control(session: aiohttp.ClientSession) -> dict[str, Any]:
    async with session.get("/_control") as response:
        result: dict[str, Any] = await response.json()
        return result


async def fetch(
    session: aiohttp.ClientSession, path: str, **kwargs: Any
) -> tuple[aiohttp.ClientResponse, bytes]:
    async with session.get(path, **kwargs) as response:
        return response, await response.read()


# --------------------------------------------------------------------------------------------
# Market data


async def test_ticker_is_a_cacheable_2kb_identity_json(http: aiohttp.ClientSession) -> None:
    response, body = await fetch(
        http, "/api/v1/ticker/BTC-USD", headers={"Accept-Encoding": "gzip, br"}
    )
    assert response.status == 200
    assert 1500 <= len(body) <= 3000
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "public, max-age=1"
    assert response.headers["X-Origin-Region"] == "us-east"
    assert "Content-Encoding" not in response.headers  # the edge compresses, never the origin
    assert "Vary" not in response.headers
    etag = response.headers["ETag"]
    assert re.fullmatch(r'"[0-9a-f]{24}"', etag), etag  # strong
    parsedate_to_datetime(response.headers["Last-Modified"])
    ticker = json.loads(body)
    assert ticker["symbol"] == "BTC-USD"
    assert float(ticker["bid"]["price"]) < float(ticker["ask"]["price"])
    assert set(ticker["stats"]) >= {"24h"}
    assert {"open", "high", "low", "close", "volume"} <= set(ticker["stats"]["24h"])


async def test_depth_is_a_50kb_order_book(http: aiohttp.ClientSession) -> None:
    response, body = await fetch(http, "/api/v1/depth/ETH-USD")
    assert response.status == 200
    assert 40_000 <= len(body) <= 70_000
    assert response.headers["Cache-Control"] == "public, max-age=1"
    assert "ETag" in response.headers and "Last-Modified" in response.headers
    book = json.loads(body)
    bids = [float(level["price"]) for level in book["bids"]]
    asks = [float(level["price"]) for level in book["asks"]]
    assert len(bids) >= 500 and len(asks) >= 500
    assert bids == sorted(bids, reverse=True) and asks == sorted(asks)
    assert bids[0] < asks[0]


async def test_trades_are_the_last_100(http: aiohttp.ClientSession) -> None:
    response, body = await fetch(http, "/api/v1/trades/SOL-USD")
    assert response.status == 200
    assert 7_000 <= len(body) <= 14_000
    assert response.headers["Cache-Control"] == "public, max-age=1"
    trades = json.loads(body)["trades"]
    assert len(trades) == 100
    assert all(t["side"] in ("buy", "sell") for t in trades)
    assert [t["time"] for t in trades] == sorted((t["time"] for t in trades), reverse=True)


async def test_symbols_list_is_long_lived_and_every_symbol_serves(
    http: aiohttp.ClientSession,
) -> None:
    response, body = await fetch(http, "/api/v1/symbols")
    assert response.status == 200
    assert response.headers["Cache-Control"] == "public, max-age=300"
    names = [s["symbol"] for s in json.loads(body)["symbols"]]
    assert "BTC-USD" in names and len(names) >= 10
    for name in names:
        ticker, _ = await fetch(http, f"/api/v1/ticker/{name}")
        assert ticker.status == 200, name


async def test_unknown_symbol_is_a_json_404(http: aiohttp.ClientSession) -> None:
    response, body = await fetch(http, "/api/v1/ticker/NOPE-USD")
    assert response.status == 404
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["X-Origin-Region"] == "us-east"
    assert json.loads(body) == {"error": "unknown_symbol", "symbol": "NOPE-USD"}
    depth, _ = await fetch(http, "/api/v1/depth/NOPE-USD")
    assert depth.status == 404


async def test_if_none_match_revalidates_with_304(http: aiohttp.ClientSession) -> None:
    # The body changes every second; retry until both requests land in the same second.
    deadline = time.monotonic() + 5
    while True:
        first, _ = await fetch(http, "/api/v1/depth/BTC-USD")
        etag = first.headers["ETag"]
        second, body = await fetch(
            http, "/api/v1/depth/BTC-USD", headers={"If-None-Match": f'"other", {etag}'}
        )
        if second.status == 304 or time.monotonic() > deadline:
            break
    assert second.status == 304
    assert body == b""
    assert second.headers["ETag"] == etag
    assert second.headers["Cache-Control"] == "public, max-age=1"
    assert second.headers["X-Origin-Region"] == "us-east"
    stale, stale_body = await fetch(
        http, "/api/v1/depth/BTC-USD", headers={"If-None-Match": '"not-the-etag"'}
    )
    assert stale.status == 200 and len(stale_body) > 40_000


async def test_if_modified_since_revalidates_with_304(http: aiohttp.ClientSession) -> None:
    response, _ = await fetch(http, "/api/v1/ticker/BTC-USD")
    last_modified = response.headers["Last-Modified"]
    revalidated, body = await fetch(
        http, "/api/v1/ticker/BTC-USD", headers={"If-Modified-Since": last_modified}
    )
    assert revalidated.status == 304 and body == b""
    older = parsedate_to_datetime(last_modified) - timedelta(seconds=5)
    changed, body = await fetch(
        http,
        "/api/v1/ticker/BTC-USD",
        headers={"If-Modified-Since": format_datetime(older, usegmt=True)},
    )
    assert changed.status == 200 and body
    # If-None-Match wins over If-Modified-Since (RFC 9110 13.2.2).
    both, _ = await fetch(
        http,
        "/api/v1/ticker/BTC-USD",
        headers={"If-None-Match": '"x"', "If-Modified-Since": last_modified},
    )
    assert both.status == 200


async def test_bodies_change_over_time_and_are_stable_within_a_second(
    http: aiohttp.ClientSession,
) -> None:
    first, first_body = await fetch(http, "/api/v1/ticker/ETH-USD")
    deadline = time.monotonic() + 5
    while True:
        later, later_body = await fetch(http, "/api/v1/ticker/ETH-USD")
        if later.headers["Last-Modified"] != first.headers["Last-Modified"]:
            break
        # Same update bucket: same bytes (what makes the ETag meaningful across requests).
        assert later_body == first_body and later.headers["ETag"] == first.headers["ETag"]
        assert time.monotonic() < deadline, "ticker never changed"
        await asyncio.sleep(0.05)
    assert later_body != first_body
    assert later.headers["ETag"] != first.headers["ETag"]
    assert json.loads(later_body)["sequence"] > json.loads(first_body)["sequence"]


async def test_regions_serve_identical_bytes(http: aiohttp.ClientSession) -> None:
    with running_origin("eu-central") as other:
        async with aiohttp.ClientSession(other.url) as other_http:
            for _ in range(20):
                mine, my_body = await fetch(http, "/api/v1/ticker/BTC-USD")
                theirs, their_body = await fetch(other_http, "/api/v1/ticker/BTC-USD")
                if mine.headers["Last-Modified"] == theirs.headers["Last-Modified"]:
                    break
            assert theirs.headers["X-Origin-Region"] == "eu-central"
            assert my_body == their_body
            assert mine.headers["ETag"] == theirs.headers["ETag"]


async def test_whoami_names_the_region_and_is_not_cacheable(http: aiohttp.ClientSession) -> None:
    response, body = await fetch(http, "/api/v1/whoami")
    assert response.status == 200
    assert json.loads(body) == {"region": "us-east"}
    assert response.headers["Cache-Control"] == "no-store"


async def test_post_orders_echoes_with_201_and_is_counted(http: aiohttp.ClientSession) -> None:
    order = {"symbol": "BTC-USD", "side": "buy", "size": "0.1"}
    async with http.post("/api/v1/orders", json=order) as response:
        assert response.status == 201
        assert response.headers["Cache-Control"] == "no-store"
        created = await response.json()
    assert created["order"] == order and created["region"] == "us-east" and created["order_id"]
    async with http.post("/api/v1/orders", data=b"{not json") as bad:
        assert bad.status == 400
    counters = (await get_control(http))["requests"]
    assert counters["paths"]["/api/v1/orders"] == 2


async def test_head_returns_headers_only(http: aiohttp.ClientSession) -> None:
    async with http.head("/api/v1/ticker/BTC-USD") as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) > 1500
        assert await response.read() == b""


# --------------------------------------------------------------------------------------------
# Control switches


async def test_counters_count_each_path_and_connection(http: aiohttp.ClientSession) -> None:
    await asyncio.gather(*(fetch(http, "/api/v1/ticker/BTC-USD") for _ in range(7)))
    await fetch(http, "/api/v1/depth/BTC-USD")
    await fetch(http, "/healthz")
    state = await get_control(http)
    assert state["requests"]["paths"] == {
        "/api/v1/ticker/BTC-USD": 7,
        "/api/v1/depth/BTC-USD": 1,
        "/healthz": 1,
    }
    assert state["requests"]["total"] == 9
    assert state["requests"]["in_flight"] == 0
    assert 1 <= state["requests"]["connections"] <= 7
    reset = await put_control(http, {"reset_counters": True})
    assert reset["requests"]["total"] == 0 and reset["requests"]["paths"] == {}


async def test_unhealthy_switch_fails_healthz_only(http: aiohttp.ClientSession) -> None:
    healthy, body = await fetch(http, "/healthz")
    assert healthy.status == 200 and body == b"ok"
    assert healthy.headers["X-Origin-Region"] == "us-east"
    state = await put_control(http, {"healthy": False})
    assert state["switches"]["healthy"] is False
    unhealthy, _ = await fetch(http, "/healthz")
    assert unhealthy.status == 503
    api, _ = await fetch(http, "/api/v1/ticker/BTC-USD")
    assert api.status == 200
    await put_control(http, {})
    again, _ = await fetch(http, "/healthz")
    assert again.status == 200


async def test_status_switch_applies_to_every_api_response(http: aiohttp.ClientSession) -> None:
    await put_control(http, {"status": 503})
    for path in ("/api/v1/ticker/BTC-USD", "/api/v1/depth/BTC-USD", "/api/v1/whoami"):
        response, body = await fetch(http, path)
        assert response.status == 503, path
        assert json.loads(body) == {"error": "injected", "status": 503}
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["X-Origin-Region"] == "us-east"
    async with http.post("/api/v1/orders", json={}) as post:
        assert post.status == 503
    health, _ = await fetch(http, "/healthz")
    assert health.status == 200  # /healthz is governed by "healthy", not "status"
    await put_control(http, {})
    ok, _ = await fetch(http, "/api/v1/ticker/BTC-USD")
    assert ok.status == 200


async def test_delay_switch_delays_everything_but_control(http: aiohttp.ClientSession) -> None:
    await put_control(http, {"delay_ms": 400})
    started = time.monotonic()
    response, _ = await fetch(http, "/api/v1/ticker/BTC-USD")
    assert response.status == 200
    assert time.monotonic() - started >= 0.4
    started = time.monotonic()
    await get_control(http)
    assert time.monotonic() - started < 0.3


async def test_delayed_requests_show_in_flight(http: aiohttp.ClientSession) -> None:
    await put_control(http, {"delay_ms": 1000})
    pending = asyncio.gather(*(fetch(http, "/api/v1/ticker/BTC-USD") for _ in range(3)))
    deadline = time.monotonic() + 3
    while (await get_control(http))["requests"]["in_flight"] != 3:
        assert time.monotonic() < deadline, "delayed requests never showed as in flight"
        await asyncio.sleep(0.02)
    responses = await pending
    assert [r.status for r, _ in responses] == [200, 200, 200]


def _raw_exchange(url: str, request: bytes) -> bytes:
    """Send ``request`` on a fresh TCP connection; everything received until the peer closes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


async def test_drop_switch_closes_connections_without_a_response(
    http: aiohttp.ClientSession, origin: OriginProcess
) -> None:
    await put_control(http, {"drop": True})
    request = b"GET /api/v1/ticker/BTC-USD HTTP/1.1\r\nHost: origin\r\n\r\n"
    assert await asyncio.to_thread(_raw_exchange, origin.url, request) == b""
    with pytest.raises(aiohttp.ClientConnectionError):
        await fetch(http, "/healthz")
    state = await get_control(http)  # /_control still answers
    assert state["switches"]["drop"] is True
    assert state["requests"]["paths"]["/api/v1/ticker/BTC-USD"] == 1
    await put_control(http, {})
    ok, _ = await fetch(http, "/api/v1/ticker/BTC-USD")
    assert ok.status == 200


async def test_put_replaces_switches_and_rejects_bad_input(http: aiohttp.ClientSession) -> None:
    await put_control(http, {"status": 500, "delay_ms": 5})
    state = await put_control(http, {"healthy": False})
    assert state["switches"] == {"healthy": False, "status": None, "delay_ms": 0, "drop": False}
    for bad in ({"bogus": 1}, {"status": "503"}, {"delay_ms": -1}, {"drop": "yes"}, [1]):
        async with http.put("/_control", json=bad) as response:
            assert response.status == 400, bad
    assert (await get_control(http))["switches"]["healthy"] is False


# --------------------------------------------------------------------------------------------
# WebSocket


async def test_ws_streams_ticker_updates_and_answers_pings(http: aiohttp.ClientSession) -> None:
    async with http.ws_connect("/ws?symbols=BTC-USD,ETH-USD&interval_ms=20", autoping=False) as ws:
        seen: dict[str, int] = {}
        deadline = time.monotonic() + 5
        while min(seen.get("BTC-USD", 0), seen.get("ETH-USD", 0)) < 3:
            assert time.monotonic() < deadline, f"too few updates: {seen}"
            message = await ws.receive(timeout=2)
            assert message.type == aiohttp.WSMsgType.TEXT
            update = json.loads(message.data)
            assert update["type"] == "ticker"
            assert float(update["bid"]) < float(update["ask"])
            seen[update["symbol"]] = seen.get(update["symbol"], 0) + 1
        assert set(seen) == {"BTC-USD", "ETH-USD"}
        await ws.ping(b"probe")
        await ws.send_str('{"op":"ping"}')
        got_pong = got_app_pong = False
        while not (got_pong and got_app_pong):
            assert time.monotonic() < deadline, "no pong"
            message = await ws.receive(timeout=2)
            if message.type == aiohttp.WSMsgType.PONG:
                got_pong = message.data == b"probe"
            elif message.data == '{"type":"pong"}':
                got_app_pong = True


async def test_ws_rejects_unknown_symbols(http: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as raised:
        await http.ws_connect("/ws?symbols=BTC-USD,NOPE-USD")
    assert raised.value.status == 400
    assert raised.value.headers is not None
    assert raised.value.headers["X-Origin-Region"] == "us-east"


# --------------------------------------------------------------------------------------------
# Process lifecycle


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_exits_zero_with_an_open_websocket(sig: signal.Signals) -> None:
    with running_origin("ap-southeast") as proc:
        async with aiohttp.ClientSession(proc.url) as session:
            ws = await session.ws_connect("/ws?interval_ms=50")
            assert (await ws.receive(timeout=2)).type == aiohttp.WSMsgType.TEXT
            os.kill(proc.process.pid, sig)
            assert await asyncio.to_thread(proc.process.wait, STOP_DEADLINE) == 0
            await ws.close()
        assert "event=stopping" in proc.log_text()


def test_port_in_use_exits_one_with_a_clear_line(origin: OriginProcess) -> None:
    port = origin.url.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "meridian.origin", "--region", "x", "--port", port],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=STOP_DEADLINE * 2,
        check=False,
    )
    assert result.returncode == 1
    assert "event=listen_failed" in result.stderr


def test_listening_line_names_region_and_address(origin: OriginProcess) -> None:
    line = next(line for line in origin.log_text().splitlines() if "event=listening" in line)
    assert "logger=origin" in line and "region=us-east" in line
    assert f"addr={origin.url.removeprefix('http://')}" in line
    assert line.startswith("ts=")
