"""Reliability tests 7 and 11 of issue 21, and its defect 8, at full scale, with figures.

    python -m benchmarks.chaos.cache [rss|bombs|purge|all] [--memory-mib 64] [--multiple 10]
                                     [--bomb-mib 1024] [--stall 10] [--json FILE]

rss:   an edge whose cache holds ``--memory-mib`` MiB, filled through a raw-asyncio origin with
       ``--multiple`` times more distinct keys than fit (bodies of 300 B to 12 KB, every third
       key hit again with gzip); the edge's RSS (/proc/PID/status) before and after, the
       cache's own count, bytes per entry counted and measured.
bombs: ``--bomb-mib`` MiB of zeros gzip- and Brotli-encoded, whole and streamed, cacheable and
       not, to a client accepting neither; a gzip bomb as a request body; the edge's peak RSS
       growth for each (its VmHWM reset before each, and VmRSS sampled every 2 ms).
purge: two edges of one POP sharing a redis-server; an object cached in both; Redis stopped
       (SIGSTOP) for ``--stall`` seconds while edge A purges it and the origin changes it; the
       timeline of what each edge serves and what Redis holds.

The scenarios are the ones ``tests/test_reliability_cache.py`` asserts on (at 32 MiB x5, 1 GiB
bombs and a 3 s stall).  Loopback only; every process started is stopped by PID.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

#: The scenarios live beside the tests that assert on them (their origin, /proc readers and
#: process helpers are test support); imported by name so that type-checking this package
#: does not pull in the test helpers.
_scenarios: Any = importlib.import_module("tests.reliability_cache_support")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos.cache")
    parser.add_argument(
        "scenario", nargs="?", default="all", choices=["rss", "bombs", "purge", "all"]
    )
    parser.add_argument("--memory-mib", type=int, default=64)
    parser.add_argument("--multiple", type=float, default=10.0)
    parser.add_argument("--bomb-mib", type=int, default=1024)
    parser.add_argument("--stall", type=float, default=10.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="meridian-chaos-cache-") as tmp:
        if args.scenario in ("rss", "all"):
            figures = _scenarios.cache_rss(Path(tmp), args.memory_mib, args.multiple)
            report["rss"] = figures
            print(
                f"cache {figures['memory_mib']} MiB, {figures['keys']} keys "
                f"({figures['requests']} requests, {figures['ok']} 200, {figures['seconds']} s): "
                f"RSS +{figures['rss_growth_mib']} MiB (from {figures['rss_before_mib']}), "
                f"counted {figures['counted_mib']} MiB in {figures['entries']:.0f} entries, "
                f"{figures['evictions']:.0f} evictions; per entry counted "
                f"{figures['counted_per_entry']} B, RSS growth / entries "
                f"{figures['rss_growth_per_entry']} B",
                flush=True,
            )
        if args.scenario in ("bombs", "all"):
            results = _scenarios.bombs(Path(tmp), args.bomb_mib)
            report["bombs"] = results
            for result in results:
                print(f"bomb {result['bomb']}: " + json.dumps(result), flush=True)
        if args.scenario in ("purge", "all"):
            figures = _scenarios.purge_during_stall(Path(tmp), args.stall)
            report["purge"] = figures
            for at, event in figures["timeline"]:
                print(f"{at:8.3f} s  {event}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
