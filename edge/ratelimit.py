"""Request rate limits at the edge: GCRA per key over a bounded table of keys.  Pure: the
caller passes ``now`` (seconds on any monotonic clock) and the request's facts.

GCRA, the generic cell rate algorithm (ATM's, and redis-cell's): a key keeps one number, its
theoretical arrival time ``tat``.  Each admitted request pushes it ``interval = 1 / rate``
later; a request is refused while admitting it would put ``tat`` more than
``span = burst * interval`` ahead of now.  So at most ``burst`` requests pass at once, at most
``burst + rate * t`` in any window of ``t`` seconds, and a key idle for ``span`` has its whole
burst back.  The same arithmetic as a token bucket, with one float per key and no refill step.

What a request is keyed by (``LimitRule.key``): the client's network (``/32`` and ``/64`` by
default) after ``trusted_proxies`` (the rightmost X-Forwarded-For address that is not a
trusted proxy, when the peer is one: nginx's ``real_ip_recursive``), the value of a request
header (an API key; a request without it is keyed by its client network, so leaving the
header out is no way around the limit), or both.  Allow-listed clients are never counted.

The table of keys is bounded (``edge.memos.RATE_LIMIT_KEYS``).  When full, keys whose bucket
is full again (``tat <= now``) are forgotten first, which changes no decision; only a flood of
busy keys makes it forget the busy keys nearest to full as well (counted: those may start
over with a fresh burst).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Final, NamedTuple

from edge.http1 import Headers
from edge.memos import RATE_LIMIT_CLIENTS, RATE_LIMIT_KEYS, RATE_LIMIT_LANES, BoundedMemo
from meridian.config import EdgeRateLimit

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

#: Float slack in the comparison: ``burst`` additions of ``interval`` may round past
#: ``span`` by a few ulps, which must not refuse the last request of a burst.
EPSILON: Final = 1e-9
#: IPv6 network keys are tagged above any IPv4 one, so the two never share a bucket.
_V6_TAG: Final = 1 << 129
#: The longest header value used as a key as it is (longer ones are keyed by their prefix:
#: a client may share a bucket with itself, never escape one).
MAX_HEADER_KEY: Final = 256
#: The ``tat`` of a bucket the table forgot: it admits nothing, so whoever still holds it (a
#: ``Lane``) looks the key up again.
FORGOTTEN: Final = math.inf
#: X-Forwarded-For hops walked at most (each costs an address parse).
MAX_HOPS: Final = 16
#: Longer X-Forwarded-For values are not memoised (``RATE_LIMIT_CLIENTS`` stays small).
MAX_MEMO_FORWARDED: Final = 256
#: When the table is full and too few keys are idle, this share of it is forgotten at once
#: (amortised: one scan per ``max_keys / FORGET_SHARE`` new keys, never one per request).
FORGET_SHARE: Final = 8


class Bucket:
    """One key's state: its theoretical arrival time, and its refusals for the log."""

    __slots__ = ("held", "log_after", "tat")

    def __init__(self, tat: float) -> None:
        self.tat = tat
        #: Refusals not logged yet, and when the next log line for this key may be written.
        self.held = 0
        self.log_after = -math.inf


