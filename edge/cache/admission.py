"""What a fill's response becomes in the store: whether it may be stored at all (from its head,
before the body is read, and again once it is complete), the stored response with its
fields pooled, and the entry around it.

``HttpCache`` owns one ``Admission`` and asks it; the decisions are ``policy``'s (RFC 9111),
this module turns them into entries and keeps the memory they cost low: header fields that
many responses repeat are shared (``SHARED_FIELDS``), fills within one second share their
Date, and consecutive fills of one kind of object share their whole field tuple.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Final, NamedTuple

from edge.memos import SHARED_FIELDS, BoundedMemo
from meridian.config import CacheRule

from .entry import Compressor, Entry, StoredResponse
from .key import CacheKey, Negotiator, variant_key, vary_key
from .messages import RequestInfo, UpstreamResponse, truncated
from .policy import (
    Header,
    Headers,
    ResponseMeta,
    compute_freshness,
    format_http_date,
    merge_not_modified,
    response_meta,
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


class _HeadVerdict(NamedTuple):
    """``Admission.storable_head``'s reading of one response head for one request."""

    headers: Sequence[Header]
    request: RequestInfo
    status: int
    rule: CacheRule
    meta: ResponseMeta
    #: ``uncacheable_reason``'s answer (None: storable, as far as the head tells).
    reason: str | None


class Admission:
    """Entries for a cache's fills (module docstring)."""

    __slots__ = (
        "_compressor",
        "_extra_head",
        "_head_meta",
        "_last_date",
        "_last_fields",
        "_negotiate",
        "_shared_fields",
        "_targeted",
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
        #: One copy of each stored header field that many responses repeat (``pooled``).
        self._shared_fields: BoundedMemo[Header, Header] = BoundedMemo(SHARED_FIELDS)
        self._last_date: Header = (b"date", b"")
        self._last_fields: tuple[Header, ...] = ()

    def set_targets(self, targets: Sequence[str]) -> None:
        """The RFC 9213 targets (``CacheConfig.targets``); entries already stored keep hiding
        the fields they hid."""
        self._targeted = targeted_fields(targets)
        #: RFC 9213 fields this cache consumes: never sent on, stored or not.
        self.targeted_fields: frozenset[bytes] = frozenset(self._targeted)

    def storable_head(
        self, key: CacheKey, request: RequestInfo, status: int, headers: Headers, now: float
    ) -> str | None:
        """Why a fill's response with this status and these headers will not be stored (its
        body need not be buffered: the edge may stream it), or None when it may be: the rules
        ``admit`` applies once the body is in, minus what needs the body."""
        meta = response_meta(headers, self._targeted)
        reason = uncacheable_reason(
            b"GET", status, request.cc, request.authorized, meta, key.rule, request.cookie
        )
        # ``admit`` reuses both for the same header list, request, status and rule.
        self._head_meta = _HeadVerdict(headers, request, status, key.rule, meta, reason)
        if reason is not None:
            return reason
        # A validator alone makes it worth storing (``worth_storing``): no freshness to work out.
        if not meta.has_validator and not worth_storing(
            compute_freshness(status, meta, key.rule, now, now), meta
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
        if (
            known is not None
            and known.headers is response.headers
            and known.request is request
            and known.status == response.status
            and known.rule is rule
        ):
            meta, reason = known.meta, known.reason
        else:
            meta = response_meta(response.headers, self._targeted)
            reason = uncacheable_reason(
                b"GET", response.status, request.cc, request.authorized, meta, rule, request.cookie
            )
        if reason is not None:
            return None, reason
        if not response.complete:
            return None, "streamed"
        if meta.content_encoding is None and truncated(response):
            # Shorter than announced: the upstream died mid-body, or this is a HEAD response.
            return None, "incomplete"
        freshness = compute_freshness(response.status, meta, rule, request_time, response_time)
        if not worth_storing(freshness, meta):
            return None, "no-freshness"
        headers = stored_headers(response.headers, keep_set_cookie=rule.store_set_cookie)
        if meta.date is None:
            headers.append((b"date", format_http_date(response_time)))
        names = meta.vary
        if meta.content_encoding is None:
            # The entry serves every coding itself: Accept-Encoding does not split variants.
            if b"accept-encoding" in names:
                names = tuple(name for name in names if name != b"accept-encoding")
        elif b"accept-encoding" not in names:
            # An encoded body we cannot decode is only for clients of the same coding class,
            # even when the origin forgot to say Vary: Accept-Encoding.
            names = (*names, b"accept-encoding")
        secondary = vary_key(names, request.headers, self._negotiate) if names else b""
        stored = StoredResponse(
            status=response.status,
            reason=response.reason,
            headers=self.pooled(headers),
            body=response.body,
            freshness=freshness,
            vary=names,
            surrogate_keys=meta.surrogate_keys,
            content_coding=meta.content_encoding,
            compressible=response.compressible,
            auth_ok=shareable_with_authorization(meta.cc),
        )
        return self.entry(key, variant_key(key.primary, names, secondary), stored), ""

    def entry(self, key: CacheKey, store_key: bytes, response: StoredResponse) -> Entry:
        """The entry for ``response`` under ``store_key`` (a fill's, or a copy from L2)."""
        return Entry(
            response,
            key=store_key,
            primary=key.primary,
            url=key.url,
            compressor=self._compressor,
            extra_head=self._extra_head,
            hidden=self.targeted_fields,
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

    def pooled(self, headers: list[Header]) -> tuple[Header, ...]:
        """The stored headers, each field that is not unique to its response replaced by the
        one copy every entry shares: a million cached tickers would otherwise each hold their
        own ``content-type: application/json`` (about 0.7 KB of a 4.5 KB entry).  Bounded: the
        pool is cleared when full and refills with what is common."""
        pool = self._shared_fields
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


__all__ = ["SHARED_FIELDS_SIZE", "Admission"]
