"""The scripted faults of ``meridian world --report``, and the timeline each one leaves.

During a fault every client keeps asking every live GeoDNS (every ``DNS_EVERY`` seconds) and
keeps fetching, over new connections and through the POP it was last answered, a path no
cache holds (each request its own query string, so each goes to an origin: idempotent GETs the
edges may retry).  An observation is *bad* when:

- a GeoDNS answers a POP the fault took out (killed, or its edge lost every region), or
- a client with a residency zone is answered outside it while a POP of its zone still serves
  (or ever, when its rule says refuse rather than fallback), or
- a request fails (no response, or a 5xx).

The timeline of a fault: the last bad answer and the first good one after it, the last failed
request and the first good one after it, how many of each the clients saw, and the time to
recovery (the later of the last bad answer and the last failed request).  All times are
seconds after the fault was injected.  :func:`summarize` is pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from meridian.health.budget import detection
from meridian.log import get_logger
from meridian.world import World

log = get_logger("world")

#: Seconds between two rounds of DNS questions (every client to every GeoDNS).
DNS_EVERY = 0.1
#: A fault's window ends once this long has passed without a bad observation.
QUIET = 2.0


@dataclass(frozen=True, slots=True)
class Observation:
    at: float
    client: str
    #: "dns <answering POP>" or "http <POP fetched through>".
    probe: str
    bad: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Timeline:
    fault: str
    what: str
    last_bad_answer: float | None
    first_good_answer: float | None
    bad_answers: int
    answers: int
    last_failed_request: float | None
    first_good_request: float | None
    failed_requests: int
    requests: int
    recovery: float
    #: Answers outside a client's residency zone that its rule did not allow.
    residency_violations: int
    #: Bad observations, first few, for the report.
    examples: tuple[str, ...] = ()


def summarize(fault: str, what: str, observed: Sequence[Observation]) -> Timeline:
    """The timeline of one fault from its observations (pure)."""
    dns = [o for o in observed if o.probe.startswith("dns")]
    http = [o for o in observed if o.probe.startswith("http")]

    def last_bad(items: list[Observation]) -> float | None:
        return max((o.at for o in items if o.bad), default=None)

    def first_good_after(items: list[Observation], after: float | None) -> float | None:
        if after is None:
            return None
        return min((o.at for o in items if not o.bad and o.at > after), default=None)

    bad_dns, bad_http = last_bad(dns), last_bad(http)
    recovery = max(x for x in (bad_dns, bad_http, 0.0) if x is not None)
    examples = tuple(f"{o.at:+.2f}s {o.client} {o.probe}: {o.detail}" for o in observed if o.bad)[
        :4
    ]
    return Timeline(
        fault,
        what,
        bad_dns,
        first_good_after(dns, bad_dns),
        sum(o.bad for o in dns),
        len(dns),
        bad_http,
        first_good_after(http, bad_http),
        sum(o.bad for o in http),
        len(http),
        recovery,
        sum(1 for o in dns if o.bad and "residency" in o.detail),
        examples,
    )


@dataclass
class Fault:
    name: str
    what: str
    inject: Callable[[], Awaitable[object]]
    restore: Callable[[], Awaitable[object]]
    #: POPs GeoDNS must stop answering.
    avoid: frozenset[str] = frozenset()
    #: POPs that cannot answer DNS any more (killed).
    silent: frozenset[str] = frozenset()
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def plan_faults(world: World) -> dict[str, Fault]:
    """The scripted faults for this world's regions and POPs."""
    plan = world.plan
    regions = [r.name for r in plan.regions]
    zoned = [c for c in plan.clients if c.zone is not None]
    pop_killed = zoned[0].nearest_pop if zoned else plan.pops[0].name
    starved = next(
        (c.nearest_pop for c in plan.clients if c.nearest_pop != pop_killed),
        plan.pops[-1].name,
    )
    killed, holed, flapping = regions[0], regions[min(1, len(regions) - 1)], regions[-1]
    period = max(1.0, plan.topology.health.interval)

    async def flap() -> None:
        for up in itertools.cycle((False, True)):
            await world.relay(f"{'up' if up else 'down'} dst={flapping}")
            await asyncio.sleep(period)

    flapper = Fault(
        "region-flapping",
        f"region {flapping} unreachable and back every {period:g}s",
        lambda: _noop(),
        lambda: _noop(),
    )

    async def start_flap() -> None:
        flapper.tasks.append(asyncio.create_task(flap()))

    async def stop_flap() -> None:
        for task in flapper.tasks:
            task.cancel()
        await asyncio.gather(*flapper.tasks, return_exceptions=True)
        flapper.tasks.clear()
        await world.relay(f"up dst={flapping}")

    flapper.inject, flapper.restore = start_flap, stop_flap
    return {
        "region-killed": Fault(
            "region-killed",
            f"origin of {killed} killed (SIGKILL), its address refuses",
            lambda: world.kill_region(killed),
            lambda: world.restore_region(killed),
        ),
        "region-blackholed": Fault(
            "region-blackholed",
            f"region {holed} black-holed: connections accepted, nothing answered",
            lambda: world.relay(f"blackhole dst={holed}"),
            lambda: world.relay(f"up dst={holed}"),
        ),
        "pop-killed": Fault(
            "pop-killed",
            f"POP {pop_killed} killed: its edge and GeoDNS (SIGKILL), its address refuses",
            lambda: world.kill_pop(pop_killed),
            lambda: world.restore_pop(pop_killed),
            frozenset({pop_killed}),
            frozenset({pop_killed}),
        ),
        "pop-regions-down": Fault(
            "pop-regions-down",
            f"every region unreachable from POP {starved} (its process up)",
            lambda: world.relay(f"down src={starved}"),
            lambda: world.relay(f"up src={starved}"),
            frozenset({starved}),
        ),
        "region-flapping": flapper,
    }


