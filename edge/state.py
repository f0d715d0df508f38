"""The config snapshot every stage reads, and what is memoised under it.

``EdgeState`` is built once per config generation and pinned by a request when it starts, so
a reload never changes a request half-way.  Its ``route`` is the route stage (host and path to
a ``RouteTarget``, memoised); ``RequestHead`` is a validated request head remembered by its
exact bytes (``EdgeState.request_heads``), with what the hit path derives from it.  The memos
themselves are named and bounded in ``edge.memos``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Literal, NamedTuple

from edge.cache import HitMemo, Prepared
from edge.cache.messages import RequestInfo
from edge.cache.policy import NO_DIRECTIVES, targeted_fields
from edge.cache.requests import RequestReader
from edge.http1 import HOP_BY_HOP, Headers, head_budget, via_value
from edge.memos import FILL_HEADERS, FIRST_SIGHTS, REQUEST_HEADS, ROUTES, BoundedMemo
from edge.router import Router, RouteTarget, normalise_host
from meridian.config import Config


@dataclass(frozen=True, slots=True)
class EdgeState:
    """Everything a request reads from config, built once per config generation."""

    config: Config
    generation: int
    pop: str
    router: Router
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...]
    request_id_header: bytes
    failure_statuses: frozenset[int]
    #: ``request_id_header`` as aiohttp takes header names.
    request_id_name: str = ""
    #: Upstream response headers never passed on: hop-by-hop, framing, the edge's own.
    dropped_response_headers: frozenset[bytes] = frozenset()
    #: The same plus the RFC 9213 fields addressed to this cache (``edge.cache.targets``), for
    #: responses passed through uncached: those fields are the edge's, stored or not.
    dropped_forwarded_headers: frozenset[bytes] = frozenset()
    #: ``Via`` value this POP adds to responses.
    via: bytes = b""
    #: Per-request limits and client deadlines, precomputed for the protocol's callbacks:
    #: raw head bytes allowed (``http1.head_budget``), and seconds per deadline kind
    #: (none, header, body, idle: ``edge.protocol``'s ``_DEADLINE_*`` indexes).
    head_budget: int = 0
    deadlines: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    max_headers: int = 0
    max_header_bytes: int = 0
    #: Request headers the protocol notes as they arrive: Host, framing, the request ID.
    tracked_headers: frozenset[bytes] = frozenset()
    #: ``edge.memos.REQUEST_HEADS``: raw request chunk -> its parsed head, for requests
    #: validated under this snapshot's limits (a reload starts afresh).
    request_heads: BoundedMemo[bytes, RequestHead] = field(
        default_factory=lambda: BoundedMemo(REQUEST_HEADS)
    )
    #: ``edge.memos.FIRST_SIGHTS``: hashes of heads seen -> how often (1, or 2 for more).
    first_sights: BoundedMemo[int, int] = field(default_factory=lambda: BoundedMemo(FIRST_SIGHTS))
    #: ``edge.memos.ROUTES``: (Host header, path) -> route; dropped with the snapshot.
    route_memo: BoundedMemo[tuple[bytes | None, str], RouteTarget | None] = field(
        default_factory=lambda: BoundedMemo(ROUTES)
    )

    @classmethod
    def build(cls, config: Config, pop: str, generation: int) -> EdgeState:
        edge = config.edge
        dropped = HOP_BY_HOP | {
            b"content-length",
            b"x-cache",
            b"x-meridian-region",
            edge.request_id_header.lower().encode(),
        }
        targeted = targeted_fields(edge.cache.targets) if edge.cache.enabled else ()
        return cls(
            config=config,
            generation=generation,
            pop=pop,
            router=Router(config, pop),
            trusted_proxies=edge.trusted_proxies,
            request_id_header=edge.request_id_header.lower().encode(),
            failure_statuses=frozenset(config.outlier.failure_statuses),
            request_id_name=edge.request_id_header.lower(),
            dropped_response_headers=dropped,
            dropped_forwarded_headers=dropped | frozenset(targeted),
            via=via_value("1.1", pop),
            head_budget=head_budget(edge.limits),
            deadlines=(
                0.0,
                edge.timeouts.client_header,
                edge.timeouts.client_body,
                edge.timeouts.client_idle,
            ),
            max_headers=edge.limits.max_headers,
            max_header_bytes=edge.limits.max_header_bytes,
            tracked_headers=frozenset(
                {
                    b"host",
                    b"content-length",
                    b"transfer-encoding",
                    b"connection",
                    edge.request_id_header.lower().encode(),
                }
            ),
        )

    def route(self, host: bytes | None, path: str) -> RouteTarget | None:
        """The route stage: where a request goes (route, service, regions ordered for this
        POP), or None when no route matches."""
        key = (host, path)
        memo = self.route_memo
        try:
            return memo[key]
        except KeyError:
            pass
        target = self.router.match(normalise_host(host), path)
        if len(memo) >= memo.bound:
            memo.clear()
        memo[key] = target
        return target


class FillHeaders:
    """The upstream header lines of fills made from requests whose fields (but the request
    ID) are one list: by client address and scheme, without the request ID line
    (``edge.memos.FILL_HEADERS``, ``stages.fill.fill_headers``).  Kept by a ``RequestHead``
    (one request's exact bytes) and by a ``HeadShape`` (heads that differ only in their
    request line)."""

    __slots__ = ("fill_headers", "filled")

    def __init__(self) -> None:
        #: Made on the second fill (``filled``): a memo that would serve once is not kept.
        self.fill_headers: BoundedMemo[tuple[str, bytes], bytes] | None = None
        #: Whether a fill was made from these fields already.
        self.filled = False

    def new_fill_headers(self) -> BoundedMemo[tuple[str, bytes], bytes]:
        memo: BoundedMemo[tuple[str, bytes], bytes] = BoundedMemo(FILL_HEADERS)
        self.fill_headers = memo
        return memo


class RequestHead(FillHeaders):
    """A validated bodiless HTTP/1.1 keep-alive GET/HEAD, by the exact bytes it came in.

    Parsing and validation are a pure function of those bytes (under one config snapshot's
    limits), so when a connection at a message boundary receives exactly the same chunk again
    (clients repeat their requests byte for byte) the protocol replays this instead of running
    httptools and its callbacks.  It also keeps what the hit path derives from the head alone:
    the cache's ``Prepared`` lookup and the route name.  Lives in ``EdgeState.request_heads``.
    """

    __slots__ = (
        "headers",
        "hit",
        "host",
        "method",
        "path",
        "prepared",
        "route",
        "supplied_id",
        "target",
    )

    def __init__(
        self,
        method: str,
        target: bytes,
        path: str,
        host: bytes | None,
        headers: Headers,
        supplied_id: bytes | None,
    ) -> None:
        super().__init__()
        self.method = method
        self.target = target
        self.path = path
        self.host = host
        self.headers = headers
        #: The client's request ID when it sent one (valid); None: a new one per request.
        self.supplied_id = supplied_id
        self.prepared: Prepared | None = None
        self.route: str | None = None
        #: The last fresh hit for these bytes, replayed while it holds (``Pipeline.replay_hit``).
        self.hit: HitReplay | None = None


class HeadShape(FillHeaders):
    """What a request head is apart from its request line and its volatile fields
    (``edge.fasthead.MeaningKey``: User-Agent, Cookie, the request ID), remembered by those
    bytes (``edge.memos.HEAD_SHAPES``), so that heads differing only in their target (traffic
    spread over many keys) are validated and read once (``edge.h1fast``).  The bytes were
    accepted whole by ``parse_simple_head`` under one config snapshot."""

    __slots__ = ("headers", "host", "reads")

    def __init__(self, headers: Headers, host: bytes) -> None:
        super().__init__()
        #: The head's fields as decided (Host screened), without the volatile ones (a fill of
        #: a head that had none keeps its upstream lines here: ``FillHeaders``).
        self.headers = headers
        self.host = host
        #: Method -> what the cache reads from such heads, or False when they go the long
        #: way (``read``, on first use).
        self.reads: dict[str, RequestInfo | Literal[False]] = {}

    def read(self, method: str, reader: RequestReader) -> RequestInfo | Literal[False]:
        """What ``reader`` makes of such heads with ``method`` (GET or HEAD), remembered; False
        for request directives (max-age, no-store, only-if-cached, ...) or a bypass."""
        made = reader.read(method == "HEAD", self.headers)
        read: RequestInfo | Literal[False] = False
        if not isinstance(made, str) and made.cc is NO_DIRECTIVES:
            read = made
        self.reads[method] = read
        return read


class HitReplay(NamedTuple):
    """A memoised hit (or stale-while-revalidate answer) and what its metrics and access line
    need (``edge.memos.HIT_REPLAYS``: one per ``RequestHead``)."""

    memo: HitMemo
    route: str
    region: str
    status: int
    #: The cache status to count and log: HIT, or STALE (served while one refresh runs).
    label: str


__all__ = ["EdgeState", "FillHeaders", "HeadShape", "HitReplay", "RequestHead"]
