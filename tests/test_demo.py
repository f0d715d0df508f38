"""The demo stack end to end: `meridian demo` starts, serves market data, answers DNS, stops."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import dns.rdatatype
import pytest
import yaml

from meridian.demo import packaged_demo_config
from tests.browser_support import CHROMIUM, browser_page


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_offset() -> int:
    base_ports = (8080, 8443, 9100, 5353, 9153, 9001, 9002, 9003)
    for _ in range(50):
        offset = random.randrange(12000, 19000)  # below tests/test_image.py's band
        if all(_port_free(p + offset) for p in base_ports):
            return offset
    raise RuntimeError("no free port offset")


@pytest.fixture()
def demo() -> Iterator[tuple[subprocess.Popen[str], int]]:
    offset = _free_offset()
    proc = subprocess.Popen(
        [sys.executable, "-m", "meridian.cli", "demo", "--port-offset", str(offset)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        for line in proc.stdout:
            if "Meridian demo is up" in line or time.monotonic() > deadline:
                break
        assert proc.poll() is None, "the demo exited during start-up"
        yield proc, offset
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (names lower-cased: they are case-insensitive) and body."""
    with urllib.request.urlopen(url, timeout=10) as response:
        headers = {name.lower(): value for name, value in response.headers.items()}
        return response.status, headers, response.read()


def test_demo_serves_market_data_through_the_edge_and_answers_dns(
    demo: tuple[subprocess.Popen[str], int],
) -> None:
    proc, offset = demo
    status, headers, body = _get(f"http://127.0.0.1:{9001 + offset}/api/v1/ticker/BTC-USD")
    assert status == 200 and json.loads(body)
    assert headers["x-origin-region"] == "us-east"

    # The edge of POP iad forwards to the nearest region, us-east.
    edge = f"http://127.0.0.1:{8080 + offset}"
    status, headers, body = _get(f"{edge}/api/v1/whoami")
    assert status == 200 and json.loads(body)["region"] == "us-east"
    assert headers["x-meridian-region"] == "us-east"
    status, headers, body = _get(f"{edge}/api/v1/ticker/BTC-USD")
    assert status == 200 and "x-cache" in headers

    # GeoDNS: a Brazilian client is sent to the gru POP, a London one to fra.
    for subnet, expected in (("200.160.2.0", "127.0.1.2"), ("81.2.69.0", "127.0.1.3")):
        query = dns.message.make_query(
            "api.meridian.test", "A", use_edns=0, options=[dns.edns.ECSOption(subnet, 24)]
        )
        reply = dns.query.udp(query, "127.0.0.1", port=5353 + offset, timeout=5)
        addresses = [r.address for rrset in reply.answer for r in rrset]
        assert addresses == [expected], (subnet, addresses)

    # HTTPS (ALPN h2 or http/1.1) with the certificate the demo made at start.
    assert proc.stdout is not None
    ca = ""
    for line in proc.stdout:
        if "--cacert " in line:
            ca = line.split("--cacert ", 1)[1].split()[0]
            break
    context = ssl.create_default_context(cafile=ca)
    with (
        socket.create_connection(("127.0.0.1", 8443 + offset), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="api.meridian.test") as tls,
    ):
        tls.sendall(
            b"GET /api/v1/ticker/BTC-USD HTTP/1.1\r\nHost: api.meridian.test\r\n"
            b"Connection: close\r\n\r\n"
        )
        assert tls.recv(12) == b"HTTP/1.1 200"

    # Ctrl-C stops everything, cleanly.
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    ports = [p + offset for p in (8080, 8443, 9100, 9153, 9001, 9002, 9003)]
    while any(_listening(p) for p in ports):
        assert time.monotonic() < deadline, "a demo process outlived the demo"
        time.sleep(0.1)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
async def test_the_demo_status_page_shows_every_region(
    demo: tuple[subprocess.Popen[str], int], tmp_path: Path
) -> None:
    _, offset = demo
    regions = set(yaml.safe_load(packaged_demo_config().read_text())["regions"])
    async with browser_page(tmp_path) as page:
        await page.navigate(f"http://127.0.0.1:{9100 + offset}/")
        shown: set[str] = set()
        deadline = time.monotonic() + 15
        while shown != regions:
            assert time.monotonic() < deadline, shown
            await asyncio.sleep(0.1)  # until the first status event has rendered
            shown = set(
                await page.evaluate(
                    "[...document.querySelectorAll('[data-region]')].map((r) => r.dataset.region)"
                )
            )
        assert await page.evaluate("document.getElementById('pop').textContent") == "iad"
        await page.screenshot(tmp_path / "demo-status-page.png")
        assert page.errors == []