async def _noop() -> None:
    return None


#: Every fault, in the order ``--report`` runs them.
FAULTS = ("region-killed", "region-blackholed", "pop-killed", "pop-regions-down", "region-flapping")


async def observe(world: World, fault: Fault, window: float) -> Timeline:
    """Inject ``fault``, watch for ``window`` seconds and then until ``QUIET`` without a bad
    observation (at most three windows), restore it; the timeline."""
    plan = world.plan
    observed: list[Observation] = []
    residency = {p.name: p.residency for p in plan.pops}
    last_answer = {c.name: c.nearest_pop for c in plan.clients}
    counter = itertools.count()
    t0 = time.monotonic()
    injected = False

    def now() -> float:
        return time.monotonic() - t0

    def judge(client_name: str, landed: str | None) -> tuple[bool, str]:
        client = plan.client(client_name)
        if landed is None:
            return True, "no address in the answer"
        if injected and landed in fault.avoid:
            return True, f"answered {landed}, which the fault took out"
        if client.zone is not None and residency.get(landed) != client.zone:
            serving = [
                p
                for p, zone in residency.items()
                if zone == client.zone and not (injected and p in fault.avoid)
            ]
            if serving or not client.fallback:
                return True, f"answered {landed} outside residency zone {client.zone}"
        return False, f"answered {landed}"

    running = True

    async def ask_round() -> None:
        while running:
            pops = [p for p in world.live_pops() if not (injected and p in fault.silent)]
            for client in plan.clients:
                found = await asyncio.gather(*(world.ask(client.name, p) for p in pops))
                for pop, (landed, answer) in zip(pops, found, strict=True):
                    bad, detail = judge(client.name, landed)
                    if answer.error:
                        bad, detail = True, answer.error
                    elif landed is None:
                        detail += f" (rcode {answer.rcode})"
                    observed.append(Observation(now(), client.name, f"dns {pop}", bad, detail))
                    if landed is not None:
                        last_answer[client.name] = landed
            await asyncio.sleep(DNS_EVERY)

    async def load(client_name: str) -> None:
        base = plan.section.path
        while running:
            pop = last_answer[client_name]
            path = f"{base}?world={next(counter)}"
            result = await world.fetch_via_pop(client_name, pop, path)
            detail = f"{result.status or result.error} via {pop}"
            bad = not result.ok or (result.status or 0) >= 500
            observed.append(Observation(now(), client_name, f"http {pop}", bad, detail))
            if bad:
                await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(ask_round())]
    tasks += [asyncio.create_task(load(c.name)) for c in plan.clients]
    try:
        await asyncio.sleep(1.0)  # a baseline before the fault
        observed.clear()
        t0 = time.monotonic()
        await fault.inject()
        injected = True
        log.info("world_fault_injected", fault=fault.name)
        end = window
        while now() < min(end, 3 * window):
            await asyncio.sleep(0.2)
            bad = [o.at for o in observed if o.bad]
            end = max(window, (max(bad) if bad else 0.0) + QUIET)
    finally:
        # The loops see the flag at their next turn; cancelling is the backstop (a
        # cancellation can be lost in 3.11's wait_for when its inner future completes).
        running = False
        _, late = await asyncio.wait(tasks, timeout=6.0)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=2.0)
    log.info("world_fault_watched", fault=fault.name, observations=len(observed))
    await fault.restore()
    log.info("world_fault_restored", fault=fault.name)
    return summarize(fault.name, fault.what, list(observed))


