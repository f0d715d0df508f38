"""Tests for edge.compress: negotiation, eligibility, encoding, bounded decoding, headers."""

from __future__ import annotations

import gzip
import itertools
import json
import random
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Iterator

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edge.compress as compress_module
from edge.compress import (
    NEGOTIATION_MEMO_MAX_KEY,
    NEGOTIATION_MEMO_SIZE,
    BoundedDecoder,
    Coding,
    DecompressionBomb,
    StreamCompressor,
    accepts,
    add_vary_accept_encoding,
    compress,
    compress_offloop,
    encoded_headers,
    is_compressible,
    negotiate,
)
from meridian.config import CompressionConfig

Headers = list[tuple[bytes, bytes]]
MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _fresh_memo() -> Iterator[None]:
    compress_module._memo.clear()
    yield
    compress_module._memo.clear()


def decode(body: bytes, coding: str) -> bytes:
    if coding == "br":
        return bytes(brotli.decompress(body))
    if coding == "gzip":
        return gzip.decompress(body)
    assert coding == "identity"
    return body


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --------------------------------------------------------------------------------------------
# negotiate


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        # absent and empty: identity
        (None, "identity"),
        (b"", "identity"),
        (b"   ", "identity"),
        (b",,,", "identity"),
        # plain lists
        (b"gzip", "gzip"),
        (b"br", "br"),
        (b"identity", "identity"),
        (b"deflate", "identity"),
        (b"gzip, deflate, br", "br"),
        (b"gzip, deflate, br, zstd", "br"),
        # q-values
        (b"br;q=1, gzip;q=0.8", "br"),
        (b"br;q=0.5, gzip;q=0.8", "gzip"),
        (b"gzip;q=0.8, br;q=0.8", "br"),
        (b"gzip;q=0.5", "gzip"),
        (b"br;q=0.001", "br"),
        (b"gzip;q=0.5, identity", "identity"),
        (b"gzip;q=0.5, identity;q=0.5", "gzip"),
        (b"br;q=1.000", "br"),
        (b"br;q=1.", "br"),
        (b"gzip;q=0", "identity"),
        (b"br;q=0.", "identity"),
        (b"br;q=0.000, gzip;q=0.000", "identity"),
        # wildcard
        (b"*", "br"),
        (b"*;q=0.5, br;q=0", "gzip"),
        (b"*;q=0.3, gzip;q=0.2", "br"),
        (b"*;q=0.3, br;q=0.2, gzip;q=0.2", "identity"),
        (b"*;q=0, identity", "identity"),
        (b"*;q=0, identity;q=0.1", "identity"),
        (b"*;q=0, gzip", "gzip"),
        (b"identity;q=0.5, *;q=0", "identity"),
        # nothing acceptable
        (b"*;q=0", None),
        (b"identity;q=0", None),
        (b"identity;q=0, deflate", None),
        (b"br;q=0, gzip;q=0, identity;q=0", None),
        (b"*;q=0, br;q=0", None),
        # identity refused but a coding allowed
        (b"identity;q=0, gzip", "gzip"),
        (b"identity;q=0, *", "br"),
        # case, aliases, whitespace
        (b"GZIP", "gzip"),
        (b"Br;Q=0.9, gzip;q=0.1", "br"),
        (b"x-gzip", "gzip"),
        (b"X-GZIP;q=0.7, br;q=0.6", "gzip"),
        (b"  gzip  ;  q=0.5  ,  br ; q=0.4 ", "gzip"),
        (b"gzip;q = 0.5, br;q=0.4", "gzip"),
        (b"\tbr\t", "br"),
        # malformed elements are ignored (so their coding is not accepted)
        (b"gzip;q=", "identity"),
        (b"gzip;q", "identity"),
        (b"br;q=2, gzip", "gzip"),
        (b"br;q=1.001, gzip", "gzip"),
        (b"br;q=0.0001, gzip;q=0.1", "gzip"),
        (b"br;q=abc, gzip;q=0.1", "gzip"),
        (b"br;q=-1", "identity"),
        (b"br;q=.5", "identity"),
        (b"br;q=0.5;q=0.6, gzip;q=0.1", "gzip"),
        (b"br;q=0.5x", "identity"),
        (b"gzip;q=0, br;q=", "identity"),
        (b"identity;q=0, br;q=", None),
        # unknown parameters are tolerated
        (b"br;level=5", "br"),
        (b"br;level=5;q=0.1, gzip;q=0.05", "br"),
        # duplicates: the lowest q-value wins
        (b"gzip, gzip;q=0", "identity"),
        (b"gzip;q=0, gzip", "identity"),
        (b"gzip;q=0.2, x-gzip;q=0.9, br;q=0.5", "br"),
        (b"br, br, br", "br"),
        # garbage bytes
        (b"\xff\xfe\x00gzip, br\x80", "identity"),
        (b"\x00\x01\x02", "identity"),
        (b"gzip\xff, \xc3\xa9, br", "br"),
        (b";;;q=1,=,;", "identity"),
    ],
)
def test_negotiate(header: bytes | None, expected: Coding | None) -> None:
    assert negotiate(header) == expected
    assert negotiate(header) == expected  # the memoized answer is the same


