"""The topology config: one YAML file describes the whole world.

The file is loaded into frozen, typed dataclasses by one generic loader driven by the field
annotations below, so the schema is written once.  Every problem is collected (not just the
first) and reported as ``FILE: path.to.field: reason``.  Cross-references (a POP naming an
unknown region, a residency rule nobody can satisfy, ...) are checked after the structural pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import yaml

from meridian.units import parse_duration, parse_rate, parse_size

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")


class ConfigError(Exception):
    """A config file that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# Markers carried in ``Annotated[...]`` that tell the loader how to read a scalar.
class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


DURATION = _Marker("duration")
SIZE = _Marker("size")
URL = _Marker("url")
RATE = _Marker("rate")
HOSTPORT = _Marker("hostport")
COUNTRY = _Marker("country")
CONTINENT = _Marker("continent")
#: A mapping in YAML (``name: {...}``) loaded as a tuple of records whose ``name`` is the key.
NAMED = _Marker("named")

Duration = Annotated[float, DURATION]
Size = Annotated[int, SIZE]
Url = Annotated[str, URL]
#: Events per second, written ``10/s``, ``600/m`` or as a bare number (per second).
Rate = Annotated[float, RATE]

CONTINENTS = frozenset({"AF", "AN", "AS", "EU", "NA", "OC", "SA"})


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_hostport(text: str) -> HostPort:
    """``127.0.0.1:8080`` / ``[::1]:53`` -> HostPort; ValueError with the reason otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port 0-65535, got {text!r}")
    return HostPort(host, int(port))


def hostport_argument(text: str) -> HostPort:
    """``parse_hostport`` for argparse's ``type=``."""
    try:
        return parse_hostport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class Location:
    lat: float
    lon: float
    country: Annotated[str | None, COUNTRY] = None
    continent: Annotated[str | None, CONTINENT] = None

    def __post_init__(self) -> None:
        if not -90.0 <= self.lat <= 90.0:
            raise ValueError(f"lat {self.lat} is outside -90..90")
        if not -180.0 <= self.lon <= 180.0:
            raise ValueError(f"lon {self.lon} is outside -180..180")


@dataclass(frozen=True, slots=True)
class Listeners:
    edge: Annotated[HostPort, HOSTPORT] = HostPort("127.0.0.1", 8080)
    edge_admin: Annotated[HostPort, HOSTPORT] = HostPort("127.0.0.1", 9100)
    dns: Annotated[HostPort, HOSTPORT] = HostPort("127.0.0.1", 5353)
    dns_admin: Annotated[HostPort, HOSTPORT] = HostPort("127.0.0.1", 9153)


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Active checks, HAProxy/Envoy semantics."""

    kind: Literal["http", "tcp"] = "http"
    path: str = "/healthz"
    interval: Duration = 10.0
    #: Interval while a target is between states (HAProxy's ``fastinter``).
    fast_interval: Duration = 2.0
    timeout: Duration = 2.0
    fall: int = 3
    rise: int = 2
    #: Each check is delayed by up to this fraction of the interval, so checks spread out.
    jitter: float = 0.1
    status_min: int = 200
    status_max: int = 399
    body_match: str | None = None


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Passive detection from live traffic, Envoy semantics."""

    enabled: bool = True
    consecutive_failures: int = 5
    base_ejection: Duration = 30.0
    max_ejection: Duration = 300.0
    max_ejection_percent: int = 50
    #: Below this share of healthy backends a pool spreads over all of them (Envoy's panic mode).
    panic_threshold_percent: int = 50
    failure_statuses: tuple[int, ...] = (502, 503, 504)


@dataclass(frozen=True, slots=True)
class Region:
    """An origin site."""

    name: str
    location: Location
    backends: tuple[Url, ...]
    #: Residency zone the region sits in (``eu``); rules restrict clients to a zone.
    residency: str | None = None
    #: Addresses answered by GeoDNS for names that target regions.
    addresses: tuple[IPAddress, ...] = ()
    #: Backends that must be up for the region to count as up.
    min_healthy: int = 1


@dataclass(frozen=True, slots=True)
class Pop:
    """A point of presence running an edge and a GeoDNS instance."""

    name: str
    location: Location
    #: Public addresses answered by GeoDNS for names that target POPs.
    addresses: tuple[IPAddress, ...]
    #: Explicit region order for this POP's edge; empty means nearest first.
    regions: tuple[str, ...] = ()
    #: Where GeoDNS checks this POP's edge; none means the POP is assumed up.
    health_url: Url | None = None
    residency: str | None = None
    #: The edge's per-service readiness (``http://ADMIN/readyz``): GeoDNS checks
    #: ``<ready_url>/<service>`` for each name with a ``service``, and does not answer this POP
    #: for the name while its edge has no healthy region for that service.
    ready_url: Url | None = None


@dataclass(frozen=True, slots=True)
class ResidencyRule:
    """Clients matching the rule may only be sent to targets in ``zone``."""

    name: str
    zone: str
    countries: tuple[Annotated[str, COUNTRY], ...] = ()
    continents: tuple[Annotated[str, CONTINENT], ...] = ()
    #: When no target in the zone is healthy: ``refuse`` or ``fallback`` to any target.
    on_failure: Literal["refuse", "fallback"] = "refuse"


@dataclass(frozen=True, slots=True)
class GeoOverride:
    """gdnsd ``nets``: a network pinned to a location, a region or a POP."""

    network: IPNetwork
    location: Location | None = None
    region: str | None = None
    pop: str | None = None


@dataclass(frozen=True, slots=True)
class GeoConfig:
    #: ``builtin`` for the shipped country database, or a path to any GeoIP2/GeoLite2 City or
    #: Country database.
    database: str = "builtin"
    #: Where clients the database cannot place are assumed to be; none means the serving POP.
    default_location: Location | None = None
    overrides: tuple[GeoOverride, ...] = ()
    cache_size: int = 65536


@dataclass(frozen=True, slots=True)
class Soa:
    mname: str
    rname: str
    serial: int = 1
    refresh: Duration = 3600.0
    retry: Duration = 600.0
    expire: Duration = 604800.0
    minimum: Duration = 60.0


