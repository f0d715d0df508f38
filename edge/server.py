"""Process lifecycle of the edge: workers, reload, drain.

* One worker (the default) runs in the process itself.  With ``--workers N`` the supervisor
  (``meridian.supervise``, shared with ``dns --workers`` and ``meridian serve``) binds the
  listening sockets once and forks N workers that inherit them (a restarted worker accepts
  on the same socket, so nothing is refused while it starts); it reloads the config on
  SIGHUP and hands each worker the accepted generation, drains them on SIGTERM, and replaces
  a worker that dies or hangs.  Only worker 0 serves the admin listener; every worker also
  serves a private admin socket (in the supervisor's 0700 directory), through which worker
  0's ``/metrics`` and ``/status`` cover all the workers and a purge reaches every worker's
  L1 (``meridian.workers``).
* SIGHUP (``meridian.lifecycle``): the file is validated in full, then one immutable
  ``EdgeState`` is swapped in; requests in flight keep the snapshot they started with.
  Under the supervisor the parent validates and each worker adopts its snapshot.
* SIGTERM: stop accepting, close idle keep-alive connections, let requests in flight finish
  (their responses carry ``Connection: close``) for up to ``edge.drain_timeout``, close the
  rest, let the cache's background work (refreshes, Redis writes) finish, exit 0.
* The cache (``edge.cache.HttpCache``) lives as long as the worker: a reload reconfigures it
  (rules and limits change, stored entries stay), the purge endpoint is on the admin listener,
  and its metrics and the compression counters are in the worker's registry.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import uvloop
from prometheus_client import CollectorRegistry, generate_latest

from edge.accesslog import AccessLog
from edge.admin import AdminServer, EdgeMetrics
from edge.cache import HttpCache
from edge.compress import negotiate
from edge.front import FrontDoors
from edge.http1 import head_budget
from edge.pipeline import Pipeline
from edge.protocol import Connections
from edge.purge import PurgeEndpoint
from edge.redirect import RedirectProtocol
from edge.scaling import ScalingSignals, read_limits
from edge.state import EdgeState
from edge.statusboard import SAMPLE_EVERY, StatusBoard
from edge.streams.service import StreamService
from edge.tls import TlsContexts, TlsStats
from edge.transcode import CompressionStats, Transcoder
from edge.upstream import UpstreamMetrics, UpstreamPool
from meridian.config import Config, ConfigError, EdgeTls, HostPort
from meridian.health import HealthMonitor
from meridian.lifecycle import ConfigHolder, Lifecycle
from meridian.log import get_logger
from meridian.redis_conn import RedisTarget
from meridian.supervise import Group, ParentLink, Supervisor, WorkerContext
from meridian.workers import WorkerApi, WorkerPeers, WorkerSockets

log = get_logger("edge")

LISTEN_BACKLOG = 2048
#: The cyclic collector's thresholds once a worker serves (``_settle_garbage_collector``).
GC_THRESHOLDS = (2_000, 5, 20)
#: Entries stored between two freezes of the heap (``FreezeCacheGrowth``): a full collection
#: then walks at most the few objects per entry of this many (about 20 ms, measured).
GC_FREEZE_EVERY = 10_000


@dataclass(frozen=True, slots=True)
class EdgeOptions:
    config_path: str
    pop: str
    listen: HostPort | None
    admin: HostPort | None
    workers: int = 1
    #: ``--workers N``: the directory of the workers' private admin sockets (``meridian.workers``),
    #: made by the supervisor.
    worker_dir: str | None = None


def _bind(address: HostPort) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address.host, address.port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


async def _tls_listeners(
    doors: FrontDoors,
    tls: TlsContexts,
    tls_config: EdgeTls,
    tls_sock: socket.socket | None,
    config: Config,
    worker: int,
) -> tuple[asyncio.Server, list[asyncio.Server]]:
    """The TLS listener (on the socket the supervisor bound, else its own), and the plaintext
    one that redirects to it when ``edge.tls.redirect`` is set."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        doors.tls_factory,
        sock=tls_sock if tls_sock is not None else _bind(tls_config.listen),
        # The loop calls listen() again on a socket it is given, with its default of 100
        # unless told: a burst of new TLS connections then overflowed the accept queue.
        backlog=LISTEN_BACKLOG,
        ssl=tls.listening,
        ssl_handshake_timeout=config.edge.timeouts.client_header,
    )
    bound = server.sockets[0].getsockname()
    extra: list[asyncio.Server] = []
    if tls_config.redirect is not None:
        https_port, timeouts = bound[1], config.edge.timeouts
        extra.append(
            await loop.create_server(
                lambda: RedirectProtocol(
                    https_port, head_budget(config.edge.limits), timeouts.client_header
                ),
                tls_config.redirect.host,
                tls_config.redirect.port,
                backlog=LISTEN_BACKLOG,
                reuse_port=True,  # every worker binds it; the kernel spreads connections
            )
        )
    log.info("edge_tls_listening", addr=f"{bound[0]}:{bound[1]}", worker=worker)
    return server, extra


