"""The upstream side's pieces without an edge process: the per-backend pool bound and its
waits, which failures blame a backend, local resource errors, request body buffering, the
descriptor budget and throttled logging, and health checks that fail for a local reason."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey
from prometheus_client import CollectorRegistry

from edge.fdlimit import FdBudget, Throttle, fd_exhausted
from edge.http1 import BodyFraming, BodyKind, RequestRejected
from edge.stages.forward import REQUEST_BUFFER_LIMIT, buffer_request_body
from edge.upstream import FailureKind, Gate, UpstreamFailure, UpstreamPool, retry_allowed
from meridian.config import EdgeTimeouts, EdgeUpstream
from meridian.health import HealthMonitor
from meridian.health.book import TargetInfo
from meridian.health.checks import CheckOutcome, Prober, is_local_error
from meridian.health.monitor import LOCAL_ERROR_LOG_INTERVAL
from tests.health_support import captured_logs, make_config, sample

# -- the pool bound ---------------------------------------------------------------------------


def _pool(size: int) -> UpstreamPool:
    return UpstreamPool(pool_size=size, timeouts=EdgeTimeouts())


async def test_a_full_pool_makes_requests_wait_and_a_slot_goes_to_the_longest_waiter():
    pool = _pool(2)
    assert pool.try_acquire("b") and pool.try_acquire("b")
    assert not pool.try_acquire("b")  # counted, must wait
    first = asyncio.create_task(pool.wait_for_slot("b", 30))
    assert not pool.try_acquire("b")
    second = asyncio.create_task(pool.wait_for_slot("b", 30))
    await asyncio.sleep(0)  # both are queued now
    assert pool.outstanding["b"] == 4
    pool.release("b")
    await first
    assert not second.done()
    assert pool.slots_in_use("b") == 2  # handed over, not freed and taken again
    pool.release("b")
    await second
    for _ in range(2):
        pool.release("b")
    assert pool.slots_in_use("b") == 0 and pool.outstanding["b"] == 0
    # Another backend has its own bound.
    assert pool.try_acquire("other")


async def test_a_reload_raising_pool_size_lets_waiters_in_and_new_limits_apply():
    pool = _pool(1)
    assert pool.try_acquire("b")
    assert not pool.try_acquire("b")
    waiter = asyncio.create_task(pool.wait_for_slot("b", 30))
    await asyncio.sleep(0)
    assert pool.pool_waits["b"] == 1 and not waiter.done()
    settings = EdgeUpstream(max_idle=1, max_requests=7, read_timeout=3.0)
    pool.reconfigure(2, EdgeTimeouts(connect=0.5), settings, "<memory>")
    await waiter  # let in by the raised limit, not by a release
    assert pool.slots_in_use("b") == 2
    limits = pool.client.limits
    assert (limits.connect, limits.max_idle, limits.max_requests, limits.read_idle) == (
        0.5,
        1,
        7,
        3.0,
    )
    pool.release("b")
    pool.release("b")
    assert pool.slots_in_use("b") == 0


async def test_no_slot_in_time_is_a_pool_failure_that_blames_nobody():
    pool = _pool(1)
    assert pool.try_acquire("b")
    assert not pool.try_acquire("b")
    with pytest.raises(UpstreamFailure) as caught:
        await pool.wait_for_slot("b", 0)
    assert caught.value.kind is FailureKind.POOL
    assert not caught.value.kind.blames_backend
    assert caught.value.kind.status == 503
    assert pool.outstanding["b"] == 1  # the one that gave up is no longer counted
    pool.release("b")
    assert pool.try_acquire("b")  # the timed-out waiter left nothing behind


async def test_a_waiter_cancelled_after_its_slot_was_granted_passes_it_on():
    pool = _pool(1)
    assert pool.try_acquire("b")
    assert not pool.try_acquire("b")
    granted = asyncio.create_task(pool.wait_for_slot("b", 30))
    assert not pool.try_acquire("b")
    next_in_line = asyncio.create_task(pool.wait_for_slot("b", 30))
    await asyncio.sleep(0)
    pool.release("b")  # the slot goes to ``granted``...
    granted.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await granted
    await next_in_line  # the slot was passed on, not lost
    assert pool.slots_in_use("b") == 1 and pool.outstanding["b"] == 1


async def test_streamed_bodies_hold_at_most_half_of_a_backends_slots():
    pool = _pool(4)
    for _ in range(2):
        assert not pool.try_acquire("b", streamed=True)
        await pool.wait_for_slot("b", 0, streamed=True)
    assert not pool.try_acquire("b", streamed=True)
    with pytest.raises(UpstreamFailure) as caught:
        await pool.wait_for_slot("b", 0, streamed=True)
    assert caught.value.kind is FailureKind.POOL
    # Everything else still gets the other half.
    assert pool.try_acquire("b") and pool.try_acquire("b")
    pool.release("b", streamed=True)
    assert pool.try_acquire("b")  # all four slots busy again, one streamed
    assert not pool.try_acquire("b", streamed=True)
    with pytest.raises(UpstreamFailure):  # a place in the share, but no slot
        await pool.wait_for_slot("b", 0, streamed=True)
    pool.release("b")
    assert not pool.try_acquire("b", streamed=True)
    await pool.wait_for_slot("b", 0, streamed=True)
    assert pool.slots_in_use("b") == 4 and pool.outstanding["b"] == 4


async def test_gate_wait_reports_a_timeout_as_false():
    gate = Gate(1)
    assert gate.try_take()
    assert await gate.wait(0) is False
    assert gate.waiters == type(gate.waiters)()  # the timed-out waiter is gone
    gate.give_back()
    assert gate.busy == 0


# -- which failures blame a backend -----------------------------------------------------------


def test_only_the_backends_own_failures_are_evidence_against_it():
    blamed = {kind for kind in FailureKind if kind.blames_backend}
    assert blamed == {
        FailureKind.CONNECT,
        FailureKind.RESET,
        FailureKind.TIMEOUT,
        FailureKind.PROTOCOL,
    }
    assert FailureKind.LOCAL.status == 503 and FailureKind.TIMEOUT.status == 504


def test_a_request_that_never_got_a_connection_may_move_on_whatever_its_method():
    methods = frozenset({"GET", "HEAD"})
    assert retry_allowed("POST", methods, True, FailureKind.POOL)
    # No connection was had (connect refused, timed out, the edge out of descriptors): the
    # client sends nothing before it has one, so the body never left.
    assert retry_allowed("POST", methods, True, FailureKind.CONNECT)
    assert retry_allowed("POST", methods, False, FailureKind.LOCAL)
    # Anything that may have reached the backend keeps the old rules: POST never replayed.
    assert not retry_allowed("POST", methods, False, FailureKind.RESET)
    assert not retry_allowed("POST", methods, False, FailureKind.TIMEOUT)
    assert not retry_allowed("POST", methods, False, FailureKind.PROTOCOL)
    assert not retry_allowed("POST", methods, False, FailureKind.ABANDONED)
    assert retry_allowed("GET", methods, False, FailureKind.ABANDONED)
    assert not retry_allowed("GET", methods, True, FailureKind.TIMEOUT)


def test_local_resource_errors_are_told_apart_from_the_peers():
    key = ConnectionKey("127.0.0.1", 1, False, True, None, None, None)
    for code in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.EADDRNOTAVAIL):
        assert is_local_error(OSError(code, os.strerror(code)))
        wrapped = aiohttp.ClientConnectorError(key, OSError(code, os.strerror(code)))
        assert is_local_error(wrapped)
    refused = aiohttp.ClientConnectorError(key, ConnectionRefusedError(errno.ECONNREFUSED, "no"))
    assert not is_local_error(refused)
    assert not is_local_error(TimeoutError())
    chained = RuntimeError("while connecting")
    chained.__cause__ = OSError(errno.EMFILE, "Too many open files")
    assert is_local_error(chained)
    assert not is_local_error(None)


# -- request body buffering -------------------------------------------------------------------


class _Body:
    """A request body as the connection streams it: chunks, then an end or an error."""

    def __init__(self, chunks: list[bytes], error: RequestRejected | None = None) -> None:
        self.chunks = chunks
        self.read = 0
        self._error = error

    @property
    def error(self) -> RequestRejected | None:
        return self._error

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.read += 1
            yield chunk
        if self._error is not None:
            raise self._error


async def _collect(stream: Any) -> bytes:
    return b"".join([chunk async for chunk in stream])


async def test_a_small_body_is_read_whole_before_any_connection_is_taken():
    body = _Body([b"a" * 100, b"b" * 100, b"c"])
    got = await buffer_request_body(body, BodyFraming(BodyKind.CHUNKED), REQUEST_BUFFER_LIMIT)
    assert got == b"a" * 100 + b"b" * 100 + b"c"


async def test_a_body_over_the_limit_is_streamed_from_what_was_read_on():
    chunks = [bytes([65 + i]) * 1000 for i in range(10)]
    body = _Body(chunks)
    got = await buffer_request_body(body, BodyFraming(BodyKind.CHUNKED), 2500)
    assert not isinstance(got, bytes)
    assert body.read == 3  # read only until the limit was passed
    assert await _collect(got) == b"".join(chunks)


async def test_a_declared_large_body_is_streamed_from_its_first_byte():
    body = _Body([b"x" * 10])
    got = await buffer_request_body(body, BodyFraming(BodyKind.LENGTH, 5000), 1000)
    assert not isinstance(got, bytes) and body.read == 0
    assert await _collect(got) == b"x" * 10


async def test_a_client_failing_while_its_body_is_buffered_is_the_clients_error():
    timeout = RequestRejected(408, "client_body_timeout")
    body = _Body([b"x"], timeout)
    with pytest.raises(RequestRejected) as caught:
        await buffer_request_body(body, BodyFraming(BodyKind.LENGTH, 100), 1000)
    assert caught.value is timeout


# -- descriptor budget, throttled logging, exhaustion probe -----------------------------------


def test_the_descriptor_budget_keeps_a_reserve_for_the_edges_own_connections():
    big = FdBudget.of_limit(20_000)
    assert (big.reserve, big.max_connections) == (1024, 18_976)
    assert FdBudget.of_limit(1024).max_connections == 1024 - 102
    small = FdBudget.of_limit(128)
    assert small.max_connections == 64
    assert small.admits(63) and not small.admits(64)
    assert FdBudget.of_limit(40).max_connections == 20  # half at least for clients
    unbounded = FdBudget.of_limit(0)
    assert unbounded.max_connections == 0 and unbounded.admits(10**9)


def test_throttle_reports_once_per_interval_with_the_count_held_back():
    throttle = Throttle(10.0)
    assert throttle.note(0.0) == 1
    assert [throttle.note(t) for t in (1.0, 2.0, 9.9)] == [0, 0, 0]
    assert throttle.note(10.0) == 4  # the three held back and this one
    assert throttle.note(10.5) == 0
    assert throttle.note(25.0) == 2


@contextlib.contextmanager
def _descriptors_exhausted(spare: int = 0) -> Iterator[list[int]]:
    """Lower this process's soft descriptor limit and fill it (leaving ``spare`` free);
    restored, every descriptor closed, on the way out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 64, hard))
    try:
        while True:
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        for _ in range(spare):
            os.close(held.pop())
        yield held
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_probe_sees_a_process_out_of_descriptors():
    probe = os.open(os.devnull, os.O_RDONLY)
    try:
        assert not fd_exhausted(probe)
        with _descriptors_exhausted():
            assert fd_exhausted(probe)
        assert not fd_exhausted(probe)
    finally:
        os.close(probe)


