"""What the L2 keeps in Redis, byte for byte: its keys and its stored-response records (pure).

Keys, under a namespace (``meridian:cache:`` by default), each with a hash tag ``{h}`` (``h``: 16
hex digits of a BLAKE2b of the resource's primary key) so that every key of one resource lives
in one cluster slot while resources spread over the slots (``redis_key``; the kinds are listed
in ``redis_l2``).

Values are a compact, versioned binary record (no pickle): magic ``MC``, version byte, fixed
fields, then length-prefixed reason, coding, Vary names, surrogate keys, headers and body.  A
value read back is hostile input like any other: ``decode`` reads no length past the bytes it
was given and raises ``DecodeError`` for anything that is not a whole record of this version
(the caller treats it as a miss).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Final

from .entry import StoredResponse
from .key import VARIANT_SEPARATOR
from .policy import Freshness, Header

MAGIC: Final = b"MC"
VERSION: Final = 1
_FIXED: Final = struct.Struct("<2sBHBddddd")
_U8: Final = struct.Struct("<B")
_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")
_HEADER: Final = struct.Struct("<HI")
_NO_STALE, _ALWAYS_REVALIDATE, _COMPRESSIBLE, _AUTH_OK = 1, 2, 4, 8


class DecodeError(ValueError):
    """A value that is not a record this version understands."""


def encode(response: StoredResponse) -> bytes:
    """Serialise a stored response (binary-safe, no pickle)."""
    f = response.freshness
    flags = (
        (_NO_STALE if f.no_stale else 0)
        | (_ALWAYS_REVALIDATE if f.always_revalidate else 0)
        | (_COMPRESSIBLE if response.compressible else 0)
        | (_AUTH_OK if response.auth_ok else 0)
    )
    coding = response.content_coding or b""
    vary = b",".join(response.vary)
    tags = " ".join(response.surrogate_keys).encode("utf-8")
    parts = [
        _FIXED.pack(
            MAGIC,
            VERSION,
            response.status,
            flags,
            f.response_time,
            f.initial_age,
            f.lifetime,
            f.stale_while_revalidate,
            f.stale_if_error,
        ),
        _U8.pack(len(response.reason[:255])),
        response.reason[:255],
        _U8.pack(len(coding)),
        coding,
        _U16.pack(len(vary)),
        vary,
        _U32.pack(len(tags)),
        tags,
        _U16.pack(len(response.headers)),
    ]
    for name, value in response.headers:
        parts.append(_HEADER.pack(len(name), len(value)))
        parts.append(name)
        parts.append(value)
    parts.append(response.body)
    return b"".join(parts)


def decode(data: bytes) -> StoredResponse:
    """Inverse of ``encode``; raises DecodeError on anything else (truncation, other versions)."""
    view = memoryview(data)
    try:
        magic, version, status, flags, rtime, age, lifetime, swr, sie = _FIXED.unpack_from(view)
        if magic != MAGIC or version != VERSION:
            raise DecodeError(f"not a v{VERSION} record")
        pos = _FIXED.size

        def take(n: int) -> bytes:
            nonlocal pos
            if pos + n > len(view):
                raise DecodeError("truncated")
            chunk = bytes(view[pos : pos + n])
            pos += n
            return chunk

        def length(fmt: struct.Struct) -> int:
            nonlocal pos
            (n,) = fmt.unpack_from(view, pos)
            pos += fmt.size
            return int(n)

        reason = take(length(_U8))
        coding = take(length(_U8))
        vary = take(length(_U16))
        tags = take(length(_U32)).decode("utf-8")
        headers: list[Header] = []
        for _ in range(length(_U16)):
            name_len, value_len = _HEADER.unpack_from(view, pos)
            pos += _HEADER.size
            name = take(name_len)
            headers.append((name, take(value_len)))
        body = bytes(view[pos:])
    except (struct.error, UnicodeDecodeError) as exc:
        raise DecodeError(str(exc)) from None
    return StoredResponse(
        status=status,
        reason=reason,
        headers=tuple(headers),
        body=body,
        freshness=Freshness(
            response_time=rtime,
            initial_age=age,
            lifetime=lifetime,
            stale_while_revalidate=swr,
            stale_if_error=sie,
            no_stale=bool(flags & _NO_STALE),
            always_revalidate=bool(flags & _ALWAYS_REVALIDATE),
        ),
        vary=tuple(vary.split(b",")) if vary else (),
        surrogate_keys=tuple(tags.split()) if tags else (),
        content_coding=coding or None,
        compressible=bool(flags & _COMPRESSIBLE),
        auth_ok=bool(flags & _AUTH_OK),
    )


def slot_tag(raw: bytes) -> bytes:
    """The cluster hash tag of a key's resource: ``{`` 16 hex digits ``}``.  Hex, so that no
    ``{`` or ``}`` in a URL can end the tag early; the same for every variant of a resource."""
    primary = raw.split(VARIANT_SEPARATOR, 1)[0]
    return b"{" + hashlib.blake2b(primary, digest_size=8).hexdigest().encode() + b"}"


#: What ``slot_tag`` looks like in a SCAN pattern.
TAG_GLOB: Final = b"{" + b"?" * 16 + b"}"


def redis_key(namespace: bytes, kind: bytes, raw: bytes) -> bytes:
    """The Redis key of ``raw`` (a store key, a primary, a surrogate key) under ``kind``."""
    return namespace + kind + slot_tag(raw) + raw


def glob_escape(raw: bytes) -> bytes:
    """Escape Redis glob metacharacters so ``raw`` matches literally in SCAN MATCH."""
    out = bytearray()
    for byte in raw:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)


__all__ = [
    "MAGIC",
    "TAG_GLOB",
    "VERSION",
    "DecodeError",
    "decode",
    "encode",
    "glob_escape",
    "redis_key",
    "slot_tag",
]
