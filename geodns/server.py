"""The asyncio shells around the responder: UDP and TCP on one port, the admin HTTP listener,
SIGHUP reload and SIGTERM stop.  All decisions are the responder's; this module does the I/O,
counts and logs (client addresses truncated to /24 and /56)."""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import errno
import gc
import ipaddress
import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, cast

import dns.rcode
import dns.rdatatype
import uvloop
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from geodns import mmsg
from geodns.budget import failover_budget
from geodns.ratelimit import ComputeBudget, ResponseRateLimiter, Verdict
from geodns.responder import (
    DOORKEEPER_SLOTS,
    MEMO_LIMIT,
    Compiled,
    Reply,
    ReplyInfo,
    Responder,
    slip_for_query,
    truncate_for_slip,
)
from geodns.selection import HealthView
from geodns.tcpframe import MessageFramer
from geodns.zone import IPAddress, Zone
from meridian.config import Config, ConfigError, HostPort
from meridian.geo import GeoError, GeoLocator
from meridian.health import HealthMonitor
from meridian.lifecycle import ConfigHolder, Lifecycle, trim_heap
from meridian.log import get_logger
from meridian.supervise import Group, ParentLink, Supervisor, WorkerContext
from meridian.workers import WorkerApi, WorkerPeers, WorkerSockets

log = get_logger("geodns")

#: Each whole TCP message (length and query) must arrive within this of the previous one (or of
#: the connection opening), else the connection is closed; a byte does not re-arm it (RFC 7766
#: suggests seconds; see geodns.tcpframe).
TCP_IDLE_TIMEOUT = 10.0
#: TCP connections one client address may hold at once (dnsdist's max TCP connections per client).
TCP_MAX_PER_CLIENT = 16
#: TCP connections the server holds at once (also bounded by half the descriptor limit).
TCP_MAX_CONNECTIONS = 4096
#: Socket buffers asked for on the UDP socket (a burst of queries waits there while a cold
#: answer is computed; the kernel caps a plain request at net.core.rmem_max / wmem_max).
UDP_SOCKET_BUFFER = 8 * 1024 * 1024
#: Datagrams read per wake-up before the loop gets a turn (TCP, admin, health checks).
UDP_BATCH = 64
#: recvmmsg batches read per wake-up of the UDP socket (``_udp_readable_batched``).
UDP_BATCH_ROUNDS = 4
#: Replies held while the socket's send buffer is full; past this they are dropped (counted).
UDP_SEND_BACKLOG = 4096
_DOORKEEPER_MASK = DOORKEEPER_SLOTS - 1
_COUNTED_QTYPES = frozenset(
    {
        "A",
        "AAAA",
        "ANY",
        "SOA",
        "NS",
        "CNAME",
        "MX",
        "TXT",
        "HTTPS",
        "SVCB",
        "PTR",
        "SRV",
        "CAA",
        "DS",
        "DNSKEY",
        "AXFR",
        "IXFR",
    }
)


def truncate_address(address: IPAddress) -> str:
    """What may be logged of a client address: its /24 or /56."""
    prefix = 24 if address.version == 4 else 56
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


LATENCY_BUCKETS = (0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)


