"""Locust load test: market-data users against a Meridian edge (the demo stack by default).

    pip install -e '.[bench]'            # locust (brings websocket-client)
    meridian demo &                      # origins, edge on 127.0.0.1:8080, GeoDNS on :5353
    locust -f benchmarks/locustfile.py --headless -u 200 -r 50 -t 60s \\
        --host http://127.0.0.1:8080 --only-summary

Users (class weights and wait times from environment variables, defaults in brackets):

- ``MarketDataUser`` [BENCH_WEIGHT_MARKET=16]: polls tickers of symbols picked with a Zipf-like
  popularity skew (BENCH_ZIPF_S=1.1: BTC-USD is asked for far more often than the tail), fetches
  order books and recent trades (task weights BENCH_TASK_TICKER=10, BENCH_TASK_DEPTH=3,
  BENCH_TASK_TRADES=2, BENCH_TASK_SYMBOLS=1), waiting BENCH_WAIT_MIN..BENCH_WAIT_MAX seconds
  [0.2..1.0] between requests.
- ``StreamUser`` [BENCH_WEIGHT_STREAM=2]: holds a WebSocket to ``/ws`` for BENCH_WS_SYMBOLS
  [3] popular symbols, reconnecting when it drops; each update is one "WS ticker update" sample
  whose time is the update's age on arrival (origin timestamp to receipt, through the edge).
- ``DnsUser`` [BENCH_WEIGHT_DNS=2]: resolves BENCH_DNS_NAME [api.meridian.test] through GeoDNS at
  BENCH_DNS [127.0.0.1:5353] with dnspython before each request ("DNS A" samples), then sends
  the request with that Host header.  The demo's POP addresses (127.0.1.x) have no listener, so
  the request goes to --host unless BENCH_DNS_CONNECT=1 (then to the answered address).

At the end it prints requests/s, failures and p50/p95/p99 per kind and overall, and the edge's
cache hit ratio for the test window from the admin ``/metrics`` (BENCH_ADMIN
[http://127.0.0.1:9100]), read before and after so earlier traffic does not count.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import dns.exception
import dns.message
import dns.query
import dns.rdatatype
import websocket  # websocket-client, installed with locust
from locust import FastHttpUser, User, between, events, task
from locust.env import Environment
from locust.stats import StatsEntry
from prometheus_client.parser import text_string_to_metric_families

DEFAULT_SYMBOLS = (
    "BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD", "ADA-USD", "DOGE-USD", "AVAX-USD", "DOT-USD",
    "LINK-USD", "MATIC-USD", "LTC-USD", "BCH-USD", "ATOM-USD", "UNI-USD", "XLM-USD", "ETH-BTC",
    "SOL-BTC", "BTC-EUR", "ETH-EUR", "USDT-USD",
)  # fmt: skip


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


WAIT = between(env_float("BENCH_WAIT_MIN", 0.2), env_float("BENCH_WAIT_MAX", 1.0))
ADMIN_URL = os.environ.get("BENCH_ADMIN", "http://127.0.0.1:9100").rstrip("/")
DNS_SERVER = os.environ.get("BENCH_DNS", "127.0.0.1:5353")
DNS_NAME = os.environ.get("BENCH_DNS_NAME", "api.meridian.test")


class Symbols:
    """The symbols in play, in popularity order, and a Zipf-like pick over them."""

    names: list[str] = list(DEFAULT_SYMBOLS)
    weights: list[float] = []

    @classmethod
    def configure(cls, names: Iterable[str]) -> None:
        cls.names = list(names) or list(DEFAULT_SYMBOLS)
        skew = env_float("BENCH_ZIPF_S", 1.1)
        cls.weights = [1.0 / (rank**skew) for rank in range(1, len(cls.names) + 1)]

    @classmethod
    def pick(cls) -> str:
        return random.choices(cls.names, cls.weights)[0]


Symbols.configure(
    os.environ.get("BENCH_SYMBOLS", "").split(",")
    if os.environ.get("BENCH_SYMBOLS")
    else DEFAULT_SYMBOLS
)


class MarketDataUser(FastHttpUser):
    weight = env_int("BENCH_WEIGHT_MARKET", 16)
    wait_time = WAIT

    @task(env_int("BENCH_TASK_TICKER", 10))
    def ticker(self) -> None:
        self.client.get(
            f"/api/v1/ticker/{Symbols.pick()}",
            name="/api/v1/ticker/[symbol]",
            headers={"Accept-Encoding": "gzip, br"},
        )

    @task(env_int("BENCH_TASK_DEPTH", 3))
    def depth(self) -> None:
        self.client.get(
            f"/api/v1/depth/{Symbols.pick()}",
            name="/api/v1/depth/[symbol]",
            headers={"Accept-Encoding": "gzip, br"},
        )

    @task(env_int("BENCH_TASK_TRADES", 2))
    def trades(self) -> None:
        self.client.get(
            f"/api/v1/trades/{Symbols.pick()}",
            name="/api/v1/trades/[symbol]",
            headers={"Accept-Encoding": "gzip, br"},
        )

    @task(env_int("BENCH_TASK_SYMBOLS", 1))
    def symbols(self) -> None:
        self.client.get("/api/v1/symbols", headers={"Accept-Encoding": "gzip, br"})


class StreamUser(User):
    """Holds one WebSocket stream; a dropped stream is a failure and is reopened."""

    weight = env_int("BENCH_WEIGHT_STREAM", 2)
    wait_time = between(0.0, 0.0)

    def on_start(self) -> None:
        count = env_int("BENCH_WS_SYMBOLS", 3)
        self.url = _ws_url(self.host or "http://127.0.0.1:8080", Symbols.names[:count])
        self.socket: websocket.WebSocket | None = None

    def on_stop(self) -> None:
        if self.socket is not None:
            self.socket.close()

    @task
    def stream(self) -> None:
        if self.socket is None:
            started = time.monotonic()
            try:
                self.socket = websocket.create_connection(self.url, timeout=5)
            except (OSError, websocket.WebSocketException) as exc:
                self._fire("connect", (time.monotonic() - started) * 1000, exc)
                time.sleep(1.0)  # a gevent sleep (locust patches time): back off, then retry
                return
            self._fire("connect", (time.monotonic() - started) * 1000, None)
        try:
            message = self.socket.recv()
        except (OSError, websocket.WebSocketException) as exc:
            self._fire("ticker update", 0.0, exc)
            self.socket.close()
            self.socket = None
            return
        try:
            update = json.loads(message)
            # Age of the update when it arrives: origin timestamp to here, through the edge.
            sent = datetime.fromisoformat(update["time"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError, TypeError) as exc:
            self._fire("ticker update", 0.0, exc)
            return
        error = (
            None if update.get("type") == "ticker" else ValueError(f"unexpected {message[:80]!r}")
        )
        self._fire("ticker update", max(0.0, (time.time() - sent) * 1000), error, len(message))

    def _fire(self, name: str, milliseconds: float, exc: Exception | None, length: int = 0) -> None:
        self.environment.events.request.fire(
            request_type="WS",
            name=name,
            response_time=milliseconds,
            response_length=length,
            exception=exc,
            context={},
        )


def _ws_url(host: str, symbols: list[str]) -> str:
    parts = urlsplit(host)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}/ws?symbols={','.join(symbols)}&interval_ms=100"


class DnsUser(FastHttpUser):
    """Resolves the service name through GeoDNS before each request, as a fresh client would."""

    weight = env_int("BENCH_WEIGHT_DNS", 2)
    wait_time = WAIT

    def on_start(self) -> None:
        host, _, port = DNS_SERVER.rpartition(":")
        self.dns_server, self.dns_port = host or "127.0.0.1", int(port)
        self.connect_to_answer = os.environ.get("BENCH_DNS_CONNECT") == "1"

    def resolve(self) -> str | None:
        query = dns.message.make_query(DNS_NAME, dns.rdatatype.A)
        started = time.monotonic()
        address: str | None = None
        error: Exception | None = None
        try:
            answer = dns.query.udp(query, self.dns_server, port=self.dns_port, timeout=2.0)
            addresses = [
                r.address for rrset in answer.answer for r in rrset if r.rdtype == dns.rdatatype.A
            ]
            if addresses:
                address = addresses[0]
            else:
                error = LookupError(f"no A record (rcode {answer.rcode()})")
        except (OSError, dns.exception.DNSException) as exc:
            error = exc
        self.environment.events.request.fire(
            request_type="DNS",
            name=f"A {DNS_NAME}",
            response_time=(time.monotonic() - started) * 1000,
            response_length=0,
            exception=error,
            context={},
        )
        return address

    @task
    def resolve_then_ticker(self) -> None:
        address = self.resolve()
        if address is None:
            return
        path = f"/api/v1/ticker/{Symbols.pick()}"
        if self.connect_to_answer:
            port = urlsplit(self.host or "").port or 80
            path = f"http://{address}:{port}{path}"
        self.client.get(
            path,
            name="/api/v1/ticker/[symbol] (after DNS)",
            headers={"Host": DNS_NAME, "Accept-Encoding": "gzip, br"},
        )


# --------------------------------------------------------------------------------------------
# Edge cache hit ratio from /metrics, tolerant of metric renames


def scrape_cache_counts(admin_url: str) -> dict[str, float] | None:
    """``{"hit": n, "miss": n, ...}`` from the edge's /metrics; None when it cannot be read."""
    try:
        with urllib.request.urlopen(f"{admin_url}/metrics", timeout=5) as response:
            text = response.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError):
        return None
    return cache_counts(text)