NAMES = ["br", "gzip", "x-gzip", "identity", "*", "deflate", "zstd", "BR", "Gzip", "IDENTITY"]
VALID_Q = st.integers(0, 1000).map(lambda q: f"{q // 1000}.{q % 1000:03d}".rstrip("0") or "0")
MALFORMED_Q = st.sampled_from(["", "2", "1.5", "0.0001", "-0", "abc", ".5", "0.5.5", "1e-1", "q"])


@st.composite
def accept_elements(draw: st.DrawFn) -> tuple[str, str, int | None]:
    """(name, element text, q in thousandths or None when the element is malformed)."""
    name = draw(st.sampled_from(NAMES))
    kind = draw(st.sampled_from(["bare", "valid", "malformed"]))
    space = draw(st.sampled_from(["", " ", "  ", "\t"]))
    if kind == "bare":
        return name, f"{space}{name}{space}", 1000
    if kind == "valid":
        q_text = draw(VALID_Q)
        q_value = round(float(q_text) * 1000)
        return name, f"{space}{name}{space};{space}q={q_text}", q_value
    return name, f"{name};q={draw(MALFORMED_Q)}", None


def model_weights(elements: list[tuple[str, str, int | None]]) -> dict[str, float]:
    """An independent statement of the rules: doubled weights, implicit identity = 1 (a half)."""
    listed: dict[str, int] = {}
    for name, _, q in elements:
        if q is None:
            continue
        key = {"x-gzip": "gzip"}.get(name.lower(), name.lower())
        listed[key] = min(listed.get(key, 1000), q)
    star = listed.get("*")
    weights: dict[str, float] = {}
    for coding in ("br", "gzip"):
        weights[coding] = 2 * listed.get(coding, star if star is not None else 0)
    if "identity" in listed:
        weights["identity"] = 2 * listed["identity"]
    elif star is not None:
        weights["identity"] = 2 * star
    else:
        weights["identity"] = 1  # acceptable, below any listed coding
    return weights


@given(st.lists(accept_elements(), max_size=8), st.sampled_from([",", ", ", " , "]))
def test_negotiate_chooses_an_acceptable_coding_with_maximal_q(
    elements: list[tuple[str, str, int | None]], separator: str
) -> None:
    header = separator.join(text for _, text, _ in elements).encode()
    weights = model_weights(elements)
    choice = negotiate(header)
    best = max(weights.values())
    if best == 0:
        assert choice is None
        return
    assert choice is not None
    assert weights[choice] > 0, "chosen coding must be acceptable"
    assert weights[choice] == best, "chosen coding must have the highest q"
    preferred = next(c for c in ("br", "gzip", "identity") if weights[c] == best)
    assert choice == preferred
    assert accepts(header, choice)


