"""Throwaway Redis deployments on loopback for the tests: a 3-master Redis Cluster (one replica
each) and a Sentinel-watched master with a replica and three Sentinels.

Built from Debian's ``redis-server`` (and ``redis-sentinel``, else ``redis-server --sentinel``)
and ``redis-cli``.  Ports come from binding port 0 (a port taken before the server binds it
makes that server fail to start: the whole deployment is then started again on new ports).
Every process started here is stopped by its PID on exit (SIGCONT first, then SIGKILL), also
when starting fails half-way.  Failure detection is set fast (cluster node timeout 500 ms,
Sentinel ``down-after-milliseconds`` 500) so that a failover takes a second or two.

Then the scenarios both deployments go through (``tests/test_redis_cluster.py``,
``tests/test_redis_sentinel.py``): two cache instances of a POP sharing entries and purges,
two health monitors sharing transitions, and a master killed under two real edge processes
while clients keep asking (``edge_failover``, which returns the figures it measured).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import redis

from edge.cache import HttpCache, LookupKind
from edge.cache.redis_l2 import CircuitBreaker, RedisL2
from edge.cache.testing import FakeClock, free_port
from meridian.config import CacheConfig
from meridian.redis_conn import RedisTarget
from tests.edge_support import LOCATIONS, Client, Edge, Origin, processes, region, write_config
from tests.health_support import make_config, running_monitor, state_of
from tests.test_cache_redis import RULES, Monotonic, Pop, until

HOST = "127.0.0.1"
NODE_TIMEOUT_MS = 500
DOWN_AFTER_MS = 500
MASTER_NAME = "meridian"


def _executable(name: str) -> str:
    found = shutil.which(name) or f"/usr/bin/{name}"
    if not os.path.exists(found):
        raise RuntimeError(f"{name} is not installed (apt-get install -y redis-server)")
    return found


def wait_until(check: Callable[[], bool], within: float, what: str, every: float = 0.02) -> float:
    """Poll ``check`` until it holds; returns the seconds it took; RuntimeError after
    ``within`` seconds.  Exceptions from ``check`` count as "not yet"."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(Exception):
            if check():
                return time.monotonic() - started
        if time.monotonic() - started > within:
            raise RuntimeError(f"timed out after {within} s waiting for {what}")
        time.sleep(every)


