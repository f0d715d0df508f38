"""The HTTP/1.1 front end's shortcut past llhttp: a bodiless keep-alive GET/HEAD that arrives
whole in one read, on a connection at a message boundary with nothing in flight, is answered
from these bytes alone (``HeadShortcuts.answer``).  In order of cost:

1. the exact bytes seen before (``EdgeState.request_heads``): a memoised hit, else the head
   parsed before;
2. the same head but for its User-Agent, Cookie and request ID (``edge.fasthead.MeaningKey``):
   the memoised hit, if any, never the parsed head (those fields go upstream on a miss);
3. a head seen at most once before (one seen twice is memoised whole by 4) whose fields but
   the volatile ones were seen before, with another request line (traffic spread over many
   keys: ``HeadShape``): only its request line is read, and it is answered if it is a fresh
   cache hit (``edge.stages.shaped``: its headers are the shape's plus its own volatile fields,
   these last); a first sight that finds nothing stored is scheduled as the request it is
   (its fields in the client's order), its MISS pending; anything else (a stale answer, a
   miss seen before) goes on to 4, which decides it exactly;
4. a head of the common shape (``edge.fasthead.parse_simple_head``), parsed in one pass.

Anything else (or anything odd) is left to llhttp and every check of ``edge.h1parse``.  The
shortcut decides; the connection acts (writes the bytes, or schedules the request).  One per
listener: it keeps no per-connection state.
"""

from __future__ import annotations

import re
from typing import Final

from edge.exchange import replayed_request
from edge.fasthead import MeaningKey, Volatile, parse_simple_head
from edge.h1parse import REQUEST_HEAD_MAX_BYTES, remember_head, sightings
from edge.http1 import RequestRejected, new_request_id, valid_request_id
from edge.memos import CHECKED_PATHS, HEAD_SHAPES, BoundedMemo
from edge.pipeline import EdgeState, Pipeline, ProxyRequest, RequestHead
from edge.request_target import check_path, path_of
from edge.state import HeadShape

#: The request line ``parse_simple_head`` accepts (its pattern's first line).
_REQUEST_LINE: Final = re.compile(rb"(GET|HEAD) (/[!-~]*) HTTP/1\.1\r\n")
_METHODS: Final = {b"GET": "GET", b"HEAD": "HEAD"}


