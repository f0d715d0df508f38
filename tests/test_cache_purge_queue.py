"""The pending-purge backlog (pure): coalescing, the bound, backoff, what a pending purge covers."""

from __future__ import annotations

import pytest

from edge.cache.purge_queue import EVERYTHING, PendingPurge, PurgeBacklog, matches

URL = b"https://api.example/api/v1/ticker/BTC?x=1"
PRIMARY = b"G|" + URL


def test_the_same_purge_twice_is_one_item_with_the_later_time() -> None:
    backlog = PurgeBacklog()
    backlog.add("primary", PRIMARY, 10.0)
    backlog.add("primary", PRIMARY, 12.0)
    backlog.add("primary", PRIMARY, 11.0)
    assert backlog.batch() == [PendingPurge("primary", PRIMARY, 12.0)]


def test_done_keeps_a_purge_asked_again_while_it_was_applied() -> None:
    backlog = PurgeBacklog()
    backlog.add("tag", b"btc", 1.0)
    (attempt,) = backlog.batch()
    backlog.add("tag", b"btc", 5.0)  # asked again during the attempt: covers more
    backlog.done(attempt)
    assert backlog.batch() == [PendingPurge("tag", b"btc", 5.0)]
    backlog.done(backlog.batch()[0])
    assert not backlog and len(backlog) == 0


def test_overflow_collapses_into_one_purge_of_everything_never_narrower() -> None:
    backlog = PurgeBacklog(max_items=3)
    for n in range(3):
        backlog.add("primary", b"G|https://h/%d" % n, float(n))
    backlog.add("primary", b"G|https://h/new", 7.0)
    assert backlog.batch() == [PendingPurge(*EVERYTHING, 7.0)]
    # Everything older than the newest purge is covered, whatever its URL or tags.
    assert backlog.covers(b"G|https://h/0", b"https://h/0", (), 0.5)
    assert backlog.covers(b"G|https://other/x", b"https://other/x", ("t",), 6.9)
    backlog.add("tag", b"later", 9.0)  # still one item, now as late as the latest purge
    assert backlog.batch() == [PendingPurge(*EVERYTHING, 9.0)]
    assert len(backlog) == 1


def test_backoff_doubles_to_the_cap_is_jittered_and_resets_on_success() -> None:
    backlog = PurgeBacklog(min_delay=0.1, max_delay=1.0, rng=lambda: 1.0)
    delays = []
    for _ in range(6):
        delays.append(backlog.delay())
        backlog.failed()
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert PurgeBacklog(min_delay=0.1, rng=lambda: 0.0).delay() == pytest.approx(0.05)
    backlog.add("primary", PRIMARY, 1.0)
    backlog.done(backlog.batch()[0])
    assert backlog.failures == 0 and backlog.delay() == pytest.approx(0.1)


def test_a_pending_purge_covers_only_what_was_received_before_it() -> None:
    backlog = PurgeBacklog()
    backlog.add("path_prefix", b"/api/v1/", 100.0)
    assert backlog.covers(PRIMARY, URL, (), 99.0)
    assert backlog.covers(PRIMARY, URL, (), 100.0)
    assert not backlog.covers(PRIMARY, URL, (), 100.5)  # fetched after the purge: fine
    assert not backlog.covers(b"G|https://a/api/v2/x", b"https://a/api/v2/x", (), 1.0)


@pytest.mark.parametrize(
    ("kind", "value", "covered"),
    [
        ("primary", PRIMARY, True),
        ("primary", PRIMARY + b"2", False),
        ("url_prefix", b"https://api.example/api/", True),
        ("url_prefix", b"https://other.example/api/", False),
        ("path_prefix", b"/api/v1/ticker/", True),
        ("path_prefix", b"/ticker", False),
        ("tag", b"btc", True),
        ("tag", b"bt", False),
        ("bogus", b"/", False),
    ],
)
def test_what_each_kind_of_purge_matches(kind: str, value: bytes, covered: bool) -> None:
    assert matches(kind, value, PRIMARY, URL, ("btc", "ticker")) is covered


def test_the_bound_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PurgeBacklog(max_items=0)