@dataclass(frozen=True, slots=True)
class NameServer:
    name: str
    addresses: tuple[IPAddress, ...] = ()


@dataclass(frozen=True, slots=True)
class DnsName:
    #: Owner name relative to the zone (``api``), or ``@`` for the apex.
    name: str
    targets: Literal["pops", "regions"]
    answers: int = 2
    ttl: Duration | None = None
    #: Restrict to these POPs/regions; empty means all of the kind.
    candidates: tuple[str, ...] = ()
    #: The edge service this name serves (POP names): a POP whose edge is not ready for it
    #: (``pops.*.ready_url``) is down for this name.
    service: str | None = None


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    enabled: bool = True
    responses_per_second: int = 200
    #: Every ``slip``-th limited response is sent truncated (TC) instead of dropped; 0 drops all.
    slip: int = 2
    ipv4_prefix: int = 24
    ipv6_prefix: int = 56


@dataclass(frozen=True, slots=True)
class DnsConfig:
    zone: str
    soa: Soa
    ns: tuple[NameServer, ...]
    names: Annotated[tuple[DnsName, ...], NAMED]
    ttl: Duration = 30.0
    #: TTL floor used as a health transition nears (gdnsd shortens TTLs the same way).
    min_ttl: Duration = 5.0
    #: When every eligible target is down: answer all, answer nothing, or SERVFAIL.
    all_down: Literal["fail_open", "empty", "servfail"] = "fail_open"
    max_udp_payload: int = 1232
    rate_limit: RateLimitConfig = RateLimitConfig()
    workers: int = 1


#: An RFC 9213 target: the lower-case prefix of a ``<target>-Cache-Control`` field name.
_CACHE_TARGET = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class CacheRule:
    """Per-path caching policy, supplementing (or with ``force_ttl``, overriding) the origin."""

    path_prefix: str
    #: Freshness when the origin gives none (or always, with ``force_ttl``).
    ttl: Duration | None = None
    force_ttl: bool = False
    stale_while_revalidate: Duration = 0.0
    stale_if_error: Duration = 0.0
    sort_query: bool = True
    #: Query parameters dropped from the key; a trailing ``*`` matches a prefix (``utm_*``).
    drop_params: tuple[str, ...] = ()
    store_set_cookie: bool = False
    bypass: bool = False


@dataclass(frozen=True, slots=True)
class CacheConfig:
    enabled: bool = True
    memory: Size = 256 * 1024 * 1024
    max_object: Size = 8 * 1024 * 1024
    #: ``redis_mode: standalone`` (the default): the one server, ``redis://host:6379/0``.
    redis_url: str | None = None
    #: How the POP runs Redis: one server (``redis_url``), Sentinel (``redis_nodes`` are the
    #: Sentinels watching ``redis_master``) or Cluster (``redis_nodes`` are seed nodes).
    redis_mode: Literal["standalone", "sentinel", "cluster"] = "standalone"
    redis_nodes: tuple[Annotated[HostPort, HOSTPORT], ...] = ()
    redis_master: str | None = None
    #: Sentinel and Cluster only (standalone puts these in ``redis_url``); Cluster has db 0.
    redis_db: int = 0
    redis_username: str | None = None
    redis_password: str | None = field(default=None, repr=False)
    #: Sentinel only: the Sentinels' own ``requirepass``, when they have one.
    redis_sentinel_password: str | None = field(default=None, repr=False)
    redis_tls: bool = False
    redis_timeout: Duration = 0.05
    redis_max_value: Size = 1024 * 1024
    #: A coalesced waiter never waits longer than this for the one upstream fetch.
    lock_timeout: Duration = 5.0
    #: How long an uncacheable key is remembered so that its requests skip coalescing.
    hit_for_miss: Duration = 10.0
    purge_token: str | None = None
    rules: tuple[CacheRule, ...] = ()
    #: RFC 9213 target list, in precedence order: target ``t`` reads ``t-Cache-Control``
    #: (``cdn``: CDN-Cache-Control) and ``surrogate`` reads Surrogate-Control.  The first one
    #: present and valid replaces Cache-Control and Expires for this cache; all are removed
    #: from what the edge sends on.  ``[]`` turns targeting off.
    targets: tuple[str, ...] = ("cdn", "surrogate")


@dataclass(frozen=True, slots=True)
class CompressionConfig:
    enabled: bool = True
    types: tuple[str, ...] = (
        "application/json",
        "application/javascript",
        "application/xml",
        "application/problem+json",
        "image/svg+xml",
        "text/*",
    )
    min_size: Size = 256
    #: Cached variants are compressed once, so they can afford a higher level.
    cached_brotli_quality: int = 6
    cached_gzip_level: int = 6
    stream_brotli_quality: int = 4
    stream_gzip_level: int = 4
    #: Bodies above this size are compressed in a thread, off the event loop.
    offload_above: Size = 64 * 1024
    #: An upstream body that decodes beyond this is a decompression bomb: 502.
    max_decoded_size: Size = 64 * 1024 * 1024
    #: BREACH: never compress a response that sets a cookie.
    disable_with_set_cookie: bool = True
    disable_routes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Service:
    """An upstream service: a set of regions, ordered per POP."""

    name: str
    regions: tuple[str, ...] = ()
    #: Restrict the service to regions of this residency zone (an EU-only service).
    residency: str | None = None
    retry_methods: tuple[str, ...] = ("GET", "HEAD")


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    service: str
    host: str = "*"
    path_prefix: str = "/"


@dataclass(frozen=True, slots=True)
class EdgeTimeouts:
    connect: Duration = 2.0
    first_byte: Duration = 10.0
    total: Duration = 30.0
    client_idle: Duration = 60.0
    client_header: Duration = 10.0
    client_body: Duration = 30.0
    upstream_idle: Duration = 30.0


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """TLS to ``https://`` backends (``meridian.origin_tls``); verification is always on."""

    #: PEM bundle of the CAs origins' certificates must chain to (default: the system's).
    ca_file: str | None = None
    #: A client certificate (and its key, unless in the same file): mutual TLS to origins.
    client_cert: str | None = None
    client_key: str | None = None


