"""What a supervisor decides about its children, as a pure state machine.

The I/O shell (``meridian.supervise``) forks, reaps, reads heartbeats and signals; every
decision is made here, from the events it reports and the time it passes in.  Nothing here
forks, sleeps, logs or reads a clock, so a crash loop over minutes runs in microseconds in
the tests.

One child per named slot (``edge/0``, ``dns/1``, ``origin us-east``).  States::

    WAITING  --spawned----------------> STARTING
    STARTING --first heartbeat--------> READY        (no heartbeat channel: up stable_after)
    STARTING --exited-----------------> WAITING      (a boot failure; max_boot_failures: give up)
    STARTING --silent past deadline---> KILLED       (SIGKILL)
    READY    --exited-----------------> WAITING      (respawned at once, or backed off)
    READY    --silent for hung_after--> KILLED       (SIGKILL: a loop that no longer beats)
    READY    --stale generation-------> WAITING      (the process drains beside its replacement)
    KILLED   --exited-----------------> WAITING
    any      --stop-------------------> STOPPING     (SIGTERM; SIGKILL at the drain deadline)
    STOPPING --exited-----------------> DONE

Why each rule:

* A respawned child runs the config generation the supervisor accepted last (it is forked
  from the supervisor's memory, never from the file on disk, which may be invalid by then).
  A child that has not acknowledged the current generation ``reload_deadline`` after a
  reload is replaced: the group never serves two configs for longer than that.
* Backoff: a child that ends before ``stable_after`` of uptime counts as a failure; the
  first is replaced at once, each further consecutive one doubles the pause before the next
  spawn (``backoff_base`` up to ``backoff_max``).  A child that ran longer is replaced at
  once.  A child that dies ``max_boot_failures`` times in a row before it ever became ready
  will never work (an import error, a missing database): the group stops with exit code 1,
  so that systemd or Kubernetes sees the failure instead of a crash loop (gunicorn's choice
  for boot errors).
* Hung: a child beats from its event loop every ``heartbeat`` seconds; one that has not
  beaten for ``hung_after`` cannot drain either, so it is killed, not asked to stop.
"""

from __future__ import annotations

import dataclasses
import math
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum


class Phase(StrEnum):
    WAITING = "waiting"
    STARTING = "starting"
    READY = "ready"
    KILLED = "killed"
    STOPPING = "stopping"
    DONE = "done"


class Event(StrEnum):
    SPAWNED = "spawned"
    PROVEN = "proven"
    EXITED = "exited"
    SILENT = "silent"
    STALE = "stale"
    STOP = "stop"


#: (phase, event) -> next phase.  A pair that is absent leaves the phase as it is.
TRANSITIONS: Mapping[tuple[Phase, Event], Phase] = {
    (Phase.WAITING, Event.SPAWNED): Phase.STARTING,
    (Phase.WAITING, Event.STOP): Phase.DONE,
    (Phase.STARTING, Event.PROVEN): Phase.READY,
    (Phase.STARTING, Event.EXITED): Phase.WAITING,
    (Phase.STARTING, Event.SILENT): Phase.KILLED,
    (Phase.STARTING, Event.STOP): Phase.STOPPING,
    (Phase.READY, Event.EXITED): Phase.WAITING,
    (Phase.READY, Event.SILENT): Phase.KILLED,
    (Phase.READY, Event.STALE): Phase.WAITING,
    (Phase.READY, Event.STOP): Phase.STOPPING,
    (Phase.KILLED, Event.EXITED): Phase.WAITING,
    (Phase.KILLED, Event.STOP): Phase.STOPPING,
    (Phase.STOPPING, Event.EXITED): Phase.DONE,
}

#: Phases in which the slot has a live process.
LIVE = frozenset({Phase.STARTING, Phase.READY, Phase.KILLED, Phase.STOPPING})


@dataclass(frozen=True, slots=True)
class Timing:
    """The supervisor's clocks, in seconds."""

    #: A child beats this often (from its event loop).
    heartbeat: float = 1.0
    #: A ready child silent this long is hung: killed and replaced.
    hung_after: float = 10.0
    #: A child must beat for the first time within this long of its spawn.
    start_deadline: float = 60.0
    #: A ready child must run the accepted generation within this long of the reload.
    reload_deadline: float = 15.0
    #: Uptime after which an exit is not part of a crash loop (and, without a heartbeat
    #: channel, after which a child counts as ready).
    stable_after: float = 10.0
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_boot_failures: int = 5
    #: SIGTERM to SIGKILL: the children's drain timeout plus a margin.
    drain: float = 15.0