def _status_board(pipeline: Pipeline, metrics: EdgeMetrics, health: HealthMonitor) -> StatusBoard:
    """The status page's board over this worker's traffic, services and health."""

    def services() -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for target in pipeline.state.router.targets:
            regions = out.setdefault(target.service.name, [])
            regions.extend(r for r in target.regions if r not in regions)
        return out

    return StatusBoard(
        time.time,
        traffic=lambda: metrics.request_stats.traffic(time.time(), metrics.error_counts()),
        services=services,
        region_up=lambda name: health.snapshot.region_up(name),
        route_latency=metrics.request_stats.route_latency,
        route_service=lambda: {t.route.name: t.service.name for t in pipeline.state.router.targets},
    )


def _service_ready(pipeline: Pipeline, health: HealthMonitor) -> Callable[[str], bool | None]:
    """``/readyz/<service>``: a region of the service is up (None: no route uses it)."""

    def ready(name: str) -> bool | None:
        regions = [t.regions for t in pipeline.state.router.targets if t.service.name == name]
        if not regions:
            return None
        snapshot = health.snapshot
        return any(snapshot.region_up(r) for group in regions for r in group)

    return ready


def _pop_checker(pop: str) -> Callable[[Config, int], None]:
    """A reload listener refusing a config in which this worker's POP is gone."""

    def check(config: Config, generation: int) -> None:
        try:
            config.pop(pop)
        except KeyError:
            raise ConfigError([f"{config.source}: pops: POP {pop!r} is gone"]) from None

    return check