# -- health checks that fail for a local reason -----------------------------------------------


async def test_a_check_failing_for_want_of_descriptors_is_local_and_changes_no_state():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    config = make_config({"r": [url]}, health={"kind": "tcp", "fall": 1})
    now = [100.0]
    registry = CollectorRegistry()
    registry_monitor = HealthMonitor(config, registry=registry, clock=lambda: now[0])
    prober = Prober()
    await prober.start()
    info = TargetInfo(url, "backend", url, ("r",))
    try:
        with captured_logs() as events:
            with _descriptors_exhausted():
                outcome = await prober.check(info, config.health)
            assert outcome == CheckOutcome(False, outcome.reason, outcome.seconds, local=True)
            assert "Too many open files" in outcome.reason
            before = registry_monitor.snapshot
            registry_monitor._on_check(url, outcome)
            now[0] += 1.0
            registry_monitor._on_check(url, outcome)  # logged once per interval
            assert registry_monitor.snapshot is before  # nothing published: state kept
            assert registry_monitor.status()["targets"][url]["state"] == "unknown"
            assert registry_monitor.status()["targets"][url]["consecutive_failures"] == 0
            lines = [e for e in events() if e["event"] == "health_check_local_error"]
            assert len(lines) == 1 and lines[0]["target"] == url
            now[0] += LOCAL_ERROR_LOG_INTERVAL
            registry_monitor._on_check(url, outcome)
            lines = [e for e in events() if e["event"] == "health_check_local_error"]
            assert [line["count"] for line in lines] == [1, 2]
        assert sample(registry, "meridian_health_check_local_errors_total", {"target": url}) == 3
        # With descriptors back, the same check passes and the target comes up.
        outcome = await prober.check(info, config.health)
        assert outcome.ok and not outcome.local
        registry_monitor._on_check(url, outcome)
        assert registry_monitor.status()["targets"][url]["state"] == "up"
    finally:
        await prober.close()
        server.close()
        await server.wait_closed()


async def test_a_real_failure_still_counts_against_the_target():
    config = make_config({"r": ["http://127.0.0.1:1"]}, health={"kind": "tcp", "fall": 1})
    registry = CollectorRegistry()
    monitor = HealthMonitor(config, registry=registry)
    prober = Prober()
    await prober.start()
    try:
        info = TargetInfo("http://127.0.0.1:1", "backend", "http://127.0.0.1:1", ("r",))
        outcome = await prober.check(info, config.health)
        assert not outcome.ok and not outcome.local
        monitor._on_check(info.name, outcome)
        assert monitor.status()["targets"][info.name]["state"] == "down"
        assert sample(registry, "meridian_health_check_local_errors_total") is None
    finally:
        await prober.close()
