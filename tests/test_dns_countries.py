"""GeoDNS answers by client country (issue 18): the bounded country map (pure), the counts of a
server fed datagrams in process (every path: known ECS shape, compiled fast path, memo hits,
strict path over TCP), and a real server answering dnspython queries with ECS from several
countries, read back from /status, /metrics and the page rendered by headless Chromium."""

from __future__ import annotations

import ipaddress
import json
import random
import re
import time
from bisect import bisect_right
from collections import Counter
from pathlib import Path
from typing import Any

import dns.message
import pytest

from geodns.countries import (
    COUNTRY_LIMIT,
    MIXED,
    OTHER,
    UNKNOWN,
    build_country_map,
    country_label,
)
from geodns.server import DnsServer
from meridian.config import GeoConfig, HostPort, Location
from meridian.geo import GeoLocator
from meridian.lifecycle import ConfigHolder
from tests import dns_support
from tests.browser_support import CHROMIUM, browser_page
from tests.edge_support import http_request

#: Clients (ECS /24s) in the built-in database; the test reads their countries from the
#: locator (the database reader), not from the code under test.
CLIENTS = (
    "81.2.69.0/24",
    "89.160.20.0/24",
    "175.16.199.0/24",
    "1.0.0.0/24",
    "8.8.8.0/24",
    "2.16.0.0/24",
    "41.0.0.0/24",
    "200.0.0.0/24",
)


def _locator() -> GeoLocator:
    # As the served config places clients the database cannot (tests.dns_support).
    default = Location(39.04, -77.49, "US", "NA")
    return GeoLocator(GeoConfig(default_location=default), default)


def expected_countries(clients: tuple[str, ...] = CLIENTS) -> dict[str, str]:
    locator = _locator()
    return {c: country_label(locator.locate(ipaddress.ip_network(c)[0]).country) for c in clients}


# --------------------------------------------------------------------------------------------
# The map (pure)


def test_country_labels_are_iso_codes_or_other_or_unknown() -> None:
    assert country_label("de") == "DE"
    assert country_label(None) == UNKNOWN and country_label("") == UNKNOWN
    for hostile in ('G"B', "GBR", "É1", "1A", "a\nb", "{x}"):
        assert country_label(hostile) == OTHER


def test_map_answers_like_a_plain_bisect_and_marks_mixed_blocks() -> None:
    rng = random.Random(7)
    countries = ["DE", "FR", None, "xx1", "US"]
    starts = sorted({0, *(rng.getrandbits(32) for _ in range(3000))})
    values = [rng.randrange(len(countries)) for _ in starts]
    v6_starts = [0, 1 << 100, 1 << 120]
    cmap = build_country_map(countries, starts, values, v6_starts, [0, 4, 2])
    assert cmap.names == ("DE", "FR", "US", OTHER, UNKNOWN)
    labels = [country_label(c) for c in countries]
    for _ in range(20000):
        address = rng.getrandbits(32)
        placement = values[bisect_right(starts, address) - 1]
        assert cmap.names[cmap.of_v4(address)] == labels[placement]
    assert cmap.names[cmap.of(ipaddress.ip_address("::1"))] == "DE"
    assert cmap.names[cmap.of_ecs(2, 1 << 101)] == "US"
    assert cmap.names[cmap.of_ecs(2, 1 << 121)] == UNKNOWN
    # A /16 is MIXED exactly when a range starts strictly inside it.
    inner = {s >> 16 for s in starts if s & 0xFFFF}
    assert {b for b, n in enumerate(cmap.v4_blocks) if n == MIXED} <= inner
    one = build_country_map(["DE"], [0], [0], [0], [0])
    assert set(one.v4_blocks) == {0} and one.names[one.of_v4(123456)] == "DE"