@given(st.binary(max_size=300))
def test_negotiate_never_fails_on_arbitrary_bytes(header: bytes) -> None:
    choice = negotiate(header)
    assert choice in ("br", "gzip", "identity", None)
    assert negotiate(header) == choice
    if choice is not None:
        assert accepts(header, choice)


def test_negotiation_memo_is_bounded_and_evicts_oldest() -> None:
    memo = compress_module._memo
    headers = [f"gzip;q=0.{i % 1000:03d}, x{i}".encode() for i in range(NEGOTIATION_MEMO_SIZE + 50)]
    for header in headers:
        negotiate(header)
    assert len(memo) == NEGOTIATION_MEMO_SIZE
    assert headers[0] not in memo
    assert headers[-1] in memo


def test_negotiation_memo_hit_returns_the_stored_answer() -> None:
    negotiate(b"gzip, br")
    # A planted answer proves that a repeat is served from the memo, not re-parsed.
    memo = compress_module._memo
    memo[b"gzip, br"] = compress_module._Acceptance("gzip", frozenset(), frozenset(), None)
    assert negotiate(b"gzip, br") == "gzip"


def test_negotiation_memo_skips_long_values() -> None:
    long_header = b"gzip, " + b"x" * NEGOTIATION_MEMO_MAX_KEY
    assert negotiate(long_header) == "gzip"
    assert long_header not in compress_module._memo


# --------------------------------------------------------------------------------------------
# accepts


@pytest.mark.parametrize(
    ("header", "coding", "expected"),
    [
        (None, "gzip", False),
        (None, "br", False),
        (None, "identity", True),
        (b"", "gzip", False),
        (b"", "identity", True),
        (b"gzip", "gzip", True),
        (b"gzip", "x-gzip", True),
        (b"x-gzip", "gzip", True),
        (b"gzip", "br", False),
        (b"gzip", "GZIP", True),
        (b"gzip;q=0", "gzip", False),
        (b"gzip;q=", "gzip", False),
        (b"deflate", "deflate", True),
        (b"zstd, br", "zstd", True),
        (b"*", "deflate", True),
        (b"*", "br", True),
        (b"*;q=0", "identity", False),
        (b"*;q=0, gzip", "gzip", True),
        (b"*;q=0, gzip", "br", False),
        (b"*, br;q=0", "br", False),
        (b"identity;q=0", "identity", False),
        (b"identity;q=0, gzip", "gzip", True),
        (b"br", "identity", True),
        (b"gzip", "\xe9", False),
    ],
)
def test_accepts(header: bytes | None, coding: str, expected: bool) -> None:
    assert accepts(header, coding) is expected


# --------------------------------------------------------------------------------------------
# is_compressible

JSON: Headers = [(b"content-type", b"application/json")]
CONFIG = CompressionConfig()