class Gcra:
    """One limit's arithmetic and its table of keys."""

    __slots__ = ("buckets", "burst", "forgotten_busy", "interval", "rate", "span")

    def __init__(self, rate: float, burst: int, max_keys: int) -> None:
        if not rate > 0.0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be positive, burst and max_keys at least 1")
        self.rate = rate
        self.burst = burst
        self.interval = 1.0 / rate
        self.span = burst * self.interval
        self.buckets: BoundedMemo[Hashable, Bucket] = BoundedMemo(RATE_LIMIT_KEYS, bound=max_keys)
        #: Keys forgotten while not yet full again (their clients got a fresh burst).
        self.forgotten_busy = 0

    def bucket(self, key: Hashable, now: float) -> Bucket:
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.buckets.bound:
                self._forget(now)
            bucket = self.buckets[key] = Bucket(now)
        return bucket

    def take(self, bucket: Bucket, now: float) -> float:
        """Admit one request: 0.0; or the seconds until one would be admitted (nothing changes)."""
        tat = bucket.tat
        if tat < now:
            tat = now
        tat += self.interval
        wait = tat - now - self.span
        if wait > EPSILON:
            return wait
        bucket.tat = tat
        return 0.0

    def refund(self, bucket: Bucket) -> None:
        """Undo one admission (another limit refused the request)."""
        bucket.tat -= self.interval

    def check(self, key: Hashable, now: float) -> float:
        """``take`` for ``key``."""
        return self.take(self.bucket(key, now), now)

    def remaining(self, bucket: Bucket, now: float) -> int:
        """Requests that would be admitted at once from now on."""
        ahead = bucket.tat - now
        if ahead <= 0.0:
            return self.burst
        return max(0, int((self.span - ahead) / self.interval + EPSILON))

    def _forget(self, now: float) -> None:
        buckets = self.buckets
        idle = [key for key, bucket in buckets.items() if bucket.tat <= now]
        for key in idle:
            buckets.pop(key).tat = FORGOTTEN
        share = max(1, buckets.bound // FORGET_SHARE)
        if len(idle) >= share:
            return
        # A flood of busy keys: forget those nearest to full (the least to lose).
        nearest = heapq.nsmallest(share - len(idle), buckets.items(), key=lambda kv: kv[1].tat)
        for key, _ in nearest:
            buckets.pop(key).tat = FORGOTTEN
        self.forgotten_busy += len(nearest)


# -- keys -----------------------------------------------------------------------------------------


def parse_address(text: str | bytes) -> Address | None:
    """An address as a peer name or an X-Forwarded-For entry gives it (IPv4-mapped IPv6 as
    the IPv4 address it is; a zone or port-less bracket form is not an address: None)."""
    try:
        address = ip_address(text.decode("ascii") if isinstance(text, bytes) else text)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(
    peer: str, forwarded_for: Sequence[bytes], trusted: Sequence[Network]
) -> Address | None:
    """The client a request is from: the peer, or when the peer is a trusted proxy, the
    rightmost X-Forwarded-For address that is not one (all trusted: the leftmost).  An entry
    that is not an address ends the walk at the hop after it: whoever wrote it is not to be
    believed further; so does the ``MAX_HOPS``-th hop (a chain of proxies that long is a
    client's invention).  None: the peer is not an IP address (a Unix socket)."""
    address = parse_address(peer)
    if address is None or not trusted or not any(address in net for net in trusted):
        return address
    hops = [hop.strip() for value in forwarded_for for hop in value.split(b",")]
    for hop in reversed(hops[-MAX_HOPS:]):
        previous = parse_address(hop)
        if previous is None:
            return address
        address = previous
        if not any(address in net for net in trusted):
            return address
    return address


def network_key(address: Address, ipv4_prefix: int, ipv6_prefix: int) -> int:
    """The client network ``address`` belongs to, as one int (IPv6 tagged apart from IPv4)."""
    if isinstance(address, IPv4Address):
        return int(address) >> (32 - ipv4_prefix)
    return (int(address) >> (128 - ipv6_prefix)) | _V6_TAG


def header_values(headers: Headers, name: bytes) -> bytes | None:
    """The request's ``name`` lines joined with commas (lower-case name), None when absent."""
    found: bytes | None = None
    for field, value in headers:
        if field == name:
            found = value if found is None else found + b"," + value
    return found


class Refusal(NamedTuple):
    """A request a limit refuses (or, in dry run, would refuse)."""

    rule: LimitRule
    #: Seconds until the key would be admitted again.
    wait: float
    bucket: Bucket
    #: The client address as decided (for the log).
    client: str
    #: Requests the key may still make at once, when the decision was not ``bucket``'s (a
    #: shared limit's, made in Redis).
    remaining: int | None = None


class RouteCounts:
    """One limit's outcomes on one route (``edge.stages.limit`` exports them)."""

    __slots__ = ("allowed", "exempt", "limited", "would_limit")

    def __init__(self) -> None:
        self.allowed = 0
        self.limited = 0
        self.would_limit = 0
        self.exempt = 0


class LimitRule:
    """One configured limit: its config, its GCRA table and its counters per route.  Kept
    across reloads while its config is unchanged (``RateLimits.build``)."""

    __slots__ = ("config", "counts", "dry_run", "gcra", "header", "name", "policy")

    def __init__(self, config: EdgeRateLimit) -> None:
        self.config = config
        self.name = config.name
        self.dry_run = config.dry_run
        burst = config.burst if config.burst is not None else max(1, math.ceil(config.rate))
        self.gcra = Gcra(config.rate, burst, config.max_keys)
        self.header = config.header.lower().encode() if config.header is not None else None
        self.counts: dict[str, RouteCounts] = {}
        #: The RateLimit-Policy field: the burst (q) over the seconds it takes to come back (w).
        window = max(1, math.ceil(self.gcra.span))
        self.policy = b'"%s";q=%d;w=%d' % (self.name.encode(), burst, window)

    def network_key(self, address: Address) -> int | None:
        """The client network key, or None for an allow-listed client."""
        config = self.config
        if any(address in net for net in config.allow):
            return None
        return network_key(address, config.ipv4_prefix, config.ipv6_prefix)

    def key(self, network: int | None, headers: Headers) -> Hashable:
        """What this request is counted under (``network``: from ``network_key``)."""
        mode = self.config.key
        if mode == "client":
            return network
        value = header_values(headers, self.header) if self.header is not None else None
        if value is None:
            return network  # no header: its client network pays
        if len(value) > MAX_HEADER_KEY:
            value = value[:MAX_HEADER_KEY]
        return (b"h", value) if mode == "header" else (network, value)


class ClientKeys(NamedTuple):
    """A client address and its network key under each limit (None: allow-listed)."""

    address: str
    keys: tuple[int | None, ...]
    #: The peer is a trusted proxy (the address came from X-Forwarded-For).
    proxied: bool


class Lane:
    """One client's way through a route's one limit, resolved once: the bucket it is counted
    in, so that the next request from that peer costs two dict lookups and the GCRA step.
    Only for a limit keyed by client network alone, from a peer that is not a trusted proxy
    (anything else depends on the request's headers).  A bucket the table forgot admits
    nothing (``FORGOTTEN``), so the lane falls back to the general path, which replaces it."""

    __slots__ = ("bucket", "counts", "interval", "span")

    def __init__(self, gcra: Gcra, bucket: Bucket, counts: RouteCounts) -> None:
        self.bucket = bucket
        self.counts = counts
        # The rule's constants, one attribute away.
        self.interval = gcra.interval
        self.span = gcra.span + EPSILON


class Plan:
    """The limits on one route: (index, rule, counters for the route) each, the local ones and
    the shared ones (``edge.ratelimit_redis``) apart, and the lanes of the peers seen
    (``edge.memos.RATE_LIMIT_LANES``) when the route has exactly one limit, a local one keyed
    by client."""

    __slots__ = ("entries", "lanes", "shared")

    def __init__(self, entries: tuple[tuple[int, LimitRule, RouteCounts], ...]) -> None:
        self.entries = tuple(entry for entry in entries if not entry[1].config.shared)
        self.shared = tuple(entry for entry in entries if entry[1].config.shared)
        laneable = len(entries) == 1 and entries[0][1].config.key == "client" and not self.shared
        self.lanes: BoundedMemo[str, Lane] | None = (
            BoundedMemo(RATE_LIMIT_LANES) if laneable else None
        )


class RateLimits:
    """The limits of one config generation, by route: the check every request goes through.

    ``check`` is called once per request that has a route, before anything is served (hits
    included).  Client addresses are resolved once and memoised (``RATE_LIMIT_CLIENTS``); a
    peer admitted by a route's single client-keyed limit gets a ``Lane``, the hit path's
    case: one check costs about what a dict lookup and a few float operations cost."""

    __slots__ = ("_clients", "_plans", "rules", "shared_routes", "trusted")

    def __init__(
        self,
        rules: tuple[LimitRule, ...],
        routes: dict[str, tuple[int, ...]],
        trusted: tuple[Network, ...],
    ) -> None:
        self.rules = rules
        self.trusted = trusted
        self._plans: dict[str, Plan] = {}
        for route, indexes in routes.items():
            entries = []
            for index in indexes:
                rule = rules[index]
                counts = rule.counts.setdefault(route, RouteCounts())
                entries.append((index, rule, counts))
            if entries:
                self._plans[route] = Plan(tuple(entries))
        #: Routes with a shared limit: decided on the slow path (a Redis round trip), so
        #: their hits never take the fast path.
        self.shared_routes = frozenset(route for route, plan in self._plans.items() if plan.shared)
        self._clients: BoundedMemo[str, ClientKeys | None] = BoundedMemo(RATE_LIMIT_CLIENTS)

    @classmethod
    def build(
        cls,
        limits: tuple[EdgeRateLimit, ...],
        routes: dict[str, str],
        trusted: tuple[Network, ...],
        previous: RateLimits | None = None,
    ) -> RateLimits | None:
        """The limits of a config (None: it has none).  ``routes``: route name -> its service.
        A rule whose config is unchanged since ``previous`` keeps its table and counters."""
        if not limits:
            return None
        kept = {rule.config: rule for rule in previous.rules} if previous is not None else {}
        rules = tuple(kept.get(limit) or LimitRule(limit) for limit in limits)
        applies: dict[str, tuple[int, ...]] = {}
        for route, service in routes.items():
            applies[route] = tuple(
                i
                for i, limit in enumerate(limits)
                if (not limit.routes and not limit.services)
                or route in limit.routes
                or service in limit.services
            )
        return cls(rules, applies, trusted)

    def applies_to(self, route: str) -> bool:
        return route in self._plans

    def shared_entries(self, route: str) -> tuple[tuple[int, LimitRule, RouteCounts], ...]:
        """The shared limits on ``route`` (``edge.ratelimit_redis`` decides them)."""
        plan = self._plans.get(route)
        return plan.shared if plan is not None else ()

    def client(self, peer: str, headers: Headers) -> ClientKeys | None:
        """The client as the limits see it (None: no IP address to key by: not limited)."""
        memo_key = peer
        forwarded: bytes | None = None
        if self.trusted:
            forwarded = header_values(headers, b"x-forwarded-for")
            if forwarded is not None:
                memo_key = peer + "|" + forwarded.decode("latin-1")
        clients = self._clients
        try:
            return clients[memo_key]
        except KeyError:
            pass
        address = client_address(peer, (forwarded,) if forwarded else (), self.trusted)
        found = None
        if address is not None:
            keys = tuple(rule.network_key(address) for rule in self.rules)
            proxied = parse_address(peer) != address or any(address in net for net in self.trusted)
            found = ClientKeys(str(address), keys, proxied)
        if forwarded is not None and len(forwarded) > MAX_MEMO_FORWARDED:
            return found
        if len(clients) >= clients.bound:
            clients.clear()
        clients[memo_key] = found
        return found

    def check(self, route: str, peer: str, headers: Headers, now: float) -> Refusal | None:
        """Count one request on ``route`` from ``peer`` against the local limits (the shared
        ones are ``edge.ratelimit_redis``'s).  None: admitted.  A refusal whose
        ``rule.dry_run`` is set: admitted, but that limit would have refused (the caller logs
        it).  Any other refusal: refused, and what other limits admitted is refunded (a
        refused request costs no budget)."""
        plan = self._plans.get(route)
        if plan is None:
            return None
        lanes = plan.lanes
        if lanes is not None:
            lane = lanes.get(peer)
            if lane is not None:
                # Gcra.take, inline: every hit on a limited route pays this and no more.
                bucket = lane.bucket
                tat = bucket.tat
                if tat < now:
                    tat = now
                tat += lane.interval
                if tat - now <= lane.span:
                    bucket.tat = tat
                    lane.counts.allowed += 1
                    return None
        return self._check(plan, peer, headers, now)

    def _check(self, plan: Plan, peer: str, headers: Headers, now: float) -> Refusal | None:
        client = self.client(peer, headers)
        if client is None:
            return None
        entries = plan.entries
        taken: list[tuple[Gcra, Bucket]] | None = None
        dry: Refusal | None = None
        for index, rule, counts in entries:
            network = client.keys[index]
            if network is None:
                counts.exempt += 1
                continue
            gcra = rule.gcra
            bucket = gcra.bucket(rule.key(network, headers), now)
            wait = gcra.take(bucket, now)
            if wait == 0.0:
                counts.allowed += 1
                if len(entries) > 1:
                    if taken is None:
                        taken = []
                    taken.append((gcra, bucket))
                elif plan.lanes is not None and not client.proxied:
                    lanes = plan.lanes
                    if len(lanes) >= lanes.bound:
                        lanes.clear()
                    lanes[peer] = Lane(gcra, bucket, counts)
                continue
            if rule.dry_run:
                counts.would_limit += 1
                dry = Refusal(rule, wait, bucket, client.address)
                continue
            counts.limited += 1
            for earlier, held in taken or ():
                earlier.refund(held)
            return Refusal(rule, wait, bucket, client.address)
        return dry


__all__ = [
    "Bucket",
    "ClientKeys",
    "Gcra",
    "Lane",
    "LimitRule",
    "Plan",
    "RateLimits",
    "Refusal",
    "RouteCounts",
    "client_address",
    "header_values",
    "network_key",
    "parse_address",
]