class DnsMetrics:
    """The ``meridian_dns_*`` metrics.

    Per-query tallies are plain integers (a ``prometheus_client`` counter takes a lock per
    ``inc``: several microseconds per query); a collector turns them into metric families when
    ``/metrics`` is scraped.  Each kind of reply has a slot in ``computed`` and ``hits``; a
    memoized reply keeps its slot number, so a memo hit costs one list increment (and a memo
    entry holds no mutable object: the garbage collector soon stops tracking it).  Memo hits
    are not timed: they are counted in the lowest latency bucket (they take well under 20 us).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        #: (transport, what the reply was, the client's country for a geo name's answer) ->
        #: slot in ``computed`` and ``hits``.  The country is one of a bounded set of labels
        #: (:mod:`geodns.countries`), so a memo hit still costs one increment.
        self.slots: dict[tuple[str, ReplyInfo, str | None], int] = {}
        self.computed: list[int] = []
        self.hits: list[int] = []
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = {}
        self.errors = 0
        #: UDP replies built from a known query shape (not timed: counted in the lowest
        #: latency bucket, as memo hits are).
        self.shaped = 0
        self.rate_limited = {"drop": 0, "slip": 0}
        #: Queries not computed because their network had spent its compute budget (UDP:
        #: dropped or slipped; TCP: reading paused until the budget refills).
        self.cost_limited = {"drop": 0, "slip": 0, "tcp_wait": 0}
        #: TCP connections closed by us: over a connection limit, or a message overdue.
        self.tcp_closed = {"limit": 0, "timeout": 0}
        self.unanswered = {"udp": 0, "tcp": 0}
        #: UDP replies the kernel refused (not "would block"), and those dropped with the send
        #: backlog full.
        self.send_errors = 0
        self.send_dropped = 0
        self.receive_errors = 0
        self.config_generation = Gauge(
            "meridian_dns_config_generation", "Generation of the config in force", registry=registry
        )
        self.reloads = Counter(
            "meridian_dns_reloads", "Reload attempts", ["result"], registry=registry
        )
        self.failover_budget = Gauge(
            "meridian_dns_failover_budget_seconds",
            "Worst case from a target's death until no client is sent there: health "
            "detection at the current settings plus the name's TTL (geodns.budget).",
            ["name"],
            registry=registry,
        )
        self.failover_detection = Gauge(
            "meridian_dns_failover_detection_seconds",
            "Worst case from a target's death until new answers avoid it.",
            ["name"],
            registry=registry,
        )
        registry.register(_TallyCollector(self))

    def set_budgets(self, config: Config) -> None:
        """One gauge per geo name of ``config`` (names gone since the last call removed)."""
        self.failover_budget.clear()
        self.failover_detection.clear()
        for geo in Zone.build(config).geo_names.values():
            budget = failover_budget(config, geo)
            self.failover_budget.labels(geo.fqdn).set(budget.seconds)
            self.failover_detection.labels(geo.fqdn).set(budget.detection)

    def slot(self, transport: str, info: ReplyInfo, country: str | None = None) -> int:
        """The slot of this kind of reply (created on first use)."""
        key = (transport, info, country)
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = len(self.computed)
            self.computed.append(0)
            self.hits.append(0)
        return slot

    def timed(self, transport: str, seconds: float) -> None:
        buckets = self.latency.get(transport)
        if buckets is None:
            buckets = self.latency[transport] = [0] * (len(LATENCY_BUCKETS) + 1)
            self.latency_sum[transport] = 0.0
        buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum[transport] += seconds

    def observe(self, reply: Reply, transport: str, seconds: float) -> int:
        """Count a computed reply; returns its slot (for a memo to count hits on)."""
        info = ReplyInfo(
            reply.qtype, reply.rcode, reply.truncated, reply.ecs, reply.fast, reply.targets
        )
        slot = self.slot(transport, info, reply.country)
        self.computed[slot] += 1
        self.timed(transport, seconds)
        if reply.error is not None:
            self.errors += 1
        return slot

    def answer_counts(self) -> dict[str, dict[str, int]]:
        """Geo names' answers so far: by client country and by target chosen (the POP or
        region), both transports, memo hits included (what the status page shows)."""
        by_country: dict[str, int] = {}
        by_target: dict[str, int] = {}
        for (_, info, country), slot in list(self.slots.items()):
            count = self.computed[slot] + self.hits[slot]
            if country is not None:
                by_country[country] = by_country.get(country, 0) + count
            for target in info.targets:
                by_target[target] = by_target.get(target, 0) + count
        return {"by_country": by_country, "by_target": by_target}


def _qtype_label(qtype: int | None) -> str:
    if qtype is None:
        return "none"
    text = dns.rdatatype.to_text(dns.rdatatype.RdataType.make(qtype))
    return text if text in _COUNTED_QTYPES else "other"


class _TallyCollector(Collector):
    def __init__(self, metrics: DnsMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        queries: dict[tuple[str, str, str], int] = {}
        ecs: dict[str, int] = {}
        truncated: dict[str, int] = {}
        answers: dict[str, int] = {}
        path = {True: 0, False: 0}
        hits: dict[str, int] = {}
        by_country: dict[str, int] = {}
        for (transport, info, country), slot in list(m.slots.items()):
            qtype, rcode, was_truncated, had_ecs, fast, targets = info
            computed, memo_hits = m.computed[slot], m.hits[slot]
            count = computed + memo_hits
            label = (_qtype_label(qtype), dns.rcode.to_text(dns.rcode.Rcode.make(rcode)), transport)
            queries[label] = queries.get(label, 0) + count
            if had_ecs:
                ecs[transport] = ecs.get(transport, 0) + count
            if was_truncated:
                truncated[transport] = truncated.get(transport, 0) + count
            for target in targets:
                answers[target] = answers.get(target, 0) + count
            if country is not None:
                by_country[country] = by_country.get(country, 0) + count
            path[fast] += count
            hits[transport] = hits.get(transport, 0) + memo_hits
        family = CounterMetricFamily(
            "meridian_dns_queries", "Queries answered", labels=["qtype", "rcode", "transport"]
        )
        for labels, count in queries.items():
            family.add_metric(list(labels), count)
        yield family
        for name, doc, table in (
            ("meridian_dns_ecs_queries", "Queries carrying EDNS Client Subnet", ecs),
            ("meridian_dns_truncated", "Replies sent with TC set", truncated),
            ("meridian_dns_memo_hits", "Replies sent from the reply memo (not computed)", hits),
            (
                "meridian_dns_unanswered",
                "Datagrams not answered (shorter than a header, or a response)",
                m.unanswered,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=["transport"])
            for transport, count in list(table.items()):
                family.add_metric([transport], count)
            yield family
        family = CounterMetricFamily(
            "meridian_dns_answers", "Answers by target chosen", labels=["target"]
        )
        for target, count in answers.items():
            family.add_metric([target], count)
        yield family
        family = CounterMetricFamily(
            "meridian_dns_answers_by_country",
            "Geo names' answers by client country (ECS subnet, else sender; bounded labels)",
            labels=["country"],
        )
        for country, count in by_country.items():
            family.add_metric([country], count)
        yield family
        family = CounterMetricFamily(
            "meridian_dns_path", "Queries by responder path (fast: memoized wire)", labels=["path"]
        )
        family.add_metric(["fast"], path[True])
        family.add_metric(["slow"], path[False])
        yield family
        family = CounterMetricFamily(
            "meridian_dns_rate_limited",
            "Replies rate limited (dropped, or slipped as truncated)",
            labels=["action"],
        )
        for action, count in m.rate_limited.items():
            family.add_metric([action], count)
        yield family
        family = CounterMetricFamily(
            "meridian_dns_cost_limited",
            "Queries not computed: their network had spent its compute budget",
            labels=["action"],
        )
        for action, count in m.cost_limited.items():
            family.add_metric([action], count)
        yield family
        family = CounterMetricFamily(
            "meridian_dns_tcp_closed",
            "TCP connections closed by the server (over a limit, or a message overdue)",
            labels=["reason"],
        )
        for reason, count in m.tcp_closed.items():
            family.add_metric([reason], count)
        yield family
        yield CounterMetricFamily(
            "meridian_dns_errors", "Queries that raised (answered SERVFAIL)", value=m.errors
        )
        yield CounterMetricFamily(
            "meridian_dns_send_errors",
            "UDP replies not sent: refused by the kernel, or the send backlog was full",
            value=m.send_errors + m.send_dropped,
        )
        latency = HistogramMetricFamily(
            "meridian_dns_answer_seconds",
            "Time to compute a reply (memo hits are counted in the lowest bucket)",
            labels=["transport"],
        )
        untimed = dict(hits)
        untimed["udp"] = untimed.get("udp", 0) + m.shaped
        for transport in sorted(set(m.latency) | {t for t, n in untimed.items() if n}):
            counts = list(m.latency.get(transport, [0] * (len(LATENCY_BUCKETS) + 1)))
            counts[0] += untimed.get(transport, 0)
            cumulative, running = [], 0
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                running += count
                cumulative.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
            latency.add_metric([transport], cumulative, m.latency_sum.get(transport, 0.0))
        yield latency


@dataclass(frozen=True, slots=True)
class Serving:
    """What one config generation serves with; swapped whole on reload."""

    config: Config
    generation: int
    responder: Responder
    locator: GeoLocator
    limiter: ResponseRateLimiter
    budget: ComputeBudget


def _compile_and_trim(responder: Responder, health: HealthView) -> Compiled:
    """A compilation off the event loop, its freed temporaries then handed back to the
    system (``trim_heap``) in the same thread."""
    compiled = responder.compile(health)
    trim_heap()
    return compiled


def build_serving(
    config: Config, generation: int, pop: str, previous: Serving | None = None
) -> Serving:
    """Everything a config needs before it can serve; raises ConfigError if it cannot.
    ``previous``: what serves now (a reload), whose answers are reused where they hold."""
    try:
        pop_config = config.pop(pop)
    except KeyError:
        raise ConfigError([f"{config.source}: pops: no POP named {pop!r}"]) from None
    try:
        locator = GeoLocator(config.geo, pop_config.location)
    except GeoError as exc:
        raise ConfigError([f"{config.source}: {exc}"]) from None
    return Serving(
        config,
        generation,
        Responder(
            Zone.build(config),
            locator,
            compile_inline=False,
            previous=previous.responder if previous is not None else None,
        ),
        locator,
        ResponseRateLimiter(config.dns.rate_limit),
        ComputeBudget(config.dns.rate_limit),
    )


@dataclass(frozen=True, slots=True)
class DnsSockets:
    """The sockets ``dns --workers N`` binds once in the supervisor; every worker inherits
    them (one UDP socket and one TCP listener shared by all; the admin one for worker 0)."""

    udp: socket.socket
    tcp: socket.socket
    admin: socket.socket | None
    #: What the kernel granted for the UDP receive and send buffers.
    buffers: tuple[int, int]

    @classmethod
    def bind(cls, listen: HostPort, admin: HostPort | None) -> DnsSockets:
        udp, receive, send = bind_udp(listen)
        bound: list[socket.socket] = [udp]
        try:
            # The same port as UDP, even when the caller asked for port 0.
            tcp = bind_tcp(HostPort(listen.host, udp.getsockname()[1]))
            bound.append(tcp)
            admin_socket = bind_tcp(admin) if admin is not None else None
        except OSError:
            for sock in bound:
                sock.close()
            raise
        return cls(udp, tcp, admin_socket, (receive, send))

    def all(self) -> tuple[socket.socket, ...]:
        return (self.udp, self.tcp) + ((self.admin,) if self.admin is not None else ())


def bind_udp(listen: HostPort) -> tuple[socket.socket, int, int]:
    """The UDP socket, its buffers grown first: (socket, receive buffer, send buffer)."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    udp_socket = socket.socket(family, socket.SOCK_DGRAM)
    try:
        receive_buffer = _grow_buffer(udp_socket, socket.SO_RCVBUF, _SO_RCVBUFFORCE)
        send_buffer = _grow_buffer(udp_socket, socket.SO_SNDBUF, _SO_SNDBUFFORCE)
        udp_socket.bind((listen.host, listen.port))
    except OSError:
        udp_socket.close()
        raise
    return udp_socket, receive_buffer, send_buffer