@pytest.mark.parametrize(
    ("status", "headers", "kwargs", "expected"),
    [
        (200, JSON, {}, True),
        (200, JSON, {"body_size": 256}, True),
        (200, JSON, {"body_size": 255}, False),
        (200, [*JSON, (b"content-length", b"100")], {}, False),
        (200, [*JSON, (b"content-length", b"5000")], {}, True),
        (200, [*JSON, (b"content-length", b"100")], {"body_size": 5000}, True),
        (200, [*JSON, (b"content-length", b"junk")], {}, True),
        (200, [(b"content-type", b"application/json; charset=utf-8")], {}, True),
        (200, [(b"content-type", b"Application/JSON")], {}, True),
        (200, [(b"content-type", b"text/html")], {}, True),
        (200, [(b"content-type", b"text/csv; charset=utf-8")], {}, True),
        (200, [(b"content-type", b"application/problem+json")], {}, True),
        (200, [(b"content-type", b"image/svg+xml")], {}, True),
        (200, [(b"content-type", b"image/png")], {}, False),
        (200, [(b"content-type", b"application/octet-stream")], {}, False),
        (200, [(b"content-type", b"textual/plain")], {}, False),
        (200, [(b"content-type", b"application/jsonp")], {}, False),
        (200, [], {}, False),
        (404, JSON, {}, True),
        (500, JSON, {}, True),
        (100, JSON, {}, False),
        (101, JSON, {}, False),
        (204, JSON, {}, False),
        (304, JSON, {}, False),
        (206, JSON, {}, False),
        (200, [*JSON, (b"content-range", b"bytes 0-99/1000")], {}, False),
        (200, [*JSON, (b"content-encoding", b"gzip")], {}, False),
        (200, [*JSON, (b"content-encoding", b"br")], {}, False),
        (200, [*JSON, (b"content-encoding", b"identity")], {}, True),
        (200, [*JSON, (b"content-encoding", b" Identity ")], {}, True),
        (200, [*JSON, (b"cache-control", b"no-transform")], {}, False),
        (200, [*JSON, (b"cache-control", b"public, max-age=5, No-Transform")], {}, False),
        (200, [*JSON, (b"cache-control", b"public, max-age=5")], {}, True),
        (200, [*JSON, (b"set-cookie", b"session=abc")], {}, False),
        (200, JSON, {"route": "public"}, True),
        (200, JSON, {"route": None}, True),
    ],
)
def test_is_compressible(
    status: int, headers: Headers, kwargs: dict[str, object], expected: bool
) -> None:
    route = kwargs.get("route")
    body_size = kwargs.get("body_size")
    assert route is None or isinstance(route, str)
    assert body_size is None or isinstance(body_size, int)
    assert is_compressible(status, headers, CONFIG, route=route, body_size=body_size) is expected


def test_is_compressible_follows_config_switches() -> None:
    assert not is_compressible(200, JSON, CompressionConfig(enabled=False))
    assert not is_compressible(
        200, JSON, CompressionConfig(disable_routes=("account",)), route="account"
    )
    assert is_compressible(
        200, JSON, CompressionConfig(disable_routes=("account",)), route="public"
    )
    cookie = [*JSON, (b"set-cookie", b"a=b")]
    assert is_compressible(200, cookie, CompressionConfig(disable_with_set_cookie=False))
    only_csv = CompressionConfig(types=("text/csv",))
    assert is_compressible(200, [(b"content-type", b"text/csv")], only_csv)
    assert not is_compressible(200, [(b"content-type", b"text/html")], only_csv)
    assert not is_compressible(200, JSON, only_csv)
    assert is_compressible(200, JSON, CompressionConfig(min_size=0), body_size=0)


# --------------------------------------------------------------------------------------------
# compress / compress_offloop

CODINGS: list[Coding] = ["br", "gzip", "identity"]


@pytest.mark.parametrize("coding", CODINGS)
@given(body=st.binary(max_size=5000))
@settings(max_examples=40)
def test_compress_round_trips(coding: Coding, body: bytes) -> None:
    assert decode(compress(body, coding, 5), coding) == body


@pytest.mark.parametrize(("coding", "level"), [("br", 0), ("br", 11), ("gzip", 1), ("gzip", 9)])
def test_compress_round_trips_at_extreme_levels(coding: Coding, level: int) -> None:
    body = b'{"bids": [["64000.10", "0.5"]]}' * 300
    encoded = compress(body, coding, level)
    assert len(encoded) < len(body) // 10
    assert decode(encoded, coding) == body


def test_compress_gzip_is_deterministic() -> None:
    body = b"same body on every POP" * 100
    assert compress(body, "gzip", 6) == compress(body, "gzip", 6)


def test_compress_rejects_unknown_coding() -> None:
    with pytest.raises(ValueError):
        compress(b"x", "deflate", 6)  # type: ignore[arg-type]


