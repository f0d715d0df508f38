"""The sample origin: a market-data API for the demo, the tests and the benchmarks.

    python -m meridian.origin --region us-east --port 9001

Bodies are deterministic per (symbol, update bucket), so every region serves the same bytes for
the same second (the same strong ETag everywhere) and the body changes once per bucket, as a real
ticker does.  Rendered bodies are kept for the current bucket, so a flood of cache misses from a
benchmark costs a dict lookup, not a JSON dump of a 50 KB order book.

The origin always answers identity: compression is the edge's job, so there is no ``Vary``.

``PUT /_control`` flips failure switches for tests.  A PUT replaces the whole switch state (a key
left out takes its default, so ``{}`` resets every switch); ``"reset_counters": true`` also zeroes
the request counters that ``GET /_control`` reports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import random
import signal
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any

from aiohttp import WSMsgType, web

from meridian.log import configure, get_logger
from meridian.origin_streams import DEFAULT_HISTORY, DEFAULT_RATE, Feed, StreamServer

log = get_logger("origin")

DEFAULT_UPDATE_INTERVAL = 1.0
CONTROL_PATH = "/_control"
DEPTH_LEVELS = 520
TRADES_COUNT = 100
TOP_OF_BOOK_LEVELS = 10
#: Distinct paths counted individually; beyond this they share one counter (unique-path floods).
MAX_COUNTED_PATHS = 10_000
MAX_TRACKED_PEERS = 100_000
WS_MIN_INTERVAL_MS = 10
WS_MAX_INTERVAL_MS = 60_000
WS_MAX_SYMBOLS = 50


@dataclass(frozen=True, slots=True)
class Symbol:
    name: str
    base: str
    quote: str
    price: float
    price_decimals: int
    size_decimals: int
    #: Typical trade size in base units, so sizes look like the market they belong to.
    typical_size: float


def _symbol(
    name: str, price: float, price_decimals: int, size_decimals: int, size: float
) -> Symbol:
    base, quote = name.split("-")
    return Symbol(name, base, quote, price, price_decimals, size_decimals, size)


SYMBOLS: dict[str, Symbol] = {
    s.name: s
    for s in (
        _symbol("BTC-USD", 67_250.0, 2, 8, 0.05),
        _symbol("ETH-USD", 3_480.0, 2, 6, 0.8),
        _symbol("SOL-USD", 168.0, 3, 4, 12.0),
        _symbol("XRP-USD", 0.61, 5, 1, 2_500.0),
        _symbol("ADA-USD", 0.45, 5, 1, 3_000.0),
        _symbol("DOGE-USD", 0.16, 6, 0, 9_000.0),
        _symbol("AVAX-USD", 36.0, 3, 3, 40.0),
        _symbol("DOT-USD", 7.2, 4, 2, 150.0),
        _symbol("LINK-USD", 17.5, 4, 2, 80.0),
        _symbol("MATIC-USD", 0.72, 5, 1, 1_800.0),
        _symbol("LTC-USD", 84.0, 3, 4, 6.0),
        _symbol("BCH-USD", 470.0, 2, 5, 1.5),
        _symbol("ATOM-USD", 8.9, 4, 2, 110.0),
        _symbol("UNI-USD", 9.8, 4, 2, 90.0),
        _symbol("XLM-USD", 0.11, 6, 0, 12_000.0),
        _symbol("ETH-BTC", 0.05175, 6, 4, 0.8),
        _symbol("SOL-BTC", 0.0025, 7, 3, 12.0),
        _symbol("BTC-EUR", 62_100.0, 2, 8, 0.05),
        _symbol("ETH-EUR", 3_210.0, 2, 6, 0.8),
        _symbol("USDT-USD", 1.0002, 5, 2, 5_000.0),
    )
}


# --------------------------------------------------------------------------------------------
# Deterministic market data


def _rng(*parts: object) -> random.Random:
    # hash() is salted per process; regions must agree on bytes, so derive the seed from blake2b.
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _symbol_phase(symbol: Symbol) -> float:
    return _rng("phase", symbol.name).uniform(0.0, 2 * math.pi)


def mid_price(symbol: Symbol, at: float) -> float:
    """A smooth drift (minutes to hours) plus per-second noise, the same in every process."""
    phase = _symbol_phase(symbol)
    drift = 0.03 * math.sin(at / 3600.0 + phase) + 0.008 * math.sin(at / 240.0 + 2 * phase)
    noise = _rng("noise", symbol.name, int(at)).gauss(0.0, 0.0004)
    return symbol.price * (1.0 + drift + noise)


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fmt(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def _window_stats(symbol: Symbol, at: float, seconds: int, label: str) -> dict[str, Any]:
    rng = _rng("stats", symbol.name, label, int(at))
    close = mid_price(symbol, at)
    open_ = mid_price(symbol, at - seconds)
    high = max(open_, close) * (1.0 + rng.uniform(0.001, 0.012))
    low = min(open_, close) * (1.0 - rng.uniform(0.001, 0.012))
    volume = symbol.typical_size * seconds * rng.uniform(0.5, 1.5) / 4.0
    change = close - open_
    pd, sd = symbol.price_decimals, symbol.size_decimals
    return {
        "open": _fmt(open_, pd),
        "high": _fmt(high, pd),
        "low": _fmt(low, pd),
        "close": _fmt(close, pd),
        "volume": _fmt(volume, sd),
        "quote_volume": _fmt(volume * (open_ + close) / 2.0, 2),
        "vwap": _fmt((high + low + close) / 3.0, pd),
        "change": _fmt(change, pd),
        "change_percent": _fmt(100.0 * change / open_, 3),
        "trades": int(seconds * rng.uniform(2.0, 6.0)),
    }


def _book_side(symbol: Symbol, mid: float, at: float, side: str, levels: int) -> list[Any]:
    rng = _rng("book", symbol.name, side, int(at))
    tick = 10.0**-symbol.price_decimals
    step = max(tick, mid * 0.00002)
    sign = -1.0 if side == "bids" else 1.0
    price = mid + sign * step / 2.0
    rows: list[Any] = []
    for _ in range(levels):
        size = symbol.typical_size * rng.lognormvariate(0.0, 0.9)
        rows.append(
            {
                "price": _fmt(price, symbol.price_decimals),
                "size": _fmt(size, symbol.size_decimals),
                "orders": rng.randint(1, 40),
            }
        )
        price += sign * step * rng.choice((1.0, 1.0, 1.0, 2.0, 3.0))
    return rows


def ticker_document(symbol: Symbol, at: float) -> dict[str, Any]:
    pd, sd = symbol.price_decimals, symbol.size_decimals
    rng = _rng("ticker", symbol.name, int(at))
    mid = mid_price(symbol, at)
    book_top = {
        side: [
            [row["price"], row["size"]]
            for row in _book_side(symbol, mid, at, side, TOP_OF_BOOK_LEVELS)
        ]
        for side in ("bids", "asks")
    }
    last_price = mid * (1.0 + rng.uniform(-0.0002, 0.0002))
    return {
        "symbol": symbol.name,
        "base": symbol.base,
        "quote": symbol.quote,
        "status": "trading",
        "sequence": int(at * 1000),
        "time": _iso(at),
        "last": {
            "price": _fmt(last_price, pd),
            "size": _fmt(symbol.typical_size * rng.lognormvariate(0.0, 0.8), sd),
            "side": rng.choice(("buy", "sell")),
            "trade_id": int(at * 10),
            "time": _iso(at - rng.uniform(0.0, 0.9)),
        },
        "bid": {"price": book_top["bids"][0][0], "size": book_top["bids"][0][1]},
        "ask": {"price": book_top["asks"][0][0], "size": book_top["asks"][0][1]},
        "mid": _fmt(mid, pd),
        "mark_price": _fmt(mid * (1.0 + rng.uniform(-0.0001, 0.0001)), pd),
        "index_price": _fmt(mid * (1.0 + rng.uniform(-0.0003, 0.0003)), pd),
        "book_top": book_top,
        "stats": {
            label: _window_stats(symbol, at, seconds, label)
            for label, seconds in (
                ("1h", 3600),
                ("24h", 86_400),
                ("7d", 604_800),
                ("30d", 2_592_000),
            )
        },
        "limits": {
            "tick_size": _fmt(10.0**-pd, pd),
            "lot_size": _fmt(10.0**-sd, sd) if sd else "1",
            "min_notional": "1.00",
            "max_order_size": _fmt(symbol.typical_size * 10_000, sd),
        },
        "updated_at": _iso(at),
    }


def depth_document(symbol: Symbol, at: float, levels: int = DEPTH_LEVELS) -> dict[str, Any]:
    mid = mid_price(symbol, at)
    return {
        "symbol": symbol.name,
        "sequence": int(at * 1000),
        "time": _iso(at),
        "bids": _book_side(symbol, mid, at, "bids", levels),
        "asks": _book_side(symbol, mid, at, "asks", levels),
    }


def trades_document(symbol: Symbol, at: float, count: int = TRADES_COUNT) -> dict[str, Any]:
    rng = _rng("trades", symbol.name, int(at))
    trades = []
    trade_time = at
    first_id = int(at * 10)
    for i in range(count):
        trade_time -= rng.expovariate(4.0)
        trades.append(
            {
                "id": first_id - i,
                "price": _fmt(mid_price(symbol, trade_time), symbol.price_decimals),
                "size": _fmt(
                    symbol.typical_size * rng.lognormvariate(0.0, 0.8), symbol.size_decimals
                ),
                "side": rng.choice(("buy", "sell")),
                "time": _iso(trade_time),
            }
        )
    return {"symbol": symbol.name, "time": _iso(at), "trades": trades}


def symbols_document() -> dict[str, Any]:
    return {
        "symbols": [
            {
                "symbol": s.name,
                "base": s.base,
                "quote": s.quote,
                "status": "trading",
                "price_decimals": s.price_decimals,
                "size_decimals": s.size_decimals,
            }
            for s in SYMBOLS.values()
        ]
    }


def _dumps(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


# --------------------------------------------------------------------------------------------
# Rendered representations and HTTP validators


@dataclass(frozen=True, slots=True)
class Rendered:
    body: bytes
    etag: str
    last_modified: float
    cache_control: str


def render(document: object, last_modified: float, cache_control: str) -> Rendered:
    body = _dumps(document)
    etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
    return Rendered(body, etag, last_modified, cache_control)


def _etag_listed(header: str, etag: str) -> bool:
    """If-None-Match uses the weak comparison (RFC 9110 13.1.2): W/ prefixes are ignored."""
    if header.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == bare for tag in header.split(","))


def _not_modified(request: web.Request, rendered: Rendered) -> bool:
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None:  # takes precedence over If-Modified-Since when present
        return _etag_listed(if_none_match, rendered.etag)
    if_modified_since = request.headers.get("If-Modified-Since")
    if if_modified_since is None:
        return False
    try:
        since = parsedate_to_datetime(if_modified_since).timestamp()
    except (TypeError, ValueError):
        return False
    return int(rendered.last_modified) <= since


def _http_date(at: float) -> str:
    return format_datetime(datetime.fromtimestamp(int(at), UTC), usegmt=True)


def _representation(request: web.Request, rendered: Rendered) -> web.Response:
    headers = {
        "ETag": rendered.etag,
        "Last-Modified": _http_date(rendered.last_modified),
        "Cache-Control": rendered.cache_control,
    }
    if _not_modified(request, rendered):
        return web.Response(status=304, headers=headers)
    return web.Response(body=rendered.body, content_type="application/json", headers=headers)


def _json_response(
    document: object, status: int = 200, cache_control: str = "no-store"
) -> web.Response:
    return web.Response(
        body=_dumps(document),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": cache_control},
    )


# --------------------------------------------------------------------------------------------
# Switches and counters


@dataclass(slots=True)
class Switches:
    healthy: bool = True
    #: When set, every /api response has this status.
    status: int | None = None
    delay_ms: int = 0
    #: Close every connection without answering (except /_control).
    drop: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "status": self.status,
            "delay_ms": self.delay_ms,
            "drop": self.drop,
        }


def parse_switches(data: object) -> tuple[Switches, bool]:
    """The switches a PUT body asks for, and whether it asks to reset the counters."""
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    unknown = set(data) - {"healthy", "status", "delay_ms", "drop", "reset_counters"}
    if unknown:
        raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
    switches = Switches()
    healthy = data.get("healthy", True)
    if not isinstance(healthy, bool):
        raise ValueError("healthy must be true or false")
    switches.healthy = healthy
    status = data.get("status")
    if status is not None and (
        isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599
    ):
        raise ValueError("status must be an integer 200..599 or null")
    switches.status = status
    delay_ms = data.get("delay_ms", 0)
    if isinstance(delay_ms, bool) or not isinstance(delay_ms, int) or not 0 <= delay_ms <= 600_000:
        raise ValueError("delay_ms must be an integer 0..600000")
    switches.delay_ms = delay_ms
    drop = data.get("drop", False)
    reset = data.get("reset_counters", False)
    if not isinstance(drop, bool) or not isinstance(reset, bool):
        raise ValueError("drop and reset_counters must be true or false")
    switches.drop = drop
    return switches, reset


@dataclass(slots=True)
class Counters:
    total: int = 0
    in_flight: int = 0
    by_path: dict[str, int] = field(default_factory=dict)
    #: Client (address, port) pairs seen: one per TCP connection, to check upstream reuse.
    peers: set[tuple[Any, ...]] = field(default_factory=set)

    def count(self, request: web.Request) -> None:
        self.total += 1
        path = request.path
        if path in self.by_path or len(self.by_path) < MAX_COUNTED_PATHS:
            self.by_path[path] = self.by_path.get(path, 0) + 1
        else:
            self.by_path["<other>"] = self.by_path.get("<other>", 0) + 1
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer is not None and len(self.peers) < MAX_TRACKED_PEERS:
            self.peers.add(tuple(peer))

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "in_flight": self.in_flight,
            "connections": len(self.peers),
            "paths": dict(sorted(self.by_path.items())),
        }


@dataclass(slots=True)
class OriginState:
    region: str
    update_interval: float
    started: float = field(default_factory=time.time)
    switches: Switches = field(default_factory=Switches)
    counters: Counters = field(default_factory=Counters)
    #: (kind, symbol) -> the representation of the current bucket.
    rendered: dict[tuple[str, str], tuple[int, Rendered]] = field(default_factory=dict)
    websockets: weakref.WeakSet[web.WebSocketResponse] = field(default_factory=weakref.WeakSet)
    symbols: Rendered | None = None
    streams: StreamServer | None = None

    def bucket(self, now: float | None = None) -> int:
        return int((time.time() if now is None else now) // self.update_interval)

    def representation(self, kind: str, symbol: Symbol) -> Rendered:
        bucket = self.bucket()
        cached = self.rendered.get((kind, symbol.name))
        if cached is not None and cached[0] == bucket:
            return cached[1]
        at = bucket * self.update_interval
        if kind == "ticker":
            document = ticker_document(symbol, at)
        elif kind == "depth":
            document = depth_document(symbol, at)
        else:
            document = trades_document(symbol, at)
        rendered = render(document, at, "public, max-age=1")
        self.rendered[(kind, symbol.name)] = (bucket, rendered)
        return rendered


STATE = web.AppKey("state", OriginState)


# --------------------------------------------------------------------------------------------
# Handlers

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def control_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    if request.path == CONTROL_PATH:
        return await handler(request)
    state.counters.count(request)
    state.counters.in_flight += 1
    try:
        switches = state.switches
        if switches.delay_ms:
            await asyncio.sleep(switches.delay_ms / 1000.0)
            switches = state.switches  # a test may have flipped them while we slept
        if switches.drop:
            # Close at the transport, before a byte of the response exists: the client sees
            # the connection end with no status line (nginx's "upstream prematurely closed").
            if request.transport is not None:
                request.transport.close()
            raise web.HTTPServiceUnavailable()  # never written: the transport is closed
        response: web.StreamResponse
        if switches.status is not None and request.path.startswith("/api/"):
            response = _json_response(
                {"error": "injected", "status": switches.status}, status=switches.status
            )
        else:
            response = await handler(request)
    finally:
        state.counters.in_flight -= 1
    return response


async def _add_region_header(request: web.Request, response: web.StreamResponse) -> None:
    # on_response_prepare also reaches error responses and WebSocket handshakes.
    response.headers["X-Origin-Region"] = request.app[STATE].region


def _lookup_symbol(request: web.Request) -> Symbol:
    name = request.match_info["symbol"].upper()
    symbol = SYMBOLS.get(name)
    if symbol is None:
        raise web.HTTPNotFound(
            body=_dumps({"error": "unknown_symbol", "symbol": request.match_info["symbol"]}),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )
    return symbol


def _market_handler(kind: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        symbol = _lookup_symbol(request)
        return _representation(request, request.app[STATE].representation(kind, symbol))

    handle.__name__ = f"handle_{kind}"
    return handle


async def handle_symbols(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.symbols is None:
        state.symbols = render(symbols_document(), state.started, "public, max-age=300")
    return _representation(request, state.symbols)


async def handle_whoami(request: web.Request) -> web.StreamResponse:
    return _json_response({"region": request.app[STATE].region})


async def handle_orders(request: web.Request) -> web.StreamResponse:
    try:
        order = await request.json()
    except ValueError:
        return _json_response({"error": "invalid_json"}, status=400)
    state = request.app[STATE]
    order_id = hashlib.blake2b(
        f"{state.region}:{time.time_ns()}".encode(), digest_size=8
    ).hexdigest()
    return _json_response(
        {"order_id": order_id, "status": "accepted", "region": state.region, "order": order},
        status=201,
    )


async def handle_healthz(request: web.Request) -> web.StreamResponse:
    healthy = request.app[STATE].switches.healthy
    return web.Response(
        text="ok" if healthy else "unhealthy",
        status=200 if healthy else 503,
        headers={"Cache-Control": "no-store"},
    )


async def handle_control_get(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    return _json_response(
        {
            "region": state.region,
            "switches": state.switches.as_dict(),
            "requests": state.counters.as_dict(),
            "streams": state.streams.status() if state.streams is not None else {},
        }
    )


async def handle_control_put(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        switches, reset = parse_switches(await request.json() if request.can_read_body else {})
    except ValueError as exc:
        return _json_response({"error": str(exc)}, status=400)
    state.switches = switches
    if reset:
        state.counters = Counters()
    log.info("control", region=state.region, reset_counters=reset, **switches.as_dict())
    return await handle_control_get(request)


def _ws_parameters(request: web.Request) -> tuple[list[Symbol], float]:
    names = [n for n in request.query.get("symbols", "BTC-USD").upper().split(",") if n]
    unknown = [n for n in names if n not in SYMBOLS]
    if unknown or not names or len(names) > WS_MAX_SYMBOLS:
        reason = f"unknown symbols: {','.join(unknown)}" if unknown else "1..50 symbols required"
        raise web.HTTPBadRequest(text=reason)
    try:
        interval_ms = int(request.query.get("interval_ms", "100"))
    except ValueError:
        raise web.HTTPBadRequest(text="interval_ms must be an integer") from None
    if not WS_MIN_INTERVAL_MS <= interval_ms <= WS_MAX_INTERVAL_MS:
        raise web.HTTPBadRequest(text="interval_ms must be 10..60000")
    return [SYMBOLS[n] for n in names], interval_ms / 1000.0


def ws_update(symbol: Symbol, at: float, sequence: int) -> dict[str, Any]:
    """A small streaming ticker update (the full ticker document is what the REST API is for)."""
    rng = _rng("ws", symbol.name, int(at * 1000))
    mid = mid_price(symbol, at) * (1.0 + rng.gauss(0.0, 0.00005))
    half_spread = max(10.0**-symbol.price_decimals, mid * 0.00001)
    pd, sd = symbol.price_decimals, symbol.size_decimals
    return {
        "type": "ticker",
        "symbol": symbol.name,
        "sequence": sequence,
        "time": _iso(at),
        "last": _fmt(mid, pd),
        "bid": _fmt(mid - half_spread, pd),
        "bid_size": _fmt(symbol.typical_size * rng.lognormvariate(0.0, 0.8), sd),
        "ask": _fmt(mid + half_spread, pd),
        "ask_size": _fmt(symbol.typical_size * rng.lognormvariate(0.0, 0.8), sd),
    }


async def _push_updates(ws: web.WebSocketResponse, symbols: list[Symbol], interval: float) -> None:
    loop = asyncio.get_running_loop()
    next_tick = loop.time()
    sequence = 0
    while not ws.closed:
        now = time.time()
        for symbol in symbols:
            sequence += 1
            await ws.send_str(json.dumps(ws_update(symbol, now, sequence), separators=(",", ":")))
        # Schedule against the previous tick, not "now", so the rate does not drift slower.
        next_tick = max(next_tick + interval, loop.time())
        await asyncio.sleep(next_tick - loop.time())


async def handle_ws(request: web.Request) -> web.StreamResponse:
    symbols, interval = _ws_parameters(request)
    state = request.app[STATE]
    ws = web.WebSocketResponse(autoping=True, heartbeat=None)
    await ws.prepare(request)
    state.websockets.add(ws)
    pusher = asyncio.create_task(_push_updates(ws, symbols, interval))
    try:
        async for message in ws:  # protocol pings are answered by autoping
            if message.type == WSMsgType.TEXT and message.data.strip() in ('{"op":"ping"}', "ping"):
                await ws.send_str('{"type":"pong"}')
    finally:
        pusher.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
            await pusher
    return ws


async def _close_websockets(app: web.Application) -> None:
    for ws in list(app[STATE].websockets):
        await ws.close(code=1001, message=b"origin shutting down")


def create_app(
    region: str,
    update_interval: float = DEFAULT_UPDATE_INTERVAL,
    stream_rate: float = DEFAULT_RATE,
    stream_history: int = DEFAULT_HISTORY,
    stream_lockstep: bool = False,
) -> web.Application:
    """The origin application for ``region``; bodies change every ``update_interval`` seconds,
    stream channels publish ``stream_rate`` messages a second, each at its own phase unless
    ``stream_lockstep`` (``meridian.origin_streams``)."""
    app = web.Application(middlewares=[control_middleware])
    app[STATE] = OriginState(region=region, update_interval=update_interval)
    symbols = {s.name: (s.price, s.price_decimals) for s in SYMBOLS.values()}
    app[STATE].streams = streams = StreamServer(
        Feed(symbols, stream_rate, stream_history, lockstep=stream_lockstep)
    )
    streams.install(app)
    app.router.add_get("/api/v1/ticker/{symbol}", _market_handler("ticker"))
    app.router.add_get("/api/v1/depth/{symbol}", _market_handler("depth"))
    app.router.add_get("/api/v1/trades/{symbol}", _market_handler("trades"))
    app.router.add_get("/api/v1/symbols", handle_symbols)
    app.router.add_get("/api/v1/whoami", handle_whoami)
    app.router.add_post("/api/v1/orders", handle_orders)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/ws", handle_ws)
    app.router.add_get(CONTROL_PATH, handle_control_get)
    app.router.add_put(CONTROL_PATH, handle_control_put)
    app.on_response_prepare.append(_add_region_header)
    app.on_shutdown.append(_close_websockets)
    return app


# --------------------------------------------------------------------------------------------
# Process


async def serve(
    region: str,
    host: str,
    port: int,
    update_interval: float,
    stream_rate: float = DEFAULT_RATE,
    stream_history: int = DEFAULT_HISTORY,
    stream_lockstep: bool = False,
) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    runner = web.AppRunner(
        create_app(region, update_interval, stream_rate, stream_history, stream_lockstep),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=2.0,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            log.error("listen_failed", region=region, addr=f"{host}:{port}", reason=str(exc))
            return 1
        bound = runner.addresses[0]
        addr = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        log.info("listening", region=region, addr=addr)
        await stopping.wait()
        log.info("stopping", region=region)
    finally:
        await runner.cleanup()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meridian origin", description="Run the sample market-data origin."
    )
    parser.add_argument("--region", required=True, help="region name sent in X-Origin-Region")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9001, help="port to bind; 0 picks a free one")
    parser.add_argument(
        "--update-interval",
        type=float,
        default=DEFAULT_UPDATE_INTERVAL,
        help="seconds between market-data updates (default 1)",
    )
    parser.add_argument(
        "--stream-rate",
        type=float,
        default=DEFAULT_RATE,
        help="messages per second on every stream channel (default 10)",
    )
    parser.add_argument(
        "--stream-history",
        type=int,
        default=DEFAULT_HISTORY,
        help="messages a stream subscription can replay with since= (default 10000)",
    )
    parser.add_argument(
        "--stream-lockstep",
        action="store_true",
        help="every stream channel ticks at the same instant (default: each at its own phase)",
    )
    parser.add_argument("--log-format", choices=("logfmt", "json"), default="logfmt")
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.update_interval <= 0:
        build_parser().error("--update-interval must be positive")
    if not 0 < args.stream_rate <= 1000 or args.stream_history < 0:
        build_parser().error("--stream-rate must be 0..1000 and --stream-history not negative")
    configure(args.log_level, args.log_format)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # the stdlib loop is fine for an origin; uvloop is only faster
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(
            serve(
                args.region,
                args.host,
                args.port,
                args.update_interval,
                args.stream_rate,
                args.stream_history,
                args.stream_lockstep,
            )
        )


if __name__ == "__main__":
    raise SystemExit(main())