def test_ipv6_blocks_embedding_ipv4_read_the_ipv4_map_and_keep_their_surroundings() -> None:
    mapped = 0xFFFF << 32
    six_to_four = 0x2002 << 112
    countries = ["DE", "FR", "US", "JP"]
    v4_starts, v4_values = [0, 1 << 31], [0, 1]  # DE below 128.0.0.0, FR from there
    # IPv6: JP, then copies of the IPv4 map inside both blocks (which end in the same
    # placement as the one after them: merged ranges run on past a block's end), then US.
    v6_starts = [0, mapped, mapped + (1 << 31), mapped + (1 << 32) + 5, six_to_four]
    v6_starts += [six_to_four + (1 << 111), (0x2003 << 112), 0x3000 << 112]
    v6_values = [3, 0, 1, 2, 0, 1, 1, 2]
    cmap = build_country_map(
        countries, v4_starts, v4_values, v6_starts, v6_values, [(mapped, 96), (six_to_four, 16)]
    )
    names = cmap.names

    def of(address: int) -> str:
        return names[cmap.of_v6(address)]

    assert of(mapped - 1) == "JP"
    assert of(mapped + 7) == "DE" and of(mapped + (1 << 31) + 7) == "FR"
    assert of(mapped + (1 << 32)) == "FR"  # FR ran on past the block's end...
    assert of(mapped + (1 << 32) + 5) == "US"  # ...up to the next start
    assert of(six_to_four | (0x01020304 << 80) | 99) == "DE"
    assert of(six_to_four | (0x81020304 << 80)) == "FR"
    assert of(0x2003 << 112) == "FR" and of(0x3000 << 112) == "US"
    # Only the native ranges are kept (a block is one range).
    assert len(cmap.v6_starts) <= 8 and isinstance(cmap.v6_starts, tuple)