@pytest.mark.parametrize("coding", ["br", "gzip"])
async def test_compress_offloop_uses_a_thread_only_above_the_threshold(
    coding: Coding, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    real = compress_module.compress

    def recording(body: bytes, coding: Coding, level: int) -> bytes:
        threads.append(threading.get_ident())
        return real(body, coding, level)

    monkeypatch.setattr(compress_module, "compress", recording)
    small, large = b"a" * 1000, b"b" * 5000
    assert decode(await compress_offloop(small, coding, 4, offload_above=1000), coding) == small
    assert decode(await compress_offloop(large, coding, 4, offload_above=1000), coding) == large
    loop_thread = threading.get_ident()
    assert threads == [loop_thread, threads[1]]
    assert threads[1] != loop_thread


async def test_compress_offloop_identity_is_the_body() -> None:
    body = b"x" * 10
    assert await compress_offloop(body, "identity", 0, offload_above=0) is body


# --------------------------------------------------------------------------------------------
# StreamCompressor


@pytest.mark.parametrize("coding", CODINGS)
@given(chunks=st.lists(st.binary(max_size=2000), max_size=12))
@settings(max_examples=40)
def test_stream_compressor_round_trips_any_chunking(coding: Coding, chunks: list[bytes]) -> None:
    stream = StreamCompressor(coding, 4)
    encoded = b"".join(stream.compress(chunk) for chunk in chunks) + stream.finish()
    assert decode(encoded, coding) == b"".join(chunks)


@pytest.mark.parametrize("coding", ["br", "gzip"])
def test_stream_compressor_emits_each_chunk_before_finish(coding: Coding) -> None:
    stream = StreamCompressor(coding, 4)
    read: Callable[[bytes], bytes] = (
        zlib.decompressobj(31).decompress if coding == "gzip" else brotli.Decompressor().process
    )
    seen = b""
    for i in range(5):
        chunk = json.dumps({"seq": i, "price": f"{64000 + i}.5"}).encode()
        out = stream.compress(chunk)
        assert out, "each chunk must produce output immediately"
        seen += read(out)
        assert seen.endswith(chunk), "a client can decode everything sent so far"
    assert stream.compress(b"") == b""
    seen += read(stream.finish())
    assert seen == b"".join(
        json.dumps({"seq": i, "price": f"{64000 + i}.5"}).encode() for i in range(5)
    )


def test_stream_compressor_refuses_use_after_finish() -> None:
    stream = StreamCompressor("gzip", 4)
    stream.finish()
    with pytest.raises(RuntimeError):
        stream.compress(b"late")
    with pytest.raises(RuntimeError):
        stream.finish()


# --------------------------------------------------------------------------------------------
# BoundedDecoder


def run_decoder(decoder: BoundedDecoder, chunks: list[bytes]) -> bytes:
    return b"".join(decoder.decode(chunk) for chunk in chunks) + decoder.finish()


def encode_for_upstream(body: bytes, coding: str) -> bytes:
    if coding in ("gzip", "x-gzip"):
        return gzip.compress(body)
    if coding == "br":
        return bytes(brotli.compress(body, quality=5))
    if coding == "deflate":
        return zlib.compress(body)
    assert coding == "raw-deflate"
    raw = zlib.compressobj(6, zlib.DEFLATED, -15)
    return raw.compress(body) + raw.flush()


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "br", "deflate", "raw-deflate"])
@given(body=st.binary(max_size=20000), cuts=st.lists(st.integers(0, 30000), max_size=6))
@settings(max_examples=30)
def test_bounded_decoder_decodes_any_chunking(coding: str, body: bytes, cuts: list[int]) -> None:
    encoded = encode_for_upstream(body, coding)
    name = "deflate" if coding == "raw-deflate" else coding
    assert run_decoder(BoundedDecoder(name, len(body)), split_at(encoded, cuts)) == body


def test_bounded_decoder_handles_multi_member_gzip() -> None:
    encoded = gzip.compress(b"first ") + gzip.compress(b"second")
    assert run_decoder(BoundedDecoder("gzip", 100), [encoded]) == b"first second"
    assert run_decoder(BoundedDecoder("gzip", 100), [encoded[:25], encoded[25:]]) == (
        b"first second"
    )


