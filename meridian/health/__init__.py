"""Health checking and failover: which backends, regions and POPs can serve right now.

- :mod:`~meridian.health.state`: the pure per-target state machine (checks, traffic, ejection).
- :mod:`~meridian.health.book`: every target of a config plus the pool rules (ejection cap,
  panic mode) and the roll-up into a :class:`HealthSnapshot`; pure as well.
- :mod:`~meridian.health.monitor`: the asyncio shell (:class:`HealthMonitor`) that probes,
  takes live-traffic outcomes, shares through Redis, logs, counts and publishes snapshots.
"""

from meridian.health.book import HealthBook, TargetInfo
from meridian.health.monitor import HealthMonitor
from meridian.health.snapshot import HealthSnapshot, pop_service_target, pop_target
from meridian.health.state import TRANSITIONS, Health, Signal, TargetHealth, Transition

__all__ = [
    "TRANSITIONS",
    "Health",
    "HealthBook",
    "HealthMonitor",
    "HealthSnapshot",
    "Signal",
    "TargetHealth",
    "TargetInfo",
    "Transition",
    "pop_service_target",
    "pop_target",
]
