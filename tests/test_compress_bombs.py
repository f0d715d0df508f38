"""Decompression bombs in bounded memory: the decoder hands out bounded pieces, a body in memory
is measured without being kept, and the transcoder never holds a decoded bomb (issue 21, 14).

Memory is read with tracemalloc (zlib's and Brotli's output buffers are Python bytes objects,
so it sees them); the end-to-end RSS figures are in ``test_reliability_cache.py``.
"""

from __future__ import annotations

import asyncio
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import brotli
import pytest

from edge.compress import DECODE_STEP, BoundedDecoder, DecompressionBomb, decoded_size
from edge.exchange import OutgoingResponse
from edge.transcode import DECODE_WHOLE_MAX, BodyError, CompressionStats, Transcoder, decode_whole
from meridian.config import CompressionConfig

MiB = 1 << 20
LIMIT = 64 * MiB  # the default compression.max_decoded_size


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """1 GiB of zeros as gzip (~1 MB) and as Brotli (a few KB), never held whole."""
    zeros = bytes(MiB)
    gz = zlib.compressobj(9, zlib.DEFLATED, 31)
    gzip_bomb = b"".join(gz.compress(zeros) for _ in range(1024)) + gz.flush()
    br = brotli.Compressor(quality=1)
    brotli_bomb = b"".join(bytes(br.process(zeros)) for _ in range(1024)) + bytes(br.finish())
    return {"gzip": gzip_bomb, "br": brotli_bomb}


def peak_of(run: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_pieces_are_bounded_and_a_bomb_stops_at_the_limit(
    coding: str, bombs: dict[str, bytes]
) -> None:
    bomb = bombs[coding]
    decoder = BoundedDecoder(coding, 8 * MiB)
    largest = produced = 0

    def run() -> None:
        nonlocal largest, produced
        with pytest.raises(DecompressionBomb):
            for piece in decoder.pieces(bomb):  # the whole bomb as one chunk
                largest = max(largest, len(piece))
                produced += len(piece)

    peak = peak_of(run)
    assert produced <= 8 * MiB
    assert largest <= 2 * DECODE_STEP  # Brotli may give up to twice what is asked
    # Before: one decompress call produced the whole limit (8 MiB here, 64 MiB by default).
    assert peak < 3 * MiB, f"peak {peak / MiB:.1f} MiB"


@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_measuring_a_1_gib_bomb_keeps_nothing(coding: str, bombs: dict[str, bytes]) -> None:
    def run() -> None:
        with pytest.raises(DecompressionBomb):
            decoded_size(bombs[coding], coding, LIMIT)

    assert peak_of(run) < 3 * MiB


@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_decode_whole_of_a_bomb_with_the_default_limit_stays_small(
    coding: str, bombs: dict[str, bytes]
) -> None:
    stats = CompressionStats()

    def run() -> None:
        with pytest.raises(DecompressionBomb):
            decode_whole(bombs[coding], coding.encode(), LIMIT, stats)

    peak = peak_of(run)
    # Before: the 64 MiB of output (and zlib's copy of it while joining) was held: ~128 MiB.
    assert peak < 3 * MiB, f"peak {peak / MiB:.1f} MiB"
    assert stats.bombs == 1


def test_decoder_round_trips_in_bounded_pieces_across_members_and_tails() -> None:
    body = bytes(range(256)) * 20_000  # 5 MB, compresses well
    member = zlib.compressobj(6, zlib.DEFLATED, 31)
    encoded = member.compress(body) + member.flush()
    encoded += encoded  # two gzip members back to back
    decoder = BoundedDecoder("gzip", 2 * len(body), step=64 * 1024)
    pieces = [
        p
        for start in range(0, len(encoded), 4096)
        for p in decoder.pieces(encoded[start : start + 4096])
    ]
    pieces.append(decoder.finish())
    assert b"".join(pieces) == body + body
    assert max(len(p) for p in pieces) <= 64 * 1024
    assert decoder.produced == 2 * len(body)


def _response(data: bytes, coding: bytes) -> OutgoingResponse:
    async def body() -> AsyncIterator[bytes]:
        yield data

    return OutgoingResponse(
        200,
        b"OK",
        [(b"content-type", b"application/octet-stream"), (b"content-encoding", coding)],
        len(data),
        body(),
        data=data,
    )


async def _collect(response: OutgoingResponse) -> list[bytes]:
    assert response.body is not None
    return [chunk async for chunk in response.body]


@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_a_bomb_in_memory_is_a_502_before_anything_is_decoded_for_the_client(
    coding: str, bombs: dict[str, bytes]
) -> None:
    transcoder = Transcoder(CompressionStats())
    config = CompressionConfig(max_decoded_size=LIMIT)

    def run() -> None:
        with pytest.raises(BodyError, match="decompression_bomb"):
            transcoder.encode(_response(bombs[coding], coding.encode()), None, "r", config)

    assert peak_of(run) < 3 * MiB
    assert transcoder.stats.bombs == 1


def test_a_large_body_in_memory_is_decoded_piece_by_piece_with_its_exact_length() -> None:
    body = (b"market data row 0123456789\n" * 200_000)[: 5 * MiB]
    encoded = _gzip(body)
    transcoder = Transcoder(CompressionStats())
    config = CompressionConfig(max_decoded_size=LIMIT, enabled=False)
    out = transcoder.encode(_response(encoded, b"gzip"), None, "r", config)
    assert out.data is None and out.length == len(body) > DECODE_WHOLE_MAX
    pieces = asyncio.run(_collect(out))
    assert b"".join(pieces) == body
    assert max(len(p) for p in pieces) <= DECODE_STEP
    assert (b"content-encoding", b"gzip") not in out.headers


def test_a_small_body_in_memory_is_still_decoded_whole() -> None:
    body = b'{"symbol": "BTC-USD"}' * 100
    transcoder = Transcoder(CompressionStats())
    out = transcoder.encode(
        _response(_gzip(body), b"gzip"), None, "r", CompressionConfig(enabled=False)
    )
    assert out.data == body and out.length == len(body)


def _gzip(body: bytes) -> bytes:
    encoder = zlib.compressobj(6, zlib.DEFLATED, 31)
    return encoder.compress(body) + encoder.flush()