@pytest.mark.parametrize("coding", ["gzip", "br", "deflate"])
def test_bounded_decoder_limit_is_exact(coding: str) -> None:
    body = bytes(range(256)) * 40
    encoded = encode_for_upstream(body, coding)
    assert run_decoder(BoundedDecoder(coding, len(body)), [encoded]) == body
    with pytest.raises(DecompressionBomb):
        run_decoder(BoundedDecoder(coding, len(body) - 1), [encoded])


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """100 MiB of zeros as a ~100 KB gzip body, built without holding the 100 MiB."""
    encoder = zlib.compressobj(4, zlib.DEFLATED, 31)
    zeros = bytes(MiB)
    bomb = b"".join(encoder.compress(zeros) for _ in range(100)) + encoder.flush()
    assert len(bomb) < 200_000
    return bomb


@pytest.fixture(scope="module")
def brotli_bomb() -> bytes:
    encoder = brotli.Compressor(quality=1)
    zeros = bytes(MiB)
    bomb = b"".join(bytes(encoder.process(zeros)) for _ in range(100)) + bytes(encoder.finish())
    assert len(bomb) < 200_000
    return bomb


@pytest.mark.parametrize("chunk_size", [1 << 30, 16 * 1024])
@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_bounded_decoder_stops_a_bomb_without_expanding_it(
    coding: str, chunk_size: int, gzip_bomb: bytes, brotli_bomb: bytes
) -> None:
    bomb = gzip_bomb if coding == "gzip" else brotli_bomb
    decoder = BoundedDecoder(coding, MiB)
    produced = 0
    tracemalloc.start()
    try:
        with pytest.raises(DecompressionBomb):
            for start in range(0, len(bomb), chunk_size):
                produced += len(decoder.decode(bomb[start : start + chunk_size]))
            decoder.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert produced <= MiB
    # The limit plus Brotli's overshoot and bookkeeping: nowhere near the 100 MiB.
    assert peak < 4 * MiB, f"peak {peak} bytes"


@pytest.mark.parametrize(
    ("coding", "chunks"),
    [
        ("gzip", [b"this is not gzip at all"]),
        ("gzip", [gzip.compress(b"hello")[:-4] + b"\x00\x00\x00\x00"]),  # bad CRC/size
        ("gzip", [gzip.compress(b"hello")[:12]]),  # truncated
        ("gzip", [gzip.compress(b"hello") + b"trailing garbage"]),
        ("x-gzip", [b"\x1f\x8b\x08\x00" + b"\xff" * 40]),
        ("br", [b"this is not brotli at all"]),
        ("br", [bytes(brotli.compress(b"hello" * 100))[:-3]]),  # truncated
        ("br", [bytes(brotli.compress(b"hello")), b"trailing"]),
        ("deflate", [b"\x78\x9c" + b"\xff" * 40]),
        ("deflate", [zlib.compress(b"hello")[:-2]]),  # truncated
        ("deflate", [zlib.compress(b"hello") + b"more"]),
        ("deflate", [b"x"]),  # one byte: cannot even be a header
    ],
)
def test_bounded_decoder_rejects_corrupt_input(coding: str, chunks: list[bytes]) -> None:
    with pytest.raises(ValueError):
        run_decoder(BoundedDecoder(coding, MiB), chunks)


def test_bounded_decoder_rejects_unknown_coding_and_reuse() -> None:
    with pytest.raises(ValueError):
        BoundedDecoder("compress", MiB)
    decoder = BoundedDecoder("gzip", MiB)
    assert run_decoder(decoder, [gzip.compress(b"ok")]) == b"ok"
    with pytest.raises(RuntimeError):
        decoder.decode(b"more")


def test_bounded_decoder_ignores_empty_chunks() -> None:
    decoder = BoundedDecoder("br", MiB)
    assert decoder.decode(b"") == b""
    assert run_decoder(decoder, [bytes(brotli.compress(b"data")), b""]) == b"data"


# --------------------------------------------------------------------------------------------
# encoded_headers / add_vary_accept_encoding


def values(headers: Headers, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]


ORIGIN: Headers = [
    (b"content-type", b"application/json"),
    (b"content-length", b"5000"),
    (b"etag", b'"v1"'),
    (b"accept-ranges", b"bytes"),
    (b"cache-control", b"max-age=1"),
]


