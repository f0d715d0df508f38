"""The request side's written-out paths: the same outcome as the calls they stand for.

``Pipeline.handle`` sends a MISS straight to the fill (ahead of ``HitStage.answer`` and
``needs_fill``); ``EdgeConnection``'s idle deadline after an answer from the request's bytes
and after a response is ``_set_deadline``'s; ``RequestQueue.push`` starts a bodiless request
without ``_start``.  In memory: fake transports and clocks, no sockets, no sleeps."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.cache import Lookup, LookupKind
from edge.exchange import Exchange as StageExchange
from edge.h1parse import Exchange
from edge.h1queue import RequestQueue
from edge.protocol import _DEADLINE_IDLE, Connections, EdgeConnection
from edge.stages.hit import needs_fill
from tests.stage_support import FakeSink, FakeTransport, Reply, request, world

TICKER = b'{"symbol":"BTC-USD","price":"97000.12"}'
CACHEABLE = [(b"Content-Type", b"application/json"), (b"Cache-Control", b"max-age=60")]


@settings(max_examples=50)
@given(st.sampled_from(list(LookupKind)))
def test_a_miss_sent_straight_to_the_fill_is_what_answer_and_needs_fill_decide(
    kind: LookupKind,
) -> None:
    w = world()
    sink = FakeSink()
    exchange = StageExchange(request(), None, sink, w.pipeline.state)
    lookup = Lookup(kind, b"HTTP/1.1 200 OK\r\n\r\n", key=None)
    answered = w.pipeline.hits.answer(exchange, lookup)
    if kind is LookupKind.MISS:  # the shortcut's verdict: no answer, a fill
        assert not answered and needs_fill(lookup)


class FixedTime:
    """A loop whose clock stands still (``EdgeConnection`` reads only ``time``)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def _connection(w: object, loop: asyncio.AbstractEventLoop) -> tuple[EdgeConnection, object]:
    connections = Connections(w.pipeline, loop)  # type: ignore[attr-defined]
    transport = FakeTransport()
    connection = connections.factory()
    connection.connection_made(transport)
    return connection, transport


def _expected_idle(connection: EdgeConnection, now: float) -> tuple[int, float]:
    """What ``_set_deadline(_DEADLINE_IDLE)`` leaves at ``now``."""
    loop = connection._loop
    connection._loop = FixedTime(now)  # type: ignore[assignment]
    kept = connection._deadline_kind, connection._deadline
    connection._set_deadline(_DEADLINE_IDLE)
    expected = connection._deadline_kind, connection._deadline
    connection._deadline_kind, connection._deadline = kept
    connection._loop = loop
    return expected


@settings(max_examples=25, deadline=None)
@given(st.floats(0.0, 1e6), st.integers(1, 4))
def test_the_idle_deadline_after_an_answer_is_set_deadlines(now: float, hits: int) -> None:
    async def scenario() -> None:
        w = world({"http://u1": [Reply(200, CACHEABLE, (TICKER,))]})
        connection, transport = _connection(w, asyncio.get_running_loop())
        expected = _expected_idle(connection, now)
        head = b"GET /api/ticker?n=%d HTTP/1.1\r\nHost: example.test\r\n\r\n"
        # A miss: answered by the task, the idle deadline set in ``request_done``.
        connection.data_received(head % hits)
        for _ in range(100):
            if connection._requests.active is None:
                break
            await asyncio.sleep(0)
        connection._loop = FixedTime(now)  # type: ignore[assignment]
        connection.request_done(Exchange(request(), None, False))
        assert (connection._deadline_kind, connection._deadline) == expected
        # Hits from the request's bytes alone: the idle deadline set in ``data_received``.
        for _ in range(hits):
            connection._deadline_kind, connection._deadline = 0, 0.0
            connection.data_received(head % hits)
            assert (connection._deadline_kind, connection._deadline) == expected
        assert transport.written  # type: ignore[attr-defined]
        connection.connection_lost(None)

    asyncio.run(scenario())


