"""Entries (pre-built wire forms, variants, 304s) and the byte-bounded L1 store."""

from __future__ import annotations

import gzip

import brotli
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.cache.entry import X_CACHE_STALE, Entry, StoredResponse
from edge.cache.key import VARIANT_SEPARATOR, vary_key
from edge.cache.policy import Freshness, format_http_date
from edge.cache.store import MemoryStore, PathIndex

NOW = 1_700_000_000.0
FRESH = Freshness(
    response_time=NOW,
    initial_age=0.0,
    lifetime=60.0,
    stale_while_revalidate=0.0,
    stale_if_error=0.0,
    no_stale=False,
    always_revalidate=False,
)


def compressor(body: bytes, coding: str) -> bytes:
    return brotli.compress(body) if coding == "br" else gzip.compress(body, mtime=0)


def make_entry(
    url: bytes = b"https://h/x",
    body: bytes = b"hello",
    *,
    headers: tuple[tuple[bytes, bytes], ...] = (),
    tags: tuple[str, ...] = (),
    vary: tuple[bytes, ...] = (),
    secondary: bytes = b"",
    status: int = 200,
    compressible: bool = False,
    freshness: Freshness = FRESH,
) -> Entry:
    primary = b"G|" + url
    response = StoredResponse(
        status=status,
        reason=b"",
        headers=((b"date", format_http_date(NOW)), *headers),
        body=body,
        freshness=freshness,
        vary=vary,
        surrogate_keys=tags,
        compressible=compressible,
    )
    key = primary + VARIANT_SEPARATOR + secondary if vary else primary
    return Entry(
        response,
        key=key,
        primary=primary,
        url=url,
        compressor=compressor,
        extra_head=b"via: 1.1 meridian\r\n",
    )


