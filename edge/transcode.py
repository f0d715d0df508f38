"""The compression stage of the request path (``Pipeline.encode_response``) and its metrics.

* Cached responses: the cache builds each coding's body once, through ``cached_compressor``
  (``edge.compress.compress`` at the cached levels, counted here); nothing in this module runs
  on a cache hit.
* Uncached responses (``Transcoder.encode``): the coding is negotiated, ``is_compressible``
  decides, and the body goes through a ``StreamCompressor`` at the stream levels chunk by chunk
  (chunked framing: the length is unknown).  A body already whole in memory and not larger than
  ``offload_above`` is compressed in one piece and keeps an exact Content-Length; a larger one is
  compressed in a thread.
* An origin's own coding passes through when the client accepts it; otherwise the body is
  decoded with a ``BoundedDecoder`` (``max_decoded_size``; past it ``DecompressionBomb``, which
  the edge answers with 502 before the head, or by closing the connection after it).  Decoded
  bodies are never held whole unless small: a body in memory is first measured (decoded a
  piece at a time, nothing kept: a bomb costs O(``DECODE_STEP``) of memory, not
  ``max_decoded_size``), then sent decoded piece by piece with its exact Content-Length.
* ``CompressionStats``: bytes in and out and operations by encoding and kind (cached, stream,
  decode), plain integers turned into Prometheus families on scrape.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.compress import (
    DECODE_STEP,
    BoundedDecoder,
    Coding,
    DecompressionBomb,
    StreamCompressor,
    accepts,
    add_vary_accept_encoding,
    compress,
    compress_offloop,
    decoded_size,
    encoded_headers,
    is_compressible,
    negotiate,
)
from edge.errors import EdgeError
from meridian.config import CompressionConfig

if TYPE_CHECKING:
    from edge.exchange import OutgoingResponse

Headers = list[tuple[bytes, bytes]]

#: Codings the edge can decode for a client that does not accept them.
DECODABLE: Final = frozenset({b"gzip", b"x-gzip", b"br", b"deflate"})
#: A body in memory that decodes to at most this is decoded whole (one write, exact length);
#: a larger one is decoded again piece by piece as it is sent.
DECODE_WHOLE_MAX: Final = 1024 * 1024
_NO_BODY_STATUSES: Final = frozenset({204, 304})


class BodyError(EdgeError):
    """A response body that cannot be delivered whole (bad or oversized upstream coding)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CompressionStats(Collector):
    """Bytes in (identity) and out (encoded) by encoding and kind, bumped as plain integers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the cache compresses large bodies in a worker thread
        self.bytes_in: dict[tuple[str, str], int] = {}
        self.bytes_out: dict[tuple[str, str], int] = {}
        self.operations: dict[tuple[str, str], int] = {}
        self.bombs = 0

    def operation(self, kind: str, encoding: str) -> None:
        key = (kind, encoding)
        with self._lock:
            self.operations[key] = self.operations.get(key, 0) + 1

    def count(self, kind: str, encoding: str, identity: int, encoded: int) -> None:
        key = (kind, encoding)
        with self._lock:
            self.bytes_in[key] = self.bytes_in.get(key, 0) + identity
            self.bytes_out[key] = self.bytes_out.get(key, 0) + encoded

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            bytes_in = dict(self.bytes_in)
            bytes_out = dict(self.bytes_out)
            operations = dict(self.operations)
        family = CounterMetricFamily(
            "meridian_edge_compress_bytes",
            "Body bytes through the compressors: direction in = identity, out = encoded "
            "(for kind=decode: in = encoded from the origin, out = decoded).",
            labels=["direction", "encoding", "kind"],
        )
        for (kind, encoding), value in sorted(bytes_in.items()):
            family.add_metric(["in", encoding, kind], value)
        for (kind, encoding), value in sorted(bytes_out.items()):
            family.add_metric(["out", encoding, kind], value)
        yield family
        ops = CounterMetricFamily(
            "meridian_edge_compress_operations",
            "Bodies compressed (cached: one per stored variant; stream: one per response) or "
            "decoded.",
            labels=["encoding", "kind"],
        )
        for (kind, encoding), value in sorted(operations.items()):
            ops.add_metric([encoding, kind], value)
        yield ops
        ratio = GaugeMetricFamily(
            "meridian_edge_compress_ratio",
            "Encoded bytes over identity bytes since start (compression kinds only).",
            labels=["encoding", "kind"],
        )
        for (kind, encoding), value in sorted(bytes_in.items()):
            if kind != "decode" and value:
                ratio.add_metric([encoding, kind], bytes_out.get((kind, encoding), 0) / value)
        yield ratio
        yield CounterMetricFamily(
            "meridian_edge_decompression_bombs",
            "Upstream bodies that decoded past compression.max_decoded_size.",
            value=self.bombs,
        )

    def describe(self) -> Iterable[Metric]:
        return []


def level_for(config: CompressionConfig, coding: str, *, cached: bool) -> int:
    if coding == "br":
        return config.cached_brotli_quality if cached else config.stream_brotli_quality
    return config.cached_gzip_level if cached else config.stream_gzip_level


def content_coding(headers: Headers) -> bytes | None:
    """The response's Content-Encoding, lower-cased, None for identity or absent."""
    for name, value in headers:
        if name == b"content-encoding":
            coding = value.strip().lower()
            return None if coding in (b"", b"identity") else coding
    return None


