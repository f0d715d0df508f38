"""The health of one target as a pure state machine (HAProxy/Envoy semantics).

Inputs are active check results and live-traffic outcomes, each with the time it happened; the
output is the next immutable :class:`TargetHealth`.  Nothing here sleeps, logs or reads a clock,
so 30 simulated seconds of flapping run in microseconds in the tests.

States::

    UNKNOWN --check ok--------------------> UP
    UNKNOWN --fall failed checks----------> DOWN
    UP      --fall failed checks----------> DOWN
    DOWN    --rise passed checks----------> UP
    UNKNOWN/UP --N traffic failures-------> EJECTED   (passive outlier detection)
    EJECTED --check ok after ejection-----> UP
    EJECTED --fall failed checks----------> DOWN

Why UNKNOWN counts as usable: a process that restarts knows nothing yet.  Treating every target
as down until its first check would blackhole all traffic for up to a check interval on every
deploy, and a restart would be an outage; treating them as usable costs at most the few requests
that reach a target that really is dead, which retries and passive detection absorb.  HAProxy
makes the same choice (servers start up, with the health counter at its lowest up level).
UNKNOWN ends at the first passed check, or after ``fall`` failed ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from meridian.config import HealthConfig, OutlierConfig


class Health(StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"
    EJECTED = "ejected"

    @property
    def usable(self) -> bool:
        """Whether traffic may be sent (outside panic mode)."""
        # Module globals, not ``Health.UP``: enum member lookup costs ~200 ns in 3.11.
        return self is _UP or self is _UNKNOWN


_UP, _UNKNOWN = Health.UP, Health.UNKNOWN


class Signal(StrEnum):
    """What an input amounted to, once the counters were updated."""

    CHECK_OK = "check_ok"
    ROSE = "rose"
    FELL = "fell"
    OUTLIER = "outlier"
    EJECTION_OVER = "ejection_over"


#: (state, signal) -> next state.  A pair that is absent leaves the state as it is.
TRANSITIONS: Mapping[tuple[Health, Signal], Health] = {
    (Health.UNKNOWN, Signal.CHECK_OK): Health.UP,
    (Health.UNKNOWN, Signal.FELL): Health.DOWN,
    (Health.UNKNOWN, Signal.OUTLIER): Health.EJECTED,
    (Health.UP, Signal.FELL): Health.DOWN,
    (Health.UP, Signal.OUTLIER): Health.EJECTED,
    (Health.DOWN, Signal.ROSE): Health.UP,
    (Health.EJECTED, Signal.FELL): Health.DOWN,
    (Health.EJECTED, Signal.EJECTION_OVER): Health.UP,
}


@dataclass(frozen=True, slots=True)
class TargetHealth:
    """Everything known about one target; replaced whole on every input that changes it."""

    state: Health = Health.UNKNOWN
    #: When the current state was entered.
    since: float = 0.0
    #: Why the target is in its current state.
    reason: str = "no check yet"
    #: Consecutive passed / failed active checks (one of the two is always zero).
    successes: int = 0
    failures: int = 0
    #: Consecutive failed requests from live traffic.
    traffic_failures: int = 0
    #: Ejections so far, decayed while the target stays in rotation (Envoy's multiplier).
    ejections: int = 0
    ejected_until: float | None = None
    #: When the target last entered UP; ejections are forgiven with time spent in rotation.
    up_since: float | None = None
    last_check: float | None = None
    last_check_ok: bool | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of state, as published, logged and counted."""

    target: str
    old: Health
    new: Health
    reason: str
    at: float
    #: For ``new is EJECTED``: how long the ejection lasts.
    ejection_seconds: float | None = None


def initial(now: float) -> TargetHealth:
    return TargetHealth(since=now)


def ejection_seconds(ejections: int, outlier: OutlierConfig) -> float:
    """Envoy's backoff: base time multiplied by the number of ejections, capped."""
    return min(outlier.base_ejection * ejections, outlier.max_ejection)


def on_check(
    health: TargetHealth, ok: bool, reason: str, now: float, config: HealthConfig
) -> TargetHealth:
    """Apply an active check result.  ``reason`` says what the check saw ("status 503")."""
    if ok:
        health = dataclasses.replace(
            health,
            successes=health.successes + 1,
            failures=0,
            last_check=now,
            last_check_ok=True,
        )
        signals: list[tuple[Signal, str]] = []
        if health.ejected_until is not None and now >= health.ejected_until:
            signals.append((Signal.EJECTION_OVER, f"ejection over and check passed: {reason}"))
        if health.successes >= config.rise:
            signals.append((Signal.ROSE, f"{health.successes} checks passed: {reason}"))
        signals.append((Signal.CHECK_OK, f"check passed: {reason}"))
        return _advance(health, signals, now)
    health = dataclasses.replace(
        health,
        successes=0,
        failures=health.failures + 1,
        last_check=now,
        last_check_ok=False,
        last_error=reason,
    )
    if health.failures >= config.fall:
        signal = (Signal.FELL, f"{health.failures} checks failed: {reason}")
        return _advance(health, [signal], now)
    return health