@pytest.mark.parametrize("coding", ["br", "gzip"])
def test_encoded_headers_for_a_compressed_variant(coding: Coding) -> None:
    original = list(ORIGIN)
    headers = encoded_headers(ORIGIN, coding)
    assert original == ORIGIN, "the input list is not mutated"
    assert values(headers, b"content-encoding") == [coding.encode()]
    assert values(headers, b"content-length") == []
    assert values(headers, b"accept-ranges") == []
    assert values(headers, b"etag") == [b'W/"v1"']
    assert values(headers, b"vary") == [b"accept-encoding"]
    assert values(headers, b"cache-control") == [b"max-age=1"]
    assert values(headers, b"content-type") == [b"application/json"]


def test_encoded_headers_for_identity_only_adds_vary() -> None:
    headers = encoded_headers(ORIGIN, "identity")
    assert headers == [*ORIGIN, (b"vary", b"accept-encoding")]


def test_encoded_headers_keeps_a_weak_etag_and_replaces_identity_encoding() -> None:
    headers = encoded_headers([(b"etag", b'W/"v2"'), (b"content-encoding", b"identity")], "gzip")
    assert values(headers, b"etag") == [b'W/"v2"']
    assert values(headers, b"content-encoding") == [b"gzip"]


@pytest.mark.parametrize(
    ("vary", "expected"),
    [
        ([], [b"accept-encoding"]),
        ([b"origin"], [b"origin, accept-encoding"]),
        ([b"Origin, Accept-Language"], [b"Origin, Accept-Language, accept-encoding"]),
        ([b"Accept-Encoding"], [b"Accept-Encoding"]),
        ([b"origin, accept-encoding"], [b"origin, accept-encoding"]),
        ([b"origin", b"ACCEPT-ENCODING"], [b"origin", b"ACCEPT-ENCODING"]),
        ([b"origin", b"accept-language"], [b"origin, accept-encoding", b"accept-language"]),
        ([b"*"], [b"*"]),
        ([b"origin", b"*"], [b"origin", b"*"]),
        ([b"origin,"], [b"origin, accept-encoding"]),
        ([b""], [b"accept-encoding"]),
    ],
)
def test_vary_is_merged_not_duplicated(vary: list[bytes], expected: list[bytes]) -> None:
    headers: Headers = [(b"content-type", b"text/plain"), *((b"vary", v) for v in vary)]
    for result in (add_vary_accept_encoding(headers), encoded_headers(headers, "br")):
        assert values(result, b"vary") == expected
    assert values(headers, b"vary") == vary


# --------------------------------------------------------------------------------------------
# Compression ratio on market data (the infrastructure plan's 70% target)


def _decimal(rng: random.Random, low: float, high: float, places: int) -> str:
    return f"{rng.uniform(low, high):.{places}f}"


def _qty(rng: random.Random) -> str:
    # Lot sizes: a few significant digits, padded to 8 decimals as exchanges print them.
    return f"{round(rng.lognormvariate(-2, 1.5), rng.randint(2, 5)):.8f}"