def decoded_headers(headers: Headers) -> Headers:
    """Headers of a body decoded to identity: no Content-Encoding or Content-Length, a weak
    ETag (the identity bytes are not the ones the strong tag named)."""
    out: Headers = []
    for name, value in headers:
        if name in (b"content-encoding", b"content-length"):
            continue
        if name == b"etag" and not value.lstrip().startswith(b"W/"):
            value = b"W/" + value.lstrip()
        out.append((name, value))
    return out


def decode_whole(
    data: bytes,
    coding: bytes,
    limit: int,
    stats: CompressionStats,
    *,
    count_bomb: bool = True,
) -> bytes:
    """``data`` decoded; ``DecompressionBomb`` past ``limit``, ``ValueError`` when corrupt.

    The result is held whole, so the memory it takes is what it decodes to: with a large
    ``limit`` the body is measured first (nothing kept), so a bomb never costs more than a
    decoding step; within ``DECODE_WHOLE_MAX`` one pass does both (a bomb stops there)."""
    name = coding.decode("ascii")
    try:
        if limit > DECODE_WHOLE_MAX:
            limit = decoded_size(data, name, limit)  # raises on a bomb; exact size otherwise
        decoder = BoundedDecoder(name, limit)
        pieces = [
            piece
            for start in range(0, len(data), DECODE_STEP)
            for piece in decoder.pieces(data[start : start + DECODE_STEP])
        ]
        pieces.append(decoder.finish())
    except DecompressionBomb:
        if count_bomb:
            stats.bombs += 1
        raise
    body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    del pieces
    stats.operation("decode", coding.decode("ascii"))
    stats.count("decode", coding.decode("ascii"), len(data), len(body))
    return body