@dataclass(frozen=True, slots=True)
class EdgeUpstream:
    """The edge's connections to origins (``edge.upstream_client``); the bound on connections
    open per backend is ``edge.pool_size``."""

    #: Idle keep-alive connections kept per backend (None: ``pool_size``, as nginx's
    #: ``keepalive`` is usually sized to the peak in flight).
    max_idle: int | None = None
    #: A connection is closed after this many requests (nginx's ``keepalive_requests``).
    max_requests: int = 1000
    #: Longest stall between two reads of a response body (the origin's, not a slow client's).
    read_timeout: Duration = 10.0
    tls: UpstreamTls = UpstreamTls()


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    max_header_bytes: Size = 16 * 1024
    max_headers: int = 100
    max_url: Size = 8 * 1024
    max_body: Size = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TlsCertificate:
    """One certificate and its key (PEM files; relative paths are from the config file)."""

    cert: str
    key: str
    #: The server names it serves (each must be covered by its subjectAltName); empty: every
    #: DNS name in its subjectAltName.
    names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EdgeTls:
    """The TLS listener: certificates chosen by SNI, ALPN h2 and http/1.1."""

    listen: Annotated[HostPort, HOSTPORT]
    certificates: tuple[TlsCertificate, ...]
    #: The name whose certificate answers clients without SNI or with an unknown name (default:
    #: the first certificate's).
    default: str | None = None
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    #: A plaintext listener that answers every request with a 308 to the same URL over
    #: https (``edge.redirect``), e.g. 0.0.0.0:80.
    redirect: Annotated[HostPort | None, HOSTPORT] = None


@dataclass(frozen=True, slots=True)
class EdgeHttp2:
    """HTTP/2 on the edge: ALPN h2 on the TLS listener, prior-knowledge h2c on the plain one."""

    enabled: bool = True
    cleartext: bool = True
    max_concurrent_streams: int = 128
    max_frame_size: Size = 16384
    #: Stream resets (either side) per connection per second before GOAWAY ENHANCE_YOUR_CALM.
    max_resets_per_second: int = 100
    #: SETTINGS, PING, PRIORITY, WINDOW_UPDATE and empty DATA/HEADERS frames per second.
    max_control_frames_per_second: int = 200
    #: A stream whose response waits on a zero flow-control window this long is reset.
    stall_timeout: Duration = 10.0


@dataclass(frozen=True, slots=True)
class EdgeRateLimit:
    """A request rate limit at the edge (``edge.ratelimit``): GCRA, ``rate`` on average with up
    to ``burst`` requests at once, per client network, per request header value, or per both.
    Over it: 429 with Retry-After and the IETF RateLimit / RateLimit-Policy fields."""

    name: str
    rate: Rate
    #: Requests admitted at once after a pause (None: one second's worth, at least 1).
    burst: int | None = None
    #: client: the client network (after ``trusted_proxies``); header: the value of
    #: ``header`` (requests without it are keyed by client network); both: the pair.
    key: Literal["client", "header", "both"] = "client"
    header: str | None = None
    #: The routes it applies to, by name, and every route of these services; both empty: all.
    routes: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    #: A client network is this wide: every address of a /64 is one IPv6 client by default.
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64
    #: Clients in these networks are never limited.
    allow: tuple[IPNetwork, ...] = ()
    #: Count what would be refused, refuse nothing.
    dry_run: bool = False
    #: Counted in the POP's Redis (``edge.cache``'s ``redis_*``): the POP's instances and
    #: workers draw on one budget, at the cost of a Redis round trip per request (hits go
    #: the slow path).  Redis slow or gone: each instance limits on its own meanwhile.
    shared: bool = False
    #: Keys tracked at once (idle ones are forgotten first: a full bucket needs no memory).
    max_keys: int = 100_000


@dataclass(frozen=True, slots=True)
class EdgeConnectionLimits:
    """Client connections allowed at once (``edge.connlimit``), checked at accept: a refused
    connection is closed before a byte is read, logged and counted."""

    #: Per client network (the peer's address: no header is read yet; 0: no limit).
    per_client: int = 0
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64
    #: For the whole process (0: the descriptor budget alone, ``edge.fdlimit``).
    total: int = 0
    #: Networks never limited per client (``edge.trusted_proxies`` never are either).
    allow: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class StreamChannel:
    """Channels matching ``pattern`` (``ticker:*``: a prefix and ``*``, or an exact name):
    what the edge does for a client that cannot keep up, and how much it remembers."""

    pattern: str
    #: ``conflate``: keep the latest value per channel (tickers, books: each message is the
    #: whole value); ``disconnect``: close the client with 1008 and a reason (trades: never
    #: dropped silently).
    slow_consumer: Literal["conflate", "disconnect"] = "disconnect"
    #: Messages kept per channel for ``since`` and snapshot replay, at most ``history_bytes``
    #: of payload (the frames kept beside the payloads about double it).
    history: int = 1024
    history_bytes: Size = 1024 * 1024