class HeadShortcuts:
    """Answers from request bytes alone (module docstring)."""

    __slots__ = ("_meaning", "_paths", "_pipeline", "_shapes", "_state")

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        #: The config snapshot the two below were made for: the head-stripping rule (the
        #: request ID field's name is configurable) and ``edge.memos.HEAD_SHAPES`` (heads
        #: validated under that snapshot's limits).
        self._state: EdgeState | None = None
        self._meaning = MeaningKey(b"x-request-id")
        self._shapes: BoundedMemo[bytes, HeadShape] = BoundedMemo(HEAD_SHAPES)
        #: ``edge.memos.CHECKED_PATHS``: a target's path that ``check_path`` accepted -> the
        #: routing path (paths repeat where targets, told apart by their query, do not).
        self._paths: BoundedMemo[bytes, str] = BoundedMemo(CHECKED_PATHS)

    def meaning_key(self, state: EdgeState) -> MeaningKey:
        """The ``MeaningKey`` of config snapshot ``state`` (made once per snapshot)."""
        if state is not self._state:
            self._state = state
            self._meaning = MeaningKey(state.request_id_header)
            self._shapes = BoundedMemo(HEAD_SHAPES)
        return self._meaning

    def answer(
        self, data: bytes, client_ip: str, scheme: bytes, protocol: str | None
    ) -> bytes | ProxyRequest | None:
        """For ``data`` from a client at ``client_ip``: the response bytes of a cache hit; or
        the request it is, when the cache did not answer it (the connection schedules it, with
        ``Pipeline.take_pending``'s lookup); or None when it is not a head of a known shape
        (llhttp parses it)."""
        pipeline = self._pipeline
        state = pipeline.state
        heads = state.request_heads
        head = heads.get(data)
        if head is not None:
            if head.hit is not None:
                wire = pipeline.replay_hit(head, client_ip, head.supplied_id, protocol)
                if wire is not None:
                    return wire
            return self._replay(head, client_ip, scheme, protocol)
        if len(data) > REQUEST_HEAD_MAX_BYTES or data[-4:] != b"\r\n\r\n":
            return None
        meaning = self._meaning if state is self._state else self.meaning_key(state)
        volatile = meaning.split(data)
        key = volatile.key
        if key is not data:
            head = heads.get(key)
            if (
                head is not None
                and head.hit is not None
                # The stripped fields count against the limits like any other.
                and data.count(b"\n") <= state.max_headers + 2
                and len(data) <= state.max_header_bytes
            ):
                rid = volatile.request_id
                supplied = rid if rid is not None and valid_request_id(rid) else None
                wire = pipeline.replay_hit(head, client_ip, supplied, protocol)
                if wire is not None:
                    return wire
        limits = state.config.edge.limits
        seen = sightings(state.first_sights, key)
        line_end = key.find(b"\r\n") + 2
        shape_key = key[line_end:]
        shape = self._shapes.get(shape_key)
        if (
            shape is not None
            # A head seen thrice is memoised whole (4); one seen once before is answered by
            # its shape still: a key hit now and then (traffic spread over more keys than the
            # memos hold) is not worth a full parse and a memo that would not replay.
            and seen < 2
            and data.count(b"\n") <= state.max_headers + 2
            and len(data) <= state.max_header_bytes
        ):
            # A first sight that misses goes upstream from its shape (``edge.stages.shaped``);
            # one seen before is parsed below, and memoised.
            answered = self._shaped(
                shape, key, line_end, volatile, limits.max_url, client_ip, scheme, protocol, seen
            )
            if answered is not None:
                return answered
        simple = parse_simple_head(
            data,
            request_id_header=state.request_id_header,
            max_headers=limits.max_headers,
            max_header_bytes=limits.max_header_bytes,
            max_url=limits.max_url,
        )
        if simple is None:
            return None
        head = RequestHead(*simple)
        if shape is None and simple.host is not None:
            stripped = self._meaning.stripped
            self._shapes.remember(
                shape_key,
                HeadShape([f for f in simple.headers if f[0] not in stripped], simple.host),
            )
        if seen:
            remember_head(heads, key, head)
            return self._replay(head, client_ip, scheme, protocol)
        return self._replay(head, client_ip, scheme, protocol, memoised=False)

    def _shaped(
        self,
        shape: HeadShape,
        key: bytes,
        line_end: int,
        volatile: Volatile,
        max_url: int,
        client_ip: str,
        scheme: bytes,
        protocol: str | None,
        seen: int,
    ) -> bytes | ProxyRequest | None:
        """Step 3 (module docstring): the hit's bytes; for a head never ``seen`` before that
        finds nothing stored, its request (the MISS pending); else None."""
        line = _REQUEST_LINE.match(key)
        if line is None or line.end() != line_end:
            return None
        method, target = line.groups()
        pipeline = self._pipeline
        if len(target) > max_url or b"#" in target:
            return None
        end = target.find(b"?")
        raw_path = target if end < 0 else target[:end]
        path = self._paths.get(raw_path)
        if path is None:
            try:
                check_path(target)
            except RequestRejected:
                return None  # refused by the full parse, which says why
            path = self._paths.remember(raw_path, path_of(target))
        rid = volatile.request_id
        return pipeline.shaped_response(
            shape,
            volatile,
            _METHODS[method],
            target,
            raw_path,
            path,
            rid if rid is not None and valid_request_id(rid) else None,
            client_ip,
            scheme,
            protocol,
            not seen,
        )

    def _replay(
        self,
        head: RequestHead,
        client_ip: str,
        scheme: bytes,
        protocol: str | None,
        *,
        memoised: bool = True,
    ) -> bytes | ProxyRequest:
        """A request whose exact bytes were parsed and validated before: no parser, no
        callbacks (the parser stays at the message boundary it was at).  ``memoised``: the
        head lives in ``request_heads``, so what the hit path derives from it is kept on it;
        a head seen once goes through as if llhttp had parsed it."""
        supplied = head.supplied_id
        pipeline = self._pipeline
        request = replayed_request(
            head,
            client_ip,
            supplied if supplied is not None else new_request_id(),
            pipeline.clock(),
            head if memoised else None,
            scheme,
            protocol,
        )
        wire = pipeline.fast_response(request)
        return wire if wire is not None else request


__all__ = ["HeadShortcuts"]