@settings(max_examples=25, deadline=None)
@given(st.booleans(), st.sampled_from(["GET", "HEAD"]))
def test_push_starts_a_bodiless_request_as_start_does(keep_alive: bool, method: str) -> None:
    async def scenario() -> None:
        w = world({"http://u1": [Reply(200, CACHEABLE, (TICKER,))] * 2})
        loop = asyncio.get_running_loop()
        states = []
        for start in (True, False):
            connection, transport = _connection(w, loop)
            queue, response = connection._requests, connection._response
            response.bytes_sent, response.request_deadline = 7, 3.0
            response.request_expired = True
            exchange = Exchange(request(method=method, keep_alive=keep_alive), None, False)
            if start:
                exchange.scheduled = True
                queue._start(exchange)
            else:
                queue.push(exchange)
            task = queue.task
            assert task is not None
            states.append(
                (
                    exchange.scheduled,
                    queue.active is exchange,
                    response.active is exchange,
                    response.keep_alive,
                    response.bytes_sent,
                    response.request_deadline,
                    response.request_expired,
                    task.get_coro().__qualname__,  # type: ignore[union-attr]
                    bytes(transport.written),  # type: ignore[attr-defined]
                )
            )
            await task
            connection.connection_lost(None)
        assert states[0] == states[1]

    asyncio.run(scenario())


async def _run_as_before(queue: RequestQueue, exchange: Exchange) -> None:
    """``RequestQueue._run`` as it was: its own coroutine around ``Pipeline.handle``, the
    reference the queue as ``handle``'s ``RequestGuard`` must match."""
    response = queue._response
    try:
        await queue._pipeline.handle(exchange.request, exchange.body, response, exchange.lookup)
    except asyncio.CancelledError:
        pass
    except Exception:
        if queue.active is exchange and not exchange.response_started:
            response.write_complete(
                queue._pipeline.error_answer(500, "internal_error", exchange.request.request_id),
                close=True,
            )
        else:
            response.abort()
    finally:
        if queue.active is exchange:
            queue.active = None
            queue.task = None
            response.active = None
            response.request_deadline = 0.0
            queue._host.request_done(exchange)


#: What the fill does: answers, fails before or after its response started, or is cancelled
#: (its client gone) before or after it answered.
OUTCOMES = ["answer", "fail", "answer_then_fail", "cancel", "answer_then_cancel"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(OUTCOMES), min_size=1, max_size=4), st.booleans())
def test_the_queue_as_handles_guard_ends_requests_as_its_own_coroutine_did(
    outcomes: list[str], keep_alive: bool
) -> None:
    async def scenario(reference: bool) -> tuple[object, ...]:
        w = world()
        loop = asyncio.get_running_loop()
        connection, transport = _connection(w, loop)
        queue = connection._requests
        done: list[bool] = []
        host_done = connection.request_done

        def request_done(exchange: Exchange) -> None:
            done.append(exchange.scheduled)
            host_done(exchange)

        connection.request_done = request_done  # type: ignore[method-assign]
        queue._host = connection
        gate = loop.create_future()

        async def fill(exchange: StageExchange) -> None:
            outcome = outcomes[len(done) % len(outcomes)]
            if outcome.startswith("answer"):
                w.pipeline.respond.write_wire(
                    exchange, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
                )
            if outcome.endswith("fail"):
                raise RuntimeError("a bug")
            if outcome.endswith("cancel"):
                await gate

        w.pipeline.filler = SimpleNamespace(fill=fill)  # type: ignore[assignment]
        for n, _ in enumerate(outcomes):
            if transport.closed:  # type: ignore[attr-defined]
                break
            req = request(f"/api/ticker?n={n}", keep_alive=keep_alive)
            exchange = Exchange(req, None, False)
            if reference:
                exchange.scheduled = True
                queue.active = exchange
                queue._response.begin(exchange)
                queue.task = loop.create_task(_run_as_before(queue, exchange))
            else:
                queue.push(exchange)
            task = queue.task
            assert task is not None
            for _ in range(20):
                await asyncio.sleep(0)
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        stats = w.pipeline.metrics.upstream_stats
        return (
            bytes(transport.written),  # type: ignore[attr-defined]
            transport.closed,  # type: ignore[attr-defined]
            done,
            queue.active,
            queue.task,
            connection._response.request_deadline,
            stats.in_flight,
        )

    assert asyncio.run(scenario(True)) == asyncio.run(scenario(False))
