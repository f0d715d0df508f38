"""The health book: every target of one config, its health, and the rules that span a pool.

Sans-I/O like :mod:`meridian.health.state`: methods take the time as an argument and return the
transitions they caused; the monitor does the logging, counting and publishing.  The book is the
only mutable thing in the health engine, and only the monitor's event loop touches it.

Pool rules (per region, Envoy semantics):

- never eject more than ``max_ejection_percent`` of a region's backends, but always allow one;
- when fewer than ``panic_threshold_percent`` of a region's backends are usable (or none is),
  the region's pool spreads over all of them: better some errors than no answer at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from meridian.config import Config
from meridian.health import state
from meridian.health.snapshot import HealthSnapshot, pop_service_target, pop_target
from meridian.health.state import Health, TargetHealth, Transition

TargetKind = Literal["backend", "pop"]


@dataclass(frozen=True, slots=True)
class TargetInfo:
    """What a target is, from the config: fixed for the life of one config."""

    name: str
    kind: TargetKind
    #: For a backend its base URL; for a POP its ``health_url``.
    url: str
    #: Regions that list this backend (a URL may be shared); empty for a POP.
    regions: tuple[str, ...] = ()
    #: The POP this target is the edge of (POP targets only).
    pop: str | None = None
    #: Whether this process runs active checks against it.
    probed: bool = True
    #: For a POP's readiness for one edge service (``pop:NAME/SERVICE``): the service.
    service: str | None = None


def targets_of(config: Config, *, check_backends: bool, check_pops: bool) -> dict[str, TargetInfo]:
    """Every target of ``config``: all backends (passive detection needs them even unprobed) and,
    when ``check_pops``, every POP with a ``health_url``, and for every POP with a ``ready_url``
    its readiness for each edge service a DNS name serves (``pop:NAME/SERVICE``)."""
    regions_of: dict[str, list[str]] = {}
    for region in config.regions:
        for url in region.backends:
            regions_of.setdefault(url, []).append(region.name)
    targets = {
        url: TargetInfo(url, "backend", url, tuple(names), probed=check_backends)
        for url, names in regions_of.items()
    }
    if check_pops:
        for pop in config.pops:
            if pop.health_url is not None:
                name = pop_target(pop.name)
                targets[name] = TargetInfo(name, "pop", pop.health_url, pop=pop.name)
        services = sorted({n.service for n in config.dns.names if n.service is not None})
        for pop in config.pops:
            if pop.ready_url is None:
                continue
            for service in services:
                name = pop_service_target(pop.name, service)
                url = f"{pop.ready_url.rstrip('/')}/{service}"
                targets[name] = TargetInfo(name, "pop", url, pop=pop.name, service=service)
    return targets


class HealthBook:
    """Health of every target of one config.  Mutable, but only through the input methods,
    each of which takes the time and returns the transitions it caused."""

    def __init__(
        self, config: Config, *, now: float, check_backends: bool = True, check_pops: bool = False
    ) -> None:
        self.check_backends = check_backends
        self.check_pops = check_pops
        self.config = config
        self.targets: Mapping[str, TargetInfo] = targets_of(
            config, check_backends=check_backends, check_pops=check_pops
        )
        self.health: dict[str, TargetHealth] = {name: state.initial(now) for name in self.targets}

    # ----------------------------------------------------------------------------------------
    # Inputs

    def check(self, target: str, ok: bool, reason: str, now: float) -> tuple[Transition, ...]:
        """An active check of ``target`` finished with ``ok`` (``reason``: what it saw)."""
        old = self.health.get(target)
        if old is None:
            return ()  # removed by a reload while its check was in flight
        return self._store(target, old, state.on_check(old, ok, reason, now, self.config.health))

    def traffic(self, target: str, ok: bool, now: float) -> tuple[Transition, ...]:
        """A live request to backend ``target`` succeeded or failed.  Cheap when nothing changes."""
        old = self.health.get(target)
        if old is None or (ok and old.traffic_failures == 0):
            return ()  # the hot path: a success with nothing to reset
        outlier = self.config.outlier
        allowed = not ok and state.would_eject(old, outlier) and self.ejection_allowed(target)
        new = state.on_traffic(old, ok, now, outlier, ejection_allowed=allowed)
        if new is old:
            return ()
        return self._store(target, old, new)

    def expire(self, now: float) -> tuple[Transition, ...]:
        """Return ejected targets whose time is up and that no active check will bring back."""
        found: list[Transition] = []
        for name, old in list(self.health.items()):
            if old.state is Health.EJECTED and not self.targets[name].probed:
                found.extend(self._store(name, old, state.expire_ejection(old, now)))
        return tuple(found)

    def adopt(
        self,
        target: str,
        new_state: Health,
        reason: str,
        now: float,
        *,
        ejection_left: float | None = None,
    ) -> tuple[Transition, ...]:
        """Take a peer's transition (shared through Redis); pool rules still apply."""
        old = self.health.get(target)
        if old is None:
            return ()
        if new_state is Health.EJECTED and not self.ejection_allowed(target):
            return ()
        new = state.adopt(
            old, new_state, reason, now, self.config.health, ejection_left=ejection_left
        )
        return self._store(target, old, new)

    def reconfigure(self, config: Config, now: float) -> tuple[set[str], set[str]]:
        """Switch to ``config``, keeping the health of targets still present.

        Returns the names of the targets added and removed (a changed POP ``health_url`` is
        both: its probe restarts).
        """
        targets = targets_of(config, check_backends=self.check_backends, check_pops=self.check_pops)
        # A POP whose health_url changed is a new target under the same name: start it afresh.
        kept = {
            name
            for name, info in targets.items()
            if name in self.targets and self.targets[name].url == info.url
        }
        added = targets.keys() - kept
        removed = self.targets.keys() - kept
        self.health = {
            name: self.health[name] if name in kept else state.initial(now) for name in targets
        }
        self.targets = targets
        self.config = config
        return set(added), set(removed)

    # ----------------------------------------------------------------------------------------
    # Queries

    def transitioning(self, target: str) -> bool:
        health = self.health.get(target)
        return health is not None and state.transitioning(health)

    def deadline(self, target: str) -> float | None:
        """When a pending transition of ``target`` could complete (see ``state.pending_until``).

        A target nobody checks has nothing pending, except the end of an ejection.
        """
        health = self.health.get(target)
        if health is None:
            return None
        if not self.targets[target].probed and health.state is not Health.EJECTED:
            return None
        return state.pending_until(health, self.config.health)

    def next_expiry(self) -> float | None:
        """When :meth:`expire` next has something to do, if ever."""
        times = [
            h.ejected_until
            for name, h in self.health.items()
            if h.ejected_until is not None and not self.targets[name].probed
        ]
        return min(times, default=None)

    def ejection_allowed(self, target: str) -> bool:
        """Whether ejecting ``target`` keeps every pool it is in within ``max_ejection_percent``.

        One ejection per pool is always allowed (as in Envoy), so a small pool can still shed
        its one bad backend.
        """
        percent = self.config.outlier.max_ejection_percent
        for region_name in self.targets[target].regions:
            members = self.config.region(region_name).backends
            ejected = sum(1 for url in members if self.health[url].state is Health.EJECTED)
            if ejected > 0 and (ejected + 1) * 100 > percent * len(members):
                return False
        return True

    def snapshot(
        self, generation: int, clock: Callable[[], float] = time.monotonic
    ) -> HealthSnapshot:
        config = self.config
        usable_of = {name: h.state.usable for name, h in self.health.items()}
        backend_health = {
            name: usable_of[name] for name, info in self.targets.items() if info.kind == "backend"
        }
        threshold = config.outlier.panic_threshold_percent
        region_health: dict[str, bool] = {}
        usable: dict[str, tuple[str, ...]] = {}
        panic: set[str] = set()
        ejected: set[str] = set()
        for region in config.regions:
            healthy = tuple(url for url in region.backends if usable_of[url])
            region_health[region.name] = len(healthy) >= region.min_healthy
            if not region_health[region.name]:
                states = (self.health[url].state for url in region.backends)
                spared = sum(1 for current in states if current is Health.EJECTED)
                if len(healthy) + spared >= region.min_healthy:
                    ejected.add(region.name)
            if not healthy or len(healthy) * 100 < threshold * len(region.backends):
                panic.add(region.name)
                usable[region.name] = region.backends
            else:
                usable[region.name] = healthy
        pop_health = {pop.name: usable_of.get(pop_target(pop.name), True) for pop in config.pops}
        service_health = {
            name: usable_of[name]
            for name, info in self.targets.items()
            if info.kind == "pop" and info.service is not None
        }
        deadlines = {
            name: deadline for name in self.health if (deadline := self.deadline(name)) is not None
        }
        return HealthSnapshot(
            generation=generation,
            backend_health=backend_health,
            region_health=region_health,
            pop_health=pop_health,
            pop_service_health=service_health,
            usable=usable,
            panic_regions=frozenset(panic),
            ejected_regions=frozenset(ejected),
            deadlines=deadlines,
            clock=clock,
        )

    # ----------------------------------------------------------------------------------------

    def _store(self, target: str, old: TargetHealth, new: TargetHealth) -> tuple[Transition, ...]:
        self.health[target] = new
        if new.state is old.state:
            return ()
        seconds = None
        if new.state is Health.EJECTED and new.ejected_until is not None:
            seconds = new.ejected_until - new.since
        return (Transition(target, old.state, new.state, new.reason, new.since, seconds),)
