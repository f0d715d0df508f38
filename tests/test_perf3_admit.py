"""The miss path's shortcuts from the origin's head to the stored entry read every response as
the path they replace: ``HeadShapes.read`` (a made shape found again by its exact names and
stable lines) finds the shape and headers that ``shape_key``, ``find``, ``make`` and
``HeadShape.headers`` (or ``rewrite_response_headers``) give; ``Admission.admit``'s inlined
shaped freshness is ``compute_freshness``'s."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.cache.admission import Admission
from edge.cache.key import negotiate_coding
from edge.cache.messages import UpstreamResponse
from edge.cache.policy import compute_freshness, response_meta
from edge.http1 import rewrite_response_headers
from edge.stages.fill_read import HeadShapes, shape_key
from meridian.config import CacheRule
from tests.test_fill_shapes import (
    COOKIE_REQUEST,
    NOW,
    REQUEST,
    RULES,
    STATE,
    cache_key,
    heads,
    response_of,
)


def respelled(raw: list[tuple[bytes, bytes]], swaps: list[bool]) -> list[tuple[bytes, bytes]]:
    """``raw`` with some names in another case (another spelling of the same head)."""
    return [
        (name.swapcase() if swap else name, value)
        for (name, value), swap in zip(raw, swaps + [False] * len(raw), strict=False)
    ]


@settings(max_examples=300, deadline=None)
@given(
    head=heads(),
    status=st.sampled_from([200, 203, 206, 301, 404, 500]),
    statuses=st.lists(st.sampled_from([200, 404]), min_size=6, max_size=6),
    rule=RULES,
    other_rule=RULES,
    region=st.sampled_from(["us-east", "eu-central"]),
    routes=st.lists(st.sampled_from(["api", "static"]), min_size=6, max_size=6),
    picks=st.lists(st.integers(0, 1), min_size=6, max_size=6),
    swaps=st.lists(st.booleans(), max_size=12),
    respell=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_read_finds_what_the_shape_key_path_finds(
    head: tuple[list[bool], list[tuple[bytes, bytes]], list[list[bytes]]],
    status: int,
    statuses: list[int],
    rule: CacheRule,
    other_rule: CacheRule,
    region: str,
    routes: list[str],
    picks: list[int],
    swaps: list[bool],
    respell: list[bool],
) -> None:
    volatile, lines, values = head
    admission = Admission((), compressor=None, extra_head=b"", negotiate=negotiate_coding)
    fast, reference = HeadShapes(), HeadShapes()
    for sight in range(6):
        raw = response_of(volatile, lines, values[picks[sight]])
        if respell[sight]:
            raw = respelled(raw, swaps)
        route = routes[sight]
        now_status = status if sight % 2 else statuses[sight]
        now_rule = rule if sight < 4 else other_rule
        shape, headers = fast.read(raw, now_status, STATE, region, route, admission, now_rule)
        key, found = shape_key(raw, now_status, region, route, now_rule)
        assert key is not None
        expected, seen = reference.find(STATE, admission, key)
        if expected is None and seen:
            expected = reference.make(
                key, raw, now_status, STATE, region, route, admission, now_rule
            )
        plain = rewrite_response_headers(
            raw, dropped=STATE.dropped_response_headers, via=STATE.via, region=region
        )
        assert headers == plain
        assert (shape is None) == (expected is None)
        if shape is None or expected is None:
            continue
        assert headers == expected.headers(found)
        # The same shape: made for the same key, so the same readings.
        assert shape.template == expected.template and shape.fills == expected.fills
        assert (shape.coding, shape.compressible) == (expected.coding, expected.compressible)
        assert shape.stored is not None and expected.stored is not None
        assert shape.stored.rule is now_rule and shape.stored.template == expected.stored.template


def test_a_known_head_is_found_by_its_names_and_stable_lines_only() -> None:
    rule = CacheRule("/")
    admission = Admission((), compressor=None, extra_head=b"", negotiate=negotiate_coding)
    shapes = HeadShapes()
    raw = [(b"Content-Type", b"application/json"), (b"Date", b"Mon, 07 Dec 2026 03:52:41 GMT")]
    for _ in range(2):  # made on the second sight, and known from then on
        shapes.read(raw, 200, STATE, "us-east", "api", admission, rule)
    assert len(shapes.known) == 1 and len(shapes.plans) == 1
    made = next(iter(shapes.known.values()))[0]
    later = [raw[0], (b"Date", b"Tue, 08 Dec 2026 03:52:41 GMT")]
    shape, headers = shapes.read(later, 200, STATE, "us-east", "api", admission, rule)
    assert shape is made
    assert (b"date", b"Tue, 08 Dec 2026 03:52:41 GMT") in headers
    # Another stable value, status, route or rule: not that shape.
    for other in (
        ([(b"Content-Type", b"text/html"), later[1]], 200, "api", rule),
        (later, 404, "api", rule),
        (later, 200, "static", rule),
        (later, 200, "api", CacheRule("/", ttl=1.0)),
    ):
        assert (
            shapes.read(other[0], other[1], STATE, "us-east", other[2], admission, other[3])[0]
            is not made
        )
    # Another cache forgets them all.
    other_admission = Admission((), compressor=None, extra_head=b"", negotiate=negotiate_coding)
    assert shapes.read(later, 200, STATE, "us-east", "api", other_admission, rule)[0] is None
    assert not shapes.known and not shapes.plans


def test_known_shapes_and_plans_stay_bounded() -> None:
    rule = CacheRule("/")
    admission = Admission((), compressor=None, extra_head=b"", negotiate=negotiate_coding)
    shapes = HeadShapes()
    bound = shapes.known.bound
    for i in range(bound + 10):
        raw = [(b"X-N-%d" % i, b"%d" % i), (b"Date", b"Mon, 07 Dec 2026 03:52:41 GMT")]
        for _ in range(3):
            shapes.read(raw, 200, STATE, "us-east", "api", admission, rule)
    assert 0 < len(shapes.known) <= bound and 0 < len(shapes.plans) <= shapes.plans.bound


@settings(max_examples=200, deadline=None)
@given(
    head=heads(),
    status=st.sampled_from([200, 203, 301, 404]),
    rule=RULES,
    request=st.sampled_from([REQUEST, COOKIE_REQUEST]),
    delay=st.sampled_from([0.0, 0.01, 3.0]),
)
def test_admit_of_a_shape_stores_compute_freshness(
    head: tuple[list[bool], list[tuple[bytes, bytes]], list[list[bytes]]],
    status: int,
    rule: CacheRule,
    request: Any,
    delay: float,
) -> None:
    volatile, lines, values = head
    admission = Admission((), compressor=None, extra_head=b"", negotiate=negotiate_coding)
    shapes = HeadShapes()
    key = cache_key(rule)
    for sight in range(3):
        raw = response_of(volatile, lines, values[sight % 2])
        shape, headers = shapes.read(raw, status, STATE, "us-east", "api", admission, rule)
        if shape is None:
            continue
        admission.storable_head(key, request, status, headers, NOW, shape.stored)
        response = UpstreamResponse(status, headers, b"{}" * 10, b"OK", False)
        entry, _ = admission.admit(key, request, response, NOW - delay, NOW)
        if entry is None:
            continue
        meta = response_meta(headers, ())
        assert entry.response.freshness == compute_freshness(status, meta, rule, NOW - delay, NOW)
        # The entry ``Admission.entry`` makes of the same stored response (measured anew).
        made = admission.entry(key, entry.key, entry.response)
        assert (entry.key, entry.primary, entry.url, entry.size, entry.etag) == (
            made.key,
            made.primary,
            made.url,
            made.size,
            made.etag,
        )
        assert entry.last_modified_raw == made.last_modified_raw and entry.primary == key.primary