@dataclass(frozen=True, slots=True)
class EdgeStreams:
    """Edge-terminated market streams (``edge.streams``): clients subscribe over WebSocket
    at ``path``; the edge holds one upstream subscription per channel at ``upstream_path``."""

    channels: tuple[StreamChannel, ...]
    #: The WebSocket path clients connect to (other upgrades are tunnelled 1:1).
    path: str = "/stream"
    #: The origin's stream endpoint (``?channel=NAME&since=SEQ``), routed like a request.
    upstream_path: str = "/stream"
    #: The REST snapshot of a channel (``{channel}`` is replaced), answered through the cache.
    snapshot_path: str = "/api/v1/snapshot/{channel}"
    #: Bytes queued per client beyond the socket's buffer before the slow-consumer policy.
    send_queue: Size = 256 * 1024
    #: Per client address (0: no limit).
    max_connections_per_ip: int = 64
    max_subscriptions_per_ip: int = 1024
    max_subscriptions_per_connection: int = 128
    #: Channels open at once in this worker.
    max_channels: int = 10_000
    #: Largest client message (a subscribe command).
    max_message: Size = 4096
    ping_interval: Duration = 20.0
    #: A client that answers nothing (pong or message) for this long after a ping is closed.
    ping_timeout: Duration = 20.0
    #: An upstream subscription with no local subscriber is kept this long (a client that
    #: reconnects finds its history).
    linger: Duration = 10.0
    #: Wait before resubscribing after an upstream subscription failed (doubles to 5 s).
    retry_delay: Duration = 0.1
    #: Largest upstream message.
    max_upstream_message: Size = 1024 * 1024
    #: A subscription that moved off a failed region moves back to a nearer one once that
    #: one has been up this long without a break (hysteresis: a flapping region keeps none).
    move_back_after: Duration = 30.0
    #: Subscriptions moved back per sweep (once a second) per worker at most: a recovered
    #: region is not hit by every channel's resubscription at once.
    move_back_rate: int = 50


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    services: Annotated[tuple[Service, ...], NAMED]
    routes: tuple[Route, ...]
    timeouts: EdgeTimeouts = EdgeTimeouts()
    limits: EdgeLimits = EdgeLimits()
    #: Trust X-Forwarded-* from clients in these networks (empty: trust nobody, overwrite).
    trusted_proxies: tuple[IPNetwork, ...] = ()
    request_id_header: str = "x-request-id"
    drain_timeout: Duration = 10.0
    pool_size: int = 64
    upstream: EdgeUpstream = EdgeUpstream()
    #: Latency objective exported for autoscaling.
    latency_target: Duration = 0.05
    #: One line per answered request on the ``edge.access`` logger (false: nginx's
    #: ``access_log off``); takes effect on reload.
    access_log: bool = True
    cache: CacheConfig = CacheConfig()
    compression: CompressionConfig = CompressionConfig()
    tls: EdgeTls | None = None
    http2: EdgeHttp2 = EdgeHttp2()
    #: Request rate limits, by name (``EdgeRateLimit``).
    rate_limits: Annotated[tuple[EdgeRateLimit, ...], NAMED] = ()
    connection_limits: EdgeConnectionLimits = EdgeConnectionLimits()
    #: Market streams at the edge (``EdgeStreams``); none: every upgrade is tunnelled.
    streams: EdgeStreams | None = None


@dataclass(frozen=True, slots=True)
class Config:
    regions: Annotated[tuple[Region, ...], NAMED]
    pops: Annotated[tuple[Pop, ...], NAMED]
    dns: DnsConfig
    edge: EdgeConfig
    residency: Annotated[tuple[ResidencyRule, ...], NAMED] = ()
    listeners: Listeners = Listeners()
    health: HealthConfig = HealthConfig()
    outlier: OutlierConfig = OutlierConfig()
    geo: GeoConfig = GeoConfig()
    #: Where the config came from (set by the loader, not the file).
    source: str = field(default="<memory>", compare=False)

    def region(self, name: str) -> Region:
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(name)

    def pop(self, name: str) -> Pop:
        for pop in self.pops:
            if pop.name == name:
                return pop
        raise KeyError(name)

    def residency_zone_for(
        self, country: str | None, continent: str | None
    ) -> ResidencyRule | None:
        """The first residency rule that applies to a client in ``country``/``continent``."""
        for rule in self.residency:
            if (country and country in rule.countries) or (
                continent and continent in rule.continents
            ):
                return rule
        return None


# --------------------------------------------------------------------------------------------
# Loading


_MISSING = object()


