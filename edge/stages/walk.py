"""The upstream walk: one request's attempts over regions and backends.

Retries and failover follow ``edge.upstream``'s pure policy (``next_attempt``,
``retry_allowed``); this stage does the I/O and reports what it saw to passive health.  A
request waiting for the first byte of a backend that leaves rotation is given up on
(``on_health``) and retried elsewhere, when it may be.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterable, Mapping
from typing import NamedTuple

from edge.exchange import RETRY_AFTER_SECONDS, ErrorAnswer, ExchangeRecord, RequestBody
from edge.fdlimit import Throttle
from edge.http1 import RequestRejected
from edge.router import RouteTarget
from edge.stages.services import EdgeServices
from edge.state import EdgeState
from edge.upstream import (
    Attempt,
    FailureKind,
    HealthView,
    OriginResponse,
    SnapshotView,
    UpstreamFailure,
    live_regions,
    next_attempt,
    pick_backend,
    retry_allowed,
)
from meridian.log import get_logger

log = get_logger("edge")

#: A request waiting for a response head: its backend, its regions and its attempts so far.
_Waiting = tuple[str, tuple[str, ...], list[Attempt]]


class UpstreamCall(NamedTuple):
    """What one walk sends to every backend it tries."""

    method: str
    target: str
    #: The header lines as sent (``edge.upstream.upstream_headers``), without framing.
    headers: bytes
    #: The client's body (its ``error`` tells a client fault from a backend's), if any.
    body: RequestBody | None = None
    #: What is sent: the body whole in memory (replayable) or streamed; defaults to ``body``.
    payload: bytes | AsyncIterable[bytes] | None = None
    #: A streamed body's declared length (None: it goes chunked).
    length: int | None = None
    #: For log lines.
    request_id: str = "-"


Walked = tuple[OriginResponse, Attempt] | ErrorAnswer | RequestRejected

#: What one health snapshot says of a region list: the regions to try (``live_regions``),
#: the first of them with a usable backend and those backends (where ``next_attempt`` makes
#: a first attempt), and that attempt when only one backend is usable there.
_Live = tuple[tuple[str, ...], str, tuple[str, ...], Attempt | None]


def _live_in(names: tuple[str, ...], health: HealthView) -> _Live:
    regions = live_regions(names, health)
    for region in regions:
        backends = health.usable_backends(region)
        if backends:
            return (
                regions,
                region,
                backends,
                (Attempt(region, backends[0]) if len(backends) == 1 else None),
            )
    return regions, "", (), None


def _first_pick(live: _Live, outstanding: Mapping[str, int], rng: random.Random) -> Attempt | None:
    """``next_attempt``'s first attempt from ``_live_in``'s answer, when it is not made yet
    (more than one backend to choose from, or none)."""
    _, region, backends, only = live
    if only is not None:
        return only
    backend = pick_backend(backends, outstanding, rng)
    return None if backend is None else Attempt(region, backend)


class UpstreamWalk:
    """The failover walk of one worker, and the tasks it may give up on."""

    def __init__(self, services: EdgeServices) -> None:
        self.services = services
        #: Tasks waiting for a response head, with their backend and where else they could
        #: go (``on_health``), and the ones it cancelled to retry elsewhere.  One flat table:
        #: a request is watched and unwatched with one operation each.
        self._waiting: dict[asyncio.Task[object], _Waiting] = {}
        self._abandoning: set[asyncio.Task[object]] = set()
        self._own_failures = {FailureKind.POOL: Throttle(), FailureKind.LOCAL: Throttle()}
        #: ``_live_in`` (live regions and the first attempt's candidates) per service's region
        #: list, for the snapshot in ``_live_for``: a snapshot is replaced, never changed, so
        #: the answers hold until the next one (one entry per distinct region list in the
        #: config: bounded by it).
        self._live: dict[tuple[str, ...], _Live] = {}
        self._live_for: object = None
        #: Whether a service's region list holds more than one backend (else a request never
        #: has anywhere else to go, and ``on_health`` could never give up on it), per config
        #: generation in ``_spare_for``.
        self._spare: dict[tuple[str, ...], bool] = {}
        self._spare_for: object = None
        #: The loop of the tasks walking (``asyncio.current_task`` without looking it up).
        self._loop: asyncio.AbstractEventLoop | None = None

    async def walk(
        self, state: EdgeState, target: RouteTarget, record: ExchangeRecord, call: UpstreamCall
    ) -> Walked:
        """The first response head, or why there is none; ``record`` learns the attempts.

        Only failures that are the backend's feed passive health: a wait for a pool slot, a
        local resource error, a client's body error and an attempt abandoned because its
        backend left rotation (``on_health``) are not evidence against it."""
        services = self.services
        health_source = services.health
        health = health_source.snapshot
        if health is not self._live_for:
            self._live_for = health
            self._live.clear()
        live = self._live.get(target.regions)
        if live is None:
            live = self._live[target.regions] = _live_in(target.regions, health)
        regions, _, _, only = live
        if not regions:
            return ErrorAnswer(503, "no_healthy_region", RETRY_AFTER_SECONDS)
        method, headers, body = call.method, call.headers, call.body
        payload = call.payload
        if payload is None and body is not None:
            payload = body
        # A body in memory can be sent again; a streamed one cannot.
        streamed = payload is not None and not isinstance(payload, bytes)
        upstream = services.upstream
        metrics = services.metrics
        replayable = method in target.retry_methods and not streamed
        # Given up on (``on_health``) only when there is somewhere else to go.
        abandonable = False
        if replayable:
            spare = self._spare.get(target.regions) if state is self._spare_for else None
            abandonable = self._has_spare(state, target) if spare is None else spare
        failure: UpstreamFailure | None = None
        # The first attempt (nearly every request's only one): ``next_attempt``'s first pick
        # from what ``_live_in`` found for this snapshot.
        attempt = only
        if attempt is None:
            attempt = _first_pick(live, upstream.outstanding, services.rng)
        while True:
            if record.attempts:
                assert failure is not None
                attempt = next_attempt(
                    regions, health, record.attempts, upstream.outstanding, services.rng
                )
                if attempt is None:
                    break
                if not retry_allowed(method, target.retry_methods, streamed, failure.kind):
                    break
                if health_source.snapshot is not health:
                    # Health changed while we waited (maybe because of this very failure):
                    # the retry goes by what is known now, not by what was at the start.
                    health = health_source.snapshot
                    regions = live_regions(target.regions, health) or regions
                    attempt = next_attempt(
                        regions, health, record.attempts, upstream.outstanding, services.rng
                    )
                    if attempt is None:
                        break
                metrics.retries.labels(target.service.name).inc()
                if attempt.region != record.attempts[0].region:
                    metrics.failovers.labels(
                        target.service.name, record.attempts[0].region, attempt.region
                    ).inc()
            elif attempt is None:
                break
            record.attempts.append(attempt)
            record.region, record.backend = attempt.region, attempt.backend
            backend = attempt.backend
            started = services.clock()
            task: asyncio.Task[object] | None = None
            record.streamed_body = streamed
            try:
                if not upstream.try_acquire(backend, streamed=streamed):
                    await upstream.wait_for_slot(
                        backend, state.config.edge.timeouts.connect, streamed=streamed
                    )
            except UpstreamFailure as exc:  # the edge's own limit: not the backend's doing
                self._failed(attempt, exc, call)
                failure = exc
                continue
            try:
                if abandonable:
                    # ``asyncio.current_task`` with the loop known: no get_running_loop (a
                    # getpid() each in 3.11) per request.
                    loop = self._loop
                    task = None if loop is None else asyncio.current_task(loop)
                    if task is None:
                        task = asyncio.current_task()
                        self._loop = None if task is None else task.get_loop()
                    if task is not None:  # watched: ``on_health`` may give up on it
                        self._waiting[task] = (backend, regions, record.attempts)
                try:
                    response = await upstream.send(
                        backend,
                        method,
                        call.target,
                        headers,
                        payload,
                        call.length,
                        replayable=replayable,
                    )
                finally:
                    # Unwatched before anything else: the health report below may publish
                    # a snapshot, and this task must not be given up on for its own report.
                    if task is not None:
                        self._waiting.pop(task, None)
            except UpstreamFailure as exc:
                upstream.release(backend, streamed=streamed)
                if task is not None:
                    self._settle(task)
                if body is not None and body.error is not None:
                    return body.error  # the client's fault: no retry, no health report
                if exc.kind.blames_backend:
                    health_source.report(backend, False)
                self._failed(attempt, exc, call)
                failure = exc
                continue
            except asyncio.CancelledError:
                upstream.release(backend, streamed=streamed)
                if task is None or not self._abandoned(task):
                    raise
                # on_health gave up on this attempt: the backend left rotation while we
                # waited for its first byte.  Nothing to report; go on with the walk.
                failure = UpstreamFailure(FailureKind.ABANDONED, "backend left rotation")
                self._failed(attempt, failure, call)
                continue
            except BaseException:
                upstream.release(backend, streamed=streamed)
                raise
            if task is not None and self._abandoning:
                self._settle(task)
            elapsed = services.clock() - started
            record.upstream_seconds = elapsed
            metrics.upstream_stats.observe_upstream(attempt.region, elapsed)
            health_source.report(backend, response.status not in state.failure_statuses)
            return response, attempt
        if failure is None:
            return ErrorAnswer(503, "no_backend", RETRY_AFTER_SECONDS)
        status = failure.kind.status
        return ErrorAnswer(
            status,
            f"upstream_{failure.kind.value}",
            RETRY_AFTER_SECONDS if status == 503 else None,
        )

    def _has_spare(self, state: EdgeState, target: RouteTarget) -> bool:
        """Whether ``target``'s regions hold more than one backend between them."""
        if state is not self._spare_for:
            self._spare_for = state
            self._spare.clear()
        spare = self._spare.get(target.regions)
        if spare is None:
            backends = {r.name: len(r.backends) for r in state.config.regions}
            spare = self._spare[target.regions] = (
                sum(backends.get(name, 0) for name in target.regions) > 1
            )
        return spare

    def _failed(self, attempt: Attempt, exc: UpstreamFailure, call: UpstreamCall) -> None:
        services = self.services
        services.metrics.upstream_failures.labels(attempt.region, exc.kind.value).inc()
        count = 1
        throttle = self._own_failures.get(exc.kind)
        if throttle is not None:
            # The edge's own shortage (pool full, out of descriptors) hits every request at
            # once: one line per kind per interval, with how many it stands for.
            count = throttle.note(services.clock())
            if not count:
                return
        log.warning(
            "upstream_failed",
            backend=attempt.backend,
            region=attempt.region,
            kind=exc.kind.value,
            detail=exc.detail,
            backend_fault=exc.kind.blames_backend,
            count=count,
            request_id=call.request_id,
        )

    # -- giving up on attempts to a backend that left rotation --------------------------------

    def _abandoned(self, task: asyncio.Task[object]) -> bool:
        """Whether a CancelledError in ``task`` was ``on_health``'s (and only its)."""
        if task not in self._abandoning:
            return False
        self._abandoning.discard(task)
        return task.uncancel() == 0

    def _settle(self, task: asyncio.Task[object]) -> None:
        """The attempt ended on its own although ``on_health`` had just given up on it: take
        that cancellation back (it was never delivered)."""
        if task in self._abandoning:
            self._abandoning.discard(task)
            if task.cancelling():
                task.uncancel()

    def on_health(self, snapshot: SnapshotView) -> None:
        """A new health snapshot (``HealthMonitor.subscribe``): requests waiting for the first
        byte of a backend that has left rotation (ejected by traffic, down by its checks) are
        retried elsewhere now, instead of each waiting out the first-byte timeout (10 s by
        default).  Only requests that may be retried (idempotent, body replayable) and that
        have somewhere else to go; the abandoned attempt is not reported again."""
        if not self._waiting:
            return
        outstanding = self.services.upstream.outstanding
        for task, (backend, regions, tried) in list(self._waiting.items()):
            if task.done() or task in self._abandoning or snapshot.backend_up(backend):
                continue
            later = next_attempt(regions, snapshot, tried, outstanding, self.services.rng)
            if later is None:
                continue  # nowhere else to go: this backend may still answer
            self._abandoning.add(task)
            task.cancel()


__all__ = ["UpstreamCall", "UpstreamWalk", "Walked"]