class EdgeWorker:
    """One event loop serving clients: the data plane, the health monitor, the admin listener."""

    def __init__(
        self,
        options: EdgeOptions,
        holder: ConfigHolder,
        *,
        worker: int = 0,
        link: ParentLink | None = None,
    ) -> None:
        self.options = options
        self.holder = holder
        self.worker = worker
        #: Under the supervisor: heartbeats out, config generations in.
        self.link = link
        self.started = time.time()

    async def serve(
        self,
        listen_sock: socket.socket | None,
        admin_sock: socket.socket | None,
        tls_sock: socket.socket | None = None,
    ) -> int:
        loop = asyncio.get_running_loop()
        config = self.holder.current
        pop = self.options.pop
        self.holder.listeners.append(_pop_checker(pop))
        registry = CollectorRegistry()
        metrics = EdgeMetrics(registry, pop=pop, latency_target=config.edge.latency_target)
        metrics.upstream_pool_limit.set(config.edge.pool_size)
        metrics.config_generation.set(self.holder.generation)
        shared = RedisTarget.from_config(config.edge.cache)  # the POP's instances share health
        health = HealthMonitor(
            config, registry=registry, check_backends=True, pop=pop, redis=shared
        )
        upstream = UpstreamPool(
            pool_size=config.edge.pool_size,
            timeouts=config.edge.timeouts,
            settings=config.edge.upstream,
            source=config.source,
        )
        metrics.upstream_stats.outstanding = lambda: upstream.outstanding
        registry.register(UpstreamMetrics(upstream))
        await upstream.start()
        await health.start()
        stats = CompressionStats()
        registry.register(stats)
        transcoder = Transcoder(stats)
        state = EdgeState.build(config, pop, self.holder.generation)
        cache = HttpCache(
            config.edge.cache,
            registry,
            clock=time.time,
            compressor=transcoder.cached_compressor(lambda: pipeline.state.config.edge.compression),
            negotiate=negotiate,
            compress_offload_above=config.edge.compression.offload_above,
            instance_id=f"{pop}:{os.uname().nodename}:{os.getpid()}",
        )
        await cache.start()
        access_log = AccessLog()
        access_log.configure(config.edge.access_log)
        pipeline = Pipeline(
            state,
            upstream=upstream,
            health=health,
            metrics=metrics,
            access_log=access_log,
            clock=time.perf_counter,
            cache=cache,
            transcoder=transcoder,
        )
        # Requests waiting on a backend that leaves rotation are retried elsewhere at once.
        health.subscribe(pipeline.on_health)
        # The rate limits built now, not on the first request: shared ones open Redis now.
        pipeline.limiter.current(state)
        connections = Connections(pipeline, loop)
        streams = connections.streams = StreamService(pipeline, loop)
        # Streams time regions coming up from here, to move back to a nearer one later.
        health.subscribe(streams.on_health)
        tls_config = config.edge.tls
        tls = (
            TlsContexts(
                tls_config, config.source, http2=config.edge.http2.enabled, stats=TlsStats()
            )
            if tls_config is not None
            else None
        )
        doors = FrontDoors(connections, registry, tls=tls)

        board = _status_board(pipeline, metrics, health)

        scaling = ScalingSignals(
            clock=time.monotonic,
            limits=read_limits(),
            # Requests accepted and not answered yet (a WebSocket tunnel is no request).
            queue_depth=lambda: connections.busy - len(connections.tunnels),
            p99=lambda: board.window.summary()["p99"],
            latency_target=lambda: pipeline.state.config.edge.latency_target,
        )
        registry.register(scaling)

        def short_status() -> dict[str, Any]:
            return {
                "worker": self.worker,
                "pid": os.getpid(),
                "connections": len(connections.open) + doors.open_connections(),
                "in_flight": connections.busy,
                "generation": pipeline.state.generation,
                "cache": {"entries": len(cache.store), "bytes": cache.store.bytes},
                "traffic": board.window.summary(),
                "scaling": scaling.status(),
            }

        # --workers N: this worker's private admin socket, bound before it serves a client
        # (a purge must reach every worker that may hold cached responses).
        worker_api: WorkerApi | None = None
        peers: WorkerPeers | None = None
        if self.options.worker_dir is not None and self.options.workers > 1:
            sockets = WorkerSockets(self.options.worker_dir, self.options.workers)
            worker_api = WorkerApi(
                metrics=lambda: generate_latest(registry),
                status=short_status,
                purge_local=cache.purges.purge_local,
            )
            await worker_api.start(sockets.bind(self.worker))
            if admin_sock is not None:
                peers = WorkerPeers(sockets, self.worker)
        listen = self.options.listen or config.listeners.edge
        if listen_sock is not None:
            server = await loop.create_server(
                doors.plain_factory, sock=listen_sock, backlog=LISTEN_BACKLOG
            )
        else:
            server = await loop.create_server(
                doors.plain_factory,
                listen.host,
                listen.port,
                backlog=LISTEN_BACKLOG,
                reuse_address=True,
            )
        tls_server: asyncio.Server | None = None
        extra_servers: list[asyncio.Server] = []
        if tls is not None and tls_config is not None:
            tls_server, extra_servers = await _tls_listeners(
                doors, tls, tls_config, tls_sock, config, self.worker
            )
        connections.start()
        doors.start()

        def region_ready() -> bool:
            snapshot = health.snapshot
            return any(snapshot.region_up(r.name) for r in pipeline.state.config.regions)

        def status() -> dict[str, Any]:
            return {
                "pop": pop,
                "worker": self.worker,
                "pid": os.getpid(),
                "started": self.started,
                "config": {"source": self.holder.path, "generation": pipeline.state.generation},
                "connections": len(connections.open) + doors.open_connections(),
                "in_flight": connections.busy,
                "websockets": len(connections.tunnels),
                "draining": connections.draining,
                "upstream_outstanding": dict(upstream.outstanding),
                "cache": {
                    "enabled": cache.enabled,
                    "entries": len(cache.store),
                    "bytes": cache.store.bytes,
                    "redis": cache.l2 is not None,
                    "redis_available": cache.l2 is not None and cache.l2.available,
                },
                "routes": [
                    {"route": t.route.name, "service": t.service.name, "regions": list(t.regions)}
                    for t in pipeline.state.router.targets
                ],
                "health": health.status(),
                "traffic": board.window.summary(),
                "scaling": scaling.status(),
            }

        admin: AdminServer | None = None
        if admin_sock is not None or self.options.workers == 1:
            admin = AdminServer(
                registry,
                status=status,
                ready=region_ready,
                service_ready=_service_ready(pipeline, health),
                draining=lambda: connections.draining,
                peers=peers,
                board=board,
            )
            # A region going down reaches the open status pages at once, not on the next tick.
            health.subscribe(lambda _snapshot: admin.notify() if admin is not None else None)
            admin_address = self.options.admin or config.listeners.edge_admin
            PurgeEndpoint(lambda: cache, peers).install(admin.app)
            await admin.start(admin_address.host, admin_address.port, sock=admin_sock)

        def on_reload(new: Config, generation: int) -> None:
            # In-flight requests hold the old EdgeState; new ones read this one.
            pipeline.state = EdgeState.build(new, pop, generation)
            pipeline.limiter.current(pipeline.state)
            access_log.configure(new.edge.access_log)
            health.update_config(new)
            cache.reconfigure(new.edge.cache)
            upstream.reconfigure(
                new.edge.pool_size, new.edge.timeouts, new.edge.upstream, new.source
            )
            metrics.upstream_pool_limit.set(new.edge.pool_size)
            if tls is not None and new.edge.tls is not None:
                tls.reload(new.edge.tls, new.source)
            metrics.config_generation.set(generation)
            metrics.latency_target.set(new.edge.latency_target)

        lifecycle = Lifecycle(loop)
        lifecycle.install(reload=self.link is None)
        reloads: asyncio.Task[None] | None = None
        if self.link is None:
            reloads = loop.create_task(lifecycle.run_reloads(self.holder, on_reload))
        else:

            def adopt(new: Config, generation: int) -> None:
                if self.holder.adopt(new, generation):
                    on_reload(new, generation)

            self.link.attach(
                generation=lambda: self.holder.generation,
                adopt=adopt,
                parent_gone=lifecycle.stopping.set,
            )
        bound = server.sockets[0].getsockname()
        log.info(
            "edge_listening",
            pop=pop,
            addr=f"{bound[0]}:{bound[1]}",
            worker=self.worker,
            pid=os.getpid(),
            admin=str(self.options.admin or config.listeners.edge_admin) if admin else "",
        )
        board_timer: asyncio.TimerHandle | None = None

        def sample_board() -> None:
            nonlocal board_timer
            board.sample()
            scaling.sample()
            board_timer = loop.call_later(SAMPLE_EVERY, sample_board)

        sample_board()
        _settle_garbage_collector()
        freezer = FreezeCacheGrowth(lambda: cache.store.stored)
        gc.callbacks.append(freezer)
        try:
            await lifecycle.stopping.wait()
        finally:
            gc.callbacks.remove(freezer)
            if board_timer is not None:
                board_timer.cancel()
            drain_timeout = pipeline.state.config.edge.drain_timeout
            log.info(
                "edge_draining",
                pop=pop,
                in_flight=connections.busy,
                timeout=drain_timeout,
                worker=self.worker,
            )
            server.close()
            if tls_server is not None:
                tls_server.close()
            for extra in extra_servers:
                extra.close()
            connections.begin_drain()
            doors.begin_drain()
            clean = await connections.wait_idle(drain_timeout)
            clean = await doors.wait_idle(max(0.0, drain_timeout)) and clean
            log.info(
                "edge_stopped", pop=pop, clean=clean, abandoned=connections.busy, worker=self.worker
            )
            connections.close_all()
            doors.close_all()
            await streams.aclose()
            if reloads is not None:
                reloads.cancel()
            if self.link is not None:
                self.link.detach()
            lifecycle.uninstall()
            if admin is not None:
                await admin.stop()
            if peers is not None:
                await peers.close()
            if worker_api is not None:
                await worker_api.stop()
            try:
                async with asyncio.timeout(drain_timeout):
                    await cache.aclose()
            except TimeoutError:
                log.warning("cache_close_timed_out", worker=self.worker)
            await health.stop()
            await upstream.close()
        return 0


