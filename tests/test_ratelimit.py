"""The rate limit core (``edge.ratelimit``): GCRA's guarantees, keys, the bounded table."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.ratelimit import (
    EPSILON,
    Gcra,
    LimitRule,
    RateLimits,
    client_address,
    network_key,
    parse_address,
)
from meridian.config import EdgeRateLimit

rates = st.sampled_from([0.5, 1.0, 3.0, 10.0, 100.0, 1000.0, 1 / 3, 7.7])
bursts = st.integers(min_value=1, max_value=50)
#: Gaps between requests: many at the same instant, some long pauses.
gaps = st.lists(
    st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=3.0, allow_nan=False)),
    min_size=1,
    max_size=300,
)


def admitted_times(gcra: Gcra, gaps: list[float]) -> list[float]:
    now, times = 1000.0, []
    for gap in gaps:
        now += gap
        if gcra.check("k", now) == 0.0:
            times.append(now)
    return times


@settings(max_examples=300, deadline=None)
@given(rate=rates, burst=bursts, gaps=gaps)
def test_never_more_than_burst_plus_rate_times_window(
    rate: float, burst: int, gaps: list[float]
) -> None:
    times = admitted_times(Gcra(rate, burst, 10), gaps)
    # Every window [times[i], times[j]] holds j - i + 1 admissions.
    for i in range(len(times)):
        for j in range(i, len(times)):
            window = times[j] - times[i]
            assert j - i + 1 <= burst + rate * window + 1e-6, (i, j, window)


@settings(max_examples=300, deadline=None)
@given(rate=rates, burst=bursts, gaps=gaps)
def test_idle_for_a_burst_span_gets_the_whole_burst_back(
    rate: float, burst: int, gaps: list[float]
) -> None:
    gcra = Gcra(rate, burst, 10)
    times = admitted_times(gcra, gaps)
    now = (times[-1] if times else 1000.0) + sum(gaps) + burst / rate + 1e-6
    assert gcra.remaining(gcra.bucket("k", now), now) == burst
    assert [gcra.check("k", now) for _ in range(burst)] == [0.0] * burst
    assert gcra.check("k", now) > 0.0


@settings(max_examples=200, deadline=None)
@given(rate=rates, burst=bursts, gaps=gaps)
def test_refused_requests_cost_nothing_and_retry_after_is_exact(
    rate: float, burst: int, gaps: list[float]
) -> None:
    gcra = Gcra(rate, burst, 10)
    now = 1000.0
    for gap in gaps:
        now += gap
        before = gcra.bucket("k", now).tat
        wait = gcra.check("k", now)
        if wait > 0.0:
            assert gcra.bucket("k", now).tat == before  # a refusal changes nothing
            assert gcra.check("k", now + wait - 1e-4) > 0.0  # not admitted before the wait...
            assert gcra.check("k", now + wait + EPSILON) == 0.0  # ...and admitted right after
            return


def test_burst_then_rate() -> None:
    gcra = Gcra(10.0, 20, 10)
    assert [gcra.check("a", 0.0) for _ in range(20)] == [0.0] * 20
    assert gcra.check("a", 0.0) == pytest.approx(0.1)
    assert gcra.check("b", 0.0) == 0.0  # another key is untouched
    assert gcra.check("a", 0.1) == 0.0
    assert gcra.check("a", 0.1) > 0.0
    # A sustained 10/s gets everything through.
    assert all(gcra.check("a", 0.1 + i * 0.1) == 0.0 for i in range(1, 100))


def test_remaining_counts_down() -> None:
    gcra = Gcra(1.0, 3, 10)
    bucket = gcra.bucket("a", 0.0)
    assert gcra.remaining(bucket, 0.0) == 3
    gcra.take(bucket, 0.0)
    assert gcra.remaining(bucket, 0.0) == 2
    gcra.take(bucket, 0.0)
    gcra.take(bucket, 0.0)
    assert gcra.remaining(bucket, 0.0) == 0
    assert gcra.remaining(bucket, 1.0) == 1


def test_table_forgets_idle_keys_first_and_stays_bounded() -> None:
    gcra = Gcra(1.0, 2, 16)
    gcra.check("busy", 100.0)  # its TAT is ahead of now for a second
    for i in range(15):
        gcra.check(i, 0.0)  # idle again by t=100
    gcra.check("new", 100.0)  # full: the idle ones go, the busy one stays
    assert "busy" in gcra.buckets and "new" in gcra.buckets
    assert gcra.forgotten_busy == 0
    # A flood of busy keys: bounded, and forgetting busy keys is counted.
    for i in range(1000):
        gcra.check(("flood", i), 100.0)
        assert len(gcra.buckets) <= 16
    assert gcra.forgotten_busy > 0


def test_gcra_refuses_nonsense() -> None:
    for rate, burst, keys in ((0.0, 1, 1), (1.0, 0, 1), (1.0, 1, 0), (float("nan"), 1, 1)):
        with pytest.raises(ValueError):
            Gcra(rate, burst, keys)


# -- keys -----------------------------------------------------------------------------------------

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("192.0.2.1", [b"203.0.113.9"], "192.0.2.1"),  # untrusted peer: XFF ignored
        ("10.0.0.1", [], "10.0.0.1"),  # a trusted proxy without XFF is the client
        ("10.0.0.1", [b"203.0.113.9"], "203.0.113.9"),
        ("10.0.0.1", [b"198.51.100.1, 203.0.113.9"], "203.0.113.9"),  # the rightmost
        ("10.0.0.1", [b"203.0.113.9, 10.1.1.1"], "203.0.113.9"),  # past trusted hops
        ("10.0.0.1", [b"203.0.113.9", b"10.1.1.1"], "203.0.113.9"),  # over several lines
        ("10.0.0.1", [b"10.2.2.2, 10.1.1.1"], "10.2.2.2"),  # all trusted: the leftmost
        ("10.0.0.1", [b"garbage, 10.1.1.1"], "10.1.1.1"),  # not an address: stop there
        ("10.0.0.1", [b"203.0.113.9, garbage"], "10.0.0.1"),
        ("10.0.0.1", [b"\xff\xfe"], "10.0.0.1"),
        ("::ffff:192.0.2.1", [], "192.0.2.1"),  # IPv4-mapped is IPv4
        ("fd00::1", [b"2001:db8::1"], "2001:db8::1"),
        ("/run/edge.sock", [], None),
    ],
)
def test_client_address_after_trusted_proxies(
    peer: str, xff: list[bytes], expected: str | None
) -> None:
    found = client_address(peer, xff, TRUSTED)
    assert (str(found) if found is not None else None) == expected


def test_network_keys() -> None:
    a = parse_address("192.0.2.1")
    b = parse_address("192.0.2.200")
    v6 = parse_address("2001:db8::1")
    v6b = parse_address("2001:db8::ffff:1")
    assert a is not None and b is not None and v6 is not None and v6b is not None
    assert network_key(a, 32, 64) != network_key(b, 32, 64)
    assert network_key(a, 24, 64) == network_key(b, 24, 64)
    assert network_key(v6, 32, 64) == network_key(v6b, 32, 64)  # one /64
    assert network_key(v6, 32, 128) != network_key(v6b, 32, 128)
    # /0 of each family is one key per family, never shared across families.
    assert network_key(a, 0, 0) != network_key(v6, 0, 0)
    zero6 = parse_address("::")
    assert zero6 is not None and network_key(zero6, 32, 128) != network_key(
        parse_address("0.0.0.0"),  # type: ignore[arg-type]
        32,
        128,
    )


def rule(**fields: object) -> EdgeRateLimit:
    base: dict[str, object] = {"name": "api", "rate": 1.0, "burst": 2}
    base.update(fields)
    return EdgeRateLimit(**base)  # type: ignore[arg-type]


def limits(*rules: EdgeRateLimit, routes: dict[str, str] | None = None) -> RateLimits:
    built = RateLimits.build(rules, routes or {"r": "s"}, TRUSTED)
    assert built is not None
    return built


def test_rate_limits_check_per_client_and_allow_list() -> None:
    rl = limits(rule(allow=(ipaddress.ip_network("198.51.100.0/24"),)))
    assert rl.check("r", "192.0.2.1", [], 0.0) is None
    assert rl.check("r", "192.0.2.1", [], 0.0) is None
    refused = rl.check("r", "192.0.2.1", [], 0.0)
    assert refused is not None and refused.client == "192.0.2.1"
    assert refused.wait == pytest.approx(1.0)
    assert rl.check("r", "192.0.2.2", [], 0.0) is None  # another client
    for _ in range(10):
        assert rl.check("r", "198.51.100.7", [], 0.0) is None  # allow-listed
    counts = rl.rules[0].counts["r"]
    assert (counts.allowed, counts.limited, counts.exempt) == (3, 1, 10)
    assert rl.check("other", "192.0.2.1", [], 0.0) is None  # a route it does not apply to
    assert rl.check("r", "not-an-ip", [], 0.0) is None


def test_rate_limits_behind_a_trusted_proxy_key_the_forwarded_client() -> None:
    rl = limits(rule())
    xff = [(b"x-forwarded-for", b"203.0.113.9")]
    assert rl.check("r", "10.0.0.1", xff, 0.0) is None
    assert rl.check("r", "10.0.0.1", xff, 0.0) is None
    assert rl.check("r", "10.0.0.1", xff, 0.0) is not None
    # Another client behind the same proxy is untouched, and so is the proxy itself.
    assert rl.check("r", "10.0.0.1", [(b"x-forwarded-for", b"203.0.113.10")], 0.0) is None
    assert rl.check("r", "10.0.0.1", [], 0.0) is None
    # An untrusted client cannot pick its key by sending X-Forwarded-For.
    for i in range(2):
        rl.check("r", "192.0.2.1", [(b"x-forwarded-for", b"203.0.113.%d" % i)], 0.0)
    assert rl.check("r", "192.0.2.1", [(b"x-forwarded-for", b"203.0.113.99")], 0.0) is not None


def test_header_key_and_fallback_to_the_client() -> None:
    rl = limits(rule(key="header", header="X-Api-Key"))
    k1 = [(b"x-api-key", b"k1")]
    assert rl.check("r", "192.0.2.1", k1, 0.0) is None
    assert rl.check("r", "192.0.2.2", k1, 0.0) is None
    assert rl.check("r", "192.0.2.3", k1, 0.0) is not None  # one key, whatever the address
    assert rl.check("r", "192.0.2.3", [(b"x-api-key", b"k2")], 0.0) is None
    # Without the header a request is keyed by its client network: no way around the limit.
    assert rl.check("r", "192.0.2.9", [], 0.0) is None
    assert rl.check("r", "192.0.2.9", [], 0.0) is None
    assert rl.check("r", "192.0.2.9", [], 0.0) is not None
    # A huge value is keyed by its prefix (bounded memory per key).
    huge = [(b"x-api-key", b"z" * 100_000)]
    assert rl.check("r", "192.0.2.1", huge, 0.0) is None
    key = next(k for k in rl.rules[0].gcra.buckets if isinstance(k, tuple))
    assert all(len(part) <= 256 for part in key if isinstance(part, bytes))


def test_both_keys_the_pair() -> None:
    rl = limits(rule(key="both", header="x-api-key"))
    k1 = [(b"x-api-key", b"k1")]
    for _ in range(2):
        assert rl.check("r", "192.0.2.1", k1, 0.0) is None
    assert rl.check("r", "192.0.2.1", k1, 0.0) is not None
    assert rl.check("r", "192.0.2.2", k1, 0.0) is None  # same key, another client


def test_dry_run_counts_and_admits() -> None:
    rl = limits(rule(dry_run=True))
    results = [rl.check("r", "192.0.2.1", [], 0.0) for _ in range(5)]
    assert results[:2] == [None, None]
    assert all(r is not None and r.rule.dry_run for r in results[2:])
    counts = rl.rules[0].counts["r"]
    assert (counts.allowed, counts.limited, counts.would_limit) == (2, 0, 3)


def test_a_refusal_by_one_limit_refunds_the_others() -> None:
    wide = rule(name="wide", rate=1.0, burst=3)
    narrow = rule(name="narrow", rate=1.0, burst=1)
    rl = limits(wide, narrow)
    assert rl.check("r", "192.0.2.1", [], 0.0) is None
    for _ in range(5):
        refused = rl.check("r", "192.0.2.1", [], 0.0)
        assert refused is not None and refused.rule.name == "narrow"
    # The wide limit only paid for the one admitted request.
    wide_gcra = rl.rules[0].gcra
    assert wide_gcra.remaining(wide_gcra.bucket(network_key_of("192.0.2.1"), 0.0), 0.0) == 2


def network_key_of(text: str) -> int:
    address = parse_address(text)
    assert address is not None
    return network_key(address, 32, 64)


def test_routes_and_services_scope() -> None:
    rl = limits(
        rule(name="by-route", routes=("a",)),
        rule(name="by-service", services=("svc-b",)),
        routes={"a": "svc-a", "b": "svc-b", "c": "svc-c"},
    )
    assert rl.applies_to("a") and rl.applies_to("b") and not rl.applies_to("c")
    assert set(rl.rules[0].counts) == {"a"} and set(rl.rules[1].counts) == {"b"}


def test_reload_keeps_the_state_of_unchanged_limits() -> None:
    kept, changed = rule(name="kept"), rule(name="changed")
    first = limits(kept, changed)
    for _ in range(3):
        first.check("r", "192.0.2.1", [], 0.0)
    second = RateLimits.build(
        (kept, rule(name="changed", burst=5)), {"r": "s"}, TRUSTED, previous=first
    )
    assert second is not None
    assert second.rules[0] is first.rules[0]  # same table, same counters
    assert second.rules[1] is not first.rules[1]
    assert second.check("r", "192.0.2.1", [], 0.0) is not None
    assert RateLimits.build((), {"r": "s"}, TRUSTED, previous=second) is None


def test_policy_field() -> None:
    assert LimitRule(rule(rate=10.0, burst=20)).policy == b'"api";q=20;w=2'
    assert LimitRule(rule(rate=10.0, burst=None)).policy == b'"api";q=10;w=1'
    assert LimitRule(rule(rate=1 / 60, burst=5)).policy == b'"api";q=5;w=300'


def test_lanes_count_like_the_general_path_and_die_with_forgotten_keys() -> None:
    rl = limits(rule(burst=3, max_keys=4))
    plan = rl._plans["r"]
    assert plan.lanes is not None
    assert rl.check("r", "192.0.2.1", [], 0.0) is None  # makes the lane
    assert "192.0.2.1" in plan.lanes
    assert rl.check("r", "192.0.2.1", [], 0.0) is None  # through the lane
    assert rl.check("r", "192.0.2.1", [], 0.0) is None
    assert rl.check("r", "192.0.2.1", [], 0.0) is not None  # the lane's bucket is the table's
    counts = rl.rules[0].counts["r"]
    assert (counts.allowed, counts.limited) == (3, 1)
    # The table forgets keys (a flood of new ones): the old lane's bucket admits nothing, and
    # the next request goes the general way, counted in the table's (new) bucket.
    lane = plan.lanes["192.0.2.1"]
    for i in range(10):
        rl.check("r", f"198.51.100.{i}", [], 10.0)
    assert network_key_of("192.0.2.1") not in rl.rules[0].gcra.buckets
    assert lane.bucket.tat == float("inf")
    assert rl.check("r", "192.0.2.1", [], 10.0) is None
    assert plan.lanes["192.0.2.1"] is not lane
    bucket = rl.rules[0].gcra.buckets[network_key_of("192.0.2.1")]
    assert plan.lanes["192.0.2.1"].bucket is bucket and bucket.tat > 10.0


def test_no_lane_for_a_trusted_proxy_or_a_header_key() -> None:
    rl = limits(rule())
    rl.check("r", "10.0.0.1", [], 0.0)  # a trusted proxy: its next request may carry XFF
    plan = rl._plans["r"]
    assert plan.lanes is not None and "10.0.0.1" not in plan.lanes
    assert limits(rule(key="header", header="x-k"))._plans["r"].lanes is None
    assert limits(rule(name="a"), rule(name="b"))._plans["r"].lanes is None


def test_hostile_forwarded_for_costs_bounded_work_and_memory() -> None:
    rl = limits(rule())
    # A thousand trusted hops: the walk stops after MAX_HOPS, at a trusted proxy.
    chain = b", ".join(b"10.0.%d.%d" % (i >> 8, i & 255) for i in range(1000))
    found = rl.client("10.0.0.1", [(b"x-forwarded-for", b"203.0.113.1, " + chain)])
    assert found is not None and found.address == "10.0.3.216"  # the 16th hop from the right
    assert found.proxied
    assert not rl._clients  # a long value is not memoised
    short = rl.client("10.0.0.1", [(b"x-forwarded-for", b"203.0.113.1")])
    assert short is not None and short.address == "203.0.113.1" and len(rl._clients) == 1
