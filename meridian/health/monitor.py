"""The health monitor: the asyncio shell around the health book.

It runs the active checks on a schedule, takes passive outcomes from live traffic, shares
transitions through Redis when configured, and publishes a new immutable :class:`HealthSnapshot`
on every change.  All decisions are the book's; this module does the I/O, logging and metrics.

Scheduling: each probed target has its own task.  The first check runs at once plus a random
delay of up to ``jitter * interval`` (so a restart does not fire every check together); later
checks start ``interval`` after the previous one *started* (a slow check does not stretch the
period), or ``fast_interval`` while the target is between states, each plus jitter.  With the
defaults (10 s, fast 2 s, fall 3, jitter 0.1) a backend that dies is out of rotation at most
11 + 2.2 + 2.2 s (plus three timeouts if it hangs instead of refusing) later: well within 30 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from meridian.config import Config
from meridian.health.book import HealthBook, TargetInfo
from meridian.health.checks import CheckOutcome, Prober, check_url
from meridian.health.metrics import metrics_for
from meridian.health.snapshot import HealthSnapshot, pop_target
from meridian.health.state import Health, Transition
from meridian.log import get_logger
from meridian.origin_tls import client_context

if TYPE_CHECKING:
    from meridian.health.peers import PeerLink, PeerTransition
    from meridian.redis_conn import RedisTarget

#: Transitions kept for the status page's timeline: enough for a flapping hour, bounded.
TIMELINE_LENGTH = 200

log = get_logger("health")

#: Seconds between two log lines about checks failing for a local reason.
LOCAL_ERROR_LOG_INTERVAL = 10.0


class HealthMonitor:
    """Knows which backends, regions and POPs can serve; see the module docstring.

    ``snapshot`` is a plain attribute replaced whole: hot paths read it without locks or awaits.
    ``report`` and ``update_config`` must be called from the event loop's thread.
    """

    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry,
        check_backends: bool = True,
        check_pops: bool = False,
        pop: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        redis_url: str | None = None,
        redis: RedisTarget | None = None,
    ) -> None:
        """``redis`` (or ``redis_url``, a standalone server) shares transitions with the POP's
        other instances."""
        self._config = config
        self._clock = clock
        # Fixed once, so a time reported twice reads the same (not re-derived on every call).
        self._wall_offset = time.time() - clock()
        self._pop = pop
        self._book = HealthBook(
            config, now=clock(), check_backends=check_backends, check_pops=check_pops
        )
        self._metrics = metrics_for(registry)
        self._generation = 1
        self.snapshot: HealthSnapshot = self._book.snapshot(self._generation, clock)
        self._subscribers: list[Callable[[HealthSnapshot], None]] = []
        #: The latest target and region transitions, newest last (``status()["timeline"]``).
        self._timeline: deque[dict[str, Any]] = deque(maxlen=TIMELINE_LENGTH)
        tls = config.edge.upstream.tls
        self._prober = Prober(tls=lambda: client_context(tls, config.source))
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._rng = random.Random()
        self._running = False
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._peers: PeerLink | None = None
        self._peer_task: asyncio.Task[None] | None = None
        shared = redis or redis_url
        if shared is not None:
            from meridian.health.peers import PeerLink, channel_for  # redis only when used

            self._peers = PeerLink(
                shared,
                channel_for(pop),
                on_transition=self._on_peer_transition,
                on_connected=self._on_redis_connected,
            )
            self._metrics.redis_connected.labels(self._peers.channel).set(0)
        #: Local check errors since the last line about them, and when the next may be logged.
        self._local_errors = 0
        self._local_log_after = float("-inf")
        self._gauge_labels: set[tuple[str, str, str]] = set()
        self._region_labels: set[str] = set()
        self._update_gauges()

    # ----------------------------------------------------------------------------------------
    # Lifecycle

    async def start(self) -> None:
        """Start probing (first round at once, with jitter) and, if configured, Redis sharing."""
        if self._running:
            return
        self._running = True
        await self._prober.start()
        for name, info in self._book.targets.items():
            if info.probed:
                self._start_probe(name)
        if self._peers is not None:
            self._peer_task = asyncio.create_task(self._peers.run(), name="health-redis")
        self._schedule_expiry()
        log.info(
            "health_started",
            targets=len(self._book.targets),
            probed=len(self._probes),
            pop=self._pop or "",
            redis=self._peers.display_url if self._peers else "",
        )

    async def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        tasks = list(self._probes.values())
        self._probes.clear()
        if self._peer_task is not None:
            tasks.append(self._peer_task)
            self._peer_task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._prober.close()

    # ----------------------------------------------------------------------------------------
    # Inputs

    def report(self, backend_url: str, ok: bool) -> None:
        """A live request to ``backend_url`` succeeded or failed (connect error, reset, timeout,
        or a configured 5xx).  Cheap: a dict lookup when nothing changes."""
        book = self._book
        if ok:
            # ``HealthBook.traffic``'s own hot path (a success with nothing to reset), before
            # the clock is read: once per request.
            old = book.health.get(backend_url)
            if old is None or old.traffic_failures == 0:
                return
        transitions = book.traffic(backend_url, ok, self._clock())
        if transitions:
            self._publish(transitions, source="traffic")

    def update_config(self, config: Config) -> None:
        """Switch to a reloaded config: targets still present keep their state."""
        added, removed = self._book.reconfigure(config, self._clock())
        if config.edge.upstream.tls != self._config.edge.upstream.tls:
            tls = config.edge.upstream.tls
            self._prober.retarget(lambda: client_context(tls, config.source))
        self._config = config
        for name in removed:
            task = self._probes.pop(name, None)
            if task is not None:
                task.cancel()
        if self._running:
            for name in added:
                if self._book.targets[name].probed:
                    self._start_probe(name)
        log.info("health_reconfigured", added=len(added), removed=len(removed))
        self._publish((), source="config")

    def subscribe(self, callback: Callable[[HealthSnapshot], None]) -> None:
        """Call ``callback(snapshot)`` after each new snapshot is published."""
        self._subscribers.append(callback)

    # ----------------------------------------------------------------------------------------
    # Status

    def status(self) -> dict[str, Any]:
        """Everything an operator asks about, as JSON-ready data for the admin ``/status``."""
        now = self._clock()
        snapshot = self.snapshot
        health_config = self._config.health
        targets: dict[str, Any] = {}
        for name, info in self._book.targets.items():
            h = self._book.health[name]
            targets[name] = {
                "kind": info.kind,
                "regions": list(info.regions),
                "pop": info.pop,
                "state": h.state.value,
                "usable": h.state.usable,
                "reason": h.reason,
                "since": _wall(self._wall_offset, h.since),
                "check_url": check_url(info, health_config) if info.probed else None,
                "last_check": _wall(self._wall_offset, h.last_check),
                "last_check_ok": h.last_check_ok,
                "last_error": h.last_error,
                "consecutive_successes": h.successes,
                "consecutive_failures": h.failures,
                "traffic_failures": h.traffic_failures,
                "ejections": h.ejections,
                "ejected_for": None if h.ejected_until is None else max(0.0, h.ejected_until - now),
                "ttl_hint": snapshot.ttl_hint(name),
            }
        regions = {
            region.name: {
                "up": snapshot.region_up(region.name),
                "panic": region.name in snapshot.panic_regions,
                "usable_backends": list(snapshot.usable_backends(region.name)),
                "healthy": sum(snapshot.backend_up(url) for url in region.backends),
                "backends": len(region.backends),
                "min_healthy": region.min_healthy,
            }
            for region in self._config.regions
        }
        pops = {
            pop.name: {
                "up": snapshot.pop_up(pop.name),
                "checked": pop_target(pop.name) in self._book.targets,
                # Per edge service: whether the POP's edge has a healthy region for it.
                "services": {
                    info.service: snapshot.pop_serves(pop.name, info.service)
                    for info in self._book.targets.values()
                    if info.pop == pop.name and info.service is not None
                },
            }
            for pop in self._config.pops
        }
        redis = None
        if self._peers is not None:
            redis = {
                "url": self._peers.display_url,
                "channel": self._peers.channel,
                "connected": self._peers.connected,
                "failed_attempts": self._peers.failures,
            }
        return {
            "generation": snapshot.generation,
            "pop": self._pop,
            "redis": redis,
            "targets": targets,
            "regions": regions,
            "pops": pops,
            "timeline": list(self._timeline),
        }

    # ----------------------------------------------------------------------------------------
    # Probing

    def _start_probe(self, name: str) -> None:
        task = asyncio.create_task(self._probe_forever(name), name=f"health:{name}")
        task.add_done_callback(self._probe_ended)
        self._probes[name] = task

    def _probe_ended(self, task: asyncio.Task[None]) -> None:
        # Checks never raise (see _check), so this is a bug; say so rather than go quiet.
        if not task.cancelled() and task.exception() is not None:
            log.error("health_probe_died", task=task.get_name(), error=repr(task.exception()))

    async def _probe_forever(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        config = self._config.health
        next_at = loop.time() + self._rng.random() * config.jitter * config.interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            info = self._book.targets.get(name)
            if info is None:
                return
            started = loop.time()
            outcome = await self._check(info)
            self._on_check(name, outcome)
            config = self._config.health
            period = config.interval
            if self._book.transitioning(name):
                period = min(config.fast_interval, config.interval)
            next_at = started + period * (1.0 + self._rng.random() * config.jitter)

    async def _check(self, info: TargetInfo) -> CheckOutcome:
        try:
            return await self._prober.check(info, self._config.health)
        except Exception as exc:  # a bug in one check must not stop the probing of a target
            log.error("health_check_error", target=info.name, error=repr(exc))
            return CheckOutcome(False, f"check error: {type(exc).__name__}", 0.0)

    def _on_check(self, name: str, outcome: CheckOutcome) -> None:
        self._metrics.check_seconds.labels(name).observe(outcome.seconds)
        if outcome.local:
            # This machine is out of something (descriptors, buffers): the check says
            # nothing about the target.  Counted and logged (throttled), state kept.
            self._metrics.check_local_errors.labels(name).inc()
            self._local_errors += 1
            now = self._clock()
            if now >= self._local_log_after:
                self._local_log_after = now + LOCAL_ERROR_LOG_INTERVAL
                log.warning(
                    "health_check_local_error",
                    target=name,
                    reason=outcome.reason,
                    count=self._local_errors,
                    pop=self._pop or "",
                )
                self._local_errors = 0
            return
        before = self._book.deadline(name)
        transitions = self._book.check(name, outcome.ok, outcome.reason, self._clock())
        # A new deadline changes ttl_hint even without a transition, so it is published too.
        if transitions or self._book.deadline(name) != before:
            self._publish(transitions, source="check")

    def _on_peer_transition(self, peer: PeerTransition) -> None:
        transitions = self._book.adopt(
            peer.target,
            peer.state,
            f"peer {peer.origin}: {peer.reason}",
            self._clock(),
            ejection_left=peer.ejection_left,
        )
        if transitions:
            self._publish(transitions, source="peer")

    def _on_redis_connected(self, connected: bool) -> None:
        assert self._peers is not None
        self._metrics.redis_connected.labels(self._peers.channel).set(1 if connected else 0)

    def _schedule_expiry(self) -> None:
        """Ejections of unprobed targets end on a timer (no check will bring them back)."""
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        due = self._book.next_expiry()
        if due is None or not self._running:
            return
        loop = asyncio.get_running_loop()
        self._expiry_timer = loop.call_later(max(0.0, due - self._clock()), self._expire)

    def _expire(self) -> None:
        self._expiry_timer = None
        transitions = self._book.expire(self._clock())
        if transitions:
            self._publish(transitions, source="ejection_timer")
        else:
            self._schedule_expiry()

    # ----------------------------------------------------------------------------------------
    # Publishing

    def _publish(self, transitions: tuple[Transition, ...], *, source: str) -> None:
        for transition in transitions:
            self._log_transition(transition, source)
            info = self._book.targets.get(transition.target)
            self._timeline.append(
                {
                    "at": _wall(self._wall_offset, transition.at),
                    "target": transition.target,
                    "regions": list(info.regions) if info is not None else [],
                    "old": transition.old.value,
                    "new": transition.new.value,
                    "reason": transition.reason,
                    "source": source,
                }
            )
            self._metrics.transitions.labels(transition.target, transition.new.value).inc()
            if transition.new is Health.EJECTED and source == "traffic":
                self._metrics.ejections.labels(transition.target).inc()
            if self._peers is not None and source in ("check", "traffic", "ejection_timer"):
                self._peers.publish(transition)
        old = self.snapshot
        self._generation += 1
        self.snapshot = new = self._book.snapshot(self._generation, self._clock)
        self._log_rollup(old, new)
        self._update_gauges()
        if any(t.new is Health.EJECTED or t.old is Health.EJECTED for t in transitions):
            self._schedule_expiry()
        for callback in self._subscribers:
            try:
                callback(new)
            except Exception as exc:  # one bad subscriber must not starve the others
                log.error("health_subscriber_error", callback=repr(callback), error=repr(exc))

    def _log_transition(self, transition: Transition, source: str) -> None:
        info = self._book.targets.get(transition.target)
        fields: dict[str, Any] = {
            "target": transition.target,
            "old": transition.old.value,
            "reason": transition.reason,
            "source": source,
        }
        if info is not None and info.regions:
            fields["region"] = ",".join(info.regions)
        if self._pop is not None:
            fields["pop"] = self._pop
        if transition.ejection_seconds is not None:
            fields["ejection_seconds"] = round(transition.ejection_seconds, 3)
        event = f"target_{transition.new.value}"
        if transition.new.usable:
            log.info(event, **fields)
        else:
            log.warning(event, **fields)

    def _log_rollup(self, old: HealthSnapshot, new: HealthSnapshot) -> None:
        for region in self._config.regions:
            name = region.name
            if old.region_up(name) != new.region_up(name):
                event = "region_up" if new.region_up(name) else "region_down"
                self._timeline.append(
                    {
                        "at": _wall(self._wall_offset, self._clock()),
                        "target": f"region:{name}",
                        "regions": [name],
                        "old": "up" if old.region_up(name) else "down",
                        "new": "up" if new.region_up(name) else "down",
                        "reason": event,
                        "source": "rollup",
                    }
                )
                log.warning(event, region=name, usable=len(new.usable_backends(name)))
            if (name in old.panic_regions) != (name in new.panic_regions):
                event = "region_panic" if name in new.panic_regions else "region_panic_over"
                log.warning(event, region=name)
        for pop in self._config.pops:
            if old.pop_up(pop.name) != new.pop_up(pop.name):
                log.warning("pop_up" if new.pop_up(pop.name) else "pop_down", pop=pop.name)

    def _update_gauges(self) -> None:
        """Set every gauge from the snapshot, and drop the series of removed targets."""
        pop = self._pop or ""
        snapshot = self.snapshot
        labels: set[tuple[str, str, str]] = set()
        for name, info in self._book.targets.items():
            up = 1.0 if self._book.health[name].state.usable else 0.0
            for region in info.regions or ("",):
                labels.add((name, region, pop))
                self._metrics.target_up.labels(name, region, pop).set(up)
        for gone in self._gauge_labels - labels:
            with contextlib.suppress(KeyError):
                self._metrics.target_up.remove(*gone)
        self._gauge_labels = labels
        regions = {region.name for region in self._config.regions}
        for name in regions:
            self._metrics.region_up.labels(name, pop).set(1.0 if snapshot.region_up(name) else 0.0)
            panic = 1.0 if name in snapshot.panic_regions else 0.0
            self._metrics.region_panic.labels(name, pop).set(panic)
        for gone_region in self._region_labels - regions:
            with contextlib.suppress(KeyError):
                self._metrics.region_up.remove(gone_region, pop)
                self._metrics.region_panic.remove(gone_region, pop)
        self._region_labels = regions


def _wall(offset: float, at: float | None) -> str | None:
    """A time on the monitor's clock as an ISO 8601 UTC wall-clock time."""
    if at is None:
        return None
    return datetime.fromtimestamp(at + offset, UTC).isoformat(timespec="milliseconds")