def bind_tcp(address: HostPort, backlog: int = 1024) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


#: Which of ``--workers N`` answered worker 0's scrape (``meridian.workers``).
DNS_WORKER_UP = "meridian_dns_worker_up"
#: Labels kept when adding up workers' answers (each worker bounds its own: ``countries``).
_MAX_COMBINED_LABELS = 1024


def combine_answers(documents: Iterable[object]) -> dict[str, dict[str, int]]:
    """The process group's answers (``DnsMetrics.answer_counts`` of each worker) added up.
    A sibling's document is read as untrusted: what is not a label -> count mapping is
    skipped, and the labels kept are bounded."""
    combined: dict[str, dict[str, int]] = {"by_country": {}, "by_target": {}}
    for document in documents:
        if not isinstance(document, dict):
            continue
        for part, totals in combined.items():
            counts = document.get(part)
            if not isinstance(counts, dict):
                continue
            for label, count in counts.items():
                if not isinstance(label, str) or type(count) is not int or count < 0:
                    continue
                if label in totals or len(totals) < _MAX_COMBINED_LABELS:
                    totals[label] = totals.get(label, 0) + count
    return combined


class DnsServer:
    def __init__(
        self,
        holder: ConfigHolder,
        pop: str,
        *,
        listen: HostPort,
        admin: HostPort | None,
        registry: CollectorRegistry | None = None,
        tcp: bool = True,
        sockets: DnsSockets | None = None,
        workers: WorkerSockets | None = None,
        slot: int = 0,
    ) -> None:
        """``workers``: under ``--workers N``, where each worker's private admin socket lives
        (``meridian.workers``): worker ``slot`` serves its own there, and worker 0's admin
        listener speaks for them all."""
        self.holder = holder
        self.pop = pop
        self.listen = listen
        self.admin = admin
        self.registry = registry if registry is not None else CollectorRegistry()
        self.serve_tcp = tcp
        #: Under the supervisor: the sockets it bound (``admin`` only for worker 0).
        self.sockets = sockets
        self.metrics = DnsMetrics(self.registry)
        self.serving = build_serving(holder.current, holder.generation, pop)
        self._pending: Serving | None = None
        #: How long building the pending serving took (logged when it is swapped in).
        self._prepare_seconds = 0.0
        holder.listeners.append(self._prepare)
        self.monitor = HealthMonitor(
            holder.current,
            registry=self.registry,
            check_backends=_needs_backend_checks(holder.current),
            check_pops=True,
            pop=pop,
        )
        self._udp: socket.socket | None = None
        self._sendto: Any = None  # the UDP socket's bound sendto
        #: Read and answer UDP a batch per system call (``geodns.mmsg``) where Linux allows.
        self.batch_syscalls = True
        self._batch: mmsg.DatagramBatch | None = None
        #: Replies computed during one read batch, sent together at its end (see _udp_readable).
        self._outbox: list[tuple[bytes, tuple[Any, ...]]] = []
        self._backlog: collections.deque[tuple[bytes, tuple[Any, ...]]] = collections.deque()
        #: UDP reply memo: query bytes after the ID -> (reply bytes after the ID, tally slot).
        #: ``_shared`` holds replies that depend only on the query (ECS gave the subnet),
        #: ``_by_client`` those for one sender address (keyed by its host string, or in the
        #: batched loop as :meth:`mmsg.DatagramBatch.answer` reads it).  Emptied when health
        #: or config changes.
        self._shared: dict[bytes, tuple[bytes, int]] = {}
        self._by_client: dict[tuple[bytes, Any], tuple[bytes, int]] = {}
        #: The memos' doorkeeper (TinyLFU's): a fingerprint byte (odd: never 0, an empty slot)
        #: of each memo key seen, in the slot its hash picks.  A reply :meth:`_known_ecs` or
        #: :meth:`_known_plain` gives (a range lookup: cheap) is memoized only when its key's
        #: fingerprint is already there.  A collision admits a reply early (1 in 128 at worst)
        #: or overwrites a mark (admitted a sighting later): either way the reply is the same.
        self._seen = bytearray(DOORKEEPER_SLOTS)
        self._hits = self.metrics.hits
        self._memo_generation = -1
        #: Replies of known ECS shapes (:meth:`Responder.shaped`) carry their tally slot.
        self._computed = self.metrics.computed
        self.serving.responder.tag_of = self._udp_slot
        self._shaped = self.serving.responder.shaped
        self._plain = self.serving.responder.plain
        self._limiting = self.serving.limiter.config.enabled
        #: Sender address -> its rate-limiting prefix (depends on the config: reset on reload).
        self._prefixes: dict[str, tuple[int, int]] = {}
        #: Open TCP connections, by client address and in all.
        self._tcp_clients: dict[IPAddress, int] = {}
        self._tcp_open = 0
        self._tcp_max = _tcp_capacity()
        self.monitor.subscribe(lambda snapshot: self._forget_replies())
        self.monitor.subscribe(lambda snapshot: self._compile_soon())
        #: A compilation of the geo answers is running in a thread (one at a time), and
        #: another is due when it ends.
        self._compiling = False
        self._compile_again = False
        self.serving.responder.install(self.serving.responder.compile(self.monitor.snapshot))
        trim_heap()  # the build's temporaries are freed: hand them back
        self._tcp: asyncio.Server | None = None
        self._admin_runner: web.AppRunner | None = None
        self._workers = workers
        self._slot = slot
        self._worker_api: WorkerApi | None = None
        self._peers: WorkerPeers | None = None
        self._addresses: dict[str, IPAddress] = {}
        self.udp_address: tuple[str, int] | None = None
        self.tcp_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None

    # ----------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.monitor.start()
        self.metrics.config_generation.set(self.holder.generation)
        self.metrics.set_budgets(self.holder.current)
        if self.sockets is not None:
            udp_socket = self.sockets.udp
            receive_buffer, send_buffer = self.sockets.buffers
        else:
            udp_socket, receive_buffer, send_buffer = bind_udp(self.listen)
        udp_socket.setblocking(False)
        # Our own read loop rather than a DatagramProtocol: it reads a batch of datagrams per
        # wake-up and sends with plain sendto (no transport bookkeeping per datagram).
        self._udp = udp_socket
        self._sendto = udp_socket.sendto
        if self.batch_syscalls and mmsg.AVAILABLE:
            self._batch = mmsg.DatagramBatch(udp_socket)
            loop.add_reader(udp_socket.fileno(), self._udp_readable_batched)
        else:
            loop.add_reader(udp_socket.fileno(), self._udp_readable)
        self.udp_address = udp_socket.getsockname()[:2]
        if self.serve_tcp and self.sockets is not None:
            self._tcp = await loop.create_server(lambda: _TcpProtocol(self), sock=self.sockets.tcp)
            self.tcp_address = self._tcp.sockets[0].getsockname()[:2]
        elif self.serve_tcp:
            # The same port as UDP, even when the caller asked for port 0.
            self._tcp = await loop.create_server(
                lambda: _TcpProtocol(self),
                self.listen.host,
                self.udp_address[1],
                reuse_address=True,
            )
            self.tcp_address = self._tcp.sockets[0].getsockname()[:2]
        admin_socket: socket.socket | None = None
        if self.sockets is not None:
            admin_socket = self.sockets.admin
        elif self.admin is not None:
            # Our own socket, so that the bound address is known even for port 0.
            admin_socket = bind_tcp(self.admin)
        if self._workers is not None:
            self._worker_api = WorkerApi(
                metrics=lambda: generate_latest(self.registry), status=self._worker_status
            )
            await self._worker_api.start(self._workers.bind(self._slot))
            if admin_socket is not None:
                self._peers = WorkerPeers(self._workers, self._slot, up_metric=DNS_WORKER_UP)
        if admin_socket is not None:
            app = web.Application()
            app.router.add_get("/metrics", self._metrics_page)
            app.router.add_get("/status", self._status_page)
            app.router.add_get("/", self._html_page)
            self._admin_runner = web.AppRunner(app, access_log=None)
            await self._admin_runner.setup()
            self.admin_address = admin_socket.getsockname()[:2]
            await web.SockSite(self._admin_runner, admin_socket).start()
        log.info(
            "dns_listening",
            udp=_fmt(self.udp_address),
            tcp=_fmt(self.tcp_address),
            admin=_fmt(self.admin_address),
            udp_buffers=f"{receive_buffer}/{send_buffer}",
            pop=self.pop,
            zone=self.holder.current.dns.zone,
            generation=self.holder.generation,
            pid=os.getpid(),
        )

    async def stop(self) -> None:
        if self._udp is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._udp.fileno())
            if self._backlog:
                loop.remove_writer(self._udp.fileno())
                self._backlog.clear()
            self._udp.close()
            self._udp = None
            self._batch = None
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 2.0)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self._peers is not None:
            await self._peers.close()
        if self._worker_api is not None:
            await self._worker_api.stop()
        await self.monitor.stop()
        self.serving.locator.close()
        log.info("dns_stopped", pop=self.pop)

    # -------------------------------------------------------------------------------- reload

    def _prepare(self, config: Config, generation: int) -> None:
        """Build the new serving state before the holder swaps; a failure rejects the reload."""
        started = time.perf_counter()
        pending = build_serving(config, generation, self.pop, previous=self.serving)
        pending.responder.tag_of = self._udp_slot
        pending.responder.install(pending.responder.compile(self.monitor.snapshot))
        self._pending = pending
        self._prepare_seconds = time.perf_counter() - started

    def _udp_slot(self, info: ReplyInfo, country: str | None) -> int:
        return self.metrics.slot("udp", info, country)

    def _compile_soon(self) -> None:
        """Compile the geo answers for the current health in a thread, off the hot path; the
        responder answers from its previous compilation meanwhile (not memoized), and the new
        one is swapped in whole when ready."""
        if self._compiling:
            self._compile_again = True
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test driving the server by hand): compile now
            responder = self.serving.responder
            responder.install(responder.compile(self.monitor.snapshot))
            return
        serving, snapshot = self.serving, self.monitor.snapshot
        self._compiling = True
        future = loop.run_in_executor(None, _compile_and_trim, serving.responder, snapshot)
        future.add_done_callback(lambda done: self._compiled(serving, done))

    def _compiled(self, serving: Serving, done: asyncio.Future[Any]) -> None:
        self._compiling = False
        try:
            compiled = done.result()
        except Exception as exc:  # keep answering from the previous compilation
            log.error("dns_compile_failed", error=f"{type(exc).__name__}: {exc}")
            if self._compile_again:
                self._compile_again = False
                self._compile_soon()
            return
        else:
            if serving is self.serving:
                serving.responder.install(compiled)
                self._forget_replies()
                log.info(
                    "dns_answers_compiled",
                    health_generation=compiled.health.generation,
                    seconds=round(serving.responder.compile_seconds, 3),
                )
        if (
            self._compile_again
            or self.serving.responder.compiled is None
            or (
                self.serving.responder.compiled.health.generation
                != self.monitor.snapshot.generation
            )
        ):
            self._compile_again = False
            self._compile_soon()

    def _trim_soon(self) -> None:
        """``trim_heap`` in a thread (it takes up to tens of ms): queries keep flowing."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test driving the server by hand)
            trim_heap()
            return
        loop.run_in_executor(None, trim_heap)

    def on_reload(self, config: Config, generation: int) -> None:
        pending, self._pending = self._pending, None
        if pending is None or pending.config is not config:
            return
        old, self.serving = self.serving, pending  # atomic: replies are computed synchronously
        self._shaped = pending.responder.shaped
        self._plain = pending.responder.plain
        self._limiting = pending.limiter.config.enabled
        self._prefixes.clear()
        self._forget_replies()
        old.locator.close()
        del old
        self._trim_soon()  # the old answers and the new build's temporaries
        self.monitor.update_config(config)
        self.metrics.config_generation.set(generation)
        self.metrics.set_budgets(config)
        self.metrics.reloads.labels("ok").inc()
        log.info(
            "dns_reloaded",
            generation=generation,
            geo_database=str(pending.locator.path),
            # The address map (the database walk and everything else derived from the
            # file, the overrides and the topology) was the serving one: nothing re-walked.
            geo_database_reused=pending.responder.address_map_reused,
            seconds=round(self._prepare_seconds, 3),
        )

    def reload(self) -> bool:
        """What SIGHUP does (also for tests): reload config and geo database, or keep both."""
        return self._reloaded(self.holder.reload())

    async def reload_off_loop(self) -> bool:
        """:meth:`reload` with the loading and compiling (a new database is walked and its
        answers compiled: seconds for a city database) in a thread: queries keep flowing."""
        ok = await asyncio.get_running_loop().run_in_executor(None, self.holder.reload)
        return self._reloaded(ok)

    def _reloaded(self, ok: bool) -> bool:
        if ok:
            self.on_reload(self.holder.current, self.holder.generation)
        else:
            self._pending = None
            self.metrics.reloads.labels("rejected").inc()
        return ok

    # ----------------------------------------------------------------------------- per query

    def client_address(self, host: str) -> IPAddress:
        address = self._addresses.get(host)
        if address is None:
            if len(self._addresses) > 65536:
                self._addresses.clear()
            address = self._addresses[host] = ipaddress.ip_address(host.partition("%")[0])
        return address

    def answer(self, data: bytes, source: IPAddress, tcp: bool) -> Reply | None:
        """The general path (TCP, and UDP queries the fast path does not take): counted."""
        started = time.perf_counter()
        reply = self.serving.responder.respond(data, source, tcp=tcp, health=self.monitor.snapshot)
        transport = "tcp" if tcp else "udp"
        if reply is None:
            self.metrics.unanswered[transport] += 1
            return None
        self.metrics.observe(reply, transport, time.perf_counter() - started)
        if reply.error is not None:
            log.error("dns_query_failed", client=truncate_address(source), error=reply.error)
        return reply

    def _forget_replies(self) -> None:
        self._shared.clear()
        self._by_client.clear()
        self._memo_generation = self.monitor.snapshot.generation

    def _udp_readable(self) -> None:
        """Read up to a batch of datagrams, answer each, then send the replies back to back.

        Sending at the end of the batch rather than after each query lets a client that waits
        for replies wake once per burst instead of once per reply (each wake-up of a sleeping
        receiver costs the sender several microseconds of kernel time); a batch is only long
        when queries queue up, so an idle server still answers each query at once."""
        udp = self._udp
        if udp is None:
            return
        recvfrom = udp.recvfrom
        handle = self.handle_datagram
        try:
            for _ in range(UDP_BATCH):
                try:
                    data, addr = recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:  # nothing to answer; the next wake-up tries again
                    self.metrics.receive_errors += 1
                    count = self.metrics.receive_errors
                    if count & (count - 1) == 0:  # the 1st, 2nd, 4th, 8th...: no log flood
                        log.warning("dns_udp_receive_failed", error=str(exc), count=count)
                    return
                try:
                    handle(data, addr)
                except Exception as exc:  # never lose the rest of the batch to one bad datagram
                    self.metrics.errors += 1
                    log.error("dns_datagram_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            if self._outbox:
                self._send_outbox()

    def _udp_readable_batched(self) -> None:
        """``_udp_readable`` with one ``recvmmsg`` and one ``sendmmsg`` per batch instead of
        a ``recvfrom`` and a ``sendto`` per query (gdnsd's loop): up to ``UDP_BATCH_ROUNDS``
        batches per wake-up, each batch's replies sent before the next is read, until a read
        finds nothing.  (Under load, queries arrive while a batch is answered: reading again
        at once costs less than a return to the event loop and an ``epoll_wait``; measured
        with ``benchmarks.compare dns``, 5.8-6.3 vs 6.3 µs/query.)  Memoized
        replies are written over their queries inside :meth:`mmsg.DatagramBatch.answer`
        (no Python call per datagram); the rest come from :meth:`_answer_slot`.  Under
        response rate limiting every datagram takes :meth:`handle_datagram`."""
        batch = self._batch
        if batch is None:
            return
        for _ in range(UDP_BATCH_ROUNDS):
            truncated = batch.truncated
            try:
                if self._limiting:
                    got = self._limited_batch(batch)
                else:
                    got, unsent = batch.answer(
                        self._shared, self._by_client, self._hits, self._answer_slot
                    )
                    for out, addr, code in unsent:
                        self._unsent(out, addr, code)
            except OSError as exc:
                self.metrics.receive_errors += 1
                count = self.metrics.receive_errors
                if count & (count - 1) == 0:
                    log.warning("dns_udp_receive_failed", error=str(exc), count=count)
                return
            if batch.truncated != truncated:  # longer than any query: never answered
                self.metrics.unanswered["udp"] += batch.truncated - truncated
            if not got:
                return

    def _answer_slot(self, i: int, key: bytes, sender: Any) -> bytes | None:
        """The reply (after the ID) to datagram ``i`` of the batch, which no memo answers
        (``key``: its bytes after the ID; ``sender``: its sender as the batch keys the
        per-client memo - the IPv4 address read as a machine ``int``, or 16 IPv6 bytes).
        Called only when not rate limiting (which must see every computed reply)."""
        try:
            generation = self.monitor.snapshot.generation
            if len(key) > 9 and key[9]:  # an additional record: perhaps an OPT with ECS
                reply = self._known_ecs(key, generation)
                if reply is not None:
                    return reply
            if type(sender) is int:
                reply = self._known_plain(key, True, socket.ntohl(sender), sender, generation)
            else:
                address = int.from_bytes(sender, "big")
                reply = self._known_plain(key, False, address, sender, generation)
            if reply is not None:
                return reply
            assert self._batch is not None
            received = self._batch.datagram(i)
            if received is None:
                return None
            data, addr = received
            out = self._compute_datagram(data, addr, key, sender)
        except Exception as exc:  # never lose the rest of the batch to one bad datagram
            self.metrics.errors += 1
            log.error("dns_datagram_failed", error=f"{type(exc).__name__}: {exc}")
            return None
        if out is None:
            return None
        if out[:2] != data[:2]:  # not this query's ID (never so today): sent as it is
            self._unsent(out, addr[:2], 0)
            return None
        return out[2:]

    def _known_ecs(self, query: bytes, generation: int) -> bytes | None:
        """The reply (after the ID) to ECS ``query`` (after its ID) of a shape answered
        before (:meth:`Responder.shaped`: a range lookup on the subnet), memoized for every
        sender; None: :meth:`_compute_datagram` decides."""
        shaped = self._shaped(query, generation)
        if shaped is None:
            return None
        reply, _, slot = shaped
        self._computed[slot] += 1
        self.metrics.shaped += 1
        # The doorkeeper (inline: this is every query's path when each brings a new subnet).
        key_hash = hash(query)
        at = key_hash & _DOORKEEPER_MASK
        mark = (key_hash >> 48 & 0xFF) | 1
        if self._seen[at] != mark:
            self._seen[at] = mark
            return reply
        if len(self._shared) + len(self._by_client) >= MEMO_LIMIT:
            self._forget_replies()
        self._shared[query] = (reply, slot)
        return reply

    def _known_plain(
        self, query: bytes, v4: bool, address: int, sender: Any, generation: int
    ) -> bytes | None:
        """The reply (after the ID) to ``query`` (after its ID, no ECS) of a shape answered
        before, from a sender at ``address`` never seen before (:meth:`Responder.plain`: a
        range lookup on the sender), memoized for ``sender``; None: as :meth:`_known_ecs`."""
        plain = self._plain(query, v4, address, generation)
        if plain is None:
            return None
        reply, _, slot = plain
        self._computed[slot] += 1
        self.metrics.shaped += 1
        key = (query, sender)
        key_hash = hash(key)
        at = key_hash & _DOORKEEPER_MASK
        mark = (key_hash >> 48 & 0xFF) | 1  # as in _known_ecs
        if self._seen[at] != mark:
            self._seen[at] = mark
            return reply
        if len(self._shared) + len(self._by_client) >= MEMO_LIMIT:
            self._forget_replies()
        self._by_client[key] = (reply, slot)
        return reply

    def _limited_batch(self, batch: mmsg.DatagramBatch) -> int:
        """One batch under rate limiting: each datagram through :meth:`handle_datagram`."""
        got = batch.receive()
        handle = self.handle_datagram
        try:
            for i in range(got):
                received = batch.datagram(i)
                if received is None:
                    continue
                try:
                    handle(*received)
                except Exception as exc:  # never lose the rest of the batch to one
                    self.metrics.errors += 1
                    log.error("dns_datagram_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            if self._outbox:
                outbox, self._outbox = self._outbox, []
                for index, code in batch.send(outbox):
                    out, addr = outbox[index]
                    self._unsent(out, addr[:2], code)
        return got

    def _unsent(self, out: bytes, addr: tuple[Any, ...], code: int) -> None:
        """A reply a batch did not send: too long for a slot (``code`` 0), or refused."""
        if code == 0:  # longer than a slot: the plain call
            try:
                self._sendto(out, addr)
            except OSError as exc:
                self._send_failed(exc, out, addr)
        elif code in (errno.EAGAIN, errno.EINTR):
            self._send_failed(BlockingIOError(code, "send buffer full"), out, addr)
        else:
            self.metrics.send_errors += 1

    def _send_outbox(self) -> None:
        outbox, self._outbox = self._outbox, []
        sendto = self._sendto
        for out, addr in outbox:
            try:
                sendto(out, addr)
            except OSError as exc:
                self._send_failed(exc, out, addr)

    def handle_datagram(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """One UDP query, its reply queued for the end of the read batch (``_udp_readable``).
        The hot path: a memoized reply for these query bytes (after the ID), with the query's
        ID - two dict lookups, one increment, one append."""
        tail = data[2:]
        memo = self._shared.get(tail)
        if memo is None:
            # A sender's own memo before the shape lookup: a resolver without ECS repeats.
            memo = self._by_client.get((tail, addr[0]))
        if memo is None:
            out = self._answer_new(data, addr, tail, addr[0])
            if out is not None:
                self._outbox.append((out, addr))
            return
        self._hits[memo[1]] += 1
        if self._limiting:
            self._send_limited(data[:2] + memo[0], addr)
            return
        self._outbox.append((data[:2] + memo[0], addr))

    def _answer_new(
        self, data: bytes, addr: tuple[Any, ...], tail: bytes, sender: str
    ) -> bytes | None:
        """The reply to a UDP query no memo answers (None: none is sent)."""
        if not self._limiting:
            generation = self.monitor.snapshot.generation
            if len(data) > 11 and data[11]:  # an additional record: perhaps an OPT with ECS
                reply = self._known_ecs(tail, generation)
                if reply is not None:
                    return data[:2] + reply
            v4 = ":" not in sender
            try:  # the C parser: ipaddress's costs more than the rest of this path
                if v4:
                    raw = socket.inet_pton(socket.AF_INET, sender)
                else:
                    raw = socket.inet_pton(socket.AF_INET6, sender.partition("%")[0])
            except OSError:
                return None
            address = int.from_bytes(raw, "big")
            reply = self._known_plain(tail, v4, address, sender, generation)
            if reply is not None:
                return data[:2] + reply
        return self._compute_datagram(data, addr, tail, sender)

    def _compute_datagram(
        self, data: bytes, addr: tuple[Any, ...], tail: bytes, sender: Any
    ) -> bytes | None:
        host = addr[0]
        try:
            source = self.client_address(host)
        except ValueError:
            return None
        serving = self.serving
        prefix: tuple[int, int] | None = None
        if self._limiting:
            # Decided before anything is computed (dnsdist's order, not BIND's): on the
            # sender's network, by its response rate and by what its answers have cost.
            if len(data) < 12 or data[2] & 0x80:
                self.metrics.unanswered["udp"] += 1
                return None  # never answered (too short, or a response): spends no token
            prefix = self._prefix(host)
            if prefix is None:
                return None
            now = time.monotonic()
            verdict = serving.limiter.check_prefix(prefix, now)
            tally = self.metrics.rate_limited
            if verdict is Verdict.SEND:
                verdict = serving.budget.check_prefix(prefix, now)
                tally = self.metrics.cost_limited
            if verdict is not Verdict.SEND:
                tally[verdict.value] += 1
                return slip_for_query(data) if verdict is Verdict.SLIP else None
        started = time.perf_counter()
        health = self.monitor.snapshot
        if health.generation != self._memo_generation:
            self._forget_replies()
        try:
            quick = serving.responder.quick(data, source, False, health)
        except Exception:  # the general path answers SERVFAIL and logs
            quick = None
        if quick is None:
            reply = self.answer(data, source, tcp=False)
            if prefix is not None:
                serving.budget.charge(prefix, time.perf_counter() - started, time.monotonic())
            if reply is None:
                return None
            return reply.wire
        metrics = self.metrics
        slot = metrics.slot("udp", quick.info, quick.country)
        metrics.computed[slot] += 1
        elapsed = time.perf_counter() - started
        metrics.timed("udp", elapsed)
        if prefix is not None:
            serving.budget.charge(prefix, elapsed, time.monotonic())
        if quick.reusable:
            if len(self._shared) + len(self._by_client) >= MEMO_LIMIT:
                self._forget_replies()
            if quick.shared:
                self._shared[tail] = (quick.tail, slot)
            else:
                self._by_client[(tail, sender)] = (quick.tail, slot)
        return data[:2] + quick.tail

    def _prefix(self, host: str) -> tuple[int, int] | None:
        """The rate-limiting prefix of a sender (cached per address string)."""
        prefix = self._prefixes.get(host)
        if prefix is None:
            try:
                prefix = self.serving.limiter.prefix_of(self.client_address(host))
            except ValueError:
                return None
            if len(self._prefixes) > 65536:
                self._prefixes.clear()
            self._prefixes[host] = prefix
        return prefix

    def _send_limited(self, out: bytes, addr: tuple[Any, ...]) -> None:
        """Send a memoized reply under response rate limiting: dropped, slipped (TC) or sent."""
        prefix = self._prefix(addr[0])
        if prefix is None:
            return
        verdict = self.serving.limiter.check_prefix(prefix, time.monotonic())
        if verdict is not Verdict.SEND:
            self.metrics.rate_limited[verdict.value] += 1
            if verdict is Verdict.DROP:
                return
            out = truncate_for_slip(out)
        self._outbox.append((out, addr))

    # --------------------------------------------------------------------------------- TCP

    def tcp_opened(self, source: IPAddress) -> bool:
        """Count a new TCP connection; False (counted as refused) when it is one too many for
        its client address or for the server."""
        held = self._tcp_clients.get(source, 0)
        if held >= TCP_MAX_PER_CLIENT or self._tcp_open >= self._tcp_max:
            self.metrics.tcp_closed["limit"] += 1
            return False
        self._tcp_clients[source] = held + 1
        self._tcp_open += 1
        return True

    def tcp_gone(self, source: IPAddress) -> None:
        held = self._tcp_clients.get(source, 0) - 1
        if held > 0:
            self._tcp_clients[source] = held
        else:
            self._tcp_clients.pop(source, None)
        self._tcp_open -= 1

    def tcp_wait(self, source: IPAddress) -> float:
        """Seconds before a query of ``source`` may be computed (its network's budget)."""
        if not self._limiting:
            return 0.0
        serving = self.serving
        return serving.budget.wait(serving.limiter.prefix_of(source), time.monotonic())

    def answer_tcp(self, data: bytes, source: IPAddress) -> Reply | None:
        """A TCP query answered and its cost charged to its network."""
        if not self._limiting:
            return self.answer(data, source, tcp=True)
        serving = self.serving
        started = time.perf_counter()
        reply = self.answer(data, source, tcp=True)
        prefix = serving.limiter.prefix_of(source)
        serving.budget.charge(prefix, time.perf_counter() - started, time.monotonic())
        return reply

    def _send_failed(self, exc: OSError, out: bytes, addr: tuple[Any, ...]) -> None:
        if not isinstance(exc, BlockingIOError | InterruptedError) or self._udp is None:
            self.metrics.send_errors += 1
            return
        # The send buffer is full: hold the reply until the socket is writable again.
        if len(self._backlog) >= UDP_SEND_BACKLOG:
            self.metrics.send_dropped += 1
            return
        if not self._backlog:
            asyncio.get_running_loop().add_writer(self._udp.fileno(), self._flush_backlog)
        self._backlog.append((out, addr))

    def _flush_backlog(self) -> None:
        udp = self._udp
        backlog = self._backlog
        while backlog and udp is not None:
            out, addr = backlog[0]
            try:
                udp.sendto(out, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.metrics.send_errors += 1
            backlog.popleft()
        if udp is not None:
            asyncio.get_running_loop().remove_writer(udp.fileno())

    # ------------------------------------------------------------------------------- admin

    async def _metrics_page(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        if self._peers is not None:  # --workers N: every worker's samples, labelled
            body = await self._peers.metrics(body)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _worker_status(self) -> dict[str, Any]:
        """What worker 0 asks its siblings for (``meridian.workers.WorkerApi``)."""
        return {"pid": os.getpid(), "answers": self.metrics.answer_counts()}

    async def _html_page(self, request: web.Request) -> web.Response:
        """The live status page: polls /status and /metrics (inline CSS and JS only)."""
        body = resources.files("geodns").joinpath("pages", "status.html").read_text("utf-8")
        return web.Response(
            text=body,
            content_type="text/html",
            headers={
                "Cache-Control": "no-store",
                "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; img-src data:",
            },
        )

    async def _status_page(self, request: web.Request) -> web.Response:
        document = self._own_status()
        if self._peers is not None:
            # --workers N: the answers are the process group's; each worker is listed.
            siblings = await self._peers.statuses()
            own = self._worker_status()
            document["workers"] = {
                str(slot): status for slot, status in sorted({**siblings, self._slot: own}.items())
            }
            document["answers"] = combine_answers(
                [own["answers"], *(status.get("answers") for status in siblings.values())]
            )
        return web.json_response(document)

    def _own_status(self) -> dict[str, Any]:
        return {
            "pop": self.pop,
            "zone": self.holder.current.dns.zone,
            "config_generation": self.holder.generation,
            "config_source": self.holder.current.source,
            "geo_database": str(self.serving.locator.path),
            "health_generation": self.monitor.snapshot.generation,
            "health": self.monitor.status(),
            "listening": {"udp": _fmt(self.udp_address), "tcp": _fmt(self.tcp_address)},
            "answers": self.metrics.answer_counts(),
        }


_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


def _grow_buffer(sock: socket.socket, option: int, force: int) -> int:
    """Ask for UDP_SOCKET_BUFFER; past the sysctl cap try the privileged FORCE variant (Linux,
    CAP_NET_ADMIN).  Returns what the kernel granted (it reports double the request)."""
    sock.setsockopt(socket.SOL_SOCKET, option, UDP_SOCKET_BUFFER)
    granted: int = sock.getsockopt(socket.SOL_SOCKET, option)
    if granted < UDP_SOCKET_BUFFER and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, force, UDP_SOCKET_BUFFER)
            granted = sock.getsockopt(socket.SOL_SOCKET, option)
    return granted


def _needs_backend_checks(config: Config) -> bool:
    return any(name.targets == "regions" for name in config.dns.names)


def _fmt(address: tuple[str, int] | None) -> str:
    if address is None:
        return ""
    return str(HostPort(address[0], address[1]))


def _tcp_capacity() -> int:
    """TCP_MAX_CONNECTIONS, or half the descriptor limit if that is lower (the rest is for UDP,
    health checks, the admin listener and the geo database)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return TCP_MAX_CONNECTIONS
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return TCP_MAX_CONNECTIONS
    return max(16, min(TCP_MAX_CONNECTIONS, soft // 2))


class _TcpProtocol(asyncio.Protocol):
    """RFC 7766: length-prefixed messages, pipelined (answered in order).

    Each whole message is due within TCP_IDLE_TIMEOUT of the previous one (a trickle of bytes
    does not re-arm it: :class:`~geodns.tcpframe.MessageFramer`); a client address holds at
    most TCP_MAX_PER_CLIENT connections; reading pauses while the client does not read its
    replies (so they cannot pile up here) or while its network is over its compute budget."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.source: IPAddress | None = None
        self.framer: MessageFramer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.budget_wait: asyncio.TimerHandle | None = None
        self.writing_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = self.transport.get_extra_info("peername")
        try:
            source = self.server.client_address(peer[0])
        except (ValueError, TypeError):
            self.transport.abort()
            return
        if not self.server.tcp_opened(source):
            self.transport.abort()
            return
        self.source = source
        self.loop = loop = asyncio.get_running_loop()
        self.framer = MessageFramer(TCP_IDLE_TIMEOUT, loop.time())
        self.timer = loop.call_at(self.framer.deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        # One timer per connection, moved lazily: it fires at the deadline it was set for and
        # looks whether a whole message has moved the deadline on since.
        self.timer = None
        framer, transport, loop = self.framer, self.transport, self.loop
        if framer is None or transport is None or loop is None:
            return
        now = loop.time()
        if framer.expired(now):
            self.server.metrics.tcp_closed["timeout"] += 1
            transport.abort()  # not close(): a client that reads nothing would keep it open
            return
        # A whole message waits for our budget: look again once the wait is over.
        when = framer.deadline if framer.deadline > now else now + TCP_IDLE_TIMEOUT
        self.timer = loop.call_at(when, self._check_deadline)

    def data_received(self, data: bytes) -> None:
        if self.framer is None:
            return
        self.framer.feed(data)
        self._answer_ready()

    def _answer_ready(self) -> None:
        framer, server, source, loop = self.framer, self.server, self.source, self.loop
        if framer is None or source is None or loop is None:
            return
        while framer.ready():
            transport = self.transport
            if transport is None or self.writing_paused or self.budget_wait is not None:
                return
            wait = server.tcp_wait(source)
            if wait > 0.0:
                server.metrics.cost_limited["tcp_wait"] += 1
                transport.pause_reading()
                self.budget_wait = loop.call_later(wait, self._budget_refilled)
                return
            reply = server.answer_tcp(framer.pop(loop.time()), source)
            if reply is not None:
                transport.write(len(reply.wire).to_bytes(2, "big") + reply.wire)

    def _budget_refilled(self) -> None:
        self.budget_wait = None
        self._resume()

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._resume()

    def _resume(self) -> None:
        if self.transport is None or self.writing_paused or self.budget_wait is not None:
            return
        self.transport.resume_reading()
        self._answer_ready()

    def connection_lost(self, exc: Exception | None) -> None:
        for handle in (self.timer, self.budget_wait):
            if handle is not None:
                handle.cancel()
        self.timer = self.budget_wait = None
        if self.source is not None and self.framer is not None:
            self.server.tcp_gone(self.source)
        self.transport = None
        self.framer = None


# ------------------------------------------------------------------------------------ running


def run(
    config_path: str,
    pop: str,
    *,
    listen: HostPort | None,
    admin: HostPort | None,
    workers: int | None,
) -> int:
    """Run until SIGTERM/SIGINT: in this process, or with ``workers`` > 1 (default
    ``dns.workers``) as that many workers forked by the supervisor, sharing its sockets."""
    try:
        holder = ConfigHolder.from_file(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("config_invalid", problem=problem)
        return 2
    count = workers if workers is not None else holder.current.dns.workers
    if count <= 1:
        return uvloop.run(serve(holder, pop, listen=listen, admin=admin))
    try:
        build_serving(holder.current, holder.generation, pop).locator.close()
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("config_invalid", problem=problem)
        return 2
    supervisor = Supervisor(holder)
    try:
        group = dns_group(
            holder.current,
            pop,
            listen=listen,
            admin=admin,
            workers=count,
            run_dir=supervisor.run_dir,
        )
        supervisor.add_group(group)
    except OSError as exc:
        log.error("dns_listen_failed", address=str(listen), error=str(exc))
        supervisor.stop()
        return 1
    return supervisor.run()


def dns_group(
    config: Config,
    pop: str,
    *,
    listen: HostPort | None,
    admin: HostPort | None,
    workers: int,
    run_dir: str | None = None,
) -> Group:
    """GeoDNS workers for the supervisor: the sockets bound here, once.  ``run_dir``: the
    supervisor's private directory, where the workers' admin sockets go (worker 0's
    ``/metrics`` and ``/status`` then speak for every worker)."""
    listen = listen or config.listeners.dns
    sockets = DnsSockets.bind(listen, admin or config.listeners.dns_admin)
    private: WorkerSockets | None = None
    if workers > 1 and run_dir is not None:
        directory = os.path.join(run_dir, "dns")
        os.mkdir(directory, 0o700)
        private = WorkerSockets(directory, workers)

    def run_one(context: WorkerContext) -> int:
        holder = ConfigHolder(config.source, context.config, context.generation)
        mine = sockets if context.slot == 0 else replace(sockets, admin=None)
        served: int = uvloop.run(
            serve(
                holder,
                pop,
                listen=listen,
                admin=None,
                sockets=mine,
                link=context.link,
                workers=private,
                slot=context.slot,
            )
        )
        return served

    def check(new: Config) -> None:
        build_serving(new, 0, pop).locator.close()

    return Group("dns", workers, run_one, check=check, drain=lambda new: 5.0, sockets=sockets.all())


async def serve(
    holder: ConfigHolder,
    pop: str,
    *,
    listen: HostPort | None,
    admin: HostPort | None,
    sockets: DnsSockets | None = None,
    link: ParentLink | None = None,
    workers: WorkerSockets | None = None,
    slot: int = 0,
) -> int:
    """One GeoDNS process, until SIGTERM/SIGINT (or, under the supervisor, until it goes)."""
    config = holder.current
    listen = listen or config.listeners.dns
    if admin is None and sockets is None:
        admin = config.listeners.dns_admin
    try:
        server = DnsServer(
            holder, pop, listen=listen, admin=admin, sockets=sockets, workers=workers, slot=slot
        )
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("config_invalid", problem=problem)
        return 2
    loop = asyncio.get_running_loop()
    lifecycle = Lifecycle(loop)
    lifecycle.install(reload=link is None)
    try:
        await server.start()
        _tune_collector()
        if link is None:
            reloads = asyncio.create_task(_reload_loop(lifecycle, server))
        else:

            def adopt(new: Config, generation: int) -> None:
                if holder.adopt(new, generation):
                    server.on_reload(new, generation)
                else:
                    server.metrics.reloads.labels("rejected").inc()

            link.attach(
                generation=lambda: holder.generation,
                adopt=adopt,
                parent_gone=lifecycle.stopping.set,
            )
        await lifecycle.stopping.wait()
        if link is None:
            reloads.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reloads
    except OSError as exc:
        log.error("dns_listen_failed", address=str(listen), error=str(exc))
        return 1
    finally:
        if link is not None:
            link.detach()
        await server.stop()
        lifecycle.uninstall()
    return 0


def _tune_collector() -> None:
    """What startup built (modules, config, zone, geo reader) lives as long as the process:
    freeze it out of the collector's scans, and collect the young generation less often.  The
    per-query structures (reply memo, tallies) hold no cycles, and memo entries are tuples of
    bytes and ints that the collector stops tracking; a cold burst of distinct clients then
    costs no full collections over an ever larger heap."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def _reload_loop(lifecycle: Lifecycle, server: DnsServer) -> None:
    while not lifecycle.stopping.is_set():
        await lifecycle.reload_requested.wait()
        lifecycle.reload_requested.clear()
        if lifecycle.stopping.is_set():
            return
        await server.reload_off_loop()
