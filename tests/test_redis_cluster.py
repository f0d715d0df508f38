"""The POP's shared state on a 3-master Redis Cluster (one replica each) started on loopback:
the L2 cache, purges and health sharing unchanged; keys of one resource in one slot; MOVED
and ASK followed while a slot moves; a master killed under two real edges, its replica taking
over, the edges answering throughout (figures printed: ``pytest -s``).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.crc import key_slot
from redis.exceptions import RedisError

from edge.cache.entry import Entry, StoredResponse
from edge.cache.key import VARIANT_SEPARATOR
from edge.cache.policy import Freshness
from edge.cache.redis_l2 import RedisL2, redis_key
from meridian.config import ConfigError, HostPort, parse_config
from meridian.redis_conn import RedisConnection, RedisTarget, bounded_parser
from tests.redis_topology import (
    HOST,
    Cluster,
    TopologyPop,
    cluster,
    edge_failover,
    shares_entries_and_purges,
    shares_health,
    wait_until,
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


def test_cluster_mode_config_becomes_a_target() -> None:
    config = parse_config(
        _with_cache(
            redis_mode="cluster",
            redis_nodes=["10.0.0.1:7000", "[fd00::2]:7001"],
            redis_password="s3cret",
            redis_tls=True,
        )
    )
    cache = config.edge.cache
    assert cache.redis_nodes == (HostPort("10.0.0.1", 7000), HostPort("fd00::2", 7001))
    target = RedisTarget.from_config(cache)
    assert target is not None and target.mode == "cluster"
    assert target.nodes == (("10.0.0.1", 7000), ("fd00::2", 7001))
    assert target.display == "rediss+cluster://10.0.0.1:7000,[fd00::2]:7001"
    assert "s3cret" not in repr(target) and "s3cret" not in repr(cache)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, "t.yaml: edge.cache.redis_nodes: redis_mode cluster needs HOST:PORT of seed nodes"),
        (
            {"redis_nodes": ["r1:7000"], "redis_url": "redis://r:6379/0"},
            "t.yaml: edge.cache.redis_url: not used with redis_mode cluster: list the seed nodes"
            " in redis_nodes",
        ),
        (
            {"redis_nodes": ["r1:7000"], "redis_master": "m"},
            "t.yaml: edge.cache.redis_master: only used with redis_mode sentinel",
        ),
        (
            {"redis_nodes": ["r1:7000"], "redis_db": 3},
            "t.yaml: edge.cache.redis_db: Redis Cluster has only database 0",
        ),
        ({"redis_nodes": ["r:7000", "r:7000"]}, "t.yaml: edge.cache.redis_nodes[1]: r:7000 is"),
        ({"redis_nodes": ["r:0"]}, "t.yaml: edge.cache.redis_nodes[0]: port 0 is not a port"),
        ({"redis_nodes": ["r"]}, "t.yaml: edge.cache.redis_nodes[0]: "),
        ({"redis_nodes": "r:7000"}, "t.yaml: edge.cache.redis_nodes: expected a list"),
    ],
)
def test_bad_cluster_fields_are_named_with_the_reason(
    fields: dict[str, Any], expected: str
) -> None:
    problems = _problems(redis_mode="cluster", **fields)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_a_bad_mode_is_one_line_and_exit_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(_with_cache(redis_mode="clustered")))
    bad = subprocess.run(
        [sys.executable, "-m", "meridian.cli", "check", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        f"{broken}: edge.cache.redis_mode: must be one of standalone, sentinel, cluster,"
        " got 'clustered'"
    )


# --------------------------------------------------------------------------------------------
# Keys


def test_every_key_of_a_resource_is_in_one_slot_and_resources_spread() -> None:
    primary = b"G|https://api.example/api/v1/depth/BTC-USD?x={y}&z=}{"  # braces in the URL
    variant = primary + VARIANT_SEPARATOR + b"accept-language=fr"
    keys = [
        redis_key(NS, b"e:", primary),
        redis_key(NS, b"e:", variant),
        redis_key(NS, b"v:", primary),
        redis_key(NS, b"s:", primary),
        redis_key(NS, b"l:", variant),
    ]
    assert len({key_slot(key) for key in keys}) == 1
    slots = {key_slot(redis_key(NS, b"e:", b"G|https://h/%d" % i)) for i in range(300)}
    assert len(slots) > 250  # spread, not piled on one master
    assert {slot * 3 // 16384 for slot in slots} == {0, 1, 2}


# --------------------------------------------------------------------------------------------
# A running cluster


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with cluster(tmp_path_factory.mktemp("redis-cluster")) as running:
        yield running


def _target(deployment: Cluster) -> RedisTarget:
    return RedisTarget(mode="cluster", nodes=tuple(deployment.seeds))


def _stored(deployment: Cluster) -> set[bytes]:
    """Every ``e:`` key on every live master."""
    keys: set[bytes] = set()
    for node in deployment.nodes:
        if node.alive and node.client().info("replication")["role"] == "master":
            keys.update(node.client().scan_iter(match=NS + b"e:*", count=1000))
    return keys


@pytest.fixture
async def pop(deployment: Cluster) -> AsyncIterator[TopologyPop]:
    running = TopologyPop(_target(deployment))
    await running.start()
    try:
        yield running
    finally:
        await running.close()


async def test_entries_and_purges_are_shared_through_the_cluster(
    pop: TopologyPop, deployment: Cluster
) -> None:
    await shares_entries_and_purges(pop, lambda: _stored(deployment))


async def test_health_transitions_are_shared_through_the_cluster(deployment: Cluster) -> None:
    await shares_health(_target(deployment))


def _entry(primary: bytes, body: bytes) -> Entry:
    response = StoredResponse(
        status=200,
        reason=b"OK",
        headers=((b"content-type", b"text/plain"),),
        body=body,
        freshness=Freshness(
            response_time=time.time(),
            initial_age=0.0,
            lifetime=60.0,
            stale_while_revalidate=0.0,
            stale_if_error=0.0,
            no_stale=False,
            always_revalidate=False,
        ),
    )
    return Entry(response, key=primary, primary=primary, url=primary[2:])


def _cluster_id(deployment: Cluster, port: int) -> str:
    node = next(node for node in deployment.nodes if node.port == port)
    return str(node.client(decode_responses=True).execute_command("CLUSTER MYID"))


async def test_moved_and_ask_are_followed_while_a_slot_moves(deployment: Cluster) -> None:
    """The slot of a stored resource moves to another master under a client that is never
    told: mid-migration the old owner answers ASK, afterwards MOVED; every read still hits."""
    primary = b"G|https://api.example/api/v1/moving"
    key = redis_key(NS, b"e:", primary)
    slot = key_slot(key)
    source = deployment.master_for(key)
    masters = [
        node
        for node in deployment.nodes
        if node.alive and node.client().info("replication")["role"] == "master"
    ]
    target_node = next(node for node in masters if node is not source)
    source_id, target_id = (
        _cluster_id(deployment, source.port),
        _cluster_id(deployment, target_node.port),
    )
    l2 = RedisL2(_target(deployment), timeout=0.5, max_value=1 << 20, clock=time.time)
    try:
        assert await l2.put(_entry(primary, b"moving body"))
        assert (await l2.get(primary, ()) or (b"", None))[1] is not None

        def asking_calls() -> int:
            stats = target_node.client().info("commandstats")
            return int(stats.get("cmdstat_asking", {}).get("calls", 0))

        asked = asking_calls()
        target_node.client().execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        source.client().execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        keys = source.client().execute_command("CLUSTER GETKEYSINSLOT", slot, 100)
        source.client().execute_command(
            "MIGRATE", HOST, target_node.port, "", 0, 5000, "KEYS", *keys
        )
        found = await l2.get(primary, ())  # the source answers ASK; the target has it
        assert found is not None and found[1].body == b"moving body"
        assert asking_calls() > asked

        for node in masters:
            node.client().execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
        wait_until(lambda: deployment.master_for(key) is target_node, 10, "the slot to move")
        found = await l2.get(primary, ())  # the source answers MOVED now
        assert found is not None and found[1].body == b"moving body"
        assert await l2.purge_primary(primary) == 1
        assert await l2.get(primary, ()) is None
        assert l2.breaker.is_open is False
    finally:
        await l2.aclose()


async def test_a_reply_longer_than_the_bound_is_refused_on_every_node(deployment: Cluster) -> None:
    """A cluster's replies are bounded as one server's are (``bounded_parser``): a string over
    ``max_string`` is refused before it is read, whichever master holds it, and a pub/sub
    connection reads with the same bound."""
    seeds = deployment.seeds
    big = b"x" * 65536
    keys = [b"meridian:bound:%d" % index for index in range(24)]  # over every master's slots
    for key in keys:
        deployment.master_for(key).client().set(key, big)
    masters = {deployment.master_for(key).port for key in keys}
    assert len(masters) == 3
    connection = RedisConnection(
        RedisTarget(mode="cluster", nodes=tuple(seeds)),
        timeout=2.0,
        connect_timeout=2.0,
        max_string=4096,
    )
    try:
        await connection.prepare()
        for key in keys:
            with pytest.raises(RedisError):
                await connection.client.get(key)
        await connection.client.set(b"meridian:bound:small", b"y" * 1000)
        assert await connection.client.get(b"meridian:bound:small") == b"y" * 1000
        subscription = connection.pubsub()
        try:
            pool = subscription.pubsub.connection_pool
            assert pool.connection_kwargs["parser_class"] is bounded_parser(4096)
        finally:
            await subscription.aclose()
    finally:
        await connection.aclose()
        for key in keys:
            deployment.master_for(key).client().delete(key)


# --------------------------------------------------------------------------------------------
# A master killed


async def test_a_master_killed_under_two_edges_fails_no_request(tmp_path: Path) -> None:
    with cluster(tmp_path / "redis") as running:
        target = _target(running)
        fields = {
            "redis_mode": "cluster",
            "redis_nodes": [f"{host}:{port}" for host, port in target.nodes],
        }
        victim: dict[str, Any] = {}

        def kill() -> None:
            # The master holding the most of the edges' entries.
            counts = {}
            for node in running.nodes:
                if node.client().info("replication")["role"] == "master":
                    counts[node.port] = len(list(node.client().scan_iter(match=NS + b"e:*")))
            port = max(counts, key=lambda p: counts[p])
            master = next(node for node in running.nodes if node.port == port)
            victim["replica"] = running.replica_of(master)
            victim["held"] = counts[port]
            master.kill()

        def promoted() -> bool:
            replica = victim["replica"]
            return bool(replica.client().info("replication")["role"] == "master") and (
                running.state_ok()
            )

        figures = await edge_failover(
            tmp_path, fields, target, lambda: _stored(running), kill, promoted
        )
    print(f"\nredis cluster, master holding {victim['held']} entries SIGKILLed: {figures}")
    assert figures["failed"] == 0, figures["errors"]
    assert figures["l1_not_hit"] == 0 and figures["l1_answers"] > 100
    assert figures["redis_errors"] > 0  # L2 was degraded meanwhile, and counted
    assert figures["purges_pending"] == 0