class Node:
    """One ``redis-server`` (or Sentinel) process on a loopback port."""

    def __init__(self, argv: list[str], port: int, workdir: Path, name: str) -> None:
        self.port = port
        self.name = name
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "log"
        self.process = subprocess.Popen(
            argv, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def client(self, **options: object) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=2, **options)  # type: ignore[arg-type]

    def ready(self) -> bool:
        if not self.alive:
            raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
        with socket.create_connection((HOST, self.port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL by PID: the server is gone, its connections reset."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)  # a paused process must wake to die
                os.kill(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


def _server_argv(port: int, workdir: Path, *extra: str) -> list[str]:
    return [
        _executable("redis-server"),
        "--port",
        str(port),
        "--bind",
        HOST,
        "--dir",
        str(workdir),
        "--save",
        "",
        "--appendonly",
        "no",
        "--logfile",
        str(workdir / "log"),
        "--loglevel",
        "notice",
        # A replica's first sync starts at once (the default waits 5 s for more replicas).
        "--repl-diskless-sync-delay",
        "0",
        *extra,
    ]


# --------------------------------------------------------------------------------------------
# Redis Cluster


class Cluster:
    """Three masters, one replica each, slots split evenly (``redis-cli --cluster create``)."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.workdir = workdir
        self.masters = masters
        self.nodes: list[Node] = []

    @property
    def seeds(self) -> list[tuple[str, int]]:
        return [(HOST, node.port) for node in self.nodes if node.alive]

    def start(self) -> Cluster:
        for attempt in range(3):  # a port taken between bind(0) and the server's bind
            try:
                self._start(attempt)
                return self
            except RuntimeError:
                self.stop()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _start(self, attempt: int) -> None:
        for i in range(self.masters * 2):
            port, bus = free_port(), free_port()
            workdir = self.workdir / f"try{attempt}" / f"node{i}"
            argv = _server_argv(
                port,
                workdir,
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                str(bus),
                "--cluster-config-file",
                str(workdir / "nodes.conf"),
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
            )
            self.nodes.append(Node(argv, port, workdir, f"cluster node {port}"))
        for node in self.nodes:
            wait_until(node.ready, 10, f"{node.name} to answer")
        create = subprocess.run(
            [
                _executable("redis-cli"),
                "--cluster",
                "create",
                *(f"{HOST}:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout[-2000:]!r}")
        wait_until(self.healthy, 20, "the cluster to be ok with every replica in sync")

    def info(self, node: Node, section: str) -> dict[str, str]:
        text = node.client().execute_command("CLUSTER INFO" if section == "cluster" else "INFO")
        if isinstance(text, bytes):
            text = text.decode()
        if isinstance(text, dict):  # redis-py parses INFO into a dict
            return {str(k): str(v) for k, v in text.items()}
        return dict(
            line.split(":", 1) for line in str(text).splitlines() if ":" in line and line[0] != "#"
        )

    def state_ok(self) -> bool:
        """Every live node says ``cluster_state:ok``."""
        live = [node for node in self.nodes if node.alive]
        return all(self.info(node, "cluster").get("cluster_state") == "ok" for node in live)

    def healthy(self) -> bool:
        """``state_ok``, and every master has a replica in sync."""
        if not self.state_ok():
            return False
        live = [node for node in self.nodes if node.alive]
        replicas = [node for node in live if node.client().info("replication")["role"] == "slave"]
        return len(replicas) == self.masters and all(
            node.client().info("replication")["master_link_status"] == "up" for node in replicas
        )

    def master_for(self, key: bytes) -> Node:
        """The node that serves ``key``'s slot now."""
        some = next(node for node in self.nodes if node.alive)
        slot = some.client().execute_command("CLUSTER KEYSLOT", key)
        for entry in some.client().execute_command("CLUSTER SLOTS"):
            start, end, master = entry[0], entry[1], entry[2]
            if start <= slot <= end:
                port = int(master[1])
                return next(node for node in self.nodes if node.port == port)
        raise LookupError(f"no node serves slot {slot}")

    def replica_of(self, master: Node) -> Node:
        for node in self.nodes:
            if node is master or not node.alive:
                continue
            info = node.client().info("replication")
            if info["role"] == "slave" and int(info["master_port"]) == master.port:
                return node
        raise LookupError(f"no replica of {master.name}")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
        self.nodes = []


@contextlib.contextmanager
def cluster(workdir: Path) -> Iterator[Cluster]:
    deployment = Cluster(workdir)
    try:
        yield deployment.start()
    finally:
        deployment.stop()


# --------------------------------------------------------------------------------------------
# Sentinel


class SentinelGroup:
    """A master, a replica and three Sentinels (quorum 2) watching it as ``meridian``."""

    def __init__(self, workdir: Path, sentinels: int = 3) -> None:
        self.workdir = workdir
        self.count = sentinels
        self.master: Node | None = None
        self.replica: Node | None = None
        self.sentinels: list[Node] = []

    @property
    def nodes(self) -> list[tuple[str, int]]:
        return [(HOST, node.port) for node in self.sentinels]

    def start(self) -> SentinelGroup:
        for attempt in range(3):
            try:
                self._start(attempt)
                return self
            except RuntimeError:
                self.stop()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _start(self, attempt: int) -> None:
        base = self.workdir / f"try{attempt}"
        port = free_port()
        self.master = Node(_server_argv(port, base / "master"), port, base / "master", "master")
        wait_until(self.master.ready, 10, "the master to answer")
        port = free_port()
        self.replica = Node(
            _server_argv(port, base / "replica", "--replicaof", HOST, str(self.master.port)),
            port,
            base / "replica",
            "replica",
        )
        wait_until(self.replica.ready, 10, "the replica to answer")
        wait_until(
            lambda: (
                self.replica is not None
                and self.replica.client().info("replication")["master_link_status"] == "up"
            ),
            10,
            "the replica to sync",
        )
        sentinel = shutil.which("redis-sentinel")
        for i in range(self.count):
            port = free_port()
            workdir = base / f"sentinel{i}"
            workdir.mkdir(parents=True, exist_ok=True)
            conf = workdir / "sentinel.conf"  # Sentinel rewrites it: it must be writable
            conf.write_text(
                f"port {port}\nbind {HOST}\ndir {workdir}\nlogfile {workdir / 'log'}\n"
                f"sentinel monitor {MASTER_NAME} {HOST} {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} 5000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            argv = (
                [sentinel, str(conf)]
                if sentinel
                else [_executable("redis-server"), str(conf), "--sentinel"]
            )
            self.sentinels.append(Node(argv, port, workdir, f"sentinel {port}"))
        for node in self.sentinels:
            wait_until(node.ready, 10, f"{node.name} to answer")
        # Sentinels find each other through hello messages on the master (every 2 s); a
        # failover needs a majority of them to know each other, and the replica.
        wait_until(self.settled, 20, "the Sentinels to know each other and the replica")

    def _state(self, node: Node) -> dict[str, str]:
        raw = node.client(decode_responses=True).execute_command("SENTINEL", "MASTER", MASTER_NAME)
        if isinstance(raw, dict):
            return {str(k): str(v) for k, v in raw.items()}
        items = [str(item) for item in raw]
        return dict(zip(items[::2], items[1::2], strict=False))

    def settled(self) -> bool:
        for node in self.sentinels:
            state = self._state(node)
            if int(state["num-other-sentinels"]) != self.count - 1 or int(state["num-slaves"]) != 1:
                return False
        return True

    def master_port(self) -> int:
        """The master's port as the first live Sentinel sees it now."""
        node = next(node for node in self.sentinels if node.alive)
        _host, port = node.client().execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME
        )
        return int(port)

    def stop(self) -> None:
        for node in [*self.sentinels, self.master, self.replica]:
            if node is not None:
                node.kill()
        self.sentinels = []
        self.master = self.replica = None


@contextlib.contextmanager
def sentinel_group(workdir: Path) -> Iterator[SentinelGroup]:
    deployment = SentinelGroup(workdir)
    try:
        yield deployment.start()
    finally:
        deployment.stop()


# --------------------------------------------------------------------------------------------
# Scenarios


#: Redis timeout of ``TopologyPop``: its tests check what the deployment shares, not how fast.
#: The unit tests' 50 ms (``test_cache_redis.TIMEOUT``) is too short for a Cluster read on a
#: loaded CI machine (a late L2 read is a MISS, and the test failed so once).
SHARING_TIMEOUT = 1.0


class TopologyPop(Pop):
    """``tests.test_cache_redis.Pop`` (two HttpCache instances and an origin) on any target."""

    def __init__(self, target: RedisTarget) -> None:
        clock = FakeClock(time.time())
        super().__init__("redis://unused", clock, Monotonic())
        config = CacheConfig(redis_timeout=SHARING_TIMEOUT, rules=RULES, lock_timeout=2.0)
        self.caches = [
            HttpCache(
                config,
                clock=clock,
                l2=RedisL2(
                    target,
                    timeout=SHARING_TIMEOUT,
                    max_value=config.redis_max_value,
                    clock=clock,
                    instance_id=name,
                    breaker=CircuitBreaker(threshold=3, cooldown=30.0),
                ),
            )
            for name in ("edge-a", "edge-b")
        ]


async def shares_entries_and_purges(pop: Pop, stored: Callable[[], set[bytes]]) -> None:
    """A fills, B hits from L2 (plain, Vary variants, tagged); purges by URL, prefix and tag
    from A leave B's L1 (pub/sub) and Redis (``stored``: every ``e:`` key, on every node)."""
    a, b = pop.caches
    origin = pop.origin
    origin.headers = [(b"cache-control", b"max-age=60"), (b"surrogate-key", b"grp")]
    for path in (b"/api/v1/symbols", b"/api/v1/symbols/a", b"/api/v1/other"):
        assert (await pop.request(a, path))[0] == "MISS"
    origin.headers = [(b"cache-control", b"max-age=60"), (b"vary", b"accept-language")]
    for lang in (b"en", b"fr"):
        origin.body = b"in-" + lang
        await pop.request(a, b"/api/v1/lang", [(b"accept-language", lang)])
    await a.drain()
    assert len(stored()) == 5
    for path in (b"/api/v1/symbols", b"/api/v1/symbols/a", b"/api/v1/other"):
        assert (await pop.request(b, path))[0] == "HIT"  # from L2, now in B's L1 too
    for lang in (b"fr", b"en"):
        found = await pop.request(b, b"/api/v1/lang", [(b"accept-language", lang)])
        assert found == ("HIT", b"in-" + lang)
    assert origin.calls == 5 and b.metrics.l2_hits == 5

    def in_l1(cache: HttpCache, path: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> bool:
        host = b"api.example"
        found = cache.lookup(b"GET", b"https", host, path, [(b"host", host), *headers])
        return found.kind is LookupKind.HIT

    result = await a.purges.purge_url("https://api.example/api/v1/lang")
    assert result.shared == 4 and not result.queued  # both variants, their set, the Vary names
    await until(lambda: not in_l1(b, b"/api/v1/lang", ((b"accept-language", b"fr"),)))
    result = await a.purges.purge_prefix("/api/v1/symbols")
    assert result.shared == 2 and not result.queued
    await until(lambda: not in_l1(b, b"/api/v1/symbols") and not in_l1(b, b"/api/v1/symbols/a"))
    assert in_l1(b, b"/api/v1/other")
    result = await a.purges.purge_tag("grp")
    assert result.shared >= 1 and not result.queued
    await until(lambda: not in_l1(b, b"/api/v1/other"))
    assert stored() == set()
    assert (await pop.request(b, b"/api/v1/other"))[0] == "MISS"  # not refilled from Redis


async def shares_health(target: RedisTarget) -> None:
    """Two monitors of a POP: what one ejects the other follows, through ``target``."""
    url = "http://127.0.0.1:9"
    config = make_config({"r": [url, "http://127.0.0.1:10"]})
    options: dict[str, Any] = {"check_backends": False, "pop": "iad", "redis": target}
    async with (
        running_monitor(config, **options) as (a, _),
        running_monitor(config, **options) as (b, _),
    ):
        for monitor in (a, b):
            await until(lambda m=monitor: bool(m.status()["redis"]["connected"]), 10)
        for _ in range(5):
            a.report(url, False)
        await until(lambda: state_of(b, url) == "ejected", 5)
        assert b.status()["targets"][url]["reason"].startswith("peer ")


TOKEN = "purge-token-for-redis-tests"
POP_HOST = "api.meridian.test"  # one name for the POP's instances (their ports differ)


def edge_config(path: Path, origin: Origin, redis_fields: dict[str, Any]) -> Path:
    return write_config(
        path,
        {"eu-central": region(*LOCATIONS["eu-central"], [origin.url])},
        edge={
            "services": {"echo": {"regions": ["eu-central"]}},
            "routes": [{"name": "echo", "service": "echo", "path_prefix": "/"}],
            "cache": {"purge_token": TOKEN, **redis_fields},
        },
        outlier={"enabled": False},
    )


def _get(edge: Edge, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return Client(edge.port, host=POP_HOST).get(path, **headers)


def _redis_connected(edge: Edge) -> bool:
    return bool(edge.status()["health"]["redis"]["connected"])


async def _share_through_redis(
    a: Edge, b: Edge, stored: Callable[[], set[bytes]], count: int
) -> tuple[list[str], int]:
    """``count`` objects filled through ``a``, stored in Redis and read from there by ``b``
    (so in both L1s); also how many were lost on the way.

    L2 calls are best effort: on a loaded machine the first ones can outlast the 50 ms Redis
    deadline (a write skipped, a read answered from the origin), and the breaker then skips
    calls for a while.  Such a lost object is replaced by another (at most ``count`` of them),
    not taken for a failure.
    """
    shared: list[str] = []
    lost = 0
    while len(shared) < count:
        path = f"/cc/warm/{len(shared) + lost}"
        before = len(stored())
        status, _, _ = await asyncio.to_thread(_get, a, path)
        assert status == 200, path
        for _ in range(100):  # 2 s
            if len(stored()) > before:
                break
            await asyncio.sleep(0.02)
        if len(stored()) > before:
            status, headers, _ = await asyncio.to_thread(_get, b, path)
            assert status == 200, (path, headers)
            if headers["x-cache"] == "HIT":
                shared.append(path)
                continue
        lost += 1
        assert lost <= count, f"{lost} L2 writes or reads lost while warming: Redis unusable"
    return shared, lost


async def edge_failover(
    tmp: Path,
    redis_fields: dict[str, Any],
    target: RedisTarget,
    stored: Callable[[], set[bytes]],
    kill: Callable[[], None],
    promoted: Callable[[], bool],
) -> dict[str, Any]:
    """Two edges of a POP on the deployment, 25 objects in both L1s (24 served on, one
    purged during the outage), clients asking all along; the master is killed (``kill``).

    Measures: ``promoted`` (kill -> the replica serves as master, as the deployment says);
    ``l2_back`` (kill -> an object one edge filled is an L2 hit in the other); the requests
    and those that failed (any status but 200, any transport error); answers for the objects
    in L1 that were not HITs; Redis errors the edges counted; the purge's answer and when it
    reached the other edge; health sharing reconnected (both edges' /status), and a
    transition shared across the new topology by two health monitors that lived through it.
    """
    figures: dict[str, Any] = {}
    health_url = "http://127.0.0.1:9"
    health_config = make_config({"r": [health_url, "http://127.0.0.1:10"]})
    monitor_options: dict[str, Any] = {"check_backends": False, "pop": "iad", "redis": target}
    with processes() as procs:
        origin = Origin("eu-central", tmp, echo=True)
        procs.append(origin)
        origin.ready()
        config = edge_config(tmp / "edge.yaml", origin, redis_fields)
        a, b = Edge(config, "iad", tmp), Edge(config, "iad", tmp)
        procs.extend([a, b])
        a.ready()
        b.ready()
        shared, figures["warm_writes_lost"] = await _share_through_redis(a, b, stored, 25)
        warm, purged = shared[:-1], shared[-1]
        for edge in (a, b):
            await until(lambda e=edge: _redis_connected(e), 10)

        results: list[tuple[str, int, str]] = []
        errors: list[str] = []
        stop = asyncio.Event()

        async def client(worker: int) -> None:
            rng = random.Random(worker)
            base = (a, b)[worker % 2]
            timeout = aiohttp.ClientTimeout(total=10)
            async with aiohttp.ClientSession(
                headers={"Host": POP_HOST}, timeout=timeout
            ) as session:
                i = 0
                while not stop.is_set():
                    i += 1
                    fresh = i % 3 == 0
                    path = f"/cc/fresh/{worker}-{i}" if fresh else rng.choice(warm)
                    try:
                        async with session.get(base.base + path) as response:
                            await response.read()
                            kind = "fresh" if fresh else "warm"
                            results.append((kind, response.status, response.headers["X-Cache"]))
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        errors.append(repr(exc))
                    await asyncio.sleep(0.005)

        async with (
            running_monitor(health_config, **monitor_options) as (mon_a, _),
            running_monitor(health_config, **monitor_options) as (mon_b, _),
        ):
            for monitor in (mon_a, mon_b):
                await until(lambda m=monitor: bool(m.status()["redis"]["connected"]), 10)
            clients = [asyncio.create_task(client(w)) for w in range(6)]
            await asyncio.sleep(0.3)
            killed = time.monotonic()
            kill()
            await asyncio.sleep(0.05)
            status, answer = await asyncio.to_thread(
                a.purge, {"url": f"http://{POP_HOST}{purged}"}, TOKEN
            )
            assert status == 200, answer
            figures["purge_queued"] = answer["queued"]

            def since() -> float:
                return round(time.monotonic() - killed, 2)

            async def watch(name: str, check: Callable[[], bool]) -> None:
                while not await asyncio.to_thread(check):
                    assert time.monotonic() - killed < 30, f"{name}: not within 30 s"
                    await asyncio.sleep(0.02)
                figures[name] = since()

            def purge_reached_b() -> bool:
                return _get(b, purged, Cache_Control="only-if-cached")[0] == 504

            async def l2_back() -> None:
                probe = 0
                while True:
                    assert time.monotonic() - killed < 30, "L2 not back in 30 s"
                    probe += 1
                    path = f"/cc/probe/{probe}"
                    await asyncio.to_thread(_get, a, path)
                    await asyncio.sleep(0.05)
                    if (await asyncio.to_thread(_get, b, path))[1]["x-cache"] == "HIT":
                        break
                figures["l2_back_s"] = since()

            await asyncio.gather(
                watch("promoted_s", promoted),
                watch("purge_reached_b_s", purge_reached_b),
                l2_back(),
            )
            await asyncio.sleep(0.5)  # a little more traffic on the new topology
            stop.set()
            await asyncio.gather(*clients)

            for edge in (a, b):
                while not await asyncio.to_thread(_redis_connected, edge):
                    assert time.monotonic() - killed < 30, "health sharing not reconnected"
                    await asyncio.sleep(0.05)
            figures["edge_health_reconnected_s"] = since()
            for monitor in (mon_a, mon_b):
                await until(lambda m=monitor: bool(m.status()["redis"]["connected"]), 20)
            for _ in range(5):
                mon_a.report(health_url, False)
            await until(lambda: state_of(mon_b, health_url) == "ejected", 5)

        # Not refilled from Redis: the purged copy is gone there too (the origin counts 2).
        await until(lambda: not any(key.endswith(purged.encode()) for key in stored()), 10)
        _, headers, body = await asyncio.to_thread(_get, b, purged)
        assert headers["x-cache"] == "MISS" and b'"n": 2' in body, (headers, body)

        figures["requests"] = len(results) + len(errors)
        figures["failed"] = len(errors) + sum(1 for _, status, _ in results if status != 200)
        figures["errors"] = errors[:5]
        warm_answers = [x_cache for kind, _, x_cache in results if kind == "warm"]
        figures["l1_answers"] = len(warm_answers)
        figures["l1_not_hit"] = sum(1 for x_cache in warm_answers if x_cache != "HIT")
        # What the others were, so a failure says (STALE, MISS, ...).
        figures["l1_not_hit_verdicts"] = sorted({x for x in warm_answers if x != "HIT"})
        figures["redis_errors"] = sum(
            edge.metric("meridian_cache_redis_errors_total") for edge in (a, b)
        )

        # A purge whose delete failed while its slot had no master (the broadcast may have gone
        # out) stays pending and is retried with backoff, up to 1 s apart: it has to drain,
        # not merely be pending no more at the instant this looks.
        def pending() -> float:
            return sum(edge.metric("meridian_cache_purges_pending") for edge in (a, b))

        figures["purges_pending"] = await asyncio.to_thread(pending)
        while figures["purges_pending"] and time.monotonic() - killed < 30:
            await asyncio.sleep(0.1)
            figures["purges_pending"] = await asyncio.to_thread(pending)
        figures["purges_drained_s"] = since()
    return figures


__all__ = [
    "HOST",
    "MASTER_NAME",
    "Cluster",
    "Node",
    "SentinelGroup",
    "TopologyPop",
    "cluster",
    "edge_config",
    "edge_failover",
    "sentinel_group",
    "shares_entries_and_purges",
    "shares_health",
    "wait_until",
]
