"""Content coding for the edge: negotiation, eligibility, Brotli/gzip encoding and bounded decoding.

Everything here is synchronous and free of I/O except ``compress_offloop``, which only moves the
same work to a thread.  Headers are ``list[tuple[bytes, bytes]]`` with lower-cased names, as the
HTTP layer parses them; functions that change headers return a new list and never mutate theirs.

Cached objects keep one body per coding, built once with ``compress`` at the cached levels, so
serving a Brotli hit costs what an identity hit costs.  Uncached responses are streamed through a
``StreamCompressor`` at the (faster) stream levels.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, Literal

import brotli

from edge.errors import EdgeError
from edge.memos import MEDIA_TYPE_PATTERNS, NEGOTIATIONS, BoundedMemo
from meridian.config import CompressionConfig

Coding = Literal["br", "gzip", "identity"]

__all__ = [
    "DECODE_STEP",
    "BoundedDecoder",
    "Coding",
    "DecompressionBomb",
    "StreamCompressor",
    "accepts",
    "add_vary_accept_encoding",
    "compress",
    "compress_offloop",
    "decoded_size",
    "encoded_headers",
    "is_compressible",
    "negotiate",
]

# --------------------------------------------------------------------------------------------
# Negotiation (RFC 9110 section 12.5.3)

#: Distinct Accept-Encoding values remembered.  Real clients send a handful; the bound keeps a
#: client that sends a new value on every request from growing the memo without limit.
NEGOTIATION_MEMO_SIZE: Final = NEGOTIATIONS.bound
#: Longer values are parsed every time rather than remembered, so the memo stays small in bytes.
NEGOTIATION_MEMO_MAX_KEY: Final = 256

# q-values are kept in thousandths: RFC 9110 allows at most three decimals.
_Q_MAX: Final = 1000
_QVALUE_RE: Final = re.compile(rb"0(?:\.(\d{0,3}))?|1(?:\.0{0,3})?")
_ALIASES: Final = {b"x-gzip": b"gzip", b"x-compress": b"compress"}
# Among equal q-values the smaller body wins: Brotli, then gzip.
_PREFERENCE: Final[tuple[Coding, ...]] = ("br", "gzip")


@dataclass(frozen=True, slots=True)
class _Acceptance:
    """One Accept-Encoding value, parsed: the coding to serve and what the client said."""

    choice: Coding | None
    #: Codings (lower-case, aliases resolved) the client listed with q > 0, and with q = 0.
    allowed: frozenset[bytes]
    refused: frozenset[bytes]
    #: The q-value of ``*`` in thousandths, or None when ``*`` is not listed.
    wildcard: int | None


_ABSENT: Final = _Acceptance("identity", frozenset(), frozenset(), None)
#: ``edge.memos.NEGOTIATIONS``.
_memo: BoundedMemo[bytes, _Acceptance] = BoundedMemo(NEGOTIATIONS)


def negotiate(accept_encoding: bytes | None) -> Coding | None:
    """The coding to serve a client sending ``accept_encoding``; None when nothing is acceptable.

    Preference is by q-value, then Brotli, gzip, identity.  A missing or empty header means
    identity.  Malformed elements (a bad q-value such as ``q=`` or ``q=2``) are ignored, so a
    coding is only chosen when the client clearly accepts it.  Several Accept-Encoding lines must
    be joined with ``,`` by the caller.
    """
    if accept_encoding is None:
        return "identity"
    known = _memo.get(accept_encoding)
    if known is not None:
        return known.choice
    return _acceptance(accept_encoding).choice


def accepts(accept_encoding: bytes | None, coding: str) -> bool:
    """Whether the client accepts a body already encoded with ``coding`` (e.g. an origin's gzip).

    A missing header accepts only identity: RFC 9110 would allow any coding, but clients that
    omit the header (scripts, curl without ``--compressed``) generally cannot decode one.
    """
    name = coding.strip().lower().encode("ascii", "replace")
    name = _ALIASES.get(name, name)
    acceptance = _ABSENT if accept_encoding is None else _acceptance(accept_encoding)
    if name in acceptance.allowed:
        return True
    if name in acceptance.refused:
        return False
    if name == b"identity":
        # Identity is acceptable unless refused, explicitly or by "*;q=0".
        return acceptance.wildcard != 0
    return acceptance.wildcard is not None and acceptance.wildcard > 0


def _acceptance(accept_encoding: bytes) -> _Acceptance:
    known = _memo.get(accept_encoding)
    if known is not None:
        return known
    acceptance = _parse_accept_encoding(accept_encoding)
    if len(accept_encoding) <= NEGOTIATION_MEMO_MAX_KEY:
        if len(_memo) >= NEGOTIATION_MEMO_SIZE:
            # Evict the oldest entry: dicts keep insertion order, and a hit stays one lookup
            # (an LRU would have to reorder on every hit).
            del _memo[next(iter(_memo))]
        _memo[accept_encoding] = acceptance
    return acceptance


def _parse_accept_encoding(value: bytes) -> _Acceptance:
    weights: dict[bytes, int] = {}
    for element in value.split(b","):
        name, _, params = element.partition(b";")
        name = name.strip().lower()
        if not name:
            continue
        q = _parse_weight(params) if params else _Q_MAX
        if q is None:
            continue
        name = _ALIASES.get(name, name)
        # A coding listed twice keeps its lowest q: honouring a refusal only costs bandwidth,
        # ignoring one can send a body the client cannot read.
        weights[name] = min(q, weights.get(name, _Q_MAX))

    wildcard = weights.get(b"*")
    choice: Coding | None = None
    best = 0
    for coding in _PREFERENCE:
        q = weights.get(coding.encode(), wildcard if wildcard is not None else 0)
        if q > best:
            choice, best = coding, q
    identity = weights.get(b"identity", wildcard)
    if identity is None:
        # Identity not mentioned at all: always acceptable, but only as the last resort.
        choice = choice or "identity"
    elif identity > best:
        choice = "identity"
    return _Acceptance(
        choice=choice,
        allowed=frozenset(name for name, q in weights.items() if q > 0 and name != b"*"),
        refused=frozenset(name for name, q in weights.items() if q == 0 and name != b"*"),
        wildcard=wildcard,
    )


def _parse_weight(params: bytes) -> int | None:
    """The q-value of ``;q=0.5;...`` in thousandths; None when malformed (element ignored)."""
    weight = _Q_MAX
    seen_q = False
    for param in params.split(b";"):
        key, has_value, raw = param.partition(b"=")
        if key.strip().lower() != b"q":
            continue  # other parameters are not defined for Accept-Encoding; tolerate them
        text = raw.strip()
        match = _QVALUE_RE.fullmatch(text)
        if seen_q or not has_value or match is None:
            return None
        seen_q = True
        weight = _Q_MAX if text.startswith(b"1") else int((match.group(1) or b"").ljust(3, b"0"))
    return weight


# --------------------------------------------------------------------------------------------
# Eligibility


_TYPE, _ENCODING, _CACHE_CONTROL, _RANGE, _SET_COOKIE, _LENGTH = range(6)
#: The response fields ``is_compressible`` reads, each to its branch.
_ELIGIBILITY_FIELDS: Final = {
    b"content-type": _TYPE,
    b"content-encoding": _ENCODING,
    b"cache-control": _CACHE_CONTROL,
    b"content-range": _RANGE,
    b"set-cookie": _SET_COOKIE,
    b"content-length": _LENGTH,
}


def is_compressible(
    status: int,
    headers: list[tuple[bytes, bytes]],
    config: CompressionConfig,
    *,
    route: str | None = None,
    body_size: int | None = None,
) -> bool:
    """Whether the edge may compress this response (for any client).

    ``body_size`` is the identity body's size when known; without it a Content-Length header is
    used, and with neither the size check is skipped (streamed responses).
    """
    if not config.enabled:
        return False
    if status < 200 or status in (204, 206, 304):
        return False
    if route is not None and route in config.disable_routes:
        return False
    media_type: bytes | None = None
    content_length: int | None = None
    fields = _ELIGIBILITY_FIELDS
    for name, value in headers:
        field = fields.get(name)  # one dict probe for the many fields that do not matter
        if field is None:
            continue
        if field == _TYPE:
            media_type = value.partition(b";")[0].strip().lower()
        elif field == _ENCODING:
            if value.strip().lower() not in (b"", b"identity"):
                return False
        elif field == _CACHE_CONTROL:
            if b"transform" in value.lower() and b"no-transform" in _directives(value):
                return False
        elif field == _RANGE:
            return False
        elif field == _SET_COOKIE:
            # BREACH: a compressed body next to a secret lets an attacker guess it by size.
            if config.disable_with_set_cookie:
                return False
        else:
            content_length = _parse_length(value)
    if media_type is None or not _type_matches(media_type, config.types):
        return False
    size = body_size if body_size is not None else content_length
    return size is None or size >= config.min_size


def _directives(value: bytes) -> set[bytes]:
    return {part.partition(b"=")[0].strip().lower() for part in value.split(b",")}


def _parse_length(value: bytes) -> int | None:
    value = value.strip()
    return int(value) if value.isdigit() else None


def _type_matches(media_type: bytes, types: tuple[str, ...]) -> bool:
    exact, prefixes = _type_patterns(types)
    return media_type in exact or media_type.startswith(prefixes)


@lru_cache(maxsize=MEDIA_TYPE_PATTERNS.bound)
def _type_patterns(types: tuple[str, ...]) -> tuple[frozenset[bytes], tuple[bytes, ...]]:
    """``types`` split into exact media types and ``text/``-style prefixes (from ``text/*``)."""
    lowered = [t.strip().lower().encode("ascii") for t in types]
    exact = frozenset(t for t in lowered if not t.endswith(b"/*"))
    prefixes = tuple(t[:-1] for t in lowered if t.endswith(b"/*"))
    return exact, prefixes


# --------------------------------------------------------------------------------------------
# Encoding


def compress(body: bytes, coding: Coding, level: int) -> bytes:
    """``body`` encoded with ``coding`` in one shot (cached variants); identity returns it as is.

    ``level`` is a Brotli quality (0-11) or a gzip level (1-9).  gzip output has no timestamp,
    so the same body always gives the same bytes on every POP.
    """
    if coding == "br":
        return bytes(brotli.compress(body, quality=level))
    if coding == "gzip":
        return gzip.compress(body, compresslevel=level, mtime=0)
    if coding == "identity":
        return body
    raise ValueError(f"unknown coding {coding!r}")


async def compress_offloop(body: bytes, coding: Coding, level: int, *, offload_above: int) -> bytes:
    """``compress``, run in a worker thread when ``body`` is larger than ``offload_above`` bytes.

    zlib and Brotli release the GIL while compressing, so a large body does not stall the loop;
    small ones are cheaper to compress inline than to hand to a thread.
    """
    if coding == "identity" or len(body) <= offload_above:
        return compress(body, coding, level)
    return await asyncio.to_thread(compress, body, coding, level)


class StreamCompressor:
    """Encodes a streamed body chunk by chunk, flushing after each so clients see data early.

    gzip uses ``Z_SYNC_FLUSH`` and Brotli an empty-metadata flush per chunk: a little less
    compression than buffering, but the body is never held whole and nothing waits on the next
    chunk.
    """

    __slots__ = ("_brotli", "_coding", "_finished", "_zlib")

    def __init__(self, coding: Coding, level: int) -> None:
        if coding not in ("br", "gzip", "identity"):
            raise ValueError(f"unknown coding {coding!r}")
        self._coding: Coding = coding
        self._finished = False
        self._brotli = brotli.Compressor(quality=level) if coding == "br" else None
        # wbits 31: a gzip wrapper around a 32 KiB deflate window.
        self._zlib = zlib.compressobj(level, zlib.DEFLATED, 31) if coding == "gzip" else None

    def compress(self, chunk: bytes) -> bytes:
        """The encoded bytes for ``chunk``, everything so far flushed; b"" for an empty chunk."""
        if self._finished:
            raise RuntimeError("StreamCompressor.compress called after finish")
        if not chunk:
            return b""  # a flush with no new data would only add framing
        if self._zlib is not None:
            return self._zlib.compress(chunk) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
        if self._brotli is not None:
            return bytes(self._brotli.process(chunk)) + bytes(self._brotli.flush())
        return chunk

    def finish(self) -> bytes:
        """The bytes that end the stream (trailer and checksum); call once, last."""
        if self._finished:
            raise RuntimeError("StreamCompressor.finish called twice")
        self._finished = True
        if self._zlib is not None:
            return self._zlib.flush(zlib.Z_FINISH)
        if self._brotli is not None:
            return bytes(self._brotli.finish())
        return b""


# --------------------------------------------------------------------------------------------
# Decoding an origin's body for a client that does not accept its coding


class DecompressionBomb(EdgeError):
    """An upstream body decodes to more than the allowed size (the edge answers 502)."""


#: Most output one decoding step produces: bodies are decoded in pieces this size, so a bomb
#: (or a large legitimate body) never sits in memory whole, only one piece of it at a time.
#: Brotli may return up to about twice ``output_buffer_limit`` per call; still bounded.
DECODE_STEP: Final = 256 * 1024


class BoundedDecoder:
    """Decodes a gzip, Brotli or deflate body incrementally, never producing more than ``limit``
    bytes in all, nor more than ``step`` bytes per piece.

    Output is requested with an explicit maximum (zlib's ``max_length``, Brotli's
    ``output_buffer_limit``) of at most ``step`` and at most one byte past what is left, so a
    bomb is detected after at most ``limit`` bytes have been produced, and ``pieces`` hands
    them out one bounded piece at a time (the caller writes or counts each and drops it):
    memory stays O(step) whatever the body expands to.  ``decode`` joins the pieces of one
    chunk (for callers that keep the output anyway).  Both raise ``DecompressionBomb`` past
    the limit and ``ValueError`` on corrupt data; ``finish`` raises ``ValueError`` when the
    body was cut short.
    """

    __slots__ = (
        "_brotli",
        "_coding",
        "_finished",
        "_limit",
        "_pending",
        "_produced",
        "_step",
        "_zlib",
    )

    def __init__(self, coding: str, limit: int, *, step: int = DECODE_STEP) -> None:
        name = coding.strip().lower()
        if name == "x-gzip":
            name = "gzip"
        if name not in ("gzip", "br", "deflate"):
            raise ValueError(f"cannot decode content coding {coding!r}")
        if limit < 0:
            raise ValueError("limit must not be negative")
        if step < 1:
            raise ValueError("step must be positive")
        self._coding = name
        self._limit = limit
        self._step = step
        self._produced = 0
        self._finished = False
        self._brotli = brotli.Decompressor() if name == "br" else None
        # deflate waits for two bytes to tell a zlib wrapper (RFC 9110) from raw deflate.
        self._zlib = zlib.decompressobj(31) if name == "gzip" else None
        self._pending = b""

    @property
    def produced(self) -> int:
        """Decoded bytes so far."""
        return self._produced

    def decode(self, chunk: bytes) -> bytes:
        """The decoded bytes for ``chunk`` (possibly b""), joined."""
        pieces = list(self.pieces(chunk))
        if not pieces:
            return b""
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def pieces(self, chunk: bytes) -> Iterator[bytes]:
        """The decoded bytes for ``chunk``, as non-empty pieces of at most ``step`` bytes each
        (Brotli: about twice that at most), produced as they are taken."""
        if self._finished:
            raise RuntimeError("BoundedDecoder.decode called after finish")
        if not chunk:
            return iter(())
        if self._brotli is not None:
            return self._pieces_brotli(self._brotli, chunk)
        if self._zlib is None:
            self._pending += chunk
            if len(self._pending) < 2:
                return iter(())
            chunk, self._pending = self._pending, b""
            self._zlib = zlib.decompressobj(15 if _has_zlib_header(chunk) else -15)
        return self._pieces_zlib(chunk)

    def finish(self) -> bytes:
        """Checks the body was complete; returns any last decoded bytes."""
        if self._finished:
            raise RuntimeError("BoundedDecoder.finish called twice")
        self._finished = True
        if self._brotli is not None:
            if not self._brotli.is_finished():
                raise ValueError("truncated br body")
            return b""
        if self._zlib is None:  # deflate that never got two bytes
            raise ValueError("truncated deflate body")
        # ``pieces`` drained every byte its input could give, so flush has nothing unbounded
        # to release.
        tail = self._zlib.flush()
        self._account(len(tail))
        if not self._zlib.eof:
            raise ValueError(f"truncated {self._coding} body")
        return tail

    def _pieces_zlib(self, data: bytes) -> Iterator[bytes]:
        decoder = self._zlib
        assert decoder is not None
        while True:
            if decoder.eof:
                if not data:
                    return
                if self._coding != "gzip":
                    raise ValueError(f"data after the end of the {self._coding} body")
                # gzip allows several members back to back (RFC 1952 section 2.2).
                decoder = self._zlib = zlib.decompressobj(31)
            # At most one step, and at most one byte past what is left: either the input
            # fits within the limit, or the extra byte proves the body is too big.
            want = min(self._step, self._limit - self._produced + 1)
            try:
                piece = decoder.decompress(data, want)
            except zlib.error as exc:
                raise ValueError(f"corrupt {self._coding} body: {exc}") from None
            self._account(len(piece))
            if piece:
                yield piece
            if decoder.eof:
                data = decoder.unused_data  # only non-empty at the end of a gzip member
            else:
                data = decoder.unconsumed_tail
                if len(piece) < want and not data:
                    return  # input used up and nothing held back: wait for the next chunk

    def _pieces_brotli(self, decoder: brotli.Decompressor, chunk: bytes) -> Iterator[bytes]:
        if decoder.is_finished():
            raise ValueError("data after the end of the br body")
        data = chunk
        try:
            while True:
                step = min(self._limit - self._produced + 1, self._step)
                piece = bytes(decoder.process(data, output_buffer_limit=step))
                self._account(len(piece))
                if piece:
                    yield piece
                data = b""
                # Output is held back while the decoder's buffer is full; drain it with
                # empty input, as the Brotli API requires.  An empty piece means no progress.
                if decoder.can_accept_more_data() or not piece:
                    break
        except brotli.error as exc:
            raise ValueError(f"corrupt br body: {exc}") from None

    def _account(self, produced: int) -> None:
        self._produced += produced
        if self._produced > self._limit:
            raise DecompressionBomb(f"{self._coding} body decodes to more than {self._limit} bytes")


def decoded_size(data: bytes, coding: str, limit: int, *, step: int = DECODE_STEP) -> int:
    """How many bytes ``data`` decodes to, counted a piece at a time and nothing kept:
    ``DecompressionBomb`` past ``limit``, ``ValueError`` when corrupt or cut short."""
    decoder = BoundedDecoder(coding, limit, step=step)
    for start in range(0, len(data), step):
        for _piece in decoder.pieces(data[start : start + step]):
            pass
    decoder.finish()
    return decoder.produced


def _has_zlib_header(data: bytes) -> bool:
    """RFC 1950: method 8 (deflate) and a header checksum divisible by 31."""
    return data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0


# --------------------------------------------------------------------------------------------
# Headers


def encoded_headers(
    headers: list[tuple[bytes, bytes]], coding: Coding
) -> list[tuple[bytes, bytes]]:
    """The headers for the ``coding`` variant of a compressible identity response.

    For br/gzip: Content-Encoding set, Content-Length removed (the caller writes the encoded
    length), Accept-Ranges removed (ranges of the identity body no longer apply) and a strong
    ETag weakened, as nginx does, since the bytes differ from the identity variant's.  Vary
    gets Accept-Encoding in every case.
    """
    if coding == "identity":
        return add_vary_accept_encoding(headers)
    result: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name in (b"content-encoding", b"content-length", b"accept-ranges"):
            continue
        if name == b"etag" and not value.lstrip().startswith(b"W/"):
            value = b"W/" + value.lstrip()
        result.append((name, value))
    result.append((b"content-encoding", coding.encode("ascii")))
    return add_vary_accept_encoding(result)


def add_vary_accept_encoding(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` with Accept-Encoding in Vary, merged into an existing Vary header.

    Already present (in any Vary header, any case) or ``Vary: *``: unchanged, as a copy.
    """
    first_vary: int | None = None
    for index, (name, value) in enumerate(headers):
        if name != b"vary":
            continue
        fields = {part.strip().lower() for part in value.split(b",")}
        if b"*" in fields or b"accept-encoding" in fields:
            return list(headers)
        if first_vary is None:
            first_vary = index
    result = list(headers)
    if first_vary is None:
        result.append((b"vary", b"accept-encoding"))
    else:
        existing = result[first_vary][1].strip().rstrip(b",").rstrip()
        merged = existing + b", accept-encoding" if existing else b"accept-encoding"
        result[first_vary] = (b"vary", merged)
    return result
