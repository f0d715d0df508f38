"""A stored response, pre-serialised so that a hit is one dict lookup and one write.

``StoredResponse`` is the immutable value (what L2 serialises).  ``Entry`` wraps it with what a
cache hit needs: the HTTP/1.1 head built once per coding, compressed bodies built once and
kept, and the final bytes of each response shape cached per value of ``Age``.  ``Age`` is the
only thing that changes while an entry is stored, once a second, so a hit rebuilds its bytes at
most once a second.  ``Date`` stays the origin's (RFC 9110 6.6.1: it says when the response was
generated; ``Age`` tells how long it has been cached), or the time the response was received
when the origin sent none.

Compression is injected: ``Entry(..., compressor=...)`` takes any ``(body, coding) -> bytes``
(the edge passes ``edge.compress.compress`` at its cached levels).  A compressed variant gets
``Content-Encoding``, loses ``Accept-Ranges`` and has a strong ETag weakened (the bytes differ
from the identity body's), as nginx does.  A variant that does not shrink is served identity.

Bytes held by an entry (body, variants, heads, cached responses) are counted in ``size``, with
what CPython and the allocator add around them (object headers, dict slots, the stored header
tuples), so that the store's bound holds in RSS and not only in payload bytes; the store is told
about growth through ``on_resize``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from http import HTTPStatus
from typing import Final, NamedTuple, cast

from .key import METHOD_CLASS_GET, Coding
from .policy import Freshness, Header, not_modified, parse_http_date
from .ranges import UNSATISFIABLE, if_range_holds, parse_range, partial_content

Compressor = Callable[[bytes, str], bytes]

X_CACHE_HIT: Final = b"HIT"
X_CACHE_MISS: Final = b"MISS"
X_CACHE_STALE: Final = b"STALE"
X_CACHE_REVALIDATED: Final = b"REVALIDATED"
X_CACHE_BYPASS: Final = b"BYPASS"

#: Bytes of Python objects per entry beyond the payload: the entry (its dicts are made only
#: when needed), the StoredResponse and Freshness with their numbers, the headers tuple, the
#: body's and key's object headers, the store's dict slot.  Measured on CPython 3.11 at about
#: 450 (``python -m benchmarks.hitpath --memory``: 2.99 KB of RSS per cached 2,043-byte
#: ticker at 100,000 keys, head included); errs on the high side.
ENTRY_OVERHEAD: Final = 480
#: Bytes the store's path index holds per entry (the key in its parent's dict, the segment's
#: object header; ``store.PathIndex``), counted with the entry.
INDEX_OVERHEAD: Final = 100
#: Bytes per stored header beyond its name and value (two bytes objects, a tuple, its slot).
#: Fields the cache pools (``HttpCache._pooled_headers``) cost an entry 8 B, not this: the
#: count errs high for them.
HEADER_OVERHEAD: Final = 120
#: Bytes per object an entry grows by (a compressed variant, a head, a cached response) beyond
#: its length: the bytes object's header, allocator rounding, the dict slot that holds it and
#: the dict's own growth.  Measured at 100-130 per object; counting only the length let a cache
#: full of hit entries exceed its bound by 10-15% in RSS.
GROWN_OBJECT_OVERHEAD: Final = 136

#: Bytes an entry grows by for a bytes object kept in a slot of its own (no dict around it):
#: the object's header and the allocator's rounding.
BYTES_OVERHEAD: Final = 40
#: ``len(METHOD_CLASS_GET)``: what a primary key puts before the URL.
_CLASS_LENGTH: Final = len(METHOD_CLASS_GET)
_CODING_INDEX: Final[dict[str, int]] = {"identity": 0, "gzip": 1, "br": 2}
#: ``Entry._wire`` keeps the heads of compressed codings under this plus their index.
_HEAD_SLOT: Final = 100
#: RFC 9110 15.4.5: what a 304 carries from the 200 it stands for (plus Last-Modified).
_NOT_MODIFIED_FIELDS: Final = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary", b"last-modified"}
)
_NO_CONTENT_LENGTH: Final = frozenset({204, 304})
_MAX_AGE_VALUE: Final = 2147483648
#: ``Entry._wire`` keeps a response's Age under its slot plus this (slots are 0..8 for HIT
#: answers, 32..40 for STALE ones).
_AGE_OF: Final = 16
_STALE_SLOTS: Final = 32
#: X-Cache values whose responses are cached per Age (``wire``).
_CACHED_FORMS: Final = (X_CACHE_HIT, X_CACHE_STALE)


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """The immutable part of a stored response."""

    status: int
    reason: bytes
    #: Stored headers: hop-by-hop, Content-Length, Age, X-Cache, Surrogate-Key removed.
    headers: tuple[Header, ...]
    body: bytes
    freshness: Freshness
    #: Request header names whose values select this variant (the secondary key's names).
    vary: tuple[bytes, ...] = ()
    surrogate_keys: tuple[str, ...] = ()
    #: The coding ``body`` is in when the cache cannot decode it (None: identity).
    content_coding: bytes | None = None
    #: Whether the edge judged the body worth compressing (type, size, no Set-Cookie, ...).
    compressible: bool = False
    #: May serve requests carrying Authorization (public, s-maxage or must-revalidate).
    auth_ok: bool = False


class _StoredAssembly:
    """``StoredResponse(...)`` for a fill, four times cheaper: a frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__`` (a call each), while this sets
    them as plain slots and then becomes a ``StoredResponse`` (the same slots, so the same
    layout: the class switch is allowed), frozen, equal and hashed as one made the usual way."""

    __slots__ = StoredResponse.__slots__

    def __init__(
        self,
        status: int,
        reason: bytes,
        headers: tuple[Header, ...],
        body: bytes,
        freshness: Freshness,
        vary: tuple[bytes, ...],
        surrogate_keys: tuple[str, ...],
        content_coding: bytes | None,
        compressible: bool,
        auth_ok: bool,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.freshness = freshness
        self.vary = vary
        self.surrogate_keys = surrogate_keys
        self.content_coding = content_coding
        self.compressible = compressible
        self.auth_ok = auth_ok
        self.__class__ = StoredResponse  # type: ignore[assignment]


#: ``StoredResponse(...)`` as ``_StoredAssembly`` makes it, every field given (typed as the
#: class itself, so a call is checked against its fields).
stored_response: Final = cast("type[StoredResponse]", _StoredAssembly)


@lru_cache(maxsize=16)
def _house(extra_head: bytes, hidden: frozenset[bytes]) -> tuple[bytes, frozenset[bytes]]:
    """The one tuple of these that every entry of a cache holds (a cache has one pair)."""
    return extra_head, hidden


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("latin-1")
    except ValueError:
        return b""


def _with_accept_encoding(vary: bytes) -> bytes:
    fields = {part.strip().lower() for part in vary.split(b",")}
    if b"accept-encoding" in fields or b"*" in fields:
        return vary
    existing = vary.strip().rstrip(b",").rstrip()
    return existing + b", accept-encoding" if existing else b"accept-encoding"


def with_lines(wire: bytes, lines: bytes) -> bytes:
    """``wire`` (a response ``Entry.wire`` built without per-request lines) with ``lines``
    where ``Entry.wire``'s ``extra`` goes: just before X-Cache, which every such response
    carries and no stored header can be (the edge drops an origin's)."""
    at = wire.find(b"\r\nx-cache: ") + 2
    return wire[:at] + lines + wire[at:]


#: Stand-ins for the values a ``HeadTemplate`` leaves out while it is made: objects of their
#: own, recognised by identity.
_MARKS: Final = tuple(b"\x00value %d\x00" % i for i in range(64))


class HeadTemplate(NamedTuple):
    """The identity head (``ResponseForms._head``) of every entry whose stored fields differ
    only in the values at ``values`` (a head shape's, ``admission.StoredShape``), for one
    status line, one house (extra head, hidden fields) and compressor or none: its constant
    bytes, between which those values go.  An entry holds it in place of its head until the
    head is first asked for (shared: nothing per entry)."""

    #: The head as a bytes ``%`` format: its constant bytes (each ``%`` doubled) with a ``%s``
    #: for each value, then ``content-length: %d`` when ``with_length`` and the house's extra
    #: head (one formatting, not a join of pieces).
    form: bytes
    #: Index in the stored fields of each value, in order.
    values: tuple[int, ...]
    #: A Content-Length line follows the fields.
    with_length: bool
    status: int
    reason: bytes
    house: tuple[bytes, frozenset[bytes]]
    compressed: bool
    #: ``form`` followed by the rest of a MISS answer's head (``Entry.wire``'s: the
    #: per-request lines, X-Cache, Age and the blank line): ``first_answer``'s one formatting.
    miss_form: bytes

    def fits(self, forms: ResponseForms) -> bool:
        """Whether this is the template of ``forms``' head (given its fields' shape)."""
        response = forms.response
        return (
            self.house is forms._house
            and self.compressed == (forms._compressor is not None)
            and self.status == response.status
            and self.reason == response.reason
        )

    def head(self, fields: Sequence[Header], length: int) -> bytes:
        values: list[bytes | int] = []
        for at in self.values:
            values.append(fields[at][1])
        if self.with_length:
            values.append(length)
        return self.form % tuple(values)


class ResponseForms:
    """What an entry builds from its stored response, and keeps while it is worth keeping: the
    compressed variants, the head of each coding, and the last full response of each shape per
    Age second (``Entry.wire``).  Every byte kept is counted in ``size`` and reported through
    ``on_resize`` (the store's bound holds in RSS)."""

    __slots__ = (
        "_age0",
        "_compressor",
        "_head0",
        "_house",
        "_variants",
        "_wire",
        "_wire0",
        "on_resize",
        "response",
        "size",
    )

    def __init__(
        self,
        response: StoredResponse,
        compressor: Compressor | None,
        extra_head: bytes,
        hidden: frozenset[bytes],
    ) -> None:
        self.response = response
        #: Set for responses worth compressing only (``Entry.__init__``).
        self._compressor = compressor
        #: What every entry of one cache shares (one tuple for all: a slot, not two).
        self._house = _house(extra_head, hidden)
        # Kept lean: a dict costs 64 B empty and 224 B with one item, and most of a large
        # cache is entries served in one coding and one shape.  So the identity head and the
        # plain identity HIT response have slots of their own, and the dicts for the other
        # codings and shapes are made when first needed.
        #: Coding -> body; None marks a coding whose compressed form did not shrink.
        self._variants: dict[str, bytes | None] | None = None
        #: The identity head (the others are in ``_wire``, under ``_HEAD_SLOT + index``), or
        #: the template it is made from (``use_head_template``) until first asked for.
        self._head0: bytes | HeadTemplate | None = None
        #: Slot 0 (identity, GET, HIT): the Age its response was last built for (-1: never)
        #: and those bytes when kept (``_remember``).
        self._age0 = -1
        self._wire0: bytes | None = None
        #: Other slots -> the last full response built for that shape, and slot + _AGE_OF ->
        #: the Age it carries.  Ints and bytes only, no (age, bytes) tuples: a dict holding no
        #: containers is not tracked by the cyclic GC, so a hit allocates nothing the collector
        #: has to walk (with a tuple per rebuilt response, every entry hit in a new second went
        #: back into the young generation, and collections walked entries all over the heap).
        self._wire: dict[int, int | bytes] | None = None
        self.on_resize: Callable[[ResponseForms, int], None] | None = None
        self.size = 0

    @property
    def compressible(self) -> bool:
        return self._compressor is not None

    # Variants and heads

    def needs_variant(self, coding: str) -> bool:
        """True when serving ``coding`` would compress first (the edge may do it off-loop)."""
        return (
            self._compressor is not None
            and coding != "identity"
            and (self._variants is None or coding not in self._variants)
        )

    def set_variant(self, coding: str, data: bytes) -> None:
        """Install a variant compressed elsewhere (e.g. in a thread) with the same compressor."""
        variants = self._variants
        if variants is None:
            variants = self._variants = {}
        if coding == "identity" or self._compressor is None or coding in variants:
            return
        if len(data) >= len(self.response.body):
            variants[coding] = None
            self._grow(GROWN_OBJECT_OVERHEAD)  # the dict slot and its growth
            return
        variants[coding] = data
        self._grow(len(data) + GROWN_OBJECT_OVERHEAD)

    def _variant(self, coding: str) -> tuple[str, bytes]:
        body = self.response.body
        if self._compressor is None or coding == "identity":
            return "identity", body
        variants = self._variants
        if variants is None or coding not in variants:
            self.set_variant(coding, self._compressor(body, coding))
            variants = self._variants
            assert variants is not None
        data = variants[coding]
        return ("identity", body) if data is None else (coding, data)

    def _head(self, coding: str, length: int) -> bytes:
        """Status line and headers (without X-Cache/Age and the blank line) for a coding."""
        index = _CODING_INDEX[coding]
        template: HeadTemplate | None = None
        if index == 0:
            kept0 = self._head0
            if isinstance(kept0, bytes):
                return kept0
            template = kept0
            head = None
        else:
            kept = self._wire.get(_HEAD_SLOT + index) if self._wire is not None else None
            head = kept if isinstance(kept, bytes) else None
        if head is not None:
            return head
        response = self.response
        if template is not None:
            head = template.head(response.headers, length)
        else:
            reason = response.reason or reason_phrase(response.status)
            lines = [b"HTTP/1.1 %d %s\r\n" % (response.status, reason)]
            lines.extend(self._header_lines(coding))
            if response.status not in _NO_CONTENT_LENGTH:
                lines.append(b"content-length: %d\r\n" % length)
            lines.append(self._house[0])
            head = b"".join(lines)
        if index == 0:
            self._head0 = head
            # ``_grow``, inlined: every fill's first answer builds its head
            delta = len(head) + BYTES_OVERHEAD
            self.size += delta
            if self.on_resize is not None:
                self.on_resize(self, delta)
            return head
        if self._wire is None:
            self._wire = {}
        self._wire[_HEAD_SLOT + index] = head
        self._grow(len(head) + GROWN_OBJECT_OVERHEAD)
        return head

    def head_template(self, values: Sequence[int]) -> HeadTemplate | None:
        """The ``HeadTemplate`` of this response's identity head with the values of the
        stored fields at ``values`` left out (None when one of them is hidden or its line is
        not plain ``name: value``).  Made from ``_header_lines`` itself, so it stays true."""
        response = self.response
        if len(values) > len(_MARKS):
            return None
        fields = list(response.headers)
        for mark, at in zip(_MARKS, values, strict=False):
            fields[at] = (fields[at][0], mark)
        probe = ResponseForms(
            replace(response, headers=tuple(fields)), self._compressor, *self._house
        )
        lines = probe._header_lines("identity")
        hidden = self._house[1]
        shown = [at for at, (name, _) in enumerate(fields) if not (hidden and name in hidden)]
        if len(lines) < len(shown):
            return None  # not a line per field shown: no telling which line is whose
        reason = response.reason or reason_phrase(response.status)
        pieces: list[bytes] = []
        piece = [b"HTTP/1.1 %d %s\r\n" % (response.status, reason)]
        taken = 0
        for at, line in enumerate(lines):
            if taken < len(values) and at < len(shown) and shown[at] == values[taken]:
                name, mark = fields[values[taken]]
                if line != b"%s: %s\r\n" % (name, mark):
                    return None
                piece.append(name + b": ")
                pieces.append(b"".join(piece))
                piece = [b"\r\n"]
                taken += 1
            else:
                piece.append(line)
        if taken != len(values):
            return None  # a value hidden
        pieces.append(b"".join(piece))
        with_length = response.status not in _NO_CONTENT_LENGTH
        form = b"%s".join(piece.replace(b"%", b"%%") for piece in pieces)
        if with_length:
            form += b"content-length: %d\r\n"
        form += self._house[0].replace(b"%", b"%%")
        return HeadTemplate(
            form,
            tuple(values),
            with_length,
            response.status,
            response.reason,
            self._house,
            self._compressor is not None,
            form + b"%sx-cache: " + X_CACHE_MISS + b"\r\nage: %d\r\n\r\n",
        )

    def use_head_template(self, template: HeadTemplate) -> None:
        """Make the identity head from ``template`` when first asked for (it ``fits``)."""
        if self._head0 is None:
            self._head0 = template

    def _header_lines(self, coding: str) -> list[bytes]:
        compressed = coding != "identity"
        lines: list[bytes] = []
        vary_seen = False
        hidden = self._house[1]
        for name, value in self.response.headers:
            if hidden and name in hidden:
                continue
            if compressed:
                if name == b"accept-ranges":
                    continue
                if name == b"etag" and not value.lstrip().startswith(b"W/"):
                    value = b"W/" + value.lstrip()
            if name == b"vary" and self._compressor is not None and not vary_seen:
                # Every variant says it varies by coding, identity included (RFC 9110 12.5.5).
                vary_seen = True
                value = _with_accept_encoding(value)
            lines.append(b"%s: %s\r\n" % (name, value))  # one format, not three concatenations
        if self._compressor is not None and not vary_seen:
            lines.append(b"vary: accept-encoding\r\n")
        if compressed:
            lines.append(b"content-encoding: " + coding.encode("ascii") + b"\r\n")
        return lines

    # Cached response forms

    def slot_of(self, data: bytes) -> int | None:
        """The cache slot holding exactly ``data`` (this object), or None when it was built
        for one request only (HitMemo replays cached forms, never keeps its own copy)."""
        if data is self._wire0:
            return 0
        for slot, value in (self._wire or {}).items():
            if value is data:
                return slot
        return None

    def cached_wire(self, slot: int) -> bytes | None:
        """The response cached in ``slot`` (``slot_of``), None when it was rebuilt since (a new
        Age second): a memo of the old bytes no longer applies."""
        if slot == 0:
            return self._wire0
        wire = self._wire.get(slot) if self._wire is not None else None
        return wire if isinstance(wire, bytes) else None

    def _remember(self, slot: int, age: int, data: bytes | None) -> None:
        """Note that ``slot`` was built for ``age``, keeping the bytes (``data``) only when
        they were asked for twice within that Age second.  A response built once per Age - a
        key hit less than once a second, most of a large cache - is not kept: it would be a
        second copy of the body for nothing (6.4 -> 3.9 KB per cached 2 KB ticker at 100,000
        keys).  Counted: the Age marker's dict slot once, the bytes while kept."""
        if slot == 0:
            self._age0 = age
            old0, self._wire0 = self._wire0, data
            delta = (len(data) + BYTES_OVERHEAD if data is not None else 0) - (
                len(old0) + BYTES_OVERHEAD if old0 is not None else 0
            )
            if delta:
                self._grow(delta)
            return
        wire = self._wire
        if wire is None:
            wire = self._wire = {}
        old = wire.get(slot)
        delta = 0 if slot + _AGE_OF in wire else GROWN_OBJECT_OVERHEAD
        wire[slot + _AGE_OF] = age
        if isinstance(old, bytes):
            delta -= len(old) + GROWN_OBJECT_OVERHEAD
            if data is None:
                del wire[slot]
        if data is not None:
            wire[slot] = data
            delta += len(data) + GROWN_OBJECT_OVERHEAD
        if delta:
            self._grow(delta)

    def _grow(self, delta: int) -> None:
        self.size += delta
        if self.on_resize is not None:
            self.on_resize(self, delta)


class Entry(ResponseForms):
    """A stored response plus its pre-built wire forms.  Mutated only by its own caches."""

    __slots__ = (
        "__weakref__",  # HitMemo refers to its entry weakly: a memo must not keep one alive
        "_aliases",
        "etag",
        "last_modified_raw",
        "primary",
        "visited",
    )

    def __init__(
        self,
        response: StoredResponse,
        key: bytes,
        primary: bytes,
        url: bytes,
        compressor: Compressor | None = None,
        extra_head: bytes = b"",
        hidden: frozenset[bytes] = frozenset(),
        measured: tuple[int, bytes | None, bytes | None] | None = None,
    ) -> None:
        """By position or keyword (a fill's by position: keywords to a class are packed into a
        dict and out again).  ``hidden``: stored fields never sent on (the RFC 9213 fields the
        cache consumed; kept in ``response.headers`` so that a 304 without them leaves their
        policy in force).  ``measured``: what the loop over ``response.headers`` below would
        find, when the caller knows it already (``Admission``'s head shapes): their bytes with
        ``HEADER_OVERHEAD`` each, the first ETag (stripped, None when empty) and the first
        Last-Modified."""
        compressible = (
            response.compressible
            and response.content_coding is None
            and response.status not in _NO_CONTENT_LENGTH
            and response.body
        )
        # ``ResponseForms.__init__``, inlined (an entry is made per fill): the same slots set
        # to the same values (``size`` below).
        self.response, self._house, self._age0 = response, _house(extra_head, hidden), -1
        self._compressor = compressor if compressible else None
        self._variants = self._head0 = self._wire0 = self._wire = self.on_resize = None
        self.primary = primary
        # The store key is the primary key itself unless the response varies (Vary), and the
        # URL is the primary key after its method class (``key.METHOD_CLASS_GET``): each kept
        # only when it is not (the URL's copy alone was 70 B of every entry).
        own_key = key != primary
        own_url = primary[_CLASS_LENGTH:] != url
        self._aliases: tuple[bytes, bytes] | None = (key, url) if own_key or own_url else None
        etag = lm_raw = None
        size = (
            ENTRY_OVERHEAD
            + INDEX_OVERHEAD
            + len(url)  # the index's copy of the path segment, at most the URL
            + len(primary)
            + (len(key) + len(url) if self._aliases is not None else 0)
            + len(response.body)
        )
        if measured is not None:
            header_bytes, etag, lm_raw = measured
            size += header_bytes
        else:
            for name, value in response.headers:  # one pass: the validators, and their cost
                size += len(name) + len(value) + HEADER_OVERHEAD
                if name == b"etag":
                    if etag is None:
                        etag = value.strip() or None
                elif name == b"last-modified" and lm_raw is None:
                    lm_raw = value
        self.etag: bytes | None = etag
        self.last_modified_raw: bytes | None = lm_raw
        self.visited = False
        self.size = size

    # ----------------------------------------------------------------------------------------
    # Accessors

    @property
    def key(self) -> bytes:
        aliases = self._aliases
        return self.primary if aliases is None else aliases[0]

    @property
    def date(self) -> float | None:
        """The stored Date (conditional requests and If-Range only: not kept per entry)."""
        for name, value in self.response.headers:
            if name == b"date":
                return parse_http_date(value)  # memoised
        return None

    @property
    def last_modified(self) -> float | None:
        return parse_http_date(self.last_modified_raw)  # memoised

    @property
    def url(self) -> bytes:
        aliases = self._aliases
        return self.primary[_CLASS_LENGTH:] if aliases is None else aliases[1]

    @property
    def freshness(self) -> Freshness:
        return self.response.freshness

    @property
    def status(self) -> int:
        return self.response.status

    @property
    def body(self) -> bytes:
        return self.response.body

    def age(self, now: float) -> int:
        """The Age header value at ``now`` (integer seconds, RFC 9111 5.1)."""
        age = int(self.response.freshness.age(now))
        return age if age < _MAX_AGE_VALUE else _MAX_AGE_VALUE

    def not_modified_for(
        self, if_none_match: bytes | None, if_modified_since: bytes | None
    ) -> bool:
        """Whether a client's conditional request is answered 304 from this entry."""
        return not_modified(
            self.response.status,
            self.etag,
            self.last_modified,
            self.date,
            if_none_match,
            if_modified_since,
        )

    # ----------------------------------------------------------------------------------------
    # Wire forms

    def wire(
        self,
        coding: Coding | str,
        now: float,
        head_only: bool = False,
        x_cache: bytes = X_CACHE_HIT,
        extra: bytes = b"",
    ) -> bytes:
        """The complete HTTP/1.1 response for ``coding`` at ``now``.

        ``head_only`` serves HEAD (same headers and Content-Length, no body).  ``x_cache`` is
        the X-Cache value; ``extra`` is pre-formatted per-request header lines
        (``b"x-request-id: 1\\r\\n"``).  The plain HIT forms are cached per Age value once asked
        for twice in it (``_remember``); others are built per call (one concatenation).  STALE
        forms are cached the same way (a memoised stale-while-revalidate answer replays them).
        """
        freshness = self.response.freshness
        resident = now - freshness.response_time
        age = int(freshness.initial_age + resident if resident > 0 else freshness.initial_age)
        if age >= _MAX_AGE_VALUE:
            age = _MAX_AGE_VALUE
        if self._compressor is None:
            coding = "identity"
        cacheable = x_cache in _CACHED_FORMS and not extra
        # Slots are keyed by the requested coding, so a hit never resolves the variant.
        slot = _CODING_INDEX[coding] * 2 + head_only
        if x_cache == X_CACHE_STALE:
            slot += _STALE_SLOTS
        keep = False
        if cacheable:
            if slot == 0:
                if self._age0 == age:
                    if self._wire0 is not None:
                        return self._wire0
                    keep = True  # asked again within this Age second: worth keeping
            else:
                wire = self._wire
                if wire is not None and wire.get(slot + _AGE_OF) == age:
                    cached = wire.get(slot)
                    if cached is not None:
                        return cached  # type: ignore[return-value]
                    keep = True
        identity = coding == "identity"  # ``_variant``'s answer then, without its call
        effective, body = ("identity", self.response.body) if identity else self._variant(coding)
        data = b"".join(
            (
                self._head(effective, len(body)),
                extra,
                b"x-cache: ",
                x_cache,
                b"\r\nage: %d\r\n\r\n" % age,
                b"" if head_only else body,
            )
        )
        if cacheable:
            self._remember(slot, age, data if keep else None)
        return data

    def wire_not_modified(
        self,
        coding: Coding | str,
        now: float,
        x_cache: bytes = X_CACHE_HIT,
        extra: bytes = b"",
    ) -> bytes:
        """A 304 answering a client's conditional request from this entry (RFC 9110 15.4.5):
        the validator and caching fields of the ``coding`` variant, no body."""
        effective = self._variant(coding)[0]
        age = self.age(now)
        cacheable = x_cache in _CACHED_FORMS and not extra
        slot = 6 + _CODING_INDEX[effective]
        if x_cache == X_CACHE_STALE:
            slot += _STALE_SLOTS
        keep = False
        if cacheable:
            wire = self._wire
            if wire is not None and wire.get(slot + _AGE_OF) == age:
                cached = wire.get(slot)
                if cached is not None:
                    return cached  # type: ignore[return-value]
                keep = True
        lines = [b"HTTP/1.1 304 Not Modified\r\n"]
        lines.extend(
            line
            for line in self._header_lines(effective)
            if line[: line.index(b":")] in _NOT_MODIFIED_FIELDS
        )
        lines.append(self._house[0])
        lines.append(extra)
        lines.append(b"x-cache: " + x_cache + b"\r\nage: %d\r\n\r\n" % age)
        data = b"".join(lines)
        if cacheable:
            self._remember(slot, age, data if keep else None)
        return data

    def wire_range(
        self,
        range_value: bytes,
        if_range: bytes | None,
        now: float,
        x_cache: bytes = X_CACHE_HIT,
        extra: bytes = b"",
    ) -> bytes | None:
        """The 206 (or 416) answering a GET with ``Range`` from this complete response, or
        None when the whole response is the answer (see ``ranges.parse_range``; a failed
        If-Range; a multipart answer no smaller than the body; a status other than 200).

        Ranges are over the stored body (identity, or the coding the origin sent that we keep
        as is), so a client asking for gzip gets identity parts: every client accepts those,
        and the byte positions of a compressed variant would not be stable across rebuilds.
        Built per request, never cached: ranges are rare and their shapes unbounded.
        """
        response = self.response
        if response.status != 200:
            return None
        if if_range is not None and not if_range_holds(
            if_range, self.etag, self.last_modified, self.date
        ):
            return None
        body = response.body
        length = len(body)
        spans = parse_range(range_value, length)
        if spans is None:
            return None
        age = self.age(now)
        tail = b"x-cache: " + x_cache + b"\r\nage: %d\r\n\r\n" % age
        if spans == UNSATISFIABLE:
            return b"".join(
                (
                    b"HTTP/1.1 416 Range Not Satisfiable\r\ncontent-range: bytes */%d\r\n"
                    b"content-length: 0\r\n" % length,
                    self._house[0],
                    extra,
                    tail,
                )
            )
        content_type = next((v for n, v in response.headers if n == b"content-type"), None)
        partial = partial_content(body, spans, content_type, self._header_lines("identity"))
        if partial is None:
            return None
        lines, payload = partial
        lines.append(self._house[0])
        lines.append(extra)
        lines.append(tail)
        lines.append(payload)
        return b"".join(lines)

    # ----------------------------------------------------------------------------------------
    # Derivation

    def refreshed(self, response: StoredResponse) -> Entry:
        """A new entry for the same body after a 304 (merged headers, new freshness).

        Compressed variants are reused: the body is the same, so they still apply.
        """
        entry = Entry(
            response,
            key=self.key,
            primary=self.primary,
            url=self.url,
            compressor=self._compressor,
            extra_head=self._house[0],
            hidden=self._house[1],
        )
        if entry._compressor is not None and self._variants:
            entry._variants = dict(self._variants)
            for data in self._variants.values():
                entry.size += GROWN_OBJECT_OVERHEAD + (len(data) if data is not None else 0)
        return entry


def first_answer(
    entry: Entry, coding: Coding | str, now: float, head_only: bool, extra: bytes
) -> bytes | None:
    """``entry.wire(coding, now, head_only, X_CACHE_MISS, extra)`` for an entry whose identity
    head is still its template (``use_head_template``): the answer of the fill that stored it,
    in one formatting, and without keeping the head.  A fill's MISS is its entry's first
    answer and is never kept (``wire`` caches HIT and STALE forms only), so the head is built
    when a later answer asks for it, and never for a key asked for once (every miss of a
    stream of new keys).  None when ``wire`` is the way: no template, or a compressed answer.
    """
    template = entry._head0
    if type(template) is not HeadTemplate or (
        entry._compressor is not None and coding != "identity"
    ):
        return None
    response = entry.response
    freshness = response.freshness
    resident = now - freshness.response_time  # ``wire``'s Age
    age = int(freshness.initial_age + resident if resident > 0 else freshness.initial_age)
    if age >= _MAX_AGE_VALUE:
        age = _MAX_AGE_VALUE
    fields = response.headers
    body = response.body
    values: list[bytes | int] = []
    for at in template.values:
        values.append(fields[at][1])
    if template.with_length:
        values.append(len(body))
    values.append(extra)
    values.append(age)
    head = template.miss_form % tuple(values)
    return head if head_only else head + body


def stored_under(entry: Entry) -> tuple[bytes, bytes]:
    """``entry.key`` and ``entry.url`` in one call, without their properties
    (``MemoryStore.put``, once per fill)."""
    aliases = entry._aliases
    if aliases is None:
        primary = entry.primary
        return primary, primary[_CLASS_LENGTH:]
    return aliases


__all__ = [
    "ENTRY_OVERHEAD",
    "GROWN_OBJECT_OVERHEAD",
    "HEADER_OVERHEAD",
    "INDEX_OVERHEAD",
    "X_CACHE_BYPASS",
    "X_CACHE_HIT",
    "X_CACHE_MISS",
    "X_CACHE_REVALIDATED",
    "X_CACHE_STALE",
    "Compressor",
    "Entry",
    "HeadTemplate",
    "StoredResponse",
    "first_answer",
    "reason_phrase",
    "stored_response",
    "stored_under",
]