class _Loader:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, path: str, reason: str) -> object:
        self.problems.append(f"{path or '<top>'}: {reason}")
        return _MISSING

    def load(self, tp: Any, value: Any, path: str) -> Any:
        marker: _Marker | None = None
        if get_origin(tp) is Annotated:
            tp, *extras = get_args(tp)
            marker = next((e for e in extras if isinstance(e, _Marker)), None)
        origin = get_origin(tp)
        if origin in (Union, types.UnionType):
            options = [a for a in get_args(tp) if a is not type(None)]
            if value is None:
                if type(None) in get_args(tp):
                    return None
                return self.fail(path, "a value is required")
            if tp == IPAddress:
                return self._ip(value, path)
            if tp == IPNetwork:
                return self._network(value, path)
            (inner,) = options
            return self.load(Annotated[inner, marker] if marker else inner, value, path)
        if origin is tuple:
            args = get_args(tp)
            if not isinstance(value, list):
                return self.fail(path, f"expected a list, got {_kind(value)}")
            if marker is NAMED:
                return self.fail(path, "expected a mapping of names")
            item_tp = args[0]
            if args[-1] is not Ellipsis:  # fixed tuple such as (int, int)
                return tuple(
                    self.load(t, v, f"{path}[{i}]")
                    for i, (t, v) in enumerate(zip(args, value, strict=False))
                )
            items = [self.load(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
            return tuple(items)
        if origin is Literal:
            allowed = get_args(tp)
            if value not in allowed:
                return self.fail(
                    path, f"must be one of {', '.join(map(str, allowed))}, got {value!r}"
                )
            return value
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            if tp is HostPort:
                return self._hostport(value, path)
            return self._dataclass(tp, value, path)
        if marker is DURATION:
            return self._scalar(parse_duration, value, path)
        if marker is SIZE:
            return self._scalar(parse_size, value, path)
        if marker is URL:
            return self._url(value, path)
        if marker is RATE:
            return self._scalar(parse_rate, value, path)
        if marker is COUNTRY:
            if not (
                isinstance(value, str) and len(value) == 2 and value.isalpha() and value.isupper()
            ):
                return self.fail(
                    path, f"expected an ISO 3166 country code such as DE, got {value!r}"
                )
            return value
        if marker is CONTINENT:
            if value not in CONTINENTS:
                return self.fail(
                    path,
                    f"expected a continent code ({', '.join(sorted(CONTINENTS))}), got {value!r}",
                )
            return value
        if tp is bool:
            if not isinstance(value, bool):
                return self.fail(path, f"expected true or false, got {_kind(value)}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                return self.fail(path, f"expected an integer, got {_kind(value)}")
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                return self.fail(path, f"expected a number, got {_kind(value)}")
            return float(value)
        if tp is str:
            if not isinstance(value, str) or not value:
                return self.fail(path, f"expected a non-empty string, got {_kind(value)}")
            return value
        if tp == IPAddress:
            return self._ip(value, path)
        if tp == IPNetwork:
            return self._network(value, path)
        raise TypeError(f"config loader cannot read {tp!r}")  # a schema bug, not a user error

    def _scalar(self, parse: Any, value: Any, path: str) -> Any:
        try:
            return parse(value)
        except ValueError as exc:
            return self.fail(path, str(exc))

    def _ip(self, value: Any, path: str) -> Any:
        try:
            return ipaddress.ip_address(value)
        except ValueError:
            return self.fail(path, f"{value!r} is not an IP address")

    def _network(self, value: Any, path: str) -> Any:
        try:
            return ipaddress.ip_network(value, strict=True)
        except (ValueError, TypeError) as exc:
            return self.fail(path, f"{value!r} is not a CIDR network ({exc})")

    def _url(self, value: Any, path: str) -> Any:
        if not isinstance(value, str):
            return self.fail(path, f"expected a URL, got {_kind(value)}")
        parts = urlsplit(value)
        try:
            port = parts.port
        except ValueError:
            return self.fail(path, f"{value!r} has a bad port")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return self.fail(path, f"{value!r} is not an http(s) URL with a host")
        del port
        return value

    def _hostport(self, value: Any, path: str) -> Any:
        if not isinstance(value, str):
            return self.fail(path, f"expected HOST:PORT, got {_kind(value)}")
        return self._scalar(parse_hostport, value, path)

    def _dataclass(self, cls: type, value: Any, path: str) -> Any:
        if not isinstance(value, Mapping):
            return self.fail(path, f"expected a mapping, got {_kind(value)}")
        hints = get_type_hints(cls, include_extras=True)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
        kwargs: dict[str, Any] = {}
        for key in value:
            if key not in fields:
                close = difflib.get_close_matches(
                    str(key).replace("-", "_"), fields, n=1, cutoff=0.8
                )
                hint = f" (did you mean {close[0]}?)" if close else ""
                self.fail(_join(path, str(key)), f"unknown key{hint}")
        for name, fld in fields.items():
            sub = _join(path, name)
            if name not in value:
                if (
                    fld.default is dataclasses.MISSING
                    and fld.default_factory is dataclasses.MISSING
                ):
                    self.fail(sub, "is required")
                continue
            tp = hints[name]
            if _is_named(tp):
                kwargs[name] = self._named(tp, value[name], sub)
            else:
                kwargs[name] = self.load(tp, value[name], sub)
        if any(v is _MISSING for v in kwargs.values()) or _has_missing(cls, kwargs):
            return _MISSING
        try:
            return cls(**kwargs)
        except ValueError as exc:
            return self.fail(path, str(exc))

    def _named(self, tp: Any, value: Any, path: str) -> Any:
        item_tp = get_args(get_args(tp)[0])[0]
        if not isinstance(value, Mapping):
            return self.fail(path, f"expected a mapping of names, got {_kind(value)}")
        items = []
        for name, body in value.items():
            if not isinstance(name, str) or not name:
                self.fail(path, f"name {name!r} must be a non-empty string")
                continue
            if body is None:
                body = {}
            if not isinstance(body, Mapping):
                self.fail(_join(path, name), f"expected a mapping, got {_kind(body)}")
                continue
            if "name" in body:
                self.fail(_join(path, name) + ".name", "unknown key (the name is the mapping key)")
                continue
            items.append(self.load(item_tp, {"name": name, **body}, _join(path, name)))
        if any(item is _MISSING for item in items):
            return _MISSING
        return tuple(items)


def _has_missing(cls: type, kwargs: dict[str, Any]) -> bool:
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    return not required <= kwargs.keys()


def _is_named(tp: Any) -> bool:
    return get_origin(tp) is Annotated and NAMED in get_args(tp)[1:]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


# --------------------------------------------------------------------------------------------
# Cross-reference checks (the file is well-formed; does it make sense?)


def _semantic_problems(config: Config) -> list[str]:
    problems: list[str] = []
    region_names = {r.name for r in config.regions}
    pop_names = {p.name for p in config.pops}
    zones = {r.residency for r in config.regions if r.residency}

    if not config.regions:
        problems.append("regions: at least one region is required")
    if not config.pops:
        problems.append("pops: at least one POP is required")
    for region in config.regions:
        where = f"regions.{region.name}"
        if not region.backends:
            problems.append(f"{where}.backends: at least one backend URL is required")
        if len(set(region.backends)) != len(region.backends):
            problems.append(f"{where}.backends: duplicate backend URL")
        if not 1 <= region.min_healthy <= max(1, len(region.backends)):
            problems.append(f"{where}.min_healthy: must be between 1 and the number of backends")
    for pop in config.pops:
        where = f"pops.{pop.name}"
        if not pop.addresses:
            problems.append(f"{where}.addresses: at least one public address is required")
        for i, name in enumerate(pop.regions):
            if name not in region_names:
                problems.append(f"{where}.regions[{i}]: unknown region {name!r}")
        if len(set(pop.regions)) != len(pop.regions):
            problems.append(f"{where}.regions: a region is listed twice")

    for rule in config.residency:
        where = f"residency.{rule.name}"
        if not rule.countries and not rule.continents:
            problems.append(f"{where}: a rule needs countries or continents")
        if rule.zone not in zones:
            problems.append(
                f"{where}.zone: no region has residency {rule.zone!r}, so matching clients could "
                "never be served"
            )

    for i, override in enumerate(config.geo.overrides):
        where = f"geo.overrides[{i}]"
        chosen = [x for x in (override.location, override.region, override.pop) if x is not None]
        if len(chosen) != 1:
            problems.append(f"{where}: give exactly one of location, region or pop")
        if override.region is not None and override.region not in region_names:
            problems.append(f"{where}.region: unknown region {override.region!r}")
        if override.pop is not None and override.pop not in pop_names:
            problems.append(f"{where}.pop: unknown POP {override.pop!r}")

    h = config.health
    if h.fall < 1 or h.rise < 1:
        problems.append("health: fall and rise must be at least 1")
    if h.timeout <= 0 or h.interval <= 0 or h.fast_interval <= 0:
        problems.append("health: interval, fast_interval and timeout must be positive")
    elif h.timeout > h.interval:
        problems.append("health.timeout: must not exceed health.interval")
    if not 0 <= h.jitter < 1:
        problems.append("health.jitter: must be a fraction between 0 and 1")
    if not 100 <= h.status_min <= h.status_max <= 599:
        problems.append("health.status_min: status range must be within 100..599 and ordered")
    o = config.outlier
    if not 0 <= o.max_ejection_percent <= 100:
        problems.append("outlier.max_ejection_percent: must be 0..100")
    if not 0 <= o.panic_threshold_percent <= 100:
        problems.append("outlier.panic_threshold_percent: must be 0..100")

    dns = config.dns
    zone = dns.zone.rstrip(".").lower()
    if not zone or any(not label or len(label) > 63 for label in zone.split(".")):
        problems.append(f"dns.zone: {dns.zone!r} is not a valid domain name")
    if not dns.ns:
        problems.append("dns.ns: at least one name server is required")
    if not 512 <= dns.max_udp_payload <= 4096:
        problems.append("dns.max_udp_payload: must be 512..4096")
    if dns.min_ttl > dns.ttl:
        problems.append("dns.min_ttl: must not exceed dns.ttl")
    if dns.workers < 1:
        problems.append("dns.workers: must be at least 1")
    for dns_name in dns.names:
        where = f"dns.names.{dns_name.name}"
        if dns_name.answers < 1:
            problems.append(f"{where}.answers: must be at least 1")
        known = pop_names if dns_name.targets == "pops" else region_names
        for i, cand in enumerate(dns_name.candidates):
            if cand not in known:
                problems.append(
                    f"{where}.candidates[{i}]: unknown {dns_name.targets[:-1]} {cand!r}"
                )
        if dns_name.targets == "regions":
            for region in config.regions:
                if (
                    not dns_name.candidates or region.name in dns_name.candidates
                ) and not region.addresses:
                    problems.append(
                        f"{where}: region {region.name!r} has no addresses to answer with"
                    )

    edge = config.edge
    service_names = {s.name for s in edge.services}
    for dns_name in dns.names:
        if dns_name.service is None:
            continue
        where = f"dns.names.{dns_name.name}.service"
        if dns_name.targets != "pops":
            problems.append(f"{where}: only a name that targets pops serves an edge service")
        elif dns_name.service not in service_names:
            problems.append(f"{where}: unknown edge service {dns_name.service!r}")
    for service in edge.services:
        where = f"edge.services.{service.name}"
        for i, name in enumerate(service.regions):
            if name not in region_names:
                problems.append(f"{where}.regions[{i}]: unknown region {name!r}")
        if service.residency is not None:
            members = [
                r for r in config.regions if not service.regions or r.name in service.regions
            ]
            if not any(r.residency == service.residency for r in members):
                problems.append(
                    f"{where}.residency: no region of the service has residency"
                    f" {service.residency!r}"
                )
    if not edge.routes:
        problems.append("edge.routes: at least one route is required")
    seen_routes: set[str] = set()
    for i, route in enumerate(edge.routes):
        where = f"edge.routes[{i}]"
        if route.name in seen_routes:
            problems.append(f"{where}.name: duplicate route name {route.name!r}")
        seen_routes.add(route.name)
        if route.service not in service_names:
            problems.append(f"{where}.service: unknown service {route.service!r}")
        if not route.path_prefix.startswith("/"):
            problems.append(f"{where}.path_prefix: must start with /")
    for i, target in enumerate(edge.cache.targets):
        if not _CACHE_TARGET.fullmatch(target):
            problems.append(
                f"edge.cache.targets[{i}]: {target!r} is not a lower-case token (a-z, 0-9, -)"
            )
    if len(set(edge.cache.targets)) != len(edge.cache.targets):
        problems.append("edge.cache.targets: a target is listed twice")
    for i, cache_rule in enumerate(edge.cache.rules):
        if not cache_rule.path_prefix.startswith("/"):
            problems.append(f"edge.cache.rules[{i}].path_prefix: must start with /")
    for i, route_name in enumerate(edge.compression.disable_routes):
        if route_name not in seen_routes:
            problems.append(f"edge.compression.disable_routes[{i}]: unknown route {route_name!r}")
    c = edge.compression
    if not 0 <= c.cached_brotli_quality <= 11 or not 0 <= c.stream_brotli_quality <= 11:
        problems.append("edge.compression: Brotli quality must be 0..11")
    if not 1 <= c.cached_gzip_level <= 9 or not 1 <= c.stream_gzip_level <= 9:
        problems.append("edge.compression: gzip level must be 1..9")
    problems.extend(_redis_problems(edge.cache))
    problems.extend(_http2_problems(edge.http2))
    problems.extend(_rate_limit_problems(edge, seen_routes, service_names))
    if edge.streams is not None:
        problems.extend(_stream_problems(edge.streams))
    conns = edge.connection_limits
    if conns.per_client < 0 or conns.total < 0:
        problems.append("edge.connection_limits: per_client and total must not be negative")
    if not 0 <= conns.ipv4_prefix <= 32:
        problems.append("edge.connection_limits.ipv4_prefix: must be 0..32")
    if not 0 <= conns.ipv6_prefix <= 128:
        problems.append("edge.connection_limits.ipv6_prefix: must be 0..128")
    up = edge.upstream
    if edge.pool_size < 1:
        problems.append("edge.pool_size: must be at least 1")
    if up.max_idle is not None and not 0 <= up.max_idle <= edge.pool_size:
        problems.append("edge.upstream.max_idle: must be 0..edge.pool_size")
    if up.max_requests < 1:
        problems.append("edge.upstream.max_requests: must be at least 1")
    if up.read_timeout <= 0:
        problems.append("edge.upstream.read_timeout: must be positive")
    return problems


def _http2_problems(h2: EdgeHttp2) -> list[str]:
    problems: list[str] = []
    if not 1 <= h2.max_concurrent_streams <= 1000:
        problems.append("edge.http2.max_concurrent_streams: must be 1..1000")
    if not 16384 <= h2.max_frame_size <= 16777215:
        problems.append("edge.http2.max_frame_size: must be 16 KiB..16 MiB - 1 (RFC 9113)")
    if h2.max_resets_per_second < 1 or h2.max_control_frames_per_second < 1:
        problems.append("edge.http2: per-second frame limits must be at least 1")
    if h2.stall_timeout <= 0:
        problems.append("edge.http2.stall_timeout: must be positive")
    return problems


def _rate_limit_problems(
    edge: EdgeConfig, route_names: set[str], service_names: set[str]
) -> list[str]:
    problems: list[str] = []
    for limit in edge.rate_limits:
        where = f"edge.rate_limits.{limit.name}"
        if limit.burst is not None and not 1 <= limit.burst <= 1_000_000:
            problems.append(f"{where}.burst: must be 1..1000000")
        if limit.key == "client":
            if limit.header is not None:
                problems.append(f"{where}.header: only used with key header or both")
        elif limit.header is None:
            problems.append(f"{where}.header: key {limit.key} needs the request header's name")
        elif not _is_token(limit.header):
            problems.append(f"{where}.header: {limit.header!r} is not a header field name")
        elif "_" in limit.header:
            problems.append(
                f"{where}.header: names with an underscore never reach the edge's routing"
                " (dropped from requests: header smuggling)"
            )
        if not 0 <= limit.ipv4_prefix <= 32:
            problems.append(f"{where}.ipv4_prefix: must be 0..32")
        if not 0 <= limit.ipv6_prefix <= 128:
            problems.append(f"{where}.ipv6_prefix: must be 0..128")
        if not 1 <= limit.max_keys <= 10_000_000:
            problems.append(f"{where}.max_keys: must be 1..10000000")
        if limit.shared and not (edge.cache.redis_url or edge.cache.redis_nodes):
            problems.append(
                f"{where}.shared: needs the POP's Redis (edge.cache.redis_url or redis_nodes)"
            )
        for i, route_name in enumerate(limit.routes):
            if route_name not in route_names:
                problems.append(f"{where}.routes[{i}]: unknown route {route_name!r}")
        for i, service_name in enumerate(limit.services):
            if service_name not in service_names:
                problems.append(f"{where}.services[{i}]: unknown service {service_name!r}")
    return problems


#: A channel name: ``kind:SYMBOL`` in a safe alphabet (it goes into URLs and JSON).
CHANNEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}:[A-Za-z0-9_.-]{1,64}")
_CHANNEL_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,32}:([A-Za-z0-9_.-]{1,64}|[A-Za-z0-9_.-]{0,63}\*)")


def _stream_problems(streams: EdgeStreams) -> list[str]:
    problems: list[str] = []
    where = "edge.streams"
    if not streams.channels:
        problems.append(f"{where}.channels: at least one channel pattern is required")
    seen: set[str] = set()
    for i, channel in enumerate(streams.channels):
        if not _CHANNEL_PATTERN.fullmatch(channel.pattern):
            problems.append(
                f"{where}.channels[{i}].pattern: {channel.pattern!r} is not KIND:NAME or"
                " KIND:PREFIX* (letters, digits, _ . -)"
            )
        if channel.pattern in seen:
            problems.append(f"{where}.channels[{i}].pattern: listed twice")
        seen.add(channel.pattern)
        if not 1 <= channel.history <= 1_000_000:
            problems.append(f"{where}.channels[{i}].history: must be 1..1000000")
        if not 1024 <= channel.history_bytes <= 1024**3:
            problems.append(f"{where}.channels[{i}].history_bytes: must be 1 KiB..1 GiB")
    for name in ("path", "upstream_path", "snapshot_path"):
        value = getattr(streams, name)
        if not value.startswith("/") or any(c in value for c in "?# "):
            problems.append(f"{where}.{name}: must be a path starting with / (no query)")
    if "{channel}" not in streams.snapshot_path:
        problems.append(f"{where}.snapshot_path: must contain {{channel}}")
    if not 4096 <= streams.send_queue <= 64 * 1024 * 1024:
        problems.append(f"{where}.send_queue: must be 4 KiB..64 MiB")
    for name in ("max_connections_per_ip", "max_subscriptions_per_ip"):
        if getattr(streams, name) < 0:
            problems.append(f"{where}.{name}: must not be negative (0: no limit)")
    if not 1 <= streams.max_subscriptions_per_connection <= 100_000:
        problems.append(f"{where}.max_subscriptions_per_connection: must be 1..100000")
    if not 1 <= streams.max_channels <= 1_000_000:
        problems.append(f"{where}.max_channels: must be 1..1000000")
    if not 64 <= streams.max_message <= 1024 * 1024:
        problems.append(f"{where}.max_message: must be 64 B..1 MiB")
    if not 1024 <= streams.max_upstream_message <= 64 * 1024 * 1024:
        problems.append(f"{where}.max_upstream_message: must be 1 KiB..64 MiB")
    for name in ("ping_interval", "ping_timeout", "retry_delay"):
        if getattr(streams, name) <= 0:
            problems.append(f"{where}.{name}: must be positive")
    if streams.linger < 0:
        problems.append(f"{where}.linger: must not be negative")
    if streams.move_back_after < 0:
        problems.append(f"{where}.move_back_after: must not be negative (0: at once)")
    if not 1 <= streams.move_back_rate <= 100_000:
        problems.append(f"{where}.move_back_rate: must be 1..100000")
    return problems


#: RFC 9110 tchar.
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _is_token(text: str) -> bool:
    return bool(text) and all(c in _TCHAR for c in text)


def _upstream_tls_problems(config: Config, source: str) -> list[str]:
    """The files of ``edge.upstream.tls``, loaded now."""
    if config.edge.upstream.tls == UpstreamTls():
        return []
    from meridian.origin_tls import context_problems

    return context_problems(config.edge.upstream.tls, source)


def _tls_problems(config: Config, source: str) -> list[str]:
    """The certificate files of ``edge.tls`` (read now: expiry, key match, names)."""
    tls = config.edge.tls
    if tls is None:
        return []
    if not tls.certificates:
        return ["edge.tls.certificates: at least one certificate is required"]
    if tls.listen == config.listeners.edge:
        return ["edge.tls.listen: must differ from listeners.edge"]
    if tls.redirect is not None and tls.redirect in (tls.listen, config.listeners.edge):
        return ["edge.tls.redirect: must differ from edge.tls.listen and listeners.edge"]
    from meridian.certs import read_certificates

    return read_certificates(tls, source)[1]


def _redis_problems(cache: CacheConfig) -> list[str]:
    """The ``edge.cache.redis_*`` fields: each mode's own fields given, the others' absent."""
    problems: list[str] = []
    mode = cache.redis_mode

    def problem(name: str, reason: str) -> None:
        problems.append(f"edge.cache.{name}: {reason}")

    if cache.redis_url is not None:
        if mode != "standalone":
            problem(
                "redis_url",
                f"not used with redis_mode {mode}: list the "
                + ("Sentinels" if mode == "sentinel" else "seed nodes")
                + " in redis_nodes",
            )
        elif not cache.redis_url.startswith(("redis://", "rediss://", "unix://")):
            problem("redis_url", "must start with redis://, rediss:// or unix://")
    if mode == "standalone":
        given = [
            name
            for name, value in (
                ("redis_nodes", cache.redis_nodes),
                ("redis_master", cache.redis_master),
                ("redis_db", cache.redis_db),
                ("redis_username", cache.redis_username),
                ("redis_password", cache.redis_password),
                ("redis_sentinel_password", cache.redis_sentinel_password),
                ("redis_tls", cache.redis_tls),
            )
            if value
        ]
        for name in given:
            problem(
                name,
                "only used with redis_mode sentinel or cluster (standalone: put it in redis_url)",
            )
        return problems
    what = "the Sentinels" if mode == "sentinel" else "seed nodes of the cluster"
    if not cache.redis_nodes:
        problem("redis_nodes", f"redis_mode {mode} needs HOST:PORT of {what} (at least one)")
    seen: set[tuple[str, int]] = set()
    for i, node in enumerate(cache.redis_nodes):
        if node.port == 0:
            problem(f"redis_nodes[{i}]", f"port 0 is not a port {node.host!r} listens on")
        if (node.host, node.port) in seen:
            problem(f"redis_nodes[{i}]", f"{node.host}:{node.port} is listed twice")
        seen.add((node.host, node.port))
    if cache.redis_db < 0:
        problem("redis_db", "must not be negative")
    if mode == "sentinel":
        if cache.redis_master is None:
            problem("redis_master", "redis_mode sentinel needs the name the Sentinels monitor")
    else:
        if cache.redis_master is not None:
            problem("redis_master", "only used with redis_mode sentinel")
        if cache.redis_db != 0:
            problem("redis_db", "Redis Cluster has only database 0")
        if cache.redis_sentinel_password is not None:
            problem("redis_sentinel_password", "only used with redis_mode sentinel")
    return problems


def _duplicate_key_loader() -> type[yaml.SafeLoader]:
    """A SafeLoader that rejects duplicate mapping keys instead of silently keeping the last."""

    class StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node)
            if key in result:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            result[key] = loader.construct_object(value_node)
        return result

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return StrictLoader