def backoff(failures: int, timing: Timing) -> float:
    """Pause before the next spawn after ``failures`` consecutive failures: none after the
    first (one crash is an accident; its replacement should serve at once), then
    ``backoff_base`` doubling up to ``backoff_max``."""
    if failures <= 1:
        return 0.0
    return min(timing.backoff_base * 2.0 ** (failures - 2), timing.backoff_max)


@dataclass(frozen=True, slots=True)
class Child:
    """Everything known about one slot; replaced whole on every change."""

    name: str
    #: Whether the child has a heartbeat channel (forked workers; not exec'd programs).
    beats: bool
    phase: Phase = Phase.WAITING
    pid: int | None = None
    #: When the process was spawned, and when it last beat.
    started: float = 0.0
    last_beat: float = 0.0
    #: The config generation the process runs (as reported by its heartbeat).
    generation: int = 0
    #: Consecutive failures (exits before ``stable_after``, hangs), for the backoff.
    failures: int = 0
    #: Consecutive exits before the child ever became ready.
    boot_failures: int = 0
    #: Whether the current process became ready (beat, or lived ``stable_after``).
    proven: bool = False
    restart_at: float = 0.0
    #: SIGKILL already sent (hung, or past the drain deadline).
    killed: bool = False


# ------------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Spawn:
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Kill:
    """Send ``signal`` to ``pid`` (SIGTERM: drain; SIGKILL; SIGHUP for an exec'd child)."""

    name: str
    pid: int
    signal: signal.Signals
    reason: str


@dataclass(frozen=True, slots=True)
class Notify:
    """Tell a child to adopt the accepted config ``generation``."""

    name: str
    pid: int
    generation: int


@dataclass(frozen=True, slots=True)
class Finish:
    """Every child is gone: the supervisor exits with ``code``."""

    code: int
    reason: str


Action = Spawn | Kill | Notify | Finish


@dataclass(frozen=True, slots=True)
class Retiring:
    """A process replaced in its slot (stale generation), draining until ``kill_at``."""

    name: str
    kill_at: float
    killed: bool = False


