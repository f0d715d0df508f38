"""One world, end to end: 3 origin regions, 5 POPs (edge + GeoDNS each, on their own loopback
addresses), clients in BR, DE, US, SG and AU, the WAN as a delaying relay; every process
started by the test through ``meridian world``'s own code and stopped by PID.

Health checks every 1 s (fast 0.5 s, fall 2) so that the faults settle in seconds; the budgets
asserted are the ones GeoDNS exports for these settings (``geodns.budget``)."""

from __future__ import annotations

import asyncio

import pytest

from geodns.budget import failover_budget
from geodns.zone import Zone
from meridian.world import World, load_plan
from meridian.world_faults import Timeline, observe, plan_faults
from meridian.world_plan import WorldPlan

pytestmark = pytest.mark.world

#: The timeout must cover a check over a new connection on the longest WAN link (gru to
#: ap-southeast: two round trips of 160 ms one way), or far regions look down.
TEST_HEALTH = {
    "interval": "1s",
    "fast_interval": "500ms",
    "timeout": "1s",
    "fall": 2,
    "rise": 1,
    "jitter": 0.1,
}
TTL = 5.0


def budget_of(plan: WorldPlan) -> float:
    geo = next(g for g in Zone.build(plan.topology).geo_names.values() if g.spec.name == "api")
    return failover_budget(plan.topology, geo).seconds


def no_residency_violation(timeline: Timeline) -> None:
    assert timeline.residency_violations == 0, timeline.examples


def test_one_world_routes_fails_over_and_keeps_eu_clients_in_the_eu() -> None:
    plan = load_plan(None, health=TEST_HEALTH, ttl=TTL)
    assert [c.name for c in plan.clients] == ["BR", "DE", "US", "SG", "AU"]
    assert len(plan.regions) == 3 and len(plan.pops) == 5
    budget = budget_of(plan)
    window = 4.0
    world = World(plan)

    async def scenario() -> list[Timeline]:
        await world.start()
        answers = await world.converge(within=20.0)
        # Each client's answer, from every GeoDNS, is its nearest POP (DE: nearest in the EU).
        for client in plan.clients:
            assert set(answers[client.name].values()) == {client.nearest_pop}, answers
        assert {c.name: c.nearest_pop for c in plan.clients} == {
            "BR": "gru",
            "DE": "fra",
            "US": "iad",
            "SG": "sin",
            "AU": "syd",
        }
        faults = plan_faults(world)
        timelines = []
        for name in ("region-killed", "pop-killed", "pop-regions-down"):
            timelines.append(await observe(world, faults[name], window))
            await world.converge(within=10.0)
        return timelines

    try:
        killed_region, killed_pop, starved_pop = asyncio.run(scenario())
    finally:
        world.stop()
    for timeline in (killed_region, killed_pop, starved_pop):
        print(timeline)
        no_residency_violation(timeline)

    # A region killed under load: the edges retry elsewhere, no client sees a failure.
    assert killed_region.requests > 50
    assert killed_region.failed_requests == 0, killed_region.examples
    assert killed_region.bad_answers == 0, killed_region.examples

    # A POP killed: it was being answered (the fault was real), and every GeoDNS stopped
    # answering it within the budget; then never again while the window lasted.
    assert killed_pop.bad_answers > 0 and killed_pop.last_bad_answer is not None
    assert killed_pop.last_bad_answer <= budget, (killed_pop.last_bad_answer, budget)
    assert killed_pop.first_good_answer is not None

    # A POP whose regions are all down (its processes up) is not answered once detected.
    assert starved_pop.last_bad_answer is not None
    assert starved_pop.last_bad_answer <= budget, (starved_pop.last_bad_answer, budget)
    assert starved_pop.first_good_answer is not None
