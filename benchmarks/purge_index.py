"""What a prefix purge costs at a million stored URLs: the store's path index against the scan
it replaced (issue 20).  In one process, no sockets.

    python -m benchmarks.purge_index [--entries 1000000]

URLs look like a market-data API: ``https://api.test/api/v1/<kind>/<symbol>?depth=<n>``, 1,000
kinds of 1,000 URLs each.  Timed: finding the 1,000 keys under ``/api/v1/kind-7/`` (index) or the
URLs that start with it (a scan over every URL, what ``purge_where`` did per entry), and adding
one more path to the index.  Memory: what the index allocates per URL (tracemalloc).
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc

from edge.cache.store import PathIndex, url_path


def _urls(count: int) -> list[bytes]:
    kinds = max(1, count // 1000)
    return [
        b"https://api.test/api/v1/kind-%d/SYM-%d?depth=%d" % (i % kinds, i // kinds, i % 7)
        for i in range(count)
    ]


def _best(run: object, rounds: int = 5) -> float:
    assert callable(run)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    urls = _urls(args.entries)
    paths = [url_path(url) or b"/" for url in urls]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = PathIndex()
    for url, path in zip(urls, paths, strict=True):
        index.add(path, url)
    allocated = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    prefix = b"/api/v1/kind-7/"
    found = index.under(prefix)
    indexed = _best(lambda: index.under(prefix))
    scanned = _best(lambda: [u for u, p in zip(urls, paths, strict=True) if p.startswith(prefix)])
    extra = b"/api/v1/kind-7/NEW?depth=1"

    def add_and_discard() -> None:
        index.add(extra, extra)
        index.discard(extra, extra)

    add = _best(add_and_discard, rounds=1000)
    print(f"entries {len(urls):,}; a prefix purge's lookup of {len(found):,} keys:")
    print(f"  index  {indexed * 1e3:8.3f} ms")
    print(f"  scan   {scanned * 1e3:8.3f} ms  ({scanned / indexed:,.0f}x)")
    per_url = allocated / len(urls)
    print(f"  add+discard one path {add * 1e6:.1f} us; index memory {per_url:.0f} B/URL")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
