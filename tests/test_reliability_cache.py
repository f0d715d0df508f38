"""Reliability of the edge cache at stated scale (issue 21: tests 7 and 11, defects 8 and 14):
real edge processes, a real origin process, a real redis-server, RSS read from the edge's
/proc/PID/status.  Figures are printed (``pytest -s``); ``python -m benchmarks.chaos.cache``
runs the same scenarios at larger scale.

* 7: a 32 MiB cache filled with 5x more distinct keys than fit: the edge's RSS grows by the
  bound plus a small fixed overhead (10 MiB allowed), not only the cache's own count.
* 11: 1 GiB gzip and Brotli bombs (whole and streamed, cacheable and not) to a client that
  accepts neither, and a gzip bomb as a request body: < 64 MiB of peak RSS growth each (before:
  ~130 MiB for a whole-body bomb).
* 8: a purge during a Redis stall (SIGSTOP) reaches the POP's other instance and Redis once
  Redis is back; the purged copy never comes back from Redis.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability_cache_support import bombs, cache_rss, purge_during_stall

pytestmark = pytest.mark.reliability

MiB = 1 << 20
#: What the edge may grow beyond its cache bound: the key memo (1/16 of the bound, 2 MiB
#: here), the edge's request-head, route and access-log memos (4,096 each), allocator slack.
#: Measured 6.5-6.7 MiB whatever the key count (a 1 MiB cache: 6.7 MiB; 5x or 10x keys: same).
FIXED_OVERHEAD_MIB = 10
BOMB_BOUND_MIB = 64


def test_7_the_cache_bound_holds_in_rss_with_five_times_more_keys_than_fit(
    tmp_path: Path,
) -> None:
    figures = cache_rss(tmp_path, memory_mib=32, multiple=5.0)
    print(f"\ncache RSS: {figures}")
    assert figures["ok"] == figures["requests"]
    assert figures["evictions"] > 3 * figures["entries"]  # far more keys than fit
    assert figures["counted_mib"] <= 32
    # Before: the key memo (65,536 keys) and uncounted per-object overhead: a 64 MiB cache
    # grew RSS by 88-103 MiB; this 32 MiB one by ~55 MiB.
    assert figures["rss_growth_mib"] <= 32 + FIXED_OVERHEAD_MIB, figures


def test_11_decompression_bombs_stay_under_64_mib_of_rss(tmp_path: Path) -> None:
    results = bombs(tmp_path)
    for result in results:
        print(f"\nbomb: {result}")
    for result in results:
        assert result["peak_growth_mib"] < BOMB_BOUND_MIB, result
        if result["bomb"] == "gzip request body":
            # The edge does not decode request bodies: forwarded byte for byte.
            assert result["status"] == 200 and result["forwarded_as_sent"], result
        elif "whole" in result["bomb"]:
            assert result["status"] == 502, result  # measured before the head: a clean 502
        else:
            # Streamed: the head went out before the bomb showed; cut at the decoded limit.
            assert result["client_bytes"] <= 64 * MiB, result
    # Far below the bound in practice (measured 1-4 MiB): hold a tighter line on the worst.
    assert max(r["peak_growth_mib"] for r in results) < 24


def test_8_a_purge_during_a_redis_stall_reaches_every_instance_and_redis(
    tmp_path: Path,
) -> None:
    figures = purge_during_stall(tmp_path, stall=3.0)
    for at, event in figures["timeline"]:
        print(f"\n{at:7.3f} s  {event}")
    answer = figures["purge_answer"]
    assert figures["purge_status"] == 200
    assert answer["propagated"] is False and answer["queued"] is True and answer["local"] == 1
    assert figures["during_a"] == ["v2"]  # A purged its own copy at once
    # B cannot be told while Redis, the POP's only channel, is stopped (it answers from L1).
    assert figures["converged_after_s"] is not None and figures["converged_after_s"] < 3.0
    assert figures["after_a"] == ["v2"] and figures["after_b"] == ["v2"]
    assert "1" not in figures["redis_versions"]  # the purged copy cannot refill anyone
    assert figures["pending_after"] == 0 and figures["retries"] >= 1