def on_traffic(
    health: TargetHealth,
    ok: bool,
    now: float,
    outlier: OutlierConfig,
    *,
    ejection_allowed: bool,
) -> TargetHealth:
    """Apply the outcome of one live request.

    Only usable targets count: failures seen on a target that is already out (reached through
    panic mode) say nothing new.  ``ejection_allowed`` is the pool's verdict on
    ``max_ejection_percent``; when it says no, the failure count stays at the threshold, so the
    target is ejected on the next failure once room frees up.
    """
    if not health.state.usable:
        return health
    if ok:
        if health.traffic_failures == 0:
            return health  # the hot path: nothing to record
        return dataclasses.replace(health, traffic_failures=0)
    failures = health.traffic_failures + 1
    health = dataclasses.replace(
        health, traffic_failures=failures, last_error="request failed (live traffic)"
    )
    if outlier.enabled and failures >= outlier.consecutive_failures and ejection_allowed:
        signal = (Signal.OUTLIER, f"{failures} consecutive request failures")
        return _advance(health, [signal], now, outlier)
    return health


def would_eject(health: TargetHealth, outlier: OutlierConfig) -> bool:
    """Whether one more traffic failure reaches the ejection threshold (pool rules aside)."""
    return (
        outlier.enabled
        and health.state.usable
        and health.traffic_failures + 1 >= outlier.consecutive_failures
    )


def expire_ejection(health: TargetHealth, now: float) -> TargetHealth:
    """Return an ejected target whose time is up, for targets no active check watches."""
    due = health.ejected_until
    if health.state is Health.EJECTED and due is not None and now >= due:
        signal = (Signal.EJECTION_OVER, "ejection over (no active check watches it)")
        return _advance(health, [signal], now)
    return health


def adopt(
    health: TargetHealth,
    state: Health,
    reason: str,
    now: float,
    config: HealthConfig,
    *,
    ejection_left: float | None = None,
) -> TargetHealth:
    """Take a peer's verdict: enter ``state`` with counters as if we had seen it ourselves.

    The counters are set to the edge of the state (``fall`` failures for DOWN, ``rise``
    successes for UP), so our own checks need a full ``rise``/``fall`` run to overturn it.
    """
    if state is health.state or state is Health.UNKNOWN:
        return health
    if state is Health.EJECTED:
        # As for our own traffic: only a usable target can be ejected.
        if ejection_left is None or ejection_left <= 0 or not health.state.usable:
            return health
        return dataclasses.replace(
            health,
            state=state,
            since=now,
            reason=reason,
            successes=0,
            traffic_failures=0,
            ejections=health.ejections + 1,
            ejected_until=now + ejection_left,
        )
    up = state is Health.UP
    return dataclasses.replace(
        health,
        state=state,
        since=now,
        reason=reason,
        successes=config.rise if up else 0,
        failures=0 if up else config.fall,
        traffic_failures=0,
        ejected_until=None,
        up_since=now if up else health.up_since,
    )


def transitioning(health: TargetHealth) -> bool:
    """Between states: the prober checks at ``fast_interval`` (HAProxy's ``fastinter``)."""
    match health.state:
        case Health.UNKNOWN | Health.EJECTED:
            return True
        case Health.UP:
            return health.failures > 0
        case Health.DOWN:
            return health.successes > 0
    return False  # pragma: no cover - the match is exhaustive


def pending_until(health: TargetHealth, config: HealthConfig) -> float | None:
    """The earliest time a pending transition could complete; None when the target is stable.

    Checks run at ``fast_interval`` while a target is transitioning, so ``n`` more checks take
    ``n * fast_interval``.  GeoDNS uses this to shorten TTLs ahead of a possible change.
    """
    fast = min(config.fast_interval, config.interval)
    match health.state:
        case Health.EJECTED:
            return health.ejected_until
        case Health.UNKNOWN if health.last_check is None:
            # The first check runs at once; the fall-th could complete fall-1 periods later.
            return health.since + (config.fall - 1) * fast
        case Health.UNKNOWN | Health.UP if health.failures > 0:
            assert health.last_check is not None
            return health.last_check + (config.fall - health.failures) * fast
        case Health.DOWN if health.successes > 0:
            assert health.last_check is not None
            return health.last_check + (config.rise - health.successes) * fast
    return None


def _advance(
    health: TargetHealth,
    signals: list[tuple[Signal, str]],
    now: float,
    outlier: OutlierConfig | None = None,
) -> TargetHealth:
    """Look the signals up in :data:`TRANSITIONS` (first hit wins) and enter the new state."""
    for signal, reason in signals:
        new = TRANSITIONS.get((health.state, signal))
        if new is not None:
            return _enter(health, new, reason, now, outlier)
    return health


def _enter(
    health: TargetHealth, new: Health, reason: str, now: float, outlier: OutlierConfig | None
) -> TargetHealth:
    if new is Health.EJECTED:
        assert outlier is not None
        ejections = _decayed_ejections(health, now, outlier) + 1
        return dataclasses.replace(
            health,
            state=new,
            since=now,
            reason=reason,
            successes=0,
            traffic_failures=0,
            ejections=ejections,
            ejected_until=now + ejection_seconds(ejections, outlier),
        )
    return dataclasses.replace(
        health,
        state=new,
        since=now,
        reason=reason,
        traffic_failures=0,
        ejected_until=None,
        up_since=now if new is Health.UP else health.up_since,
    )


def _decayed_ejections(health: TargetHealth, now: float, outlier: OutlierConfig) -> int:
    """Forgive one past ejection per ``base_ejection`` spent back in rotation (as Envoy does)."""
    if health.ejections == 0 or health.up_since is None:
        return health.ejections
    if outlier.base_ejection <= 0:
        return 0
    forgiven = int((now - health.up_since) // outlier.base_ejection)
    return max(0, health.ejections - forgiven)
