"""The pure health engine: per-target state machine, pool rules, roll-up, snapshot.

Everything runs on simulated time passed as an argument: no clock, no I/O, no event loop.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from meridian.config import Config, HealthConfig, OutlierConfig
from meridian.health import (
    TRANSITIONS,
    Health,
    HealthBook,
    HealthSnapshot,
    Signal,
    TargetHealth,
    pop_target,
)
from meridian.health import state as sm
from tests.health_support import make_config

HC = HealthConfig(interval=10.0, fast_interval=2.0, timeout=2.0, fall=3, rise=2, jitter=0.1)
OC = OutlierConfig(consecutive_failures=5, base_ejection=30.0, max_ejection=300.0)
A, B, C, D = (f"http://10.0.0.{i}:80" for i in range(1, 5))


def checks(h: TargetHealth, results: str, start: float = 0.0, step: float = 1.0) -> TargetHealth:
    """Apply checks written as a string: ``+`` passed, ``-`` failed, one per ``step`` seconds."""
    for i, result in enumerate(results):
        h = sm.on_check(
            h, result == "+", "status 200" if result == "+" else "status 503", start + i * step, HC
        )
    return h


def traffic(h: TargetHealth, results: str, now: float = 0.0, allowed: bool = True) -> TargetHealth:
    for result in results:
        h = sm.on_traffic(h, result == "+", now, OC, ejection_allowed=allowed)
    return h


UNKNOWN = sm.initial(0.0)
UP = checks(UNKNOWN, "+")
DOWN = checks(UNKNOWN, "---")


# ------------------------------------------------------------------------------------------
# One target


def test_a_new_target_is_unknown_and_usable() -> None:
    assert UNKNOWN.state is Health.UNKNOWN
    assert UNKNOWN.state.usable
    assert sm.transitioning(UNKNOWN)  # so the first checks run at fast_interval


@pytest.mark.parametrize(
    ("start", "results", "expected"),
    [
        (UNKNOWN, "+", Health.UP),  # the first passed check settles it
        (UNKNOWN, "--", Health.UNKNOWN),  # fall - 1 failures: still unknown, still usable
        (UNKNOWN, "---", Health.DOWN),
        (UNKNOWN, "--+", Health.UP),
        (UP, "--", Health.UP),
        (UP, "---", Health.DOWN),
        (UP, "--+--", Health.UP),  # a success resets the failure run: flapping stays up
        (UP, "--+---", Health.DOWN),
        (DOWN, "+", Health.DOWN),
        (DOWN, "++", Health.UP),
        (DOWN, "+-+", Health.DOWN),  # a failure resets the success run
        (DOWN, "+-++", Health.UP),
        (DOWN, "-----", Health.DOWN),
    ],
)
def test_fall_and_rise_edges(start: TargetHealth, results: str, expected: Health) -> None:
    assert checks(start, results, start=10.0).state is expected


@pytest.mark.parametrize("fall", [1, 2, 3, 5])
def test_down_exactly_at_the_fall_th_failure(fall: int) -> None:
    config = dataclasses.replace(HC, fall=fall)
    h = UP
    for i in range(1, fall + 1):
        h = sm.on_check(h, False, "timeout after 2s", float(i), config)
        assert (h.state is Health.DOWN) == (i == fall)
    assert h.reason == f"{fall} checks failed: timeout after 2s"
    assert h.last_error == "timeout after 2s"
    assert h.since == float(fall)


@pytest.mark.parametrize("rise", [1, 2, 4])
def test_up_exactly_at_the_rise_th_success(rise: int) -> None:
    config = dataclasses.replace(HC, rise=rise)
    h = DOWN
    for i in range(1, rise + 1):
        h = sm.on_check(h, True, "status 200", 10.0 + i, config)
        assert (h.state is Health.UP) == (i == rise)
    assert h.reason == f"{rise} checks passed: status 200"


def test_flapping_every_other_check_never_changes_state() -> None:
    assert checks(UP, "-+" * 20).state is Health.UP
    assert checks(DOWN, "+-" * 20).state is Health.DOWN


def test_transitioning_while_between_states() -> None:
    assert not sm.transitioning(UP)
    assert sm.transitioning(checks(UP, "-"))
    assert not sm.transitioning(DOWN)
    assert sm.transitioning(checks(DOWN, "+"))
    assert sm.transitioning(traffic(UP, "-----"))  # ejected


def test_passive_failures_eject_at_once() -> None:
    h = traffic(UP, "----", now=50.0)
    assert h.state is Health.UP and h.traffic_failures == 4
    h = traffic(h, "-", now=50.0)
    assert h.state is Health.EJECTED
    assert h.ejected_until == 50.0 + OC.base_ejection
    assert h.reason == "5 consecutive request failures"
    assert h.traffic_failures == 0


def test_a_passive_success_resets_the_run() -> None:
    assert traffic(UP, "----+----").state is Health.UP
    assert traffic(UP, "----+-----").state is Health.EJECTED


def test_unknown_targets_can_be_ejected_and_down_ones_ignore_traffic() -> None:
    assert traffic(UNKNOWN, "-----").state is Health.EJECTED
    assert traffic(DOWN, "-" * 20) is DOWN  # panic-mode traffic says nothing new
    ejected = traffic(UP, "-----")
    assert traffic(ejected, "-" * 20) is ejected


def test_a_success_on_the_hot_path_allocates_nothing() -> None:
    assert sm.on_traffic(UP, True, 1.0, OC, ejection_allowed=True) is UP


def test_disabled_outlier_detection_never_ejects() -> None:
    off = dataclasses.replace(OC, enabled=False)
    h = UP
    for _ in range(50):
        h = sm.on_traffic(h, False, 1.0, off, ejection_allowed=True)
    assert h.state is Health.UP


def test_ejection_not_allowed_keeps_the_count_at_the_threshold() -> None:
    h = traffic(UP, "-" * 8, allowed=False)
    assert h.state is Health.UP and h.traffic_failures == 8
    assert traffic(h, "-", allowed=True).state is Health.EJECTED


def test_an_ejected_target_returns_on_a_passed_check_after_the_ejection_time() -> None:
    h = traffic(UP, "-----", now=100.0)
    assert h.ejected_until == 130.0
    h = checks(h, "++++", start=101.0, step=2.0)  # passing, but the time is not over
    assert h.state is Health.EJECTED
    h = sm.on_check(h, True, "status 200", 130.0, HC)
    assert h.state is Health.UP
    assert h.reason == "ejection over and check passed: status 200"
    assert h.ejected_until is None


def test_an_ejected_target_that_fails_its_checks_goes_down() -> None:
    h = checks(traffic(UP, "-----", now=100.0), "---", start=101.0)
    assert h.state is Health.DOWN
    assert checks(h, "+", start=200.0).state is Health.DOWN  # now it needs a full rise
    assert checks(h, "++", start=200.0).state is Health.UP


def eject_and_return(h: TargetHealth, now: float) -> tuple[TargetHealth, float]:
    """Eject at ``now`` and return at the end of the ejection; gives the ejection length."""
    h = traffic(h, "-----", now=now)
    assert h.state is Health.EJECTED and h.ejected_until is not None
    seconds = h.ejected_until - now
    return sm.on_check(h, True, "status 200", h.ejected_until, HC), seconds


def test_ejection_time_grows_with_each_ejection_up_to_the_cap() -> None:
    h, now, lengths = UP, 0.0, []
    for _ in range(12):
        h, seconds = eject_and_return(h, now)
        lengths.append(seconds)
        now += seconds  # ejected again the moment it is back
    assert lengths[:4] == [30.0, 60.0, 90.0, 120.0]
    assert max(lengths) == OC.max_ejection == lengths[-1]


def test_time_in_rotation_forgives_past_ejections() -> None:
    h, now = UP, 0.0
    for _ in range(4):
        h, seconds = eject_and_return(h, now)
        now += seconds
    assert h.ejections == 4
    # Two base periods in rotation forgive two ejections: the next one is the third.
    _, seconds = eject_and_return(h, now + 2 * OC.base_ejection)
    assert seconds == 3 * OC.base_ejection
    # A long healthy stretch forgives everything.
    _, seconds = eject_and_return(h, now + 100 * OC.base_ejection)
    assert seconds == OC.base_ejection


def test_ejection_expires_without_checks_only_through_expire() -> None:
    h = traffic(UP, "-----", now=10.0)
    assert sm.expire_ejection(h, 39.9) is h
    back = sm.expire_ejection(h, 40.0)
    assert back.state is Health.UP
    assert sm.expire_ejection(UP, 1000.0) is UP


def test_every_table_entry_is_reachable_from_its_inputs() -> None:
    """Each (state, signal) edge of the table is exercised by some input sequence."""
    ejected = traffic(UP, "-----", now=0.0)
    reached = {
        (Health.UNKNOWN, Signal.CHECK_OK): checks(UNKNOWN, "+"),
        (Health.UNKNOWN, Signal.FELL): checks(UNKNOWN, "---"),
        (Health.UNKNOWN, Signal.OUTLIER): traffic(UNKNOWN, "-----"),
        (Health.UP, Signal.FELL): checks(UP, "---"),
        (Health.UP, Signal.OUTLIER): ejected,
        (Health.DOWN, Signal.ROSE): checks(DOWN, "++"),
        (Health.EJECTED, Signal.FELL): checks(ejected, "---", start=1.0),
        (Health.EJECTED, Signal.EJECTION_OVER): checks(ejected, "+", start=30.0),
    }
    assert reached.keys() == TRANSITIONS.keys()
    for edge, h in reached.items():
        assert h.state is TRANSITIONS[edge], edge


def test_pending_until_counts_the_remaining_checks_at_fast_interval() -> None:
    assert sm.pending_until(UNKNOWN, HC) == 0.0 + (HC.fall - 1) * HC.fast_interval
    assert sm.pending_until(UP, HC) is None
    assert sm.pending_until(DOWN, HC) is None
    one_failure = sm.on_check(UP, False, "status 503", 10.0, HC)
    assert sm.pending_until(one_failure, HC) == 10.0 + 2 * HC.fast_interval
    one_success = sm.on_check(DOWN, True, "status 200", 20.0, HC)
    assert sm.pending_until(one_success, HC) == 20.0 + 1 * HC.fast_interval
    ejected = traffic(UP, "-----", now=5.0)
    assert sm.pending_until(ejected, HC) == 35.0


def test_adopting_a_peer_verdict_sets_counters_at_the_edge_of_the_state() -> None:
    down = sm.adopt(UP, Health.DOWN, "peer x: 3 checks failed", 7.0, HC)
    assert down.state is Health.DOWN and down.failures == HC.fall and down.since == 7.0
    assert checks(down, "+", start=8.0).state is Health.DOWN  # a full rise to overturn it
    up = sm.adopt(down, Health.UP, "peer x: 2 checks passed", 9.0, HC)
    assert up.state is Health.UP and checks(up, "--", start=10.0).state is Health.UP
    ejected = sm.adopt(UP, Health.EJECTED, "peer x", 9.0, HC, ejection_left=12.5)
    assert ejected.state is Health.EJECTED and ejected.ejected_until == 21.5
    assert sm.adopt(UP, Health.EJECTED, "peer x", 9.0, HC, ejection_left=None) is UP
    assert sm.adopt(DOWN, Health.EJECTED, "peer x", 9.0, HC, ejection_left=5.0) is DOWN
    assert sm.adopt(UP, Health.UNKNOWN, "peer x", 9.0, HC) is UP


# ------------------------------------------------------------------------------------------
# Pools, roll-up, snapshot


def book_of(
    regions: dict[str, list[str]],
    *,
    check_pops: bool = False,
    pops: dict[str, str | None] | None = None,
    min_healthy: dict[str, int] | None = None,
    **outlier: object,
) -> HealthBook:
    config = make_config(
        regions,
        pops=pops,
        min_healthy=min_healthy,
        health={"interval": 10, "fast_interval": 2, "timeout": 2, "fall": 3, "rise": 2},
        outlier=dict(outlier),
    )
    return HealthBook(config, now=0.0, check_pops=check_pops)


def kill(book: HealthBook, url: str, now: float = 1.0) -> None:
    for i in range(book.config.health.fall):
        book.check(url, False, "connect failed: Connection refused", now + i)


def eject(book: HealthBook, url: str, now: float = 1.0) -> tuple[object, ...]:
    found: tuple[object, ...] = ()
    for _ in range(book.config.outlier.consecutive_failures):
        found += book.traffic(url, False, now)
    return found


def test_transitions_are_reported_as_data() -> None:
    book = book_of({"r": [A, B]})
    assert book.check(A, True, "status 200", 1.0) == (
        sm.Transition(A, Health.UNKNOWN, Health.UP, "check passed: status 200", 1.0),
    )
    assert book.check(A, True, "status 200", 2.0) == ()
    (ejection,) = eject(book, A, now=3.0)
    assert ejection == sm.Transition(
        A, Health.UP, Health.EJECTED, "5 consecutive request failures", 3.0, 30.0
    )


def test_max_ejection_percent_caps_ejections_in_a_pool() -> None:
    book = book_of({"r": [A, B, C, D]}, max_ejection_percent=50)
    assert eject(book, A) and eject(book, B)
    assert eject(book, C) == ()  # a third would be 75% of the pool
    assert book.health[C].state.usable and book.health[C].traffic_failures == 5
    # Room frees up when A comes back; C's next failure ejects it.
    book.check(A, True, "status 200", 31.0)
    assert book.traffic(C, False, 31.0)[0].new is Health.EJECTED


def test_one_ejection_is_always_allowed() -> None:
    book = book_of({"r": [A, B]}, max_ejection_percent=10)
    assert eject(book, A)
    assert eject(book, B) == ()


def test_a_shared_backend_needs_room_in_every_pool() -> None:
    book = book_of({"r1": [A, B], "r2": [C, A]}, max_ejection_percent=50)
    assert eject(book, C)
    assert eject(book, A) == ()  # r2 already has one of its two ejected
    assert eject(book, B)


def test_region_up_needs_min_healthy_backends() -> None:
    book = book_of({"r": [A, B, C]}, min_healthy={"r": 2})
    assert book.snapshot(1).region_up("r")
    kill(book, A)
    assert book.snapshot(2).region_up("r")
    kill(book, B)
    snapshot = book.snapshot(3)
    assert not snapshot.region_up("r")
    assert snapshot.backend_up(C) and not snapshot.backend_up(A)


def test_panic_mode_spreads_over_all_backends_below_the_threshold() -> None:
    book = book_of({"r": [A, B, C, D]}, panic_threshold_percent=50)
    kill(book, A)
    kill(book, B)
    snapshot = book.snapshot(1)
    assert snapshot.usable_backends("r") == (C, D)  # 50% healthy is not below 50%
    assert "r" not in snapshot.panic_regions
    kill(book, C)
    snapshot = book.snapshot(2)
    assert snapshot.usable_backends("r") == (A, B, C, D)
    assert snapshot.panic_regions == {"r"}
    assert snapshot.region_up("r")  # D is still up; panic is about spreading load


def test_a_pool_is_never_empty_even_without_panic() -> None:
    book = book_of({"r": [A, B]}, panic_threshold_percent=0)
    kill(book, A)
    assert book.snapshot(1).usable_backends("r") == (B,)
    kill(book, B)
    snapshot = book.snapshot(2)
    assert snapshot.usable_backends("r") == (A, B)
    assert not snapshot.region_up("r")


def test_a_region_down_only_through_ejection_is_marked_as_such() -> None:
    book = book_of({"one": [A], "two": [B, C]}, min_healthy={"two": 2})
    eject(book, A)  # one ejection per pool is always allowed
    snapshot = book.snapshot(1)
    assert not snapshot.region_up("one") and snapshot.ejected_only("one")
    eject(book, B)
    snapshot = book.snapshot(2)
    assert not snapshot.region_up("two") and snapshot.ejected_only("two")
    kill(book, C)  # an active verdict: ejection is no longer the only reason
    snapshot = book.snapshot(3)
    assert not snapshot.ejected_only("two")
    assert snapshot.ejected_only("one")
    kill(book, A)
    assert not book.snapshot(4).ejected_only("one")


def test_pop_up_follows_its_health_url_check() -> None:
    book = book_of(
        {"r": [A]}, pops={"iad": "http://10.1.0.1/healthz", "gru": None}, check_pops=True
    )
    assert book.snapshot(1).pop_up("iad") and book.snapshot(1).pop_up("gru")
    kill(book, pop_target("iad"))
    snapshot = book.snapshot(2)
    assert not snapshot.pop_up("iad")
    assert snapshot.pop_up("gru")  # no health_url: always up
    assert not snapshot.pop_up("nowhere")


def test_pops_are_up_when_this_process_does_not_check_them() -> None:
    book = book_of({"r": [A]}, pops={"iad": "http://10.1.0.1/healthz"}, check_pops=False)
    assert pop_target("iad") not in book.targets
    assert book.snapshot(1).pop_up("iad")


def test_names_not_in_the_config_are_down() -> None:
    snapshot = book_of({"r": [A]}).snapshot(1)
    assert not snapshot.backend_up("http://elsewhere")
    assert not snapshot.region_up("nowhere")
    assert snapshot.usable_backends("nowhere") == ()
    assert snapshot.ttl_hint("http://elsewhere") is None


def test_ttl_hint_counts_down_on_the_snapshot_clock() -> None:
    book = book_of({"r": [A, B]})
    book.check(A, True, "status 200", 0.5)
    book.check(B, True, "status 200", 0.5)
    now = [10.0]
    assert book.snapshot(1, clock=lambda: now[0]).ttl_hint(A) is None  # stable
    book.check(A, False, "status 503", 10.0)
    snapshot = book.snapshot(2, clock=lambda: now[0])
    assert snapshot.ttl_hint(A) == pytest.approx(4.0)  # two more failures at 2 s each
    now[0] = 13.0
    assert snapshot.ttl_hint(A) == pytest.approx(1.0)
    now[0] = 99.0
    assert snapshot.ttl_hint(A) == 0.0  # overdue: any moment now
    eject(book, B, now=20.0)
    assert book.snapshot(3, clock=lambda: 25.0).ttl_hint(B) == pytest.approx(25.0)


def test_unprobed_ejections_expire_on_time() -> None:
    config = make_config({"r": [A, B]})
    book = HealthBook(config, now=0.0, check_backends=False)
    eject(book, A, now=10.0)
    assert book.next_expiry() == 40.0
    assert book.expire(39.0) == ()
    (back,) = book.expire(40.0)
    assert back.new is Health.UP and book.next_expiry() is None


def test_reconfigure_keeps_the_state_of_targets_still_present() -> None:
    book = book_of({"r": [A, B]})
    kill(book, A)
    book.check(B, True, "status 200", 1.0)
    added, removed = book.reconfigure(make_config({"r": [A, C], "r2": [D]}), now=50.0)
    assert (added, removed) == ({C, D}, {B})
    assert book.health[A].state is Health.DOWN
    assert book.health[C] == sm.initial(50.0)
    snapshot = book.snapshot(2)
    assert not snapshot.backend_up(B)  # gone from the config
    assert snapshot.usable_backends("r2") == (D,)


def test_all_up_snapshot() -> None:
    config = make_config({"r1": [A, B], "r2": [C]}, pops={"iad": "http://10.1.0.1/", "gru": None})
    snapshot = HealthSnapshot.all_up(config)
    assert snapshot.generation == 0
    assert all(snapshot.backend_up(url) for url in (A, B, C))
    assert snapshot.region_up("r1") and snapshot.pop_up("iad") and snapshot.pop_up("gru")
    assert snapshot.usable_backends("r1") == (A, B)
    assert snapshot.ttl_hint(A) is None


def test_thirty_simulated_seconds_with_the_real_schedule() -> None:
    """The prober's schedule replayed on simulated time at the worst jitter: however the death
    of a backend lines up with its checks, it is out of rotation within 30 s."""
    hc = HC
    for phase in [i * 0.25 for i in range(44)]:  # death anywhere in one jittered interval
        book = book_of({"r": [A, B]})
        death, now = phase, 0.0
        went_down = None
        while now < 30.0 + death and went_down is None:
            ok = now < death
            for t in book.check(A, ok, "status 200" if ok else "timeout after 2s", now):
                went_down = t.at if t.new is Health.DOWN else None
            period = hc.fast_interval if book.transitioning(A) else hc.interval
            # Worst case: every check takes the full timeout and gets the full jitter.
            now += period * (1 + hc.jitter) + (0.0 if ok else hc.timeout)
        assert went_down is not None and went_down - death <= 30.0, phase


# ------------------------------------------------------------------------------------------
# Invariants over random histories

URLS = (A, B, C, D)
#: Bursts of the same input, so that runs long enough to cross fall/rise/ejection thresholds
#: are common; ticks move simulated time (ejections expire).
bursts = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["check", "traffic"]),
            st.sampled_from(URLS),
            st.booleans(),
            st.integers(1, 6),
        ),
        st.tuples(st.just("tick"), st.just(""), st.floats(0.0, 40.0), st.just(1)),
    ),
    max_size=40,
)


INVARIANT_BASE = make_config(
    {"r1": [A, B, C], "r2": [C, D]},
    outlier={"consecutive_failures": 3, "base_ejection": 2, "max_ejection": 10},
)


def invariant_config(fall: int, rise: int, max_ejection_percent: int, panic: int) -> Config:
    base = INVARIANT_BASE
    return dataclasses.replace(
        base,
        health=dataclasses.replace(base.health, fall=fall, rise=rise),
        outlier=dataclasses.replace(
            base.outlier,
            max_ejection_percent=max_ejection_percent,
            panic_threshold_percent=panic,
        ),
    )


@settings(max_examples=150, deadline=None)
@given(
    history=bursts,
    fall=st.integers(1, 4),
    rise=st.integers(1, 3),
    max_ejection_percent=st.integers(0, 100),
    panic=st.integers(0, 100),
)
def test_invariants_hold_over_any_history(
    history: list[tuple[str, str, bool | float, int]],
    fall: int,
    rise: int,
    max_ejection_percent: int,
    panic: int,
) -> None:
    config = invariant_config(fall, rise, max_ejection_percent, panic)
    book = HealthBook(config, now=0.0)
    now = 0.0
    # What the inputs alone say, to hold the book to account.
    check_fails = dict.fromkeys(URLS, 0)
    check_oks = dict.fromkeys(URLS, 0)
    traffic_fails = dict.fromkeys(URLS, 0)
    apply: dict[str, Callable[[str, bool], tuple[sm.Transition, ...]]] = {
        "check": lambda url, ok: book.check(url, ok, "x", now),
        "traffic": lambda url, ok: book.traffic(url, ok, now),
    }
    generation = 0
    steps = [(kind, url, value) for kind, url, value, n in history for _ in range(n)]
    for kind, url, value in steps:
        if kind == "tick":
            now += float(value)
            continue
        ok = bool(value)
        usable_before = book.health[url].state.usable
        if kind == "check":
            check_fails[url] = 0 if ok else check_fails[url] + 1
            check_oks[url] = check_oks[url] + 1 if ok else 0
        elif usable_before:
            traffic_fails[url] = 0 if ok else traffic_fails[url] + 1
        for t in apply[kind](url, ok):
            assert t.old is not t.new and t.at == now
            event(f"{t.old} -> {t.new}")
            if t.new is Health.DOWN:
                assert kind == "check" and check_fails[url] >= fall
            if t.new is Health.EJECTED:
                assert kind == "traffic" and traffic_fails[url] >= 3
                traffic_fails[url] = 0
            if t.new is Health.UP and t.old is Health.DOWN:
                assert check_oks[url] >= rise
            if t.new is Health.UP and t.old is Health.EJECTED:
                assert kind == "check" and ok
            if t.new is not Health.EJECTED:
                traffic_fails[url] = 0
        generation += 1
        snapshot = book.snapshot(generation, clock=functools.partial(float, now))
        for region in config.regions:
            usable = snapshot.usable_backends(region.name)
            assert usable, "a region with backends always has someone to send to"
            if region.name in snapshot.panic_regions:
                event("panic")
            assert set(usable) <= set(region.backends)
            ejected = sum(book.health[u].state is Health.EJECTED for u in region.backends)
            assert ejected <= max(1, max_ejection_percent * len(region.backends) // 100)
            healthy = sum(snapshot.backend_up(u) for u in region.backends)
            assert snapshot.region_up(region.name) == (healthy >= region.min_healthy)
        for url in URLS:
            hint = snapshot.ttl_hint(url)
            assert hint is None or hint >= 0.0
            assert snapshot.backend_up(url) == book.health[url].state.usable


def test_a_pop_whose_health_url_changes_starts_afresh() -> None:
    book = book_of({"r": [A]}, pops={"iad": "http://10.1.0.1/healthz"}, check_pops=True)
    kill(book, pop_target("iad"))
    config = make_config({"r": [A]}, pops={"iad": "http://10.1.0.2/healthz"})
    added, removed = book.reconfigure(config, now=60.0)
    assert added == removed == {pop_target("iad")}
    assert book.health[pop_target("iad")].state is Health.UNKNOWN
    assert book.snapshot(2).pop_up("iad")


def test_targets_nobody_checks_have_no_pending_transition() -> None:
    book = HealthBook(make_config({"r": [A, B]}), now=0.0, check_backends=False)
    snapshot = book.snapshot(1, clock=lambda: 100.0)
    assert snapshot.ttl_hint(A) is None  # unknown forever, but nothing is about to change
    eject(book, A, now=90.0)
    assert book.snapshot(2, clock=lambda: 100.0).ttl_hint(A) == pytest.approx(20.0)
