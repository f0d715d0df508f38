"""The walk's and client's per-request shortcuts give the answers of the code they skip.

``UpstreamPool.send`` encodes each target under its backend's path (no memo of targets);
``OriginClient.send`` writes a head whose lines lead with Host in one join (``encode_head``
otherwise) and takes the response head without ``Connection.head_in`` when one came;
``HealthMonitor.report`` reads no clock for a success with nothing to reset.  In memory:
fake transports, no sockets, no sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from edge.upstream import UpstreamPool
from edge.upstream_client import Connection
from edge.upstream_wire import encode_head
from meridian.config import EdgeTimeouts
from meridian.health import HealthMonitor
from tests.health_support import make_config as health_config
from tests.test_walk_fast_path import MemoryBackend

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
#: A head whose body has not all come: the read deadline is armed.
PARTIAL = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhi"


def _pool(url: str, replies: list[bytes | None]) -> tuple[UpstreamPool, MemoryBackend]:
    upstream = UpstreamPool(pool_size=4, timeouts=EdgeTimeouts())
    client = upstream.client
    real = client.pool(url)
    pool = MemoryBackend(real.backend, real.limits, real.loop, client.stats)
    pool.reply = lambda: replies.pop(0)
    pool.made = []
    client._pools[url] = pool
    return upstream, pool


def _run(test: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner() as runner:
        runner.run(test)


LATIN1 = st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF), max_size=12)


@settings(max_examples=60, deadline=None)
@given(url=st.sampled_from(["http://o", "http://o/base", "http://o:81/a/b/"]), path=LATIN1)
def test_a_target_goes_under_its_backends_path(url: str, path: str) -> None:
    async def go() -> None:
        upstream, pool = _pool(url, [OK, OK])
        for _ in range(2):  # a new connection, then the kept-alive one
            (await upstream.send(url, "GET", "/" + path, b"host: h\r\n", None)).release()
        expected = pool.backend.prefix + ("/" + path).encode("latin-1")
        for request in pool.made[0].requests:
            assert request.startswith(b"GET " + expected + b" HTTP/1.1\r\n")

    _run(go())


LINE = st.tuples(
    st.sampled_from([b"host", b"x-host", b"via", b"accept", b"hostx"]),
    st.binary(max_size=8).filter(lambda v: b"\r" not in v and b"\n" not in v),
)


@settings(max_examples=150, deadline=None)
@given(
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PURGE"]),
    target=st.binary(min_size=1, max_size=10),
    lines=st.lists(LINE, max_size=4),
    body=st.none() | st.binary(max_size=10),
)
def test_the_written_head_is_encode_heads(
    method: str, target: bytes, lines: list[tuple[bytes, bytes]], body: bytes | None
) -> None:
    headers = b"".join(b"%s: %s\r\n" % line for line in lines)

    async def go() -> None:
        reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" if method == "HEAD" else OK
        upstream, pool = _pool("http://o:8080", [reply, reply])
        for _ in range(2):  # through ``Connection.exchange``, then inline
            client = upstream.client
            response = await client.send("http://o:8080", method, target, headers, body)
            response.release()
        if body is None:
            framing = b"content-length: 0\r\n" if method in ("POST", "PUT") else b""
        else:
            framing = b"content-length: %d\r\n" % len(body)
        head = encode_head(method.encode(), target, headers, b"o:8080", framing)
        assert len(pool.made) == 1  # the second went inline, on the kept-alive connection
        assert pool.made[0].requests == [head + (body or b"")] * 2

    _run(go())


def _deadline(connection: Connection) -> tuple[str, bool]:
    return connection.deadline_kind, connection.due > 0


@settings(max_examples=20, deadline=None)
@given(replies=st.lists(st.sampled_from([OK, PARTIAL]), min_size=1, max_size=4))
def test_an_inline_head_arms_the_deadline_head_in_arms(replies: list[bytes]) -> None:
    async def go() -> None:
        for reply in replies:
            # The same answer through ``Connection.exchange`` (head_in) and inline.
            upstream, pool = _pool("http://o", [OK, reply, reply])
            (await upstream.send("http://o", "GET", "/", b"", None)).release()
            inline = await upstream.send("http://o", "GET", "/", b"", None)
            (connection,) = pool.open
            seen = _deadline(connection)
            assert not connection.closed
            connection.reader = None  # as ``finish`` leaves it, without pooling it again
            pool.idle.clear()
            pool.open.clear()
            reference = await upstream.send("http://o", "GET", "/", b"", None)
            assert len(pool.made) == 2
            assert seen == _deadline(pool.made[1].protocol)
            assert seen == (("read", True) if reply is PARTIAL else ("first byte", False))
            del inline, reference

    _run(go())


class _ClockFirst(HealthMonitor):
    """``report`` as it was: the clock read before the book is asked."""

    def report(self, backend_url: str, ok: bool) -> None:
        transitions = self._book.traffic(backend_url, ok, self._clock())
        if transitions:
            self._publish(transitions, source="traffic")


BACKEND_URLS = ("http://a", "http://b", "http://c")


@settings(max_examples=60, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from([*BACKEND_URLS, "http://unknown"]),
            st.booleans(),
            st.floats(0.0, 40.0),
        ),
        max_size=30,
    ),
    failures=st.integers(1, 3),
)
def test_a_success_report_skips_the_clock_and_changes_nothing_else(
    events: list[tuple[str, bool, float]], failures: int
) -> None:
    config = health_config({"r": list(BACKEND_URLS)}, outlier={"consecutive_failures": failures})

    async def go() -> None:
        now = [100.0]
        monitors = [
            kind(config, registry=CollectorRegistry(), clock=lambda: now[0])
            for kind in (HealthMonitor, _ClockFirst)
        ]
        for backend, ok, later in events:
            now[0] += later
            for monitor in monitors:
                monitor.report(backend, ok)
            fast, reference = monitors
            assert fast.snapshot == reference.snapshot
            assert fast._book.health == reference._book.health
        for monitor in monitors:
            await monitor.stop()

    _run(go())