_STRICT_LOADER = _duplicate_key_loader()


def parse_config(data: object, source: str = "<memory>") -> Config:
    """Build a Config from already-parsed YAML data; raises ConfigError with every problem."""
    loader = _Loader()
    config = loader.load(Config, data, "")
    if config is _MISSING or loader.problems:
        raise ConfigError([f"{source}: {p}" for p in loader.problems])
    assert isinstance(config, Config)
    problems = (
        _semantic_problems(config)
        or _tls_problems(config, source)
        or _upstream_tls_problems(config, source)
    )
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    return dataclasses.replace(config, source=source)


def parse_section(cls: type[T], data: object, source: str, where: str) -> T:
    """Load one frozen dataclass of another file's section (``meridian world``'s ``world:``)
    with the loader and the error lines of the config: one line per problem."""
    loader = _Loader()
    value = loader.load(cls, data, where)
    if value is _MISSING or loader.problems:
        raise ConfigError([f"{source}: {p}" for p in loader.problems])
    assert isinstance(value, cls)
    return value


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raises ConfigError naming the file and each problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"]) from None
    try:
        data = yaml.load(text, Loader=_STRICT_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{source}: {where}invalid YAML: {reason}"]) from None
    return parse_config(data, source)


__all__ = [
    "CONTINENTS",
    "CacheConfig",
    "CacheRule",
    "CompressionConfig",
    "Config",
    "ConfigError",
    "DnsConfig",
    "DnsName",
    "EdgeConfig",
    "EdgeConnectionLimits",
    "EdgeHttp2",
    "EdgeLimits",
    "EdgeRateLimit",
    "EdgeStreams",
    "EdgeTimeouts",
    "EdgeTls",
    "GeoConfig",
    "GeoOverride",
    "HealthConfig",
    "HostPort",
    "Listeners",
    "Location",
    "NameServer",
    "OutlierConfig",
    "Pop",
    "RateLimitConfig",
    "Region",
    "ResidencyRule",
    "Route",
    "Service",
    "Soa",
    "StreamChannel",
    "TlsCertificate",
    "load_config",
    "parse_config",
]