def ticker_json(rng: random.Random) -> bytes:
    """24h statistics for four symbols, Binance-shaped: prices on the tick grid, 8 decimals."""
    tickers = []
    for symbol, mid, tick in [
        ("BTCUSDT", 64000, 0.01),
        ("ETHUSDT", 3100, 0.01),
        ("SOLUSDT", 150, 0.01),
        ("XRPUSDT", 0.6, 0.0001),
    ]:

        def price(value: float, tick: float = tick) -> str:
            return f"{round(value / tick) * tick:.8f}"

        last = mid * rng.uniform(0.97, 1.03)
        opened = mid * rng.uniform(0.97, 1.03)
        first_id = rng.randint(3_000_000_000, 4_000_000_000)
        count = rng.randint(500_000, 2_000_000)
        open_time = 1_716_000_000_000 + rng.randint(0, 10**6)
        tickers.append(
            {
                "symbol": symbol,
                "priceChange": price(last - opened),
                "priceChangePercent": f"{(last - opened) / opened * 100:.3f}",
                "weightedAvgPrice": _decimal(rng, mid * 0.99, mid * 1.01, 8),
                "prevClosePrice": price(opened),
                "lastPrice": price(last),
                "lastQty": _qty(rng),
                "bidPrice": price(last - tick),
                "bidQty": _qty(rng),
                "askPrice": price(last),
                "askQty": _qty(rng),
                "openPrice": price(opened),
                "highPrice": price(max(last, opened) * rng.uniform(1, 1.02)),
                "lowPrice": price(min(last, opened) * rng.uniform(0.98, 1)),
                "volume": f"{rng.uniform(1e3, 1e6):.5f}000",
                "quoteVolume": _decimal(rng, 1e7, 1e9, 8),
                "openTime": open_time,
                "closeTime": open_time + 86_400_000 - 1,
                "firstId": first_id,
                "lastId": first_id + count - 1,
                "count": count,
            }
        )
    return json.dumps(tickers, separators=(",", ":")).encode()


def depth_json(rng: random.Random, levels: int = 850) -> bytes:
    mid, tick = 64000.0, 0.01

    def side(direction: int) -> list[list[str]]:
        price, rows = mid, []
        for _ in range(levels):
            price += direction * tick * rng.choice([1, 1, 1, 2, 3, 5, 10, 25])
            rows.append([f"{price:.8f}", _qty(rng)])
        return rows

    book = {"lastUpdateId": rng.randint(10**10, 10**11), "bids": side(-1), "asks": side(1)}
    return json.dumps(book, separators=(",", ":")).encode()


def trades_json(rng: random.Random, count: int = 60) -> bytes:
    trade_id, time_ms, price = rng.randint(3 * 10**9, 4 * 10**9), 1_716_000_000_000, 64000.0
    trades = []
    for _ in range(count):
        trade_id += 1
        time_ms += rng.randint(0, 400)
        price += rng.choice([-1, 0, 1]) * 0.01 * rng.randint(1, 50)
        qty = _qty(rng)
        trades.append(
            {
                "id": trade_id,
                "price": f"{price:.8f}",
                "qty": qty,
                "quoteQty": f"{price * float(qty):.8f}",
                "time": time_ms,
                "isBuyerMaker": rng.random() < 0.5,
                "isBestMatch": True,
            }
        )
    return json.dumps(trades, separators=(",", ":")).encode()


MARKET_DATA = {
    "ticker": (ticker_json, 2_000),
    "depth": (depth_json, 50_000),
    "trades": (trades_json, 10_000),
}
TICKER_GZIP_SHORTFALL = pytest.mark.xfail(
    strict=True,
    reason="measured 68.5% at gzip 6 (68.8% at 9): a ~2 KB body of mostly unique digits leaves "
    "deflate too little repetition; Brotli's built-in dictionary reaches 72%",
)


@pytest.mark.parametrize(
    ("kind", "coding"),
    [
        ("ticker", "br"),
        pytest.param("ticker", "gzip", marks=TICKER_GZIP_SHORTFALL),
        ("depth", "br"),
        ("depth", "gzip"),
        ("trades", "br"),
        ("trades", "gzip"),
    ],
)
def test_market_data_compresses_by_at_least_70_percent(kind: str, coding: Coding) -> None:
    make, approx_size = MARKET_DATA[kind]
    body = make(random.Random(7))
    assert 0.6 * approx_size < len(body) < 1.6 * approx_size, len(body)
    config = CompressionConfig()
    level = config.cached_brotli_quality if coding == "br" else config.cached_gzip_level
    encoded = compress(body, coding, level)
    saving = 1 - len(encoded) / len(body)
    print(
        f"{kind}: {len(body)} B -> {coding} {len(encoded)} B at level {level}, saving {saving:.1%}"
    )
    assert decode(encoded, coding) == body
    assert saving >= 0.70, f"{kind} {coding} saves only {saving:.1%}"