def cache_counts(metrics_text: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    families = list(text_string_to_metric_families(metrics_text))
    # 1. Dedicated counters: meridian_cache_hits_total / meridian_cache_misses_total.
    for family in families:
        for sample in family.samples:
            name = sample.name
            if "cache" in name and name.endswith("_total"):
                for outcome in ("hits", "misses"):
                    if name.endswith(f"_{outcome}_total"):
                        key = "hit" if outcome == "hits" else "miss"
                        counts[key] = counts.get(key, 0.0) + sample.value
    if counts:
        return counts
    # 2. A request counter labelled with the cache status (meridian_edge_requests{cache=...}).
    for family in families:
        for sample in family.samples:
            if sample.name.endswith("_total") and "cache" in sample.labels:
                status = sample.labels["cache"].lower()
                counts[status] = counts.get(status, 0.0) + sample.value
    return counts


def hit_ratio(before: Mapping[str, float] | None, after: Mapping[str, float] | None) -> str:
    if after is None:
        return f"unavailable (no /metrics at {ADMIN_URL})"
    delta = {k: v - (before or {}).get(k, 0.0) for k, v in after.items()}
    hits = sum(v for k, v in delta.items() if k in ("hit", "stale", "updating", "revalidated"))
    misses = sum(v for k, v in delta.items() if k in ("miss", "expired"))
    if hits + misses <= 0:
        return f"no cache lookups counted ({', '.join(sorted(delta)) or 'no cache metrics'})"
    detail = ", ".join(f"{k}={v:.0f}" for k, v in sorted(delta.items()) if v)
    return f"{hits / (hits + misses):.1%} ({detail})"


_cache_before: dict[str, float] | None = None


def _on_test_start(environment: Environment, **_: Any) -> None:
    global _cache_before
    _cache_before = scrape_cache_counts(ADMIN_URL)
    host = environment.host or "http://127.0.0.1:8080"
    try:  # the live symbol list, most popular first, when the API serves one
        with urllib.request.urlopen(f"{host}/api/v1/symbols", timeout=5) as response:
            listed = [s["symbol"] for s in json.load(response)["symbols"]]
        if listed and not os.environ.get("BENCH_SYMBOLS"):
            Symbols.configure(listed)
    except (OSError, ValueError, KeyError):
        pass


def _on_quitting(environment: Environment, **_: Any) -> None:
    stats = environment.stats
    if stats is None:
        return
    lines = [
        "",
        "Meridian load test summary",
        "-" * 98,
        f"{'type':6} {'name':44} {'reqs':>8} {'fail':>6} {'req/s':>8} "
        f"{'p50':>6} {'p95':>6} {'p99':>6}",
    ]
    for entry in sorted(stats.entries.values(), key=lambda e: (e.method or "", e.name)):
        lines.append(_stats_line(entry.method or "", entry.name, entry))
    # WS updates are pushed, not requested: keep them out of the request totals.
    requests_total = StatsEntry(stats, "total (HTTP + DNS)", "")
    for entry in stats.entries.values():
        if entry.method != "WS":
            requests_total.extend(entry)
    lines.append(_stats_line("", requests_total.name, requests_total))
    lines.append(
        f"edge cache hit ratio: {hit_ratio(_cache_before, scrape_cache_counts(ADMIN_URL))}"
    )
    print("\n".join(lines), flush=True)


def _stats_line(kind: str, name: str, entry: Any) -> str:
    return (
        f"{kind:6} {name[:44]:44} {entry.num_requests:>8} {entry.num_failures:>6} "
        f"{entry.total_rps:>8.1f} {entry.get_response_time_percentile(0.50) or 0:>6.0f} "
        f"{entry.get_response_time_percentile(0.95) or 0:>6.0f} "
        f"{entry.get_response_time_percentile(0.99) or 0:>6.0f}"
    )


# locust's EventHook.add_listener carries no annotations.
events.test_start.add_listener(_on_test_start)  # type: ignore[no-untyped-call]
events.quitting.add_listener(_on_quitting)  # type: ignore[no-untyped-call]
