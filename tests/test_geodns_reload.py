"""A reload reuses what it provably need not redo: the address map (the walk of the geo
database and everything derived from it, the overrides and the topology) while the database
file is the same file unchanged and those inputs are equal, and the answer tables while their
answers are.  A file replaced on disk, or a changed input, is walked and compiled again."""

from __future__ import annotations

import copy
import os
import re
import shutil
import struct
import weakref
from pathlib import Path
from typing import Any

import dns.name
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import geodns.responder as responder_module
from geodns.responder import Responder
from geodns.zone import Zone, name_key
from meridian.config import Config, parse_config
from meridian.geo import GeoLocator
from tests.dns_support import (
    CITY_TEST_DB,
    POP_ADDRESSES,
    addresses,
    ask,
    base_config,
    ecs_scope,
    running_server,
    write_config,
)
from tests.test_dns_core import FakeHealth

ZONE = "meridian.test"

#: Clients of MaxMind's City test database (London, Sweden, Washington, China, an override,
#: one it does not hold) and IPv6 ones.
SUBNETS = (
    "81.2.69.160/27",
    "89.160.20.112/28",
    "216.160.83.56/29",
    "175.16.199.0/24",
    "10.2.3.0/24",
    "192.0.2.0/24",
    "2001:218::/32",
    "2a02:ff40::/32",
)


def _sydney_london(database: Path) -> bytes:
    """The City test database with London (51.5142, -0.0931) moved to Sydney: the same size,
    one record different."""
    data = database.read_bytes()
    for old, new in ((51.5142, -33.87), (-0.0931, 151.21)):
        packed = struct.pack(">d", old)
        assert data.count(packed) == 1
        data = data.replace(packed, struct.pack(">d", new))
    return data


def _answers(port: int) -> list[tuple[str, list[str], int | None]]:
    out = []
    for subnet in SUBNETS:
        for rdtype in ("A", "AAAA"):
            reply = ask(port, f"api.{ZONE}", rdtype, ecs=subnet)
            out.append((str(reply.rcode()), addresses(reply), ecs_scope(reply)))
    return out


def _reused(line: str) -> bool:
    match = re.search(r"geo_database_reused=(\w+)", line)
    assert match is not None, line
    return match.group(1) == "true"


def test_a_server_reuses_an_unchanged_database_and_walks_a_replaced_one(tmp_path: Path) -> None:
    database = tmp_path / "geo.mmdb"
    shutil.copyfile(CITY_TEST_DB, database)
    config = base_config()
    config["geo"]["database"] = str(database)
    path = write_config(tmp_path / "w.yaml", config)
    london = "81.2.69.160/27"
    with running_server(path) as proc:
        before = _answers(proc.port)
        assert addresses(ask(proc.port, f"api.{ZONE}", ecs=london)) == [POP_ADDRESSES["fra"]]

        # (a) Nothing changed: nothing walked, the same answers.
        proc.reload()
        assert _reused(proc.log_has("dns_reloaded")[-1])
        assert _answers(proc.port) == before

        # (b) Another file renamed over it, with the same size and mtime: only its inode
        # tells it apart.
        stat = database.stat()
        replacement = tmp_path / "new.mmdb"
        replacement.write_bytes(_sydney_london(CITY_TEST_DB))
        os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.replace(replacement, database)
        assert database.stat().st_size == stat.st_size
        proc.reload()
        assert not _reused(proc.log_has("dns_reloaded")[-1])
        assert addresses(ask(proc.port, f"api.{ZONE}", ecs=london)) == [POP_ADDRESSES["syd"]]

        # ... and the original bytes copied back in place (same inode, same size): its mtime.
        inode = database.stat().st_ino
        shutil.copyfile(CITY_TEST_DB, database)
        assert database.stat().st_ino == inode
        proc.reload()
        assert not _reused(proc.log_has("dns_reloaded")[-1])
        assert _answers(proc.port) == before


# ------------------------------------------------------------------ in process, config changes


def _config(data: dict[str, Any]) -> Config:
    return parse_config(copy.deepcopy(data))


def _build(config: Config, previous: Responder | None, health: FakeHealth) -> Responder:
    """What a server's reload builds (``geodns.server.build_serving``, then compile)."""
    locator = GeoLocator(config.geo, config.pops[0].location)
    responder = Responder(Zone.build(config), locator, compile_inline=False, previous=previous)
    responder.install(responder.compile(health))
    return responder


def _fresh(config: Config, health: FakeHealth, monkeypatch: pytest.MonkeyPatch) -> Responder:
    """The same built with nothing to reuse (the caches it would find set aside)."""
    with monkeypatch.context() as patch:
        patch.setattr(responder_module, "_MAPS", weakref.WeakValueDictionary())
        patch.setattr(responder_module, "_last_map", [])
        return _build(config, None, health)