def parse(wire: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, body = wire.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    return status, dict(line.split(b": ", 1) for line in lines), body


# --------------------------------------------------------------------------------------------
# Entry wire forms


def test_wire_is_a_complete_response() -> None:
    status, headers, body = parse(make_entry().wire("identity", NOW + 3.7))
    assert status == b"HTTP/1.1 200 OK"
    assert headers[b"content-length"] == b"5"
    assert headers[b"age"] == b"3"
    assert headers[b"x-cache"] == b"HIT"
    assert headers[b"via"] == b"1.1 meridian"
    assert headers[b"date"] == format_http_date(NOW)  # the origin's Date is kept
    assert body == b"hello"


def test_wire_is_rebuilt_only_when_age_changes() -> None:
    entry = make_entry()
    once = entry.wire("identity", NOW + 1.0)  # asked once in this Age second: not kept
    first = entry.wire("identity", NOW + 1.1)  # asked again: kept
    assert first == once and first is not once
    assert entry.wire("identity", NOW + 1.9) is first
    later = entry.wire("identity", NOW + 2.0)
    assert later is not first
    assert parse(later)[1][b"age"] == b"2"
    assert entry.cached_wire(0) is None  # the Age-1 bytes went with the new second


def test_a_response_asked_once_per_age_is_not_kept() -> None:
    """A key hit less often than once a second (most of a large cache) holds one copy of its
    body, not two: the response bytes built for a hit are kept only when asked for again
    within the same Age second, and counted only while kept."""
    entry = make_entry(body=b"x" * 10_000)
    base = entry.size
    for second in range(5):
        entry.wire("identity", NOW + 10 * second)
        assert entry.cached_wire(0) is None
        assert base < entry.size < base + 1_000  # the Age marker only
    entry.wire("identity", NOW + 50)
    entry.wire("identity", NOW + 50.5)  # twice within one Age second: kept
    assert entry.cached_wire(0) is not None and entry.size > base + 10_000
    entry.wire("identity", NOW + 60)  # a new second, asked once: the kept copy goes
    assert entry.cached_wire(0) is None and entry.size < base + 1_000


def test_age_includes_the_initial_age() -> None:
    entry = make_entry(freshness=Freshness(NOW, 30.0, 60.0, 0, 0, False, False))
    assert parse(entry.wire("identity", NOW + 5))[1][b"age"] == b"35"


def test_head_only_has_the_same_headers_and_no_body() -> None:
    entry = make_entry()
    get_status, get_headers, _ = parse(entry.wire("identity", NOW))
    wire = entry.wire("identity", NOW, head_only=True)
    assert wire.endswith(b"\r\n\r\n")
    assert parse(wire)[:2] == (get_status, get_headers)


def test_status_flavours_and_extra_lines() -> None:
    entry = make_entry()
    wire = entry.wire("identity", NOW, x_cache=X_CACHE_STALE, extra=b"x-request-id: 7\r\n")
    headers = parse(wire)[1]
    assert headers[b"x-cache"] == b"STALE"
    assert headers[b"x-request-id"] == b"7"


def test_204_has_no_content_length() -> None:
    assert b"content-length" not in parse(make_entry(body=b"", status=204).wire("gzip", NOW))[1]


def test_compressed_variants_are_built_once_and_labelled() -> None:
    body = b'{"price": "1.0"}' * 200
    calls: list[str] = []

    def counting(data: bytes, coding: str) -> bytes:
        calls.append(coding)
        return compressor(data, coding)

    response = StoredResponse(
        200,
        b"",
        ((b"etag", b'"v1"'), (b"accept-ranges", b"bytes"), (b"vary", b"accept-language")),
        body,
        FRESH,
        compressible=True,
    )
    entry = Entry(response, key=b"k", primary=b"k", url=b"u", compressor=counting)
    _, headers, data = parse(entry.wire("br", NOW))
    assert brotli.decompress(data) == body
    assert headers[b"content-encoding"] == b"br"
    assert headers[b"content-length"] == str(len(data)).encode()
    assert headers[b"etag"] == b'W/"v1"'  # not byte-identical to the identity variant
    assert b"accept-ranges" not in headers
    assert headers[b"vary"] == b"accept-language, accept-encoding"
    entry.wire("br", NOW + 5)
    _, identity_headers, identity = parse(entry.wire("identity", NOW))
    assert identity == body and b"content-encoding" not in identity_headers
    assert identity_headers[b"vary"] == b"accept-language, accept-encoding"
    assert identity_headers[b"etag"] == b'"v1"'
    assert gzip.decompress(parse(entry.wire("gzip", NOW))[2]) == body
    assert calls == ["br", "gzip"]


def test_incompressible_entries_serve_identity_for_any_coding() -> None:
    entry = make_entry(compressible=False)
    _, headers, body = parse(entry.wire("br", NOW))
    assert body == b"hello" and b"content-encoding" not in headers


def test_variant_that_does_not_shrink_is_served_identity() -> None:
    entry = make_entry(body=b"ab", compressible=True)
    _, headers, body = parse(entry.wire("gzip", NOW))
    assert body == b"ab" and b"content-encoding" not in headers


def test_not_modified_wire() -> None:
    entry = make_entry(
        headers=(
            (b"etag", b'"v1"'),
            (b"cache-control", b"max-age=60"),
            (b"content-type", b"application/json"),
        )
    )
    assert entry.not_modified_for(b'"v1"', None)
    status, headers, body = parse(entry.wire_not_modified("identity", NOW + 2))
    assert status == b"HTTP/1.1 304 Not Modified"
    assert headers[b"etag"] == b'"v1"' and headers[b"cache-control"] == b"max-age=60"
    assert headers[b"age"] == b"2" and headers[b"via"] == b"1.1 meridian"
    assert b"content-type" not in headers and b"content-length" not in headers
    assert body == b""


def test_size_counts_body_headers_and_built_forms() -> None:
    entry = make_entry(body=b"x" * 10_000, compressible=True)
    base = entry.size
    assert base > 10_000
    entry.wire("identity", NOW)
    entry.wire("identity", NOW)  # asked twice in one Age second: kept
    assert entry.size > base + 10_000  # the cached response holds a copy of the body
    grown = entry.size
    entry.wire("gzip", NOW)
    assert entry.size > grown


# --------------------------------------------------------------------------------------------
# Store


def test_put_and_get() -> None:
    store = MemoryStore(10**6, 10**5)
    entry = make_entry()
    assert store.put(entry)
    assert store.get(entry.primary, []) is entry
    assert entry.visited
    assert len(store) == 1 and store.bytes == entry.size


def test_objects_over_max_object_are_not_stored() -> None:
    store = MemoryStore(10**6, 1000)
    assert not store.put(make_entry(body=b"x" * 1001))
    assert len(store) == 0 and store.bytes == 0


def test_a_too_large_replacement_drops_the_old_copy() -> None:
    store = MemoryStore(10**6, 1000)
    store.put(make_entry(body=b"old"))
    assert not store.put(make_entry(body=b"x" * 2000))
    assert store.get(b"G|https://h/x", []) is None


def test_memory_bound_holds_under_many_distinct_keys() -> None:
    limit = 200_000
    store = MemoryStore(limit, 10_000)
    for i in range(5_000):
        entry = make_entry(url=b"https://h/%d" % i, body=b"x" * (i % 700))
        store.put(entry)
        entry.wire("identity", NOW)  # built forms grow entries after insertion
        assert store.bytes <= limit
    assert store.evictions > 4000
    assert store.bytes == sum(e.size for e in store.entries())
    assert 0 < len(store) < 5000


def test_clock_gives_visited_entries_a_second_chance() -> None:
    one = make_entry(b"https://h/0", b"x" * 100).size
    store = MemoryStore(one * 3 + 50, 10**6)
    entries = [make_entry(b"https://h/%d" % i, b"x" * 100) for i in range(3)]
    for entry in entries:
        store.put(entry)
    assert store.get(entries[0].primary, []) is entries[0]  # hot
    store.put(make_entry(b"https://h/new", b"x" * 100))
    assert store.get_key(entries[0].key) is entries[0]
    assert store.get_key(entries[1].key) is None  # the oldest unvisited one went
    assert store.evictions == 1


def test_entry_growth_after_insert_is_accounted_and_evicts() -> None:
    size = make_entry(body=b"x" * 1000).size
    store = MemoryStore(size * 2 + 500, 10**6)
    a = make_entry(b"https://h/a", b"x" * 1000)
    b = make_entry(b"https://h/b", b"x" * 1000)
    store.put(a)
    store.put(b)
    assert store.evictions == 0
    b.wire("identity", NOW)
    b.wire("identity", NOW)  # asked twice: +1000 bytes for the cached response
    assert store.bytes <= store.max_bytes
    assert store.evictions == 1 and store.get_key(a.key) is None


def test_vary_variants_are_looked_up_by_request_headers() -> None:
    store = MemoryStore(10**6, 10**5)
    names = (b"accept-language",)
    en_headers = [(b"accept-language", b"en")]
    fr_headers = [(b"accept-language", b"fr")]
    en = make_entry(body=b"hello", vary=names, secondary=vary_key(names, en_headers))
    fr = make_entry(body=b"bonjour", vary=names, secondary=vary_key(names, fr_headers))
    store.put(en)
    store.put(fr)
    assert store.get(en.primary, en_headers) is en
    assert store.get(en.primary, fr_headers) is fr
    assert store.get(en.primary, [(b"accept-language", b"de")]) is None
    assert store.get(en.primary, []) is None


def test_changed_vary_drops_old_variants() -> None:
    store = MemoryStore(10**6, 10**5)
    lang = (b"accept-language",)
    old = make_entry(vary=lang, secondary=vary_key(lang, [(b"accept-language", b"en")]))
    store.put(old)
    plain = make_entry(body=b"no vary now")
    store.put(plain)
    assert store.get_key(old.key) is None
    assert store.get(plain.primary, [(b"accept-language", b"en")]) is plain
    assert store.vary_names(plain.primary) is None
    assert len(store) == 1 and store.bytes == plain.size


def test_purge_by_primary_removes_every_variant() -> None:
    store = MemoryStore(10**6, 10**5)
    names = (b"accept-language",)
    for lang in (b"en", b"fr", b"de"):
        store.put(make_entry(vary=names, secondary=vary_key(names, [(b"accept-language", lang)])))
    store.put(make_entry(url=b"https://h/other"))
    assert store.remove_primary(b"G|https://h/x") == 3
    assert len(store) == 1


def test_purge_by_url_prefix_and_path_prefix() -> None:
    store = MemoryStore(10**6, 10**5)
    for url in (
        b"https://a.example/api/v1/ticker/BTC",
        b"https://a.example/api/v1/ticker/ETH",
        b"https://b.example/api/v1/ticker/BTC",
        b"https://a.example/api/v1/depth/BTC",
    ):
        store.put(make_entry(url=url))
    assert store.purge_url_prefix(b"https://a.example/api/v1/ticker/") == 2
    assert store.purge_path_prefix(b"/api/v1/ticker/") == 1
    assert [e.url for e in store.entries()] == [b"https://a.example/api/v1/depth/BTC"]


def test_purge_by_surrogate_key() -> None:
    store = MemoryStore(10**6, 10**5)
    store.put(make_entry(url=b"https://h/1", tags=("btc", "ticker")))
    store.put(make_entry(url=b"https://h/2", tags=("eth", "ticker")))
    store.put(make_entry(url=b"https://h/3", tags=("btc",)))
    assert store.purge_tag("btc") == 2
    assert [e.url for e in store.entries()] == [b"https://h/2"]
    assert store.purge_tag("btc") == 0
    assert store.purge_tag("ticker") == 1
    assert store.bytes == 0 and store._tags == {}


@pytest.mark.parametrize("replace", [True, False])
def test_bytes_stay_exact_through_replacement_and_removal(replace: bool) -> None:
    store = MemoryStore(10**6, 10**5)
    first = make_entry(body=b"a" * 100, tags=("t",))
    store.put(first)
    if replace:
        store.put(make_entry(body=b"b" * 300, tags=("u",)))
        assert store.purge_tag("t") == 0
        assert store.purge_tag("u") == 1
    else:
        assert store.remove_entry(first)
    assert store.bytes == 0 and len(store) == 0


# --------------------------------------------------------------------------------------------
# The path index behind prefix purges

_SEGMENTS = st.sampled_from([b"", b"a", b"ab", b"b", b"a?x=1", b"%2F"])
_PATHS = st.lists(_SEGMENTS, min_size=1, max_size=4).map(lambda parts: b"/" + b"/".join(parts))


@given(st.lists(st.tuples(_PATHS, st.booleans()), max_size=40), _PATHS)
def test_the_path_index_finds_exactly_what_a_scan_finds(
    operations: list[tuple[bytes, bool]], prefix: bytes
) -> None:
    index = PathIndex()
    stored: dict[bytes, bytes] = {}
    for i, (path, variant) in enumerate(operations):
        key = path + (b"\x00v%d" % i if variant else b"")
        if key in stored and i % 3 == 0:
            index.discard(path, key)
            del stored[key]
        else:
            index.add(path, key)
            stored[key] = path
    found = index.under(prefix)
    assert len(found) == len(set(found))
    assert set(found) == {key for key, path in stored.items() if path.startswith(prefix)}
    for key, path in stored.items():
        index.discard(path, key)
    assert index.under(b"/") == [] and index._root.children in (None, {})


def test_prefix_purges_go_through_the_index(monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryStore(10**7, 10**5)
    for url in (b"https://a.test/api/v1/x", b"https://a.test/api/v2/y", b"https://b.test/api/v1/z"):
        store.put(make_entry(url))

    def no_scan(*_: object) -> None:
        raise AssertionError("a prefix purge scanned every entry")

    monkeypatch.setattr(MemoryStore, "matching", no_scan)
    monkeypatch.setattr(MemoryStore, "purge_where", no_scan)
    assert store.purge_path_prefix(b"/api/v1/") == 2
    assert store.purge_url_prefix(b"https://a.test/api/") == 1
    assert len(store) == 0
