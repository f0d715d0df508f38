"""How long health checks take to notice a dead target, worst case, from the settings alone.

Pure arithmetic over :class:`~meridian.config.HealthConfig`, following the monitor's schedule
(:mod:`meridian.health.monitor`): a target that dies just after a check *started* (and passed)
is checked again at most ``interval * (1 + jitter)`` later; once a check has failed the target
is between states and the next ones start ``min(fast_interval, interval) * (1 + jitter)``
after the previous one started, or when it ended if it ran longer; the ``fall``-th failure
takes it out.  A refused connection fails at once; a black-holed target fails only at
``timeout``, each time.
"""

from __future__ import annotations

from dataclasses import dataclass

from meridian.config import HealthConfig


@dataclass(frozen=True, slots=True)
class Detection:
    """Worst-case seconds from a target's death to its DOWN transition."""

    #: The target refuses connections (its process is gone, the host answers).
    refused: float
    #: The target accepts nothing and answers nothing (black-holed): each check times out.
    hung: float

    @property
    def worst(self) -> float:
        return max(self.refused, self.hung)


def detection(config: HealthConfig) -> Detection:
    spread = 1.0 + config.jitter
    first = config.interval * spread
    fast = min(config.fast_interval, config.interval) * spread
    later = config.fall - 1
    refused = first + later * fast
    hung = first + later * max(fast, config.timeout) + config.timeout
    return Detection(refused, hung)


__all__ = ["Detection", "detection"]
