"""What a fill's response becomes in the store: whether it may be stored at all (from its head,
before the body is read, and again once it is complete), the stored response with its
fields pooled, and the entry around it.

``HttpCache`` owns one ``Admission`` and asks it; the decisions are ``policy``'s (RFC 9111),
this module turns them into entries and keeps the memory they cost low: header fields that
many responses repeat are shared (``SHARED_FIELDS``), fills within one second share their
Date, and consecutive fills of one kind of object share their whole field tuple.

A caller that knows a response's head shape (``StoredShape``: its header names in order and its
values but the volatile ones, ``policy.VOLATILE_FIELDS``) passes it, and the meta, the stored
fields and the entry's measure are then made from that template and the volatile values alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Final, NamedTuple

from edge.memos import SHARED_FIELDS, BoundedMemo
from meridian.config import CacheRule

from .entry import (
    HEADER_OVERHEAD,
    Compressor,
    Entry,
    HeadTemplate,
    StoredResponse,
    stored_response,
)
from .key import CacheKey, Negotiator, variant_key, vary_key
from .messages import RequestInfo, UpstreamResponse, truncated
from .policy import (
    NO_DIRECTIVES,
    VOLATILE_FIELDS,
    Freshness,
    FreshnessParts,
    Header,
    Headers,
    MetaShape,
    ResponseMeta,
    compute_freshness,
    format_http_date,
    freshness_parts,
    initial_age,
    merge_not_modified,
    meta_shape,
    response_meta,
    shaped_meta,
    shareable_with_authorization,
    stored_headers,
    targeted_fields,
    uncacheable_reason,
    worth_storing,
)

#: Stored header fields nearly always unique to one response: never pooled.
_UNIQUE_PER_RESPONSE: Final = frozenset(
    {b"date", b"etag", b"last-modified", b"expires", b"content-md5", b"set-cookie", b"x-request-id"}
)
#: Distinct shared header fields kept (``Admission.pooled``).
SHARED_FIELDS_SIZE: Final = SHARED_FIELDS.bound
#: Header lines of a head that may have a shape (``StoredShape``); longer heads take the plain
#: path every time.
SHAPED_LINES_MAX: Final = 48
#: ``StoredShape.plain``'s answer for a status not seen yet (a reason is a str or None).
_UNKNOWN: Final = "\x00unknown"
#: Stand-ins for the volatile values while a shape's template is made: objects of their own,
#: recognised by identity (no origin's value is ever one of them).
_MARKS: Final = tuple(b"\x00volatile %d\x00" % i for i in range(SHAPED_LINES_MAX))


class StoredShape:
    """What ``admit`` makes of every response of one head shape (its header names in order,
    its values but those of ``VOLATILE_FIELDS``) under one rule and one set of RFC 9213
    targets: the parsed meta, and the stored header tuple as a template whose volatile fields
    are taken from each response's own header list (``fills``), with what they cost an entry.
    Made by ``Admission.stored_shape``; the edge memoises it (``edge.stages.fill_read``)."""

    __slots__ = (
        "auth_ok",
        "etag_at",
        "fills",
        "freshness",
        "head",
        "head_tried",
        "header_bytes",
        "length_at",
        "meta",
        "modified_at",
        "names",
        "plain",
        "rule",
        "targeted",
        "template",
    )

    def __init__(
        self,
        rule: CacheRule,
        targeted: tuple[bytes, ...],
        meta: MetaShape,
        template: tuple[Header, ...],
        fills: tuple[tuple[int, int, bool], ...],
        header_bytes: int,
        etag_at: tuple[int, ...],
        modified_at: int,
        length_at: int,
    ) -> None:
        #: What the shape was made for (``storable_head`` uses it for these only).
        self.rule = rule
        self.targeted = targeted
        self.meta = meta
        #: The stored fields, volatile ones as found in the first response (each replaced).
        self.template = template
        #: (index in the stored fields, index in the response's header list, is a Date).
        self.fills = fills
        #: ``HEADER_OVERHEAD`` per stored field, names and the stable values' bytes.
        self.header_bytes = header_bytes
        #: Indexes of the stored ETag lines, and of the first Last-Modified (-1: none).
        self.etag_at = etag_at
        self.modified_at = modified_at
        #: Index of the header list's first Content-Length line, the one ``truncated`` reads
        #: (-1: none).
        self.length_at = length_at
        base = meta.base  # what every response of the shape has in these (``shaped_meta``)
        #: The stored response's Vary names (``variant_names``) and ``auth_ok``.
        self.names = variant_names(base.vary, base.content_encoding)
        self.auth_ok = shareable_with_authorization(base.cc)
        #: ``freshness_parts`` of the shape by status (made when first needed; None: none).
        self.freshness: dict[int, FreshnessParts | None] = {}
        #: ``uncacheable_reason`` of the shape by status, for a request without directives,
        #: Authorization or Cookie (``storable_head``; made when first needed).
        self.plain: dict[int, str | None] = {}
        #: The identity head's template, made from the first entry of the shape whose Date
        #: was the origin's (``Entry.head_template``); used by entries it ``fits``.
        self.head: HeadTemplate | None = None
        self.head_tried = False


def variant_names(vary: tuple[bytes, ...], content_encoding: bytes | None) -> tuple[bytes, ...]:
    """The request header names whose values select a stored variant: the response's Vary,
    adjusted for the coding the entry serves."""
    if content_encoding is None:
        # The entry serves every coding itself: Accept-Encoding does not split variants.
        if b"accept-encoding" in vary:
            return tuple(name for name in vary if name != b"accept-encoding")
        return vary
    if b"accept-encoding" not in vary:
        # An encoded body we cannot decode is only for clients of the same coding class,
        # even when the origin forgot to say Vary: Accept-Encoding.
        return (*vary, b"accept-encoding")
    return vary


class _HeadVerdict(NamedTuple):
    """``Admission.storable_head``'s reading of one response head for one request."""

    headers: Sequence[Header]
    request: RequestInfo
    status: int
    rule: CacheRule
    meta: ResponseMeta
    #: ``uncacheable_reason``'s answer (None: storable, as far as the head tells).
    reason: str | None
    #: The head's shape, when the caller knew it and it applies (``admit`` stores by it).
    shape: StoredShape | None