def _tables(responder: Responder, health: FakeHealth) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for key in sorted(responder.zone.geo_names):
        for family in (4, 6):
            table = responder.answer_table(key, family, health)
            out.append(
                (
                    key,
                    family,
                    list(table.v4_starts),
                    list(table.v4_answers),
                    list(table.v6_starts),
                    list(table.v6_answers),
                    table.keys,
                    [(s.outcome, s.addresses(family), s.ttl) for s in table.selections],
                    list(table.v4_blocks),
                )
            )
    return out


def _map_of(responder: Responder) -> list[object]:
    address_map = responder.address_map
    out: list[object] = [list(address_map.countries.v6_starts), address_map.placements]
    for key in sorted(address_map.groups, key=repr):
        group = address_map.groups[key]
        out += [key, list(group.v4_starts), bytes(group.v4_signatures)]
        out += [list(group.v6_starts), bytes(group.v6_signatures), group.signatures]
    return out


def _world() -> dict[str, Any]:
    data = base_config()
    data["geo"]["database"] = str(CITY_TEST_DB)
    return data


#: Config changes, each as (what it does to the config, whether the address map reads it).
CHANGES: dict[str, tuple[Any, bool]] = {
    "ttl": (lambda d: d["dns"].update(ttl="45s"), False),
    "pop address": (lambda d: d["pops"]["gru"].update(addresses=["127.0.1.22"]), False),
    "geo cache size": (lambda d: d["geo"].update(cache_size=1000), False),
    "override pop": (lambda d: d["geo"]["overrides"][1].update(pop="gru"), True),
    "override added": (
        lambda d: d["geo"]["overrides"].append({"network": "81.2.69.0/24", "pop": "sin"}),
        True,
    ),
    "residency": (lambda d: d["residency"]["eu-data"]["countries"].append("GB"), True),
    "default location": (
        lambda d: d["geo"].update(default_location={"lat": 1.35, "lon": 103.82}),
        True,
    ),
    "pop location": (lambda d: d["pops"]["sin"].update(location={"lat": 52.0, "lon": 0.0}), True),
}


def _applied(changes: frozenset[str]) -> dict[str, Any]:
    data = _world()
    for name in sorted(changes):
        CHANGES[name][0](data)
    return data


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(sorted(CHANGES)),
            st.frozensets(st.sampled_from(["fra", "syd", "iad", "eu-central", "us-east"])),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_a_reload_answers_as_a_fresh_build(
    steps: list[tuple[str, frozenset[str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each reload toggles one config change (and the health moves): what it reuses gives
    the tables a fresh build gives, and it reuses the map exactly when no input changed."""
    changes: frozenset[str] = frozenset()
    health = FakeHealth()
    previous = _build(_config(_applied(changes)), None, health)
    for generation, (change, down) in enumerate(steps, start=2):
        changes = changes ^ {change}
        health = FakeHealth(down=down, generation=generation)
        config = _config(_applied(changes))
        reloaded = _build(config, previous, health)
        fresh = _fresh(config, health, monkeypatch)
        assert reloaded.address_map_reused is not CHANGES[change][1]
        assert not fresh.address_map_reused
        assert _map_of(reloaded) == _map_of(fresh)
        assert _tables(reloaded, health) == _tables(fresh, health)
        previous.locator.close()
        fresh.locator.close()
        previous = reloaded
    previous.locator.close()


def test_a_changed_override_is_honoured_after_a_reload() -> None:
    data = _world()
    health = FakeHealth()
    first = _build(_config(data), None, health)
    key = name_key(dns.name.from_text(f"api.{ZONE}"))
    client = int.from_bytes(bytes([10, 2, 3, 4]), "big")  # in the 10.2.0.0/16 override

    def chosen(responder: Responder) -> tuple[str, ...]:
        table = responder.answer_table(key, 4, health)
        answer, _, _ = table.find(1, client)
        return tuple(str(a) for a in table.selections[answer].addresses(4))

    assert chosen(first) == (POP_ADDRESSES["syd"],)
    same = _build(_config(data), first, health)
    assert same.address_map_reused and same.address_map is first.address_map
    # The answer tables too: the same ranges, not relabelled again.
    for family in (4, 6):
        table = same.answer_table(key, family, health)
        assert table.v6_starts is first.answer_table(key, family, health).v6_starts
    data["geo"]["overrides"][1]["pop"] = "gru"
    changed = _build(_config(data), same, health)
    assert not changed.address_map_reused
    assert chosen(changed) == (POP_ADDRESSES["gru"],)
    for responder in (first, same, changed):
        responder.locator.close()


def test_a_map_no_responder_uses_is_freed() -> None:
    """Reuse pins no old generation: once a reload to another database has replaced it, the
    previous map is gone (the last one made is held, for the supervisor's checks)."""
    data = _world()
    health = FakeHealth()
    first = _build(_config(data), None, health)
    old = weakref.ref(first.address_map)
    data["geo"]["database"] = str(CITY_TEST_DB.with_name("GeoIP2-Country-Test.mmdb"))
    second = _build(_config(data), first, health)
    assert not second.address_map_reused
    first.locator.close()
    del first
    assert old() is None
    second.locator.close()
