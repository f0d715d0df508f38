"""The fill stage's second trim: ``FillFetch`` makes its ``UpstreamCall`` and a stored
``UpstreamResponse`` by ``tuple.__new__`` (no NamedTuple ``__new__`` call), and a ``Handover``
is made only when a response is handed over (``FillFetch.live`` says whether the request still
takes one).  Each is what the named constructors and the eager hand-over made: the same call
walked, the same response stored, the same streaming and releases.

In memory (``tests.stage_support``): a scripted upstream, fake clocks, no sockets."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.cache import UpstreamResponse
from edge.exchange import ExchangeRecord
from edge.stages.fill import Filler
from edge.stages.fill_read import FillFetch
from edge.stages.walk import UpstreamCall
from edge.upstream import upstream_headers
from tests.stage_support import Reply, World, request, world

JSON = (b"Content-Type", b"application/json")
PNG = (b"Content-Type", b"image/png")
STORED = (b"Cache-Control", b"max-age=60")
PRIVATE = (b"Cache-Control", b"private")


def _spy(w: World, monkeypatch: pytest.MonkeyPatch) -> tuple[list[Any], list[Any], list[Any]]:
    """Record the calls walked, the responses the fetches read and the fetches built."""
    calls: list[UpstreamCall] = []
    read: list[UpstreamResponse] = []
    fetches: list[FillFetch] = []
    walker = w.pipeline.walker
    walk = walker.walk

    async def walk_spy(*args: Any) -> Any:
        calls.append(args[-1])
        return await walk(*args)

    walker.walk = walk_spy  # type: ignore[method-assign]
    call = FillFetch.__call__

    async def read_spy(self: FillFetch, *args: Any) -> UpstreamResponse:
        response = await call(self, *args)
        read.append(response)
        return response

    monkeypatch.setattr(FillFetch, "__call__", read_spy)
    fetch_for = Filler.fetch_for

    def fetch_for_spy(self: Filler, *args: Any) -> FillFetch:
        fetch = fetch_for(self, *args)
        fetches.append(fetch)
        return fetch

    monkeypatch.setattr(Filler, "fetch_for", fetch_for_spy)
    return calls, read, fetches


@settings(max_examples=60, deadline=None)
@given(
    png=st.booleans(),
    size=st.sampled_from([0, 10, 255, 256, 2000]),
    whole=st.booleans(),
    query=st.sampled_from(["", "?a=1", "?b=%20x&a=2"]),
)
async def test_a_stored_fill_walks_and_reads_what_the_named_constructors_make(
    png: bool, size: int, whole: bool, query: str
) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        body = b"x" * size
        headers = [PNG if png else JSON, STORED]
        w = world({"http://u1": [Reply(headers=headers, chunks=(body,), whole=whole)]})
        calls, read, fetches = _spy(w, monkeypatch)
        sink = await w.run(request("/api/ticker" + query))
    assert sink.status == 200 and bytes(sink.body) == body
    assert sink.header(b"x-cache") == b"MISS"
    (call,) = calls
    (fetch,) = fetches
    lookup_key = fetch.lookup.key
    assert lookup_key is not None
    assert type(call) is UpstreamCall
    assert call == UpstreamCall(
        method="GET",
        target=lookup_key.target.decode("latin-1"),
        headers=fetch.forwarded,
        request_id="rid-1",
    )
    assert (call.body, call.payload, call.length) == (None, None, None)
    (response,) = read
    assert type(response) is UpstreamResponse
    assert response == UpstreamResponse(
        status=200,
        headers=response.headers,
        body=body,
        reason=b"OK",
        compressible=not png and size >= 256,
        complete=True,
    )
    assert fetch.handover is None  # stored: nothing handed over, nothing made for it
    assert all(r.released for r in w.upstream.responses)
    assert w.upstream.outstanding == {"http://u1": 0}


async def test_a_second_fetch_walks_its_validators_in_the_call() -> None:
    w = world({"http://u1": [Reply(headers=[JSON, STORED])]})
    lookup, fetch = _fetch_for(w, live=True)
    assert lookup.key is not None
    sent: list[UpstreamCall] = []
    walk = w.pipeline.walker.walk

    async def walk_spy(*args: Any) -> Any:
        sent.append(args[-1])
        return await walk(*args)

    w.pipeline.walker.walk = walk_spy  # type: ignore[method-assign]
    validators = [(b"if-none-match", b'"v1"')]
    await fetch(validators)
    assert sent == [
        UpstreamCall(
            "GET",
            lookup.key.target.decode("latin-1"),
            fetch.forwarded + upstream_headers(validators),
            request_id="rid-1",
        )
    ]


def _fetch_for(w: World, *, live: bool) -> tuple[Any, FillFetch]:
    req = request()
    pipeline = w.pipeline
    assert pipeline.fast_response(req) is None
    lookup = pipeline.take_pending(req)
    assert lookup is not None
    state = pipeline.state
    target = state.route(req.host, req.path)
    assert target is not None
    return lookup, pipeline.filler.fetch_for(req, state, target, lookup, ExchangeRecord(), live)


@pytest.mark.parametrize("whole", [True, False])
async def test_a_response_not_stored_is_handed_over_and_streamed_then_released(
    whole: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world({"http://u1": [Reply(headers=[JSON, PRIVATE], chunks=(b"a", b"b"), whole=whole)]})
    _, _, fetches = _spy(w, monkeypatch)
    sink = await w.run(request())
    assert sink.status == 200 and bytes(sink.body) == b"ab" and sink.ended
    assert sink.header(b"x-cache") == b"MISS"
    (fetch,) = fetches
    handover = fetch.handover
    assert handover is not None and not fetch.live
    # Closed by the fill: nothing left to release twice.
    assert (handover.marker, handover.response, handover.attempt, handover.data) == (
        None,
        None,
        None,
        None,
    )
    assert all(r.released for r in w.upstream.responses)
    assert w.upstream.outstanding == {"http://u1": 0}


@pytest.mark.parametrize("live", [True, False])
@pytest.mark.parametrize("whole", [True, False])
async def test_a_fetch_no_longer_live_hands_nothing_over_and_releases(
    live: bool, whole: bool
) -> None:
    """A refresh's fetch (``live`` False), or a request's after its fill ended (the old
    ``Handover.abandoned``): the unstored response is released, not handed over."""
    w = world({"http://u1": [Reply(headers=[JSON, PRIVATE], chunks=(b"a", b"b"), whole=whole)]})
    _, fetch = _fetch_for(w, live=live)
    fetch.live = False  # what ``Filler.fill`` does as it ends
    response = await fetch([])
    assert response.complete is False and response.body == b""
    assert fetch.handover is None
    assert all(r.released for r in w.upstream.responses)
    assert w.upstream.outstanding == {"http://u1": 0}
