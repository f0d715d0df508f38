"""The responder's answer memo: names configured alike share one selection per place, and every
reply stays byte-for-byte what the slow path renders."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

import geodns.compiled
import geodns.responder
from geodns.responder import Responder
from geodns.selection import Selection
from geodns.zone import Zone
from meridian.config import parse_config
from meridian.geo import GeoLocator
from tests.dns_support import base_config, make_query
from tests.test_dns_core import ALL_UP

LOOPBACK = ipaddress.ip_address("127.0.0.1")
#: Client subnets spread over the world (the built-in database places them apart).
SUBNETS = ("81.2.69.0/24", "1.128.0.0/24", "89.160.20.0/24", "175.16.199.0/24", "216.160.83.0/24")


def _responder(names: dict[str, Any]) -> Responder:
    data = base_config()
    data["dns"]["names"] = {**data["dns"]["names"], **names}
    config = parse_config(data)
    locator = GeoLocator(config.geo, config.pops[0].location)
    return Responder(Zone.build(config), locator)


def _wire(name: str, rdtype: str, subnet: str, ident: int) -> bytes:
    query = make_query(f"{name}.meridian.test", rdtype, ecs=subnet)
    query.id = ident
    return query.to_wire()


def _count_selects(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Selections made by the slow path (per query) and by compilation (per signature)."""
    calls: list[int] = []
    real = geodns.responder.select

    def counting(*args: Any, **kwargs: Any) -> Selection:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(geodns.responder, "select", counting)
    monkeypatch.setattr(geodns.compiled, "select", counting)
    return calls


def test_names_configured_alike_share_one_selection_per_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A generated zone (many names, one spec): the first name costs one compiled table (a
    selection per signature), every other name of the same length answers from it - and
    identically."""
    names = [f"n{i:04d}" for i in range(200)]
    responder = _responder({name: {"targets": "pops", "answers": 1} for name in names})
    selects = _count_selects(monkeypatch)
    for subnet in SUBNETS:
        responder.respond(_wire(names[0], "A", subnet, 1), LOOPBACK, tcp=False, health=ALL_UP)
    first = len(selects)
    signatures = len(next(iter(responder.address_map.groups.values())).representatives)
    assert 1 <= first <= signatures
    ident = 2
    for name in names:
        for subnet in SUBNETS:
            for rdtype in ("A", "AAAA"):  # AAAA: NODATA (no POP has IPv6), an SOA per name
                data = _wire(name, rdtype, subnet, ident)
                ident += 1
                fast = responder.respond(data, LOOPBACK, tcp=False, health=ALL_UP)
                slow = responder.respond_slow(data, LOOPBACK, tcp=False, health=ALL_UP)
                assert fast is not None and slow is not None
                assert fast.fast and fast.wire == slow.wire, (name, rdtype, subnet)
    # The slow path selects on its own (once per query above); the fast path compiled one
    # more table (AAAA: a selection per signature), none for the 199 other names.
    fast_selects = len(selects) - first - len(names) * len(SUBNETS) * 2
    assert fast_selects <= signatures
    compiled = responder.compiled
    assert compiled is not None and sum(1 for tables in compiled.tables if tables) == 1


@pytest.mark.parametrize(
    ("ordinary", "special"),
    [("hostmastex", "hostmaster"), ("www.hostmastey", "www.hostmaster")],
)
def test_names_ending_in_the_soa_rname_keep_their_own_nodata(ordinary: str, special: str) -> None:
    """A NODATA's SOA is compressed against the question: for a name ending in the SOA's RNAME
    (``hostmaster.meridian.test``) it differs from that of a same-length name configured alike,
    so the two must not share a memoized body, whichever is asked first."""
    assert len(ordinary) == len(special)
    for order in ((ordinary, special), (special, ordinary)):
        spec = {"targets": "pops", "answers": 1}
        responder = _responder({ordinary: spec, special: spec})
        bodies = {}
        for ident, name in enumerate(order, 1):
            data = _wire(name, "AAAA", SUBNETS[0], ident)
            fast = responder.respond(data, LOOPBACK, tcp=False, health=ALL_UP)
            slow = responder.respond_slow(data, LOOPBACK, tcp=False, health=ALL_UP)
            assert fast is not None and slow is not None and fast.fast
            assert fast.wire == slow.wire, name
            opt = 22  # the OPT with a /24 ECS option, last in both
            bodies[name] = fast.wire[len(data) - opt : -opt]  # the sections
        assert bodies[ordinary] != bodies[special]
