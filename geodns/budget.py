"""Each geo name's failover budget: how long after a target dies until every client has
stopped being sent there, at the current settings.  Pure; exported by the server as
``meridian_dns_failover_budget_seconds`` and printed by ``meridian explain``.

budget = detection + TTL: GeoDNS stops answering a dead target once its own checks see it
DOWN (:mod:`meridian.health.budget`), and a resolver may keep serving the answer it cached
just before, for the name's TTL.  For a name that serves an edge service (``service``),
a POP also goes out when its edge loses every region of the service: the edge's checks
notice first (worst case: the regions black-holed), then GeoDNS's readiness check of the POP
(a fast 503): both detections add up, and the budget is the longer of the two paths.
"""

from __future__ import annotations

from dataclasses import dataclass

from geodns.zone import GeoName
from meridian.config import Config
from meridian.health.budget import detection


@dataclass(frozen=True, slots=True)
class Budget:
    name: str
    #: Worst case until new answers avoid a dead target.
    detection: float
    ttl: int
    #: Which fault sets ``detection``: "target dead" or "edge lost its regions".
    path: str

    @property
    def seconds(self) -> float:
        return self.detection + self.ttl

    def describe(self) -> str:
        return (
            f"failover budget {self.seconds:.1f} s = detection {self.detection:.1f} s"
            f" ({self.path}) + TTL {self.ttl} s"
        )


def failover_budget(config: Config, geo: GeoName) -> Budget:
    found = detection(config.health)
    own = found.worst
    if geo.spec.targets == "pops" and geo.spec.service is not None:
        through_edge = found.worst + found.refused
        if through_edge > own:
            return Budget(geo.fqdn, through_edge, geo.ttl, "edge lost its regions")
    return Budget(geo.fqdn, own, geo.ttl, "target dead")


__all__ = ["Budget", "failover_budget"]