async def run_faults(
    world: World, names: Sequence[str], *, print_progress: bool = False
) -> list[Timeline]:
    """Each fault in turn, the world restored and converged between them."""
    faults = plan_faults(world)
    found = detection(world.plan.topology.health)
    window = found.worst * 2 + 2.0
    timelines: list[Timeline] = []
    for name in names:
        fault = faults[name]
        if print_progress:
            print(f"  fault {name}: {fault.what} (watching >= {window:.0f}s)", flush=True)
        timelines.append(await observe(world, fault, window))
        with contextlib.suppress(TimeoutError):
            await world.converge(within=window * 2)
    return timelines


def budgets(world: World) -> dict[str, float]:
    """Per fault that GeoDNS must route around: the detection budget at the world's settings
    (``geodns.budget``'s two paths: the POP's process gone, its edge's regions gone)."""
    found = detection(world.plan.topology.health)
    return {"pop-killed": found.worst, "pop-regions-down": found.worst + found.refused}


def format_timeline(timelines: Sequence[Timeline], budget: dict[str, float] | None = None) -> str:
    def at(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [
        f"{'fault':<19}{'last bad':>9}{'first ok':>9}{'bad/asked':>12}"
        f"{'last fail':>10}{'first ok':>9}{'failed/sent':>13}{'recovery':>9}",
        f"{'':<19}{'answer':>9}{'answer':>9}{'':>12}{'request':>10}{'request':>9}{'':>13}",
    ]
    for t in timelines:
        lines.append(
            f"{t.fault:<19}{at(t.last_bad_answer):>9}{at(t.first_good_answer):>9}"
            f"{f'{t.bad_answers}/{t.answers}':>12}{at(t.last_failed_request):>10}"
            f"{at(t.first_good_request):>9}{f'{t.failed_requests}/{t.requests}':>13}"
            f"{t.recovery:>9.2f}" + _verdict(t, (budget or {}).get(t.fault))
        )
    lines.append("")
    for t in timelines:
        lines.append(f"{t.fault}: {t.what}")
        if t.residency_violations:
            lines.append(f"  RESIDENCY: {t.residency_violations} answer(s) outside the zone")
        lines.extend(f"  e.g. {example}" for example in t.examples)
    return "\n".join(lines)


def _verdict(timeline: Timeline, budget: float | None) -> str:
    if budget is None:
        return ""
    last = timeline.last_bad_answer or 0.0
    verdict = "within" if last <= budget else "OVER"
    return f"  answers {verdict} budget {budget:.1f}"


__all__ = [
    "FAULTS",
    "Fault",
    "Observation",
    "Timeline",
    "budgets",
    "format_timeline",
    "observe",
    "plan_faults",
    "run_faults",
    "summarize",
]
