"""The POP's shared state on a Sentinel-watched master (one replica, three Sentinels, quorum 2)
started on loopback: the L2 cache, purges and health sharing unchanged; the master killed
under two real edges, the replica promoted, the edges answering throughout (figures printed:
``pytest -s``).  Also the checks on the ``redis_*`` fields of standalone and Sentinel configs.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.exceptions import RedisError

from edge.cache.testing import huge_replier
from meridian.config import ConfigError, parse_config
from meridian.redis_conn import RedisConnection, RedisTarget
from tests.redis_topology import (
    MASTER_NAME,
    SentinelGroup,
    TopologyPop,
    edge_failover,
    sentinel_group,
    shares_entries_and_purges,
    shares_health,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "demo.yaml"
NS = b"meridian:cache:"

# --------------------------------------------------------------------------------------------
# Config


def _with_cache(**fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = copy.deepcopy(yaml.safe_load(DEMO.read_text()))
    cache = data["edge"].setdefault("cache", {})
    cache.pop("redis_url", None)
    cache.update(fields)
    return data


def _problems(**fields: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(_with_cache(**fields), "t.yaml")
    return info.value.problems


def test_sentinel_mode_config_becomes_a_target() -> None:
    config = parse_config(
        _with_cache(
            redis_mode="sentinel",
            redis_nodes=["s1:26379", "s2:26379", "s3:26379"],
            redis_master="meridian-iad",
            redis_db=2,
            redis_username="edge",
            redis_password="s3cret",
            redis_sentinel_password="s3ntinel",
        )
    )
    target = RedisTarget.from_config(config.edge.cache)
    assert target is not None
    assert (target.mode, target.master, target.db, target.username) == (
        "sentinel",
        "meridian-iad",
        2,
        "edge",
    )
    assert target.nodes == (("s1", 26379), ("s2", 26379), ("s3", 26379))
    assert target.display == "redis+sentinel://s1:26379,s2:26379,s3:26379/meridian-iad/2"
    for secret in ("s3cret", "s3ntinel"):
        assert secret not in repr(target) and secret not in repr(config.edge.cache)


def test_standalone_stays_as_it_was() -> None:
    url = "redis://:pw@r.example:6379/1"
    target = RedisTarget.from_config(parse_config(_with_cache(redis_url=url)).edge.cache)
    assert target == RedisTarget.standalone(url)
    assert target is not None and target.display == "redis://r.example:6379/1"
    assert RedisTarget.from_config(parse_config(_with_cache()).edge.cache) is None


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"redis_mode": "sentinel", "redis_master": "m"},
            [
                "edge.cache.redis_nodes: redis_mode sentinel needs HOST:PORT of the Sentinels"
                " (at least one)"
            ],
        ),
        (
            {"redis_mode": "sentinel", "redis_nodes": ["s:26379"]},
            ["edge.cache.redis_master: redis_mode sentinel needs the name the Sentinels monitor"],
        ),
        (
            {
                "redis_mode": "sentinel",
                "redis_nodes": ["s:26379"],
                "redis_master": "m",
                "redis_url": "redis://r:6379/0",
            },
            [
                "edge.cache.redis_url: not used with redis_mode sentinel: list the Sentinels"
                " in redis_nodes"
            ],
        ),
        (
            {
                "redis_mode": "sentinel",
                "redis_nodes": ["s:26379"],
                "redis_master": "m",
                "redis_db": -1,
            },
            ["edge.cache.redis_db: must not be negative"],
        ),
        (
            {"redis_url": "redis://r:6379/0", "redis_nodes": ["s:26379"], "redis_master": "m"},
            [
                "edge.cache.redis_nodes: only used with redis_mode sentinel or cluster"
                " (standalone: put it in redis_url)",
                "edge.cache.redis_master: only used with redis_mode sentinel or cluster"
                " (standalone: put it in redis_url)",
            ],
        ),
        (
            {"redis_url": "http://r:6379/0"},
            ["edge.cache.redis_url: must start with redis://, rediss:// or unix://"],
        ),
        (
            {"redis_mode": "Sentinel"},
            ["edge.cache.redis_mode: must be one of standalone, sentinel, cluster, got 'Sentinel'"],
        ),
        (
            {"redis_mode": "sentinel", "redis_nodes": ["s:26379"], "redis_master": ""},
            ["edge.cache.redis_master: expected a non-empty string, got the string ''"],
        ),
    ],
)
def test_bad_sentinel_and_standalone_fields_are_named_with_the_reason(
    fields: dict[str, Any], expected: list[str]
) -> None:
    assert _problems(**fields) == [f"t.yaml: {line}" for line in expected]


# --------------------------------------------------------------------------------------------
# A running Sentinel group


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    with sentinel_group(tmp_path_factory.mktemp("redis-sentinel")) as running:
        yield running


def _target(deployment: SentinelGroup) -> RedisTarget:
    return RedisTarget(mode="sentinel", nodes=tuple(deployment.nodes), master=MASTER_NAME)


def _stored(deployment: SentinelGroup) -> set[bytes]:
    """Every ``e:`` key on the master the Sentinels name now."""
    port = deployment.master_port()
    node = next(
        node for node in (deployment.master, deployment.replica) if node and node.port == port
    )
    return set(node.client().scan_iter(match=NS + b"e:*", count=1000))


@pytest.fixture
async def pop(deployment: SentinelGroup) -> AsyncIterator[TopologyPop]:
    running = TopologyPop(_target(deployment))
    await running.start()
    try:
        yield running
    finally:
        await running.close()


async def test_entries_and_purges_are_shared_through_sentinel(
    pop: TopologyPop, deployment: SentinelGroup
) -> None:
    await shares_entries_and_purges(pop, lambda: _stored(deployment))


async def test_health_transitions_are_shared_through_sentinel(deployment: SentinelGroup) -> None:
    await shares_health(_target(deployment))


# --------------------------------------------------------------------------------------------
# The master killed


async def test_the_master_killed_under_two_edges_fails_no_request(tmp_path: Path) -> None:
    with sentinel_group(tmp_path / "redis") as running:
        assert running.master is not None and running.replica is not None
        master, replica = running.master, running.replica
        fields = {
            "redis_mode": "sentinel",
            "redis_nodes": [f"{host}:{port}" for host, port in running.nodes],
            "redis_master": MASTER_NAME,
        }

        def promoted() -> bool:
            return running.master_port() == replica.port and (
                replica.client().info("replication")["role"] == "master"
            )

        figures = await edge_failover(
            tmp_path, fields, _target(running), lambda: _stored(running), master.kill, promoted
        )
    print(f"\nredis sentinel, master SIGKILLed: {figures}")
    assert figures["failed"] == 0, figures["errors"]
    assert figures["l1_not_hit"] == 0 and figures["l1_answers"] > 100
    assert figures["redis_errors"] > 0  # L2 was degraded meanwhile, and counted
    assert figures["purges_pending"] == 0


async def test_a_sentinel_answering_a_huge_string_is_refused_before_it_is_read() -> None:
    """A Sentinel is as untrusted as the master it names: a reply announcing a 4 GB string
    (sent for as long as the edge reads) fails the master lookup at once, not into memory."""
    async with huge_replier(b"*2\r\n") as hostile:
        connection = RedisConnection(
            RedisTarget(mode="sentinel", nodes=(("127.0.0.1", hostile.port),), master="mymaster"),
            timeout=1.0,
            connect_timeout=1.0,
            max_string=1 << 20,
        )
        try:
            with pytest.raises(RedisError):
                await connection.prepare()
            assert hostile.sent < 8 << 20  # refused on the length line, not after the string
        finally:
            await connection.aclose()