def _settle_garbage_collector() -> None:
    """Tune the cyclic garbage collector for a server, once the worker is set up.

    Everything loaded so far (modules, config, routes: most of the heap) is frozen out of the
    collector's sight (``gc.freeze``), so full collections no longer walk it.  The young
    generation's threshold goes from 700 to ``GC_THRESHOLDS[0]`` net allocations: every
    request in flight keeps objects alive across awaits, and each young collection walks the
    state of every request in flight (at 700 and 64 connections, about 25 us per miss in the
    collector, measured before the key memo).  Cycles are still collected, at most a few MB
    later.  The middle generation is collected every 5 young collections, and it walks what
    survived them: while the cache fills, mostly new entries (about 3 tracked objects per
    miss).  That walk is a pause every request in flight waits for, so the young threshold is
    set by it: at 20,000 it walked 5 x 20,000 survivors, 41-52 ms, and a miss's p99 was
    28-41 ms against nginx's 16-22; at 2,000 it is a tenth of that, and the p99 12-13 ms
    (``benchmarks.compare http --scenarios miss``, alternated) for about 1% more of the CPU in
    the collector (1.2% -> 2.3% of the samples under ``perf record``).  The cache's entries
    are frozen as they accumulate (``FreezeCacheGrowth``), so older generations never walk
    them."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class FreezeCacheGrowth:
    """``gc.callbacks`` hook: freeze the heap again each time the cache has stored another
    ``GC_FREEZE_EVERY`` entries.

    Each cached response is a few GC-tracked objects (the ``Entry``, its ``StoredResponse``
    and ``Freshness``), all long-lived, and a full collection walks every one of them: about
    1 s at a million entries and 0.3-0.6 s at 100,000-439,000 (measured), a pause every
    request in flight pays (p99 631 ms over 439k cached keys).  After a collection of the
    middle or old generation (when survivors have just been promoted) that follows
    ``GC_FREEZE_EVERY`` new entries, the heap is frozen (``gc.freeze``: moved to the permanent
    generation, which collections skip), so a full collection walks at most the survivors of
    the last ``GC_FREEZE_EVERY`` fills.

    Frozen objects are still freed by reference counting: an evicted or purged entry goes at
    once (the store breaks its one cycle, through ``on_resize``, when it unlinks it).  Only a
    frozen object that later dies in a reference cycle is never collected: the state of the
    requests in flight at a freeze (measured: up to about 1,500 objects), so at most a few
    bytes per stored entry."""

    __slots__ = ("freezes", "frozen_at", "stored")

    def __init__(self, stored: Callable[[], int]) -> None:
        #: Entries stored so far (a count that only grows: ``MemoryStore.stored``).
        self.stored = stored
        self.frozen_at = stored()
        self.freezes = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase != "stop" or info["generation"] == 0:
            return
        stored = self.stored()
        if stored - self.frozen_at >= GC_FREEZE_EVERY:
            self.frozen_at = stored
            gc.freeze()
            self.freezes += 1


def run_worker(
    options: EdgeOptions,
    holder: ConfigHolder,
    listen_sock: socket.socket | None = None,
    admin_sock: socket.socket | None = None,
    worker: int = 0,
    link: ParentLink | None = None,
    tls_sock: socket.socket | None = None,
) -> int:
    edge = EdgeWorker(options, holder, worker=worker, link=link)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(edge.serve(listen_sock, admin_sock, tls_sock))


def load(options: EdgeOptions) -> ConfigHolder | None:
    try:
        holder = ConfigHolder.from_file(options.config_path)
        holder.current.pop(options.pop)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("config_invalid", problem=problem)
        return None
    except KeyError:
        log.error("config_invalid", problem=f"unknown POP {options.pop!r}")
        return None
    return holder


def run(options: EdgeOptions) -> int:
    holder = load(options)
    if holder is None:
        return 2
    if options.workers <= 1:
        return run_worker(options, holder)
    supervisor = Supervisor(holder)
    try:
        supervisor.add_group(edge_group(options, holder.current, supervisor.run_dir))
    except OSError as exc:
        log.error("edge_listen_failed", error=str(exc))
        supervisor.stop()
        return 1
    return supervisor.run()


def edge_group(options: EdgeOptions, config: Config, run_dir: str) -> Group:
    """The edge's workers for the supervisor: the listening sockets bound here, once."""
    listen = _bind(options.listen or config.listeners.edge)
    try:
        admin = _bind(options.admin or config.listeners.edge_admin)
    except OSError:
        listen.close()
        raise
    tls_sock: socket.socket | None = None
    if config.edge.tls is not None:
        try:
            tls_sock = _bind(config.edge.tls.listen)
        except OSError:
            listen.close()
            admin.close()
            raise
    if options.workers > 1:
        # The workers' private admin sockets, in the supervisor's 0700 directory.
        worker_dir = os.path.join(run_dir, "edge")
        os.mkdir(worker_dir, 0o700)
        options = replace(options, worker_dir=worker_dir)

    def run_one(context: WorkerContext) -> int:
        holder = ConfigHolder(options.config_path, context.config, context.generation)
        admin_sock = admin if context.slot == 0 else None
        return run_worker(options, holder, listen, admin_sock, context.slot, context.link, tls_sock)

    def check(new: Config) -> None:
        try:
            new.pop(options.pop)
        except KeyError:
            raise ConfigError([f"{new.source}: pops: POP {options.pop!r} is gone"]) from None

    return Group(
        "edge",
        options.workers,
        run_one,
        check=check,
        drain=lambda new: new.edge.drain_timeout,
        sockets=(listen, admin) if tls_sock is None else (listen, admin, tls_sock),
    )
