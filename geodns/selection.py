"""Answer selection: which targets a client gets for a geo name.  Pure: no clock, no I/O.

locate -> candidates with addresses of the family -> network override pins first, then
great-circle distance -> residency (the client's rule restricts to its zone; ``on_failure`` says
what happens when nothing in the zone is up) -> drop unhealthy -> first N.  When nothing eligible
is up, ``dns.all_down`` decides.  The result carries the per-candidate verdicts and a reason so
that ``meridian explain`` prints exactly what the server did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from geodns.zone import GeoName, IPAddress, Target
from meridian.config import Config, ResidencyRule
from meridian.geo import ClientLocation, nearest_first

Outcome = Literal["answer", "empty", "servfail", "refused"]


class HealthView(Protocol):
    """The read side of a health snapshot (``meridian.health.HealthSnapshot``)."""

    @property
    def generation(self) -> int: ...

    def pop_up(self, name: str) -> bool: ...

    def pop_serves(self, pop: str, service: str) -> bool: ...

    def region_up(self, name: str) -> bool: ...

    def ttl_hint(self, target: str) -> float | None: ...


@dataclass(frozen=True, slots=True)
class Candidate:
    target: Target
    distance_km: float
    up: bool
    #: A network override pins this target for the client.
    pinned: bool
    #: Whether the target is in the client's residency zone; None when no rule applies.
    in_zone: bool | None
    chosen: bool


@dataclass(frozen=True, slots=True)
class Selection:
    outcome: Outcome
    chosen: tuple[Target, ...]
    ttl: int
    reason: str
    rule: ResidencyRule | None
    candidates: tuple[Candidate, ...]
    #: The TTL was shortened by a pending health transition.
    ttl_shortened: bool = False
    #: A pending health transition bounds the TTL (shortened now, or once it nears): the TTL
    #: depends on the time of asking, so the answer must not be memoized as bytes.
    timed: bool = False

    def addresses(self, family: int) -> tuple[IPAddress, ...]:
        return tuple(a for t in self.chosen for a in t.addresses_of(family))


def is_up(target: Target, health: HealthView) -> bool:
    """A region: enough of its backends are usable.  A POP: its edge answers and, for a name
    that serves an edge service, the edge has a healthy region for that service."""
    if target.kind != "pop":
        return health.region_up(target.name)
    if not health.pop_up(target.name):
        return False
    return target.service is None or health.pop_serves(target.name, target.service)


def select(
    config: Config, name: GeoName, family: int, client: ClientLocation, health: HealthView
) -> Selection:
    pool = [t for t in name.targets if t.addresses_of(family)]
    rule = config.residency_zone_for(client.country, client.continent)
    if not pool:
        return Selection("empty", (), name.ttl, f"no candidate has IPv{family} addresses", rule, ())

    by_distance = nearest_first(client.lat, client.lon, pool, lambda t: t.location)
    pinned_name = client.pop if name.spec.targets == "pops" else client.region
    # Stable sort: the pinned target first, the rest keep distance order.
    ordered = sorted(by_distance, key=lambda pair: pair[0].name != pinned_name)
    up = {t.name: is_up(t, health) for t, _ in ordered}

    def in_zone(target: Target) -> bool:
        return rule is not None and target.residency == rule.zone

    eligible = [t for t, _ in ordered if rule is None or in_zone(t)]
    healthy = [t for t in eligible if up[t.name]]
    reason: str
    outcome: Outcome = "answer"
    if healthy:
        chosen = healthy[: name.answers]
        reason = _why(chosen, ordered, up, pinned_name, rule)
    elif rule is not None and rule.on_failure == "refuse":
        chosen = []
        outcome = "refused"
        reason = (
            f"residency rule {rule.name}: no healthy target in zone {rule.zone} "
            "and on_failure is refuse"
        )
    else:
        if rule is not None:  # on_failure: fallback to every candidate
            eligible = [t for t, _ in ordered]
            healthy = [t for t in eligible if up[t.name]]
        if healthy:
            chosen = healthy[: name.answers]
            reason = (
                f"residency rule {rule.name if rule else '?'}: no healthy target in zone "
                f"{rule.zone if rule else '?'}, fell back to the nearest healthy outside it"
            )
        else:
            policy = config.dns.all_down
            if policy == "fail_open":
                chosen = eligible[: name.answers]
                reason = "every eligible target is down; all_down is fail_open: answering as if up"
            else:
                chosen = []
                outcome = "empty" if policy == "empty" else "servfail"
                reason = f"every eligible target is down; all_down is {policy}"

    ttl, timed = ttl_of(config, name, ordered, chosen, health)
    chosen_names = {t.name for t in chosen}
    candidates = tuple(
        Candidate(
            t,
            km,
            up[t.name],
            t.name == pinned_name,
            None if rule is None else in_zone(t),
            t.name in chosen_names,
        )
        for t, km in ordered
    )
    return Selection(outcome, tuple(chosen), ttl, reason, rule, candidates, ttl < name.ttl, timed)


def _why(
    chosen: list[Target],
    ordered: list[tuple[Target, float]],
    up: dict[str, bool],
    pinned_name: str | None,
    rule: ResidencyRule | None,
) -> str:
    parts = []
    if chosen and chosen[0].name == pinned_name:
        parts.append(f"{pinned_name} is pinned by a network override")
    skipped = [
        t.name
        for t, _ in ordered[: [t for t, _ in ordered].index(chosen[-1]) + 1]
        if t not in chosen
    ]
    down = [n for n in skipped if not up[n]]
    if rule is not None:
        parts.append(f"residency rule {rule.name} restricts to zone {rule.zone}")
    if down:
        parts.append(f"skipped nearer unhealthy {', '.join(down)}")
    parts.append(f"nearest healthy: {', '.join(t.name for t in chosen)}")
    return "; ".join(parts)


def ttl_of(
    config: Config,
    name: GeoName,
    ordered: Sequence[tuple[Target, float]],
    chosen: Sequence[Target],
    health: HealthView,
) -> tuple[int, bool]:
    """The name's TTL, shortened (floor ``dns.min_ttl``) as a transition that would change the
    answer nears: of a chosen target, or of a nearer one that could come back (gdnsd does this).

    Also whether any such transition is pending (the TTL then depends on the time of asking).
    Health verdicts decide ``chosen``; only this TTL reads the clock, so a caller may keep a
    selection for a health generation and recompute just this per query."""
    if not chosen:
        return name.ttl, False
    last = max(i for i, (t, _) in enumerate(ordered) if t in chosen)
    hints = [
        hint
        for t, _ in ordered[: last + 1]
        for key in t.hint_keys
        if (hint := health.ttl_hint(key)) is not None
    ]
    if not hints:
        return name.ttl, False
    floor = int(config.dns.min_ttl)
    return max(floor, min(name.ttl, math.ceil(min(hints)))), True