def test_more_countries_than_the_limit_fold_the_smallest_into_other() -> None:
    count = COUNTRY_LIMIT + 20
    codes = [a + b for a in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" for b in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    countries: list[str | None] = list(codes[:count])
    # Country i holds (i + 1) * 1000 addresses: the first 20 are the smallest.
    starts, values, at = [], [], 0
    for i in range(count):
        starts.append(at)
        values.append(i)
        at += (i + 1) * 1000
    cmap = build_country_map(countries, starts, values, [0], [0])
    assert len(cmap.names) == COUNTRY_LIMIT + 2
    assert set(cmap.names) == {*codes[20:count], OTHER, UNKNOWN}
    assert cmap.names[cmap.of_v4(starts[3])] == OTHER
    assert cmap.names[cmap.of_v4(starts[count - 1])] == codes[count - 1]


# --------------------------------------------------------------------------------------------
# A server fed in process


def _wire(subnet: str | None, ident: int = 1) -> bytes:
    message = dns_support.make_query("api.meridian.test", "A", ecs=subnet)
    message.id = ident
    data: bytes = message.to_wire()
    return data


def _in_process(tmp_path: Path) -> DnsServer:
    path = dns_support.write_config(tmp_path / "dns.yaml", dns_support.base_config())
    holder = ConfigHolder.from_file(str(path))
    return DnsServer(holder, "iad", listen=HostPort("127.0.0.1", 0), admin=None, tcp=False)


def test_every_path_counts_the_client_country(tmp_path: Path) -> None:
    server = _in_process(tmp_path)
    expected = expected_countries()
    assert len(set(expected.values())) >= 4, expected
    want: Counter[str] = Counter()
    for n, subnet in enumerate(CLIENTS):
        # First of a shape: the compiled fast path; then the known-shape path; then the
        # same bytes again: the reply memo.  Each is one answer in the client's country.
        for _ in range(n + 1):
            server.handle_datagram(_wire(subnet, n), ("127.0.0.1", 5300))
            want[expected[subnet]] += 1
    assert server.metrics.shaped > 0 and sum(server.metrics.hits) > 0
    # No ECS: the sender's address places the client (compiled path, then per-client memo).
    sender = "175.16.199.7"
    for _ in range(3):
        server.handle_datagram(_wire(None), (sender, 5300))
    want[expected_countries(("175.16.199.0/24",))["175.16.199.0/24"]] += 3
    # The strict path (TCP) counts alike.
    reply = server.answer_tcp(_wire("89.160.20.0/24"), ipaddress.ip_address("127.0.0.1"))
    assert reply is not None and reply.country == expected["89.160.20.0/24"]
    want[expected["89.160.20.0/24"]] += 1
    server._outbox.clear()
    counts = server.metrics.answer_counts()
    assert counts["by_country"] == dict(want)
    assert sum(counts["by_target"].values()) == sum(want.values())
    # Queries for no geo name are not counted by country.
    nxdomain = dns_support.make_query("nothere.meridian.test", "A").to_wire()
    server.handle_datagram(nxdomain, ("127.0.0.1", 5300))
    server.handle_datagram(dns_support.make_query("meridian.test", "SOA").to_wire(), ("::1", 1))
    assert server.metrics.answer_counts()["by_country"] == dict(want)


def test_fast_and_strict_paths_agree_on_the_country(tmp_path: Path) -> None:
    server = _in_process(tmp_path)
    responder = server.serving.responder
    health = server.monitor.snapshot
    rng = random.Random(3)
    for _ in range(300):
        subnet = f"{ipaddress.IPv4Address(rng.getrandbits(24) << 8)}/24"
        data = _wire(subnet)
        quick = responder.quick(data, ipaddress.ip_address("127.0.0.1"), False, health)
        slow = responder.respond_slow(
            data, ipaddress.ip_address("127.0.0.1"), tcp=False, health=health
        )
        assert quick is not None and slow is not None
        assert quick.country == slow.country, subnet


# --------------------------------------------------------------------------------------------
# A real server over real sockets


def _scrape(port: int, path: str) -> bytes:
    code, _, body = http_request(port, "GET", path)
    assert code == 200, (path, code)
    return body


needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")


@needs_chromium
async def test_a_real_server_shows_answers_by_country_and_pop(tmp_path: Path) -> None:
    expected = expected_countries()
    want: Counter[str] = Counter()
    config = dns_support.write_config(tmp_path / "dns.yaml", dns_support.base_config())
    with dns_support.running_server(config) as server:
        for n, subnet in enumerate(CLIENTS):
            for _ in range(n + 1):
                reply = dns_support.ask(server.port, "api.meridian.test", ecs=subnet)
                assert isinstance(reply, dns.message.Message) and reply.answer
                want[expected[subnet]] += 1
        # One over TCP (the strict path's counting).
        dns_support.ask(server.port, "api.meridian.test", ecs=CLIENTS[0], tcp=True)
        want[expected[CLIENTS[0]]] += 1
        status = json.loads(_scrape(server.admin_port, "/status"))
        assert status["answers"]["by_country"] == dict(want)
        assert sum(status["answers"]["by_target"].values()) == sum(want.values())
        metrics = _scrape(server.admin_port, "/metrics").decode()
        scraped = {
            m[1]: float(m[2])
            for m in re.finditer(
                r'^meridian_dns_answers_by_country_total\{country="([^"]*)"\} (\S+)$',
                metrics,
                re.MULTILINE,
            )
        }
        assert scraped == {k: float(v) for k, v in want.items()}
        async with browser_page(tmp_path) as page:
            await page.navigate(f"http://127.0.0.1:{server.admin_port}/")
            deadline = time.monotonic() + 10
            shown: dict[str, Any] = {}
            while shown != {k: str(v) for k, v in want.items()}:
                assert time.monotonic() < deadline, shown
                shown = await page.evaluate(
                    "Object.fromEntries([...document.querySelectorAll('#countries [data-country]')]"
                    ".map((r) => [r.dataset.country, r.dataset.count]))"
                )
            targets = await page.evaluate("document.getElementById('targets').textContent")
            for target in status["answers"]["by_target"]:
                assert target in targets
            header = await page.evaluate("document.body.innerText")
            assert "DNS answers by client country" in header
            assert "DNS answers by POP" in header
            await page.screenshot(tmp_path / "geodns-countries.png")
            assert page.errors == []