class Admission:
    """Entries for a cache's fills (module docstring)."""

    __slots__ = (
        "_compressor",
        "_extra_head",
        "_head_meta",
        "_negotiate",
        "_targeted",
        "fields",
        "targeted_fields",
    )

    def __init__(
        self,
        targets: Sequence[str],
        *,
        compressor: Compressor | None,
        extra_head: bytes,
        negotiate: Negotiator,
    ) -> None:
        self._compressor = compressor
        self._extra_head = extra_head
        self._negotiate = negotiate
        self.set_targets(targets)
        #: What ``storable_head`` last made of a response head (``admit`` reuses it).
        self._head_meta: _HeadVerdict | None = None
        #: One copy of each stored header field that many responses repeat.
        self.fields = SharedFields()

    def set_targets(self, targets: Sequence[str]) -> None:
        """The RFC 9213 targets (``CacheConfig.targets``); entries already stored keep hiding
        the fields they hid."""
        self._targeted = targeted_fields(targets)
        #: RFC 9213 fields this cache consumes: never sent on, stored or not.
        self.targeted_fields: frozenset[bytes] = frozenset(self._targeted)

    def storable_head(
        self,
        key: CacheKey,
        request: RequestInfo,
        status: int,
        headers: Headers,
        now: float,
        shape: StoredShape | None = None,
    ) -> str | None:
        """Why a fill's response with this status and these headers will not be stored (its
        body need not be buffered: the edge may stream it), or None when it may be: the rules
        ``admit`` applies once the body is in, minus what needs the body.

        ``shape``: ``stored_shape`` of a header list of the same shape as ``headers`` (only
        the volatile fields are then read); ignored when made for another rule or targets."""
        rule = key.rule
        plain: dict[int, str | None] | None = None
        if shape is not None and shape.rule is rule and shape.targeted is self._targeted:
            meta = shaped_meta(shape.meta, headers)
            # The shape decides the verdict but for the request's own fields (of its volatile
            # ones only the Expires' presence counts): a plain request's is the shape's.
            if request.cc is NO_DIRECTIVES and not request.authorized and not request.cookie:
                plain = shape.plain
        else:
            shape = None
            meta = response_meta(headers, self._targeted)
        reason = _UNKNOWN if plain is None else plain.get(status, _UNKNOWN)
        if reason is _UNKNOWN:
            reason = uncacheable_reason(
                b"GET", status, request.cc, request.authorized, meta, rule, request.cookie
            )
            if plain is not None and len(plain) < 4:  # a shape has one status (its key's)
                plain[status] = reason
        # ``admit`` reuses both for the same header list, request, status and rule.
        self._head_meta = tuple.__new__(  # the NamedTuple's ``__new__``, without its call
            _HeadVerdict, (headers, request, status, rule, meta, reason, shape)
        )
        if reason is not None:
            return reason
        # A validator alone makes it worth storing (``worth_storing``): no freshness to work out
        # (``meta.has_validator``, read without the property's call).
        if (
            meta.etag is None
            and meta.last_modified is None
            and not worth_storing(compute_freshness(status, meta, key.rule, now, now), meta)
        ):
            return "no-freshness"
        return None

    def admit(
        self,
        key: CacheKey,
        request: RequestInfo,
        response: UpstreamResponse,
        request_time: float,
        response_time: float,
    ) -> tuple[Entry | None, str]:
        """An entry for a complete upstream response, or None and why it may not be stored."""
        known = self._head_meta
        self._head_meta = None
        rule = key.rule
        shape: StoredShape | None = None
        if (
            known is not None
            and known.headers is response.headers
            and known.request is request
            and known.status == response.status
            and known.rule is rule
        ):
            meta, reason, shape = known.meta, known.reason, known.shape
        else:
            meta = response_meta(response.headers, self._targeted)
            reason = uncacheable_reason(
                b"GET", response.status, request.cc, request.authorized, meta, rule, request.cookie
            )
        if reason is not None:
            return None, reason
        if not response.complete:
            return None, "streamed"
        if meta.content_encoding is None:
            # Shorter than announced: the upstream died mid-body, or this is a HEAD response.
            if shape is None:
                if truncated(response):
                    return None, "incomplete"
            elif (at := shape.length_at) >= 0 and (  # ``truncated``, its line known
                response.headers[at][1].strip() != b"%d" % len(response.body)
            ):
                return None, "incomplete"
        status = response.status
        parts = None
        if shape is not None:
            # ``compute_freshness`` of a response of the shape: its parts made once a status.
            by_status = shape.freshness
            if status in by_status:
                parts = by_status[status]
            elif len(by_status) < 4:  # a shape has one status (its key's); bounded all the same
                parts = by_status[status] = freshness_parts(status, meta, rule)
        if parts is not None:
            # Every field given (``parts`` are the last five): ``tuple.__new__`` makes it
            # without the NamedTuple's ``__new__``.
            freshness = tuple.__new__(
                Freshness, (response_time, initial_age(meta, request_time, response_time), *parts)
            )
        else:
            freshness = compute_freshness(status, meta, rule, request_time, response_time)
        # A validator alone makes it worth storing, as in ``storable_head``.
        if meta.etag is None and meta.last_modified is None and not worth_storing(freshness, meta):
            return None, "no-freshness"
        measured: tuple[int, bytes | None, bytes | None] | None = None
        if shape is not None:
            fields, measured = self.fields.shaped(shape, response.headers, meta, response_time)
            names, auth_ok = shape.names, shape.auth_ok  # the shape's Vary and Cache-Control
        else:
            headers = stored_headers(response.headers, keep_set_cookie=rule.store_set_cookie)
            if meta.date is None:
                headers.append((b"date", format_http_date(response_time)))
            fields = self.fields.pooled(headers)
            names = variant_names(meta.vary, meta.content_encoding)
            auth_ok = shareable_with_authorization(meta.cc)
        if names:
            store_key = variant_key(
                key.primary, names, vary_key(names, request.headers, self._negotiate)
            )
        else:
            store_key = key.primary  # ``variant_key``'s answer when nothing varies
        stored = stored_response(  # positional: a third cheaper than by keyword
            status,
            response.reason,
            fields,
            response.body,
            freshness,
            names,
            meta.surrogate_keys,
            meta.content_encoding,
            response.compressible,
            auth_ok,
        )
        entry = self.entry(key, store_key, stored, measured)
        if shape is not None and meta.date is not None:  # no Date of ours after the fields
            template = shape.head
            if template is None and not shape.head_tried:
                shape.head_tried = True
                template = shape.head = entry.head_template([at for at, _, _ in shape.fills])
            if template is not None and template.fits(entry):
                entry.use_head_template(template)
        return entry, ""

    def entry(
        self,
        key: CacheKey,
        store_key: bytes,
        response: StoredResponse,
        measured: tuple[int, bytes | None, bytes | None] | None = None,
    ) -> Entry:
        """The entry for ``response`` under ``store_key`` (a fill's, or a copy from L2)."""
        return Entry(  # positional (``Entry.__init__``): key, primary, url, compressor, ...
            response,
            store_key,
            key.primary,
            key.url,
            self._compressor,
            self._extra_head,
            self.targeted_fields,
            measured,
        )

    def stored_shape(self, headers: Headers, rule: CacheRule) -> StoredShape | None:
        """The ``StoredShape`` of ``headers`` (a fill's header list, as ``admit`` gets it)
        under ``rule``, or None for a head too long to be worth one (``SHAPED_LINES_MAX``)."""
        if len(headers) > SHAPED_LINES_MAX:
            return None
        # The template is ``stored_headers`` of the list with each volatile value replaced by
        # a mark: where a mark comes out, each response's own value goes.
        origin: dict[int, int] = {}
        marked: list[Header] = []
        for index, (name, value) in enumerate(headers):
            if name in VOLATILE_FIELDS:
                mark = _MARKS[len(origin)]
                origin[id(mark)] = index
                value = mark
            marked.append((name, value))
        template: list[Header] = []
        fills: list[tuple[int, int, bool]] = []
        header_bytes = 0
        etag_at: list[int] = []
        modified_at = -1
        for at, (name, value) in enumerate(
            stored_headers(marked, keep_set_cookie=rule.store_set_cookie)
        ):
            header_bytes += len(name) + HEADER_OVERHEAD
            index = origin.get(id(value), -1)
            if index >= 0:
                fills.append((at, index, name == b"date"))
                template.append(headers[index])
            else:
                header_bytes += len(value)
                field = (name, value)
                template.append(
                    field if name in _UNIQUE_PER_RESPONSE else self.fields.shared(field)
                )
            if name == b"etag":
                etag_at.append(at)
            elif name == b"last-modified" and modified_at < 0:
                modified_at = at
        return StoredShape(
            rule,
            self._targeted,
            meta_shape(headers, self._targeted),
            tuple(template),
            tuple(fills),
            header_bytes,
            tuple(etag_at),
            modified_at,
            next((at for at, (name, _) in enumerate(headers) if name == b"content-length"), -1),
        )

    def refreshed(
        self,
        key: CacheKey,
        stale: Entry,
        update: UpstreamResponse,
        request_time: float,
        response_time: float,
    ) -> tuple[Entry, ResponseMeta]:
        """RFC 9111 4.3.4: ``stale`` freshened with a 304's headers, and the merged meta."""
        rule = key.rule
        merged = merge_not_modified(
            stale.response.headers, update.headers, keep_set_cookie=rule.store_set_cookie
        )
        update_meta = response_meta(update.headers, self._targeted)
        if update_meta.date is None:  # the stored Date would make the refreshed entry look old
            merged = [(n, v) for n, v in merged if n != b"date"]
            merged.append((b"date", format_http_date(response_time)))
        meta = response_meta(merged, self._targeted)._replace(age=update_meta.age)
        old = stale.response
        refreshed = stale.refreshed(
            replace(
                old,
                headers=tuple(merged),
                freshness=compute_freshness(old.status, meta, rule, request_time, response_time),
                surrogate_keys=update_meta.surrogate_keys or old.surrogate_keys,
                auth_ok=shareable_with_authorization(meta.cc),
            )
        )
        return refreshed, meta