class Policy:
    """The supervisor's decisions.  Each method takes an event and the time, returns actions."""

    def __init__(self, timing: Timing, generation: int = 0) -> None:
        self.timing = timing
        self.children: dict[str, Child] = {}
        self.retiring: dict[int, Retiring] = {}
        #: The accepted config generation, and when it was accepted.
        self.generation = generation
        self.generation_since = 0.0
        self.stopping = False
        self.stop_deadline = math.inf
        self.code = 0
        self.reason = ""
        self.finished = False

    # ------------------------------------------------------------------------- helpers

    def _set(self, child: Child, event: Event, **changes: object) -> Child:
        phase = TRANSITIONS.get((child.phase, event), child.phase)
        new = dataclasses.replace(child, phase=phase, **changes)  # type: ignore[arg-type]
        self.children[child.name] = new
        return new

    def _by_pid(self, pid: int) -> Child | None:
        for child in self.children.values():
            if child.pid == pid and child.phase in LIVE:
                return child
        return None

    def _finish_if_done(self) -> list[Action]:
        if not self.stopping or self.finished or self.retiring:
            return []
        if all(c.phase is Phase.DONE for c in self.children.values()):
            self.finished = True
            return [Finish(self.code, self.reason)]
        return []

    def pids(self) -> list[int]:
        """Every live process: current children and retiring ones."""
        live = [c.pid for c in self.children.values() if c.phase in LIVE and c.pid is not None]
        return [*live, *self.retiring]

    def describe(self, pid: int) -> tuple[str, str]:
        """(slot name, phase) of a process, for the shell's logs."""
        child = self._by_pid(pid)
        if child is not None:
            return child.name, str(child.phase)
        retiring = self.retiring.get(pid)
        if retiring is not None:
            return retiring.name, "retiring"
        return "?", "unknown"

    # -------------------------------------------------------------------------- events

    def add(self, name: str, beats: bool, now: float) -> list[Action]:
        """A new slot; spawned at once (unless the group is stopping)."""
        if name in self.children:
            raise ValueError(f"duplicate child {name!r}")
        self.children[name] = Child(name, beats, restart_at=now)
        if self.stopping:
            self._set(self.children[name], Event.STOP)
            return []
        return [Spawn(name, "start")]

    def spawned(self, name: str, pid: int, now: float) -> list[Action]:
        child = self.children[name]
        # Forked from the supervisor's memory: it runs the accepted generation.
        self._set(
            child,
            Event.SPAWNED,
            pid=pid,
            started=now,
            last_beat=now,
            killed=False,
            proven=False,
            generation=self.generation,
        )
        if self.stopping:  # a stop raced the spawn
            return self.stop(now, self.code, self.reason)
        return []

    def spawn_failed(self, name: str, now: float) -> list[Action]:
        """The fork itself failed (out of memory, process limit): try again after a pause."""
        child = self.children[name]
        failures = child.failures + 1
        self.children[name] = dataclasses.replace(
            child, failures=failures, restart_at=now + backoff(failures, self.timing)
        )
        return []

    def beat(self, pid: int, generation: int, now: float) -> list[Action]:
        child = self._by_pid(pid)
        if child is None:
            return []
        event = Event.PROVEN if child.phase is Phase.STARTING else None
        changes: dict[str, object] = {"last_beat": now, "generation": generation}
        if event is None:
            self.children[child.name] = dataclasses.replace(child, **changes)  # type: ignore[arg-type]
        else:
            self._set(child, event, boot_failures=0, proven=True, **changes)
        return []

    def exited(self, pid: int, now: float) -> list[Action]:
        if self.retiring.pop(pid, None) is not None:
            return self._finish_if_done()
        child = self._by_pid(pid)
        if child is None:
            return []
        if child.phase is Phase.STOPPING or self.stopping:
            self._set(child, Event.EXITED, pid=None)
            return self._finish_if_done()
        was = child.phase
        failures = child.failures
        boot_failures = child.boot_failures
        if not child.proven:
            boot_failures += 1
            failures += 1
        elif was is Phase.KILLED or now - child.started < self.timing.stable_after:
            failures += 1
        else:
            failures = 0
        delay = backoff(failures, self.timing)
        self._set(
            child,
            Event.EXITED,
            pid=None,
            failures=failures,
            boot_failures=boot_failures,
            restart_at=now + delay,
        )
        if boot_failures >= self.timing.max_boot_failures:
            return self.stop(
                now, 1, f"{child.name} exited {boot_failures} times before it was ready"
            )
        if delay == 0:
            return [Spawn(child.name, f"replacing pid {pid} ({was})")]
        return []

    def retire(
        self, name: str, now: float, sig: signal.Signals = signal.SIGTERM, reason: str = "retired"
    ) -> list[Action]:
        """Remove slot ``name`` for good: its process (if any) gets ``sig`` and is not replaced
        (SIGTERM drains, SIGKILL at the drain deadline; SIGKILL kills at once).  The name may be
        added again later.  A fault injected on purpose (``meridian world``) looks like this."""
        child = self.children.pop(name)
        if child.pid is None or child.phase not in LIVE:
            return self._finish_if_done()
        killed = sig == signal.SIGKILL
        self.retiring[child.pid] = Retiring(name, now + self.timing.drain, killed=killed)
        return [Kill(name, child.pid, sig, reason)]

    def reloaded(self, generation: int, now: float) -> list[Action]:
        """A config generation was accepted: every live child is told to adopt it."""
        self.generation = generation
        self.generation_since = now
        actions: list[Action] = []
        for child in self.children.values():
            if child.pid is None or child.phase not in (Phase.STARTING, Phase.READY):
                continue
            if child.beats:
                actions.append(Notify(child.name, child.pid, generation))
            else:  # an exec'd program reads its file itself
                actions.append(Kill(child.name, child.pid, signal.SIGHUP, "reload"))
        return actions

    def stop(self, now: float, code: int = 0, reason: str = "stop requested") -> list[Action]:
        """Drain every child (SIGTERM), SIGKILL what is left at the deadline."""
        if not self.stopping:
            self.stopping = True
            self.code = code
            self.reason = reason
            self.stop_deadline = now + self.timing.drain
        actions: list[Action] = []
        for child in list(self.children.values()):
            if child.phase is Phase.WAITING:
                self._set(child, Event.STOP)
            elif child.phase in (Phase.STARTING, Phase.READY):
                assert child.pid is not None
                self._set(child, Event.STOP)
                actions.append(Kill(child.name, child.pid, signal.SIGTERM, reason))
            elif child.phase is Phase.KILLED:
                self._set(child, Event.STOP)
        for pid, retiring in self.retiring.items():
            if retiring.kill_at > self.stop_deadline:
                self.retiring[pid] = dataclasses.replace(retiring, kill_at=self.stop_deadline)
        return actions + self._finish_if_done()

    def tick(self, now: float) -> list[Action]:
        """Deadlines: spawns due, hung and stale children, drains overdue."""
        t = self.timing
        actions: list[Action] = []
        for pid, retiring in list(self.retiring.items()):
            if not retiring.killed and now >= retiring.kill_at:
                self.retiring[pid] = dataclasses.replace(retiring, killed=True)
                actions.append(Kill(retiring.name, pid, signal.SIGKILL, "drain deadline"))
        for child in list(self.children.values()):
            if self.stopping:
                overdue = now >= self.stop_deadline
                if child.phase is Phase.STOPPING and not child.killed and overdue:
                    assert child.pid is not None
                    self._set(child, Event.STOP, killed=True)
                    actions.append(Kill(child.name, child.pid, signal.SIGKILL, "drain deadline"))
                continue
            if child.phase is Phase.WAITING:
                if now >= child.restart_at:
                    actions.append(Spawn(child.name, "backoff over"))
                continue
            if child.pid is None or child.phase is Phase.KILLED:
                continue
            pid = child.pid
            if child.phase is Phase.STARTING:
                if not child.beats and now - child.started >= t.stable_after:
                    self._set(child, Event.PROVEN, boot_failures=0, proven=True)
                elif child.beats and now - child.started >= t.start_deadline:
                    self._set(child, Event.SILENT, killed=True)
                    actions.append(
                        Kill(
                            child.name, pid, signal.SIGKILL, f"not ready after {t.start_deadline}s"
                        )
                    )
                continue
            # READY
            if child.beats and now - child.last_beat >= t.hung_after:
                self._set(child, Event.SILENT, killed=True)
                actions.append(
                    Kill(child.name, pid, signal.SIGKILL, f"hung: no heartbeat for {t.hung_after}s")
                )
                continue
            if (
                child.beats
                and child.generation < self.generation
                and now - self.generation_since >= t.reload_deadline
            ):
                # Replaced, not killed: it still serves its requests in flight while it drains.
                reason = f"runs generation {child.generation}, not {self.generation}"
                self.retiring[pid] = Retiring(child.name, now + t.drain)
                self._set(child, Event.STALE, pid=None, restart_at=now)
                actions.append(Kill(child.name, pid, signal.SIGTERM, reason))
                actions.append(Spawn(child.name, reason))
                continue
            if child.failures and now - child.started >= t.stable_after:
                self.children[child.name] = dataclasses.replace(child, failures=0)
        return actions

    def wakeup(self) -> float:
        """The next time ``tick`` has something to do (``inf``: only events matter)."""
        t = self.timing
        times: list[float] = [r.kill_at for r in self.retiring.values() if not r.killed]
        for child in self.children.values():
            if self.stopping:
                if child.phase is Phase.STOPPING and not child.killed:
                    times.append(self.stop_deadline)
                continue
            times.extend(self._child_deadlines(child, t))
        return min(times, default=math.inf)

    def _child_deadlines(self, child: Child, t: Timing) -> Iterable[float]:
        if child.phase is Phase.WAITING:
            yield child.restart_at
        elif child.phase is Phase.STARTING:
            yield child.started + (t.start_deadline if child.beats else t.stable_after)
        elif child.phase is Phase.READY:
            if child.beats:
                yield child.last_beat + t.hung_after
                if child.generation < self.generation:
                    yield self.generation_since + t.reload_deadline
            if child.failures:
                yield child.started + t.stable_after


__all__ = [
    "LIVE",
    "TRANSITIONS",
    "Action",
    "Child",
    "Event",
    "Finish",
    "Kill",
    "Notify",
    "Phase",
    "Policy",
    "Retiring",
    "Spawn",
    "Timing",
    "backoff",
]
