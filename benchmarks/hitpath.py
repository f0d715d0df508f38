"""The edge's HTTP/1.1 cache-hit path in one process: CPU per request, without sockets.

    python -m benchmarks.hitpath [--requests 200000] [--keys 100000] [--rounds 3] [--rate-limit]
    python -m benchmarks.hitpath --memory [--keys 100000]

The real front end (``edge.protocol.EdgeConnection``) and pipeline, fed request bytes through
``data_received`` on a fake transport (``tests.stage_support``: a scripted upstream fills the
cache).  The cache's clock advances 100 µs per request (10,000 requests a second), so Age
ticks and cached response forms are rebuilt as they are under real load; the pipeline's clock
moves with it.  ``--rate-limit`` configures a request rate limit on every route, per client,
high enough never to bite (20,000/s, burst 100: the check's cost, not a refusal's).
Scenarios, as in
``benchmarks.compare``:

* identity - the same request bytes every time (the edge replays its memo of request heads);
* varied   - one ticker, with User-Agent, Cookie and X-Request-Id new on every request;
* spread   - ``--keys`` distinct keys picked at random, headers varied as above; the keys differ
  in their query string (``/api/v1/symbols?k=N``), as in ``benchmarks.compare``'s (f).

``--memory``: memory per cached 2 KB ticker instead of CPU.  RSS (from /proc) before the fill,
after filling ``--keys`` keys (``gc.collect`` first), and after one hit on each key; growth per
key beside the cache's own count of the bytes it holds.

Prints CPU µs per request (``time.process_time``: this process only, so other work on the
machine moves it little) per round and the best round.  What it leaves out: the kernel's socket
work and the event loop's dispatch, which ``benchmarks.compare`` measures end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import resource
import time
from collections.abc import Callable, Iterator

from edge.cache.testing import FakeClock
from edge.protocol import Connections, EdgeConnection
from edge.server import _settle_garbage_collector as settle_garbage_collector
from tests.stage_support import FakeTransport, Reply, make_config, world

#: About 2 KB of ticker JSON, cacheable for longer than any run.
BODY = (
    b'{"symbol":"BTC-USD","bids":['
    + b",".join(b'["%d.%02d","%d.%04d"]' % (97000 - i, i, i, i * 7) for i in range(88))
    + b"]}"
)
HEADERS = [(b"Content-Type", b"application/json"), (b"Cache-Control", b"public, max-age=3600")]
BROWSER = (
    b"Accept: application/json\r\nAccept-Language: en-US,en;q=0.9\r\nAccept-Encoding: identity\r\n"
)


def identity() -> Iterator[bytes]:
    head = b"GET /api/v1/ticker/K0 HTTP/1.1\r\nHost: example.test\r\n" + BROWSER + b"\r\n"
    while True:
        yield head


#: The target of key N: (e) asks for one ticker, (f) for many keys of one path, told apart by
#: their query (``benchmarks.compare``); ``--memory`` fills ticker paths.
TICKER = b"/api/v1/ticker/K%d"
SPREAD = b"/api/v1/symbols?k=%d"


def varied(keys: int, seed: int = 7, target: bytes = TICKER) -> Iterator[bytes]:
    rng = random.Random(seed)
    n = 0
    while True:
        n += 1
        key = rng.randrange(keys) if keys else 0
        yield (
            b"GET "
            + target % key
            + b" HTTP/1.1\r\nHost: example.test\r\n"
            + BROWSER
            + b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) sdk/%d\r\n" % (n % 977)
            + b"Cookie: session=%016x\r\n" % rng.getrandbits(64)
            + b"X-Request-Id: req-%d\r\n\r\n" % n
        )


async def measure(
    requests: int,
    keys: int,
    rounds: int,
    access_log: bool = False,
    only: tuple[str, ...] = (),
    profile: Callable[[bool], None] | None = None,
    rate_limit: bool = False,
) -> dict[str, list[float]]:
    # Room for every key, as benchmarks.compare gives each peer (PEER_CACHE_MIB).
    limit = {"rate_limits": {"bench": {"rate": "20000/s", "burst": 100}}} if rate_limit else {}
    config = make_config(cache={"memory": "1GiB"}, **limit)
    w = world({"http://u1": [Reply(headers=HEADERS, chunks=(BODY,))]}, config=config)
    w.pipeline.access_log.configure(access_log)
    clock = w.cache_clock
    pipeline_clock = w.clock
    connections = Connections(w.pipeline, asyncio.get_running_loop())
    transport = FakeTransport(keep=False)
    connection: EdgeConnection = connections.factory()
    connection.connection_made(transport)

    await fill_keys(connection, transport, pipeline_clock, 1)
    if keys:
        await fill_keys(connection, transport, pipeline_clock, keys, SPREAD)
    # The collector as an edge worker sets it (``edge.server``): heap frozen once set up,
    # young generation every GC_THRESHOLDS[0] net allocations.
    settle_garbage_collector()
    figures: dict[str, list[float]] = {}
    scenarios: dict[str, Callable[[], Iterator[bytes]]] = {
        "identity": identity,
        "varied": lambda: varied(1),
        "spread": lambda: varied(keys, target=SPREAD),
    }
    for name, make in scenarios.items():
        if only and name not in only:
            continue
        for _ in range(rounds):
            heads = make()
            batch = [next(heads) for _ in range(requests)]
            before = transport.writes
            if profile is not None:
                profile(True)
            started = time.process_time()
            for data in batch:
                clock.advance(0.0001)
                pipeline_clock.advance(0.0001)
                connection.data_received(data)
            spent = time.process_time() - started
            if profile is not None:
                profile(False)
            answered = transport.writes - before
            if answered != requests:
                raise RuntimeError(f"{name}: {requests - answered} requests not hits")
            limits = w.pipeline.limiter.limits
            if rate_limit and (limits is None or limits.rules[0].counts["market"].limited):
                raise RuntimeError(f"{name}: the rate limit was not checked, or it bit")
            figures.setdefault(name, []).append(spent / requests * 1e6)
    connection.connection_lost(None)
    return figures


async def fill_keys(
    connection: EdgeConnection,
    transport: FakeTransport,
    clock: FakeClock,
    count: int,
    target: bytes = TICKER,
) -> None:
    """One miss (a fill from the scripted upstream) for each of ``count`` keys (``target``
    with the key's number)."""
    for key in range(count):
        clock.advance(0.0001)
        before = transport.writes
        connection.data_received(
            b"GET " + target % key + b" HTTP/1.1\r\nHost: example.test\r\n" + BROWSER + b"\r\n"
        )
        for _ in range(1000):
            if transport.writes > before:
                break
            await asyncio.sleep(0)
        else:
            raise RuntimeError(f"key {key} was not answered")


class _Forgetful(list):  # type: ignore[type-arg]
    """A list that keeps nothing appended to it."""

    def append(self, item: object) -> None:
        pass


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


async def memory_per_key(keys: int) -> dict[str, float]:
    """KB of RSS per cached ticker once filled and once each key was hit (module docstring)."""
    config = make_config(cache={"memory": "4GiB"})
    # Two chunks, so that each fill joins a body of its own, as a real origin's would be.
    half = len(BODY) // 2
    w = world(
        {"http://u1": [Reply(headers=HEADERS, chunks=(BODY[:half], BODY[half:]))]}, config=config
    )
    w.pipeline.access_log.configure(False)
    # The scripted upstream and health record every call for tests' assertions: not here.
    w.upstream.sent = w.upstream.responses = w.health.reports = _Forgetful()
    connections = Connections(w.pipeline, asyncio.get_running_loop())
    transport = FakeTransport(keep=False)
    connection: EdgeConnection = connections.factory()
    connection.connection_made(transport)
    await fill_keys(connection, transport, w.clock, 1)  # the one-off allocations of a first fill
    gc.collect()
    start = rss_bytes()
    await fill_keys(connection, transport, w.clock, keys)
    gc.collect()
    filled = rss_bytes()
    cache = w.pipeline.cache
    counted = cache.store.bytes / max(len(cache.store), 1) if cache is not None else 0.0
    before = transport.writes
    for key in range(keys):
        w.cache_clock.advance(0.0001)
        w.clock.advance(0.0001)
        connection.data_received(
            b"GET /api/v1/ticker/K%d HTTP/1.1\r\nHost: example.test\r\n" % key + BROWSER + b"\r\n"
        )
    if transport.writes - before != keys:
        raise RuntimeError("not every key was a hit")
    gc.collect()
    hit = rss_bytes()
    connection.connection_lost(None)
    return {
        "filled_kb": (filled - start) / keys / 1024,
        "hit_kb": (hit - start) / keys / 1024,
        "counted_kb": counted / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--access-log", action="store_true", help="one access line per request (off: as nginx)"
    )
    parser.add_argument(
        "--rate-limit",
        action="store_true",
        help="a rate limit on every route, per client, never reached (the check's cost)",
    )
    parser.add_argument(
        "--memory", action="store_true", help="memory per cached ticker instead of CPU"
    )
    args = parser.parse_args(argv)
    if args.memory:
        kb = asyncio.run(memory_per_key(args.keys))
        print(
            f"memory per cached 2 KB ticker at {args.keys:,} keys (RSS growth / keys): "
            f"{kb['filled_kb']:.2f} KB filled, {kb['hit_kb']:.2f} KB once each key was hit; "
            f"the cache's own count {kb['counted_kb']:.2f} KB"
        )
        return 0
    figures = asyncio.run(
        measure(args.requests, args.keys, args.rounds, args.access_log, rate_limit=args.rate_limit)
    )
    limited = ", a rate limit never reached" if args.rate_limit else ""
    print(
        f"edge hit path in one process: {args.requests:,} requests a round, "
        f"{args.keys:,} keys{limited}"
    )
    print_rounds(figures, 9)
    return 0


def print_rounds(figures: dict[str, list[float]], width: int) -> None:
    """One line per scenario: its best round and every round (CPU µs per request)."""
    for name, values in figures.items():
        rounds = "  ".join(f"{v:6.2f}" for v in values)
        print(f"  {name:{width}s} CPU µs/request  best {min(values):6.2f}   rounds {rounds}")


if __name__ == "__main__":
    raise SystemExit(main())