class Transcoder:
    """Encoding decisions for uncached responses; one per process."""

    def __init__(self, stats: CompressionStats) -> None:
        self.stats = stats

    def cached_compressor(
        self, config: Callable[[], CompressionConfig]
    ) -> Callable[[bytes, str], bytes]:
        """The cache's compressor: cached levels read from the config in force at each call."""
        stats = self.stats

        def compressor(body: bytes, coding: str) -> bytes:
            level = level_for(config(), coding, cached=True)
            data = compress(body, coding, level)  # type: ignore[arg-type]
            stats.operation("cached", coding)
            stats.count("cached", coding, len(body), len(data))
            return data

        return compressor

    def encode(
        self,
        response: OutgoingResponse,
        accept_encoding: bytes | None,
        route: str,
        config: CompressionConfig,
    ) -> OutgoingResponse:
        """``response`` as this client gets it: decoded, compressed, or as it is."""
        if response.status < 200 or response.status in _NO_BODY_STATUSES:
            return response
        headers = response.headers
        upstream = content_coding(headers)
        if upstream is not None:
            if (
                b"," in upstream
                or upstream not in DECODABLE
                or accepts(accept_encoding, upstream.decode("latin-1"))
            ):
                # Passed through as the origin sent it; it differs by coding for someone.
                return response._replace(headers=add_vary_accept_encoding(headers))
            response = self._decoded(response, upstream, config)
            headers = response.headers
        length = response.length if response.data is None else len(response.data)
        if not is_compressible(response.status, headers, config, route=route, body_size=length):
            return response
        coding = negotiate(accept_encoding)
        if coding != "br" and coding != "gzip":
            # Other clients get it compressed: caches downstream must key on the coding.
            return response._replace(headers=encoded_headers(headers, "identity"))
        headers = encoded_headers(headers, coding)
        level = level_for(config, coding, cached=False)
        if response.body is None:  # HEAD: the encoded length is not known without the body
            return response._replace(headers=headers, head_length=None)
        data = response.data
        if data is not None and len(data) <= config.offload_above:
            encoded = compress(data, coding, level)
            self.stats.operation("stream", coding)
            self.stats.count("stream", coding, len(data), len(encoded))
            return response._replace(
                headers=headers, length=len(encoded), body=_one(encoded), data=encoded
            )
        if data is not None:
            body = self._offloop(data, coding, level, config.offload_above)
        else:
            body = self._streamed(response.body, coding, level)
        return response._replace(headers=headers, length=None, body=body, data=None)

    def _decoded(
        self, response: OutgoingResponse, coding: bytes, config: CompressionConfig
    ) -> OutgoingResponse:
        headers = decoded_headers(response.headers)
        if response.body is None:
            return response._replace(headers=headers, head_length=None)
        limit = config.max_decoded_size
        name = coding.decode("ascii")
        if response.data is not None:
            # Whole in memory: measure it first (a bomb or a corrupt body is a 502 before the
            # head, and costs one decoding step of memory), then decode it whole when small,
            # else piece by piece as it is sent, with the exact length.
            try:
                size = decoded_size(response.data, name, limit)
            except DecompressionBomb as exc:
                self.stats.bombs += 1
                raise BodyError("decompression_bomb") from exc
            except ValueError as exc:
                raise BodyError("bad_content_coding") from exc
            if size <= DECODE_WHOLE_MAX:
                data = decode_whole(response.data, coding, size, self.stats)
                return response._replace(
                    headers=headers, length=len(data), body=_one(data), data=data
                )
            body = self._decoding(_pieces(response.data), BoundedDecoder(name, size), name)
            return response._replace(headers=headers, length=size, body=body, data=None)
        decoder = BoundedDecoder(name, limit)
        body = self._decoding(response.body, decoder, name)
        return response._replace(headers=headers, length=None, body=body, data=None)

    async def _decoding(
        self, body: AsyncIterable[bytes], decoder: BoundedDecoder, coding: str
    ) -> AsyncIterator[bytes]:
        stats = self.stats
        stats.operation("decode", coding)
        try:
            async for chunk in body:
                stats.count("decode", coding, len(chunk), 0)
                # One bounded piece at a time: the next is decoded once this one is taken.
                for piece in decoder.pieces(chunk):
                    stats.count("decode", coding, 0, len(piece))
                    yield piece
            tail = decoder.finish()
        except DecompressionBomb as exc:
            stats.bombs += 1
            raise BodyError("decompression_bomb") from exc
        except ValueError as exc:
            raise BodyError("bad_content_coding") from exc
        if tail:
            stats.count("decode", coding, 0, len(tail))
            yield tail

    async def _streamed(
        self, body: AsyncIterable[bytes], coding: Coding, level: int
    ) -> AsyncIterator[bytes]:
        stats = self.stats
        stats.operation("stream", coding)
        compressor = StreamCompressor(coding, level)
        async for chunk in body:
            out = compressor.compress(chunk)
            stats.count("stream", coding, len(chunk), len(out))
            if out:
                yield out
        tail = compressor.finish()
        stats.count("stream", coding, 0, len(tail))
        if tail:
            yield tail

    async def _offloop(
        self, data: bytes, coding: Coding, level: int, offload_above: int
    ) -> AsyncIterator[bytes]:
        encoded = await compress_offloop(data, coding, level, offload_above=offload_above)
        self.stats.operation("stream", coding)
        self.stats.count("stream", coding, len(data), len(encoded))
        yield encoded


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    if data:
        yield data


def _one(data: bytes) -> AsyncIterable[bytes]:
    return _one_chunk(data)


async def _pieces(data: bytes) -> AsyncIterator[bytes]:
    """``data`` in ``DECODE_STEP`` slices (input for a decoder producing bounded pieces)."""
    for start in range(0, len(data), DECODE_STEP):
        yield data[start : start + DECODE_STEP]


__all__ = [
    "DECODABLE",
    "BodyError",
    "CompressionStats",
    "Transcoder",
    "content_coding",
    "decode_whole",
    "decoded_headers",
    "level_for",
]
