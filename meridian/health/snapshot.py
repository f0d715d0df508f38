"""The immutable health view that hot paths read: one attribute load, no locks, no awaits.

A :class:`HealthSnapshot` is computed whole from the health book whenever something changes and
swapped in by a single assignment, so a reader holding one sees a consistent picture of every
backend, region and POP (the same idea as the config snapshot).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from meridian.config import Config

POP_PREFIX = "pop:"


def pop_target(name: str) -> str:
    """The target name of a POP's edge check (backends are named by their URL)."""
    return POP_PREFIX + name


def pop_service_target(pop: str, service: str) -> str:
    """The target name of a POP edge's readiness for one service (``pop:fra/market``)."""
    return f"{POP_PREFIX}{pop}/{service}"


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    """Who can serve, as of ``generation``.  Built by the health book; never mutated.

    Names that are not in the config are reported down (and have no usable backends); a POP
    without a ``health_url``, or not checked by this process, is reported up.
    """

    generation: int
    #: Backend URL -> usable (up, or unknown before its first check).
    backend_health: Mapping[str, bool]
    region_health: Mapping[str, bool]
    pop_health: Mapping[str, bool]
    #: Region -> backends to use, in config order: the usable ones, or all in panic mode.
    usable: Mapping[str, tuple[str, ...]]
    #: ``pop:NAME/SERVICE`` -> whether that POP's edge has a healthy region for the service
    #: (only the pairs this process checks; the others count as ready).
    pop_service_health: Mapping[str, bool] = field(default_factory=dict)
    #: Regions whose healthy share is below the panic threshold.
    panic_regions: frozenset[str] = frozenset()
    #: Regions down only because traffic ejected backends (no active check failed enough):
    #: the last resort when every region of a service is down (``fallback_regions``).
    ejected_regions: frozenset[str] = frozenset()
    #: Target -> time (on ``clock``) when a pending transition could complete.
    deadlines: Mapping[str, float] = field(default_factory=dict)
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)

    def backend_up(self, url: str) -> bool:
        return self.backend_health.get(url, False)

    def region_up(self, name: str) -> bool:
        """At least ``min_healthy`` of the region's backends are usable."""
        return self.region_health.get(name, False)

    def pop_up(self, name: str) -> bool:
        return self.pop_health.get(name, False)

    def pop_serves(self, pop: str, service: str) -> bool:
        """Whether ``pop``'s edge is ready for ``service`` (has a healthy region for it), as far
        as this process checks it; a pair nobody checks counts as ready."""
        return self.pop_service_health.get(pop_service_target(pop, service), True)

    def ejected_only(self, region: str) -> bool:
        """Down, but only through passive ejection: it would be up if its ejected backends
        counted."""
        return region in self.ejected_regions

    def usable_backends(self, region: str) -> tuple[str, ...]:
        """Backends to send to; never empty when the region has backends (panic mode)."""
        return self.usable.get(region, ())

    def ttl_hint(self, target: str) -> float | None:
        """Seconds until a pending transition of ``target`` could complete; None when stable.

        ``target`` is a backend URL or ``pop:NAME``.  Zero means "any moment now".
        """
        deadline = self.deadlines.get(target)
        if deadline is None:
            return None
        return max(0.0, deadline - self.clock())

    @classmethod
    def all_up(
        cls, config: Config, *, generation: int = 0, clock: Callable[[], float] = time.monotonic
    ) -> HealthSnapshot:
        """Everything up and stable: for tests, tools, and services run without checks."""
        return cls(
            generation=generation,
            backend_health={url: True for region in config.regions for url in region.backends},
            region_health={region.name: True for region in config.regions},
            pop_health={pop.name: True for pop in config.pops},
            usable={region.name: region.backends for region in config.regions},
            clock=clock,
        )