class SharedFields:
    """The stored header fields of a cache's entries, each field that is not unique to its
    response (``content-type: application/json``) one copy every entry shares (``pooled``, and
    ``shaped`` for a fill of a known head shape): a million cached tickers would otherwise
    each hold their own (about 0.7 KB of a 4.5 KB entry)."""

    __slots__ = ("_last_date", "_last_fields", "_pool")

    def __init__(self) -> None:
        #: One copy of each field that many responses repeat (bounded: cleared when full).
        self._pool: BoundedMemo[Header, Header] = BoundedMemo(SHARED_FIELDS)
        self._last_date: Header = (b"date", b"")
        self._last_fields: tuple[Header, ...] = ()

    def pooled(self, headers: list[Header]) -> tuple[Header, ...]:
        """The stored headers, each field that is not unique to its response replaced by the
        one copy every entry shares: a million cached tickers would otherwise each hold their
        own ``content-type: application/json`` (about 0.7 KB of a 4.5 KB entry).  Bounded: the
        pool is cleared when full and refills with what is common."""
        pool = self._pool
        shared: list[Header] = []
        for field in headers:
            if field[0] == b"date":
                # Unique per second, not per response: fills within a second share the last.
                if field == self._last_date:
                    field = self._last_date
                else:
                    self._last_date = field
            elif field[0] not in _UNIQUE_PER_RESPONSE:
                kept = pool.get(field)
                if kept is None:
                    if len(pool) >= SHARED_FIELDS_SIZE:
                        pool.clear()
                    pool[field] = kept = field
                field = kept
            shared.append(field)
        fields = tuple(shared)
        # Consecutive fills of one kind of object (tickers) often carry the very same fields.
        if fields == self._last_fields:
            return self._last_fields
        self._last_fields = fields
        return fields

    def shared(self, field: Header) -> Header:
        """The one copy of ``field`` every entry shares (``SHARED_FIELDS``)."""
        pool = self._pool
        kept = pool.get(field)
        if kept is None:
            if len(pool) >= SHARED_FIELDS_SIZE:
                pool.clear()
            pool[field] = kept = field
        return kept

    def shaped(
        self, shape: StoredShape, headers: Headers, meta: ResponseMeta, response_time: float
    ) -> tuple[tuple[Header, ...], tuple[int, bytes | None, bytes | None]]:
        """What ``stored_headers`` and ``pooled`` make of ``headers`` of ``shape``, and what
        ``Entry`` would measure of it (``Entry``'s ``measured``)."""
        fields = list(shape.template)
        size = shape.header_bytes
        for at, index, dated in shape.fills:
            field = headers[index]
            if dated:  # as ``pooled`` does: fills within a second share the last Date
                if field == self._last_date:
                    field = self._last_date
                else:
                    self._last_date = field
            fields[at] = field
            size += len(field[1])
        if meta.date is None:
            field = (b"date", format_http_date(response_time))
            if field == self._last_date:
                field = self._last_date
            else:
                self._last_date = field
            fields.append(field)
            size += len(field[0]) + len(field[1]) + HEADER_OVERHEAD
        etag: bytes | None = None
        for at in shape.etag_at:
            etag = fields[at][1].strip() or None
            if etag is not None:
                break
        at = shape.modified_at
        measured = (size, etag, fields[at][1] if at >= 0 else None)
        stored = tuple(fields)
        # Consecutive fills of one kind of object (tickers) often carry the very same fields.
        if stored == self._last_fields:
            return self._last_fields, measured
        self._last_fields = stored
        return stored, measured


__all__ = ["SHARED_FIELDS_SIZE", "Admission", "SharedFields"]
