"""Connections to a POP's Redis, however it is run: one server, Sentinel, or Cluster.

Everything that shares state through Redis (the cache's L2 and purges, health transitions)
connects through here, so the three deployments behave alike for it:

* ``standalone``: ``redis_url`` (``redis://``, ``rediss://``, ``unix://``), as always;
* ``sentinel``: the Sentinels in ``redis_nodes`` are asked for the current master of
  ``redis_master`` whenever a connection is opened; after a failover the old master's
  connections fail once and the next ones go to the promoted replica;
* ``cluster``: ``redis_nodes`` are seeds; redis-py's cluster client learns the slot map,
  follows ``MOVED`` and ``ASK``, and refreshes the map after a node fails.  Commands spanning
  keys must keep them in one slot: callers hash-tag such keys (``{...}``).

Pub/sub works on all three.  On a cluster a classic ``PUBLISH`` reaches every node, so a
subscriber may listen on any one: each new subscription takes the next known node in turn,
so that after a node dies the next attempt lands on a live one.

No retries here: the callers have deadlines and a fallback, and a retry would only double
the time a request waits.  Credentials never appear in ``repr``, logs or ``display``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from redis._parsers.resp2 import _AsyncRESP2Parser
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import InvalidResponse

if TYPE_CHECKING:
    from redis.asyncio.client import PubSub

    from meridian.config import CacheConfig

#: The longest string a reply may carry unless told otherwise (the purge log's entries, the
#: rate limiter's replies and health transitions are all far shorter).
MAX_REPLY_STRING = 1024 * 1024


@functools.cache
def bounded_parser(max_string: int) -> type[_AsyncRESP2Parser]:
    """redis-py's RESP2 parser, refusing a string longer than ``max_string`` before reading it.

    A Redis server (or whatever answers on its address) is as untrusted as a client: without
    this, a reply announcing ``$4000000000`` is read for as long as the peer sends, growing
    the edge's memory with it.  The refusal is a protocol error: redis-py drops that
    connection and the caller sees a Redis error (an L2 miss, a local rate-limit decision).
    """

    class BoundedParser(_AsyncRESP2Parser):
        async def _read(self, length: int) -> bytes:
            if length > max_string:
                raise InvalidResponse(f"reply string of {length} bytes (limit {max_string})")
            data: bytes = await super()._read(length)
            return data

    BoundedParser.__qualname__ = BoundedParser.__name__ = f"BoundedParser{max_string}"
    return BoundedParser


Mode = Literal["standalone", "sentinel", "cluster"]
#: A client for commands: one server (directly or the Sentinel-chosen master) or a cluster.
RedisClient = Redis | RedisCluster


def redact(url: str) -> str:
    """The URL without credentials, for logs and /status."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where the POP's Redis is and how to reach it (see the module docstring)."""

    mode: Mode = "standalone"
    url: str | None = None
    #: Sentinel: the Sentinels; cluster: seed nodes.
    nodes: tuple[tuple[str, int], ...] = ()
    #: Sentinel: the name the Sentinels monitor.
    master: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    tls: bool = False

    @classmethod
    def standalone(cls, url: str) -> RedisTarget:
        return cls(mode="standalone", url=url)

    @classmethod
    def from_config(cls, cache: CacheConfig) -> RedisTarget | None:
        """The target ``edge.cache``'s ``redis_*`` fields describe, None without Redis."""
        if cache.redis_mode == "standalone":
            return cls.standalone(cache.redis_url) if cache.redis_url else None
        if not cache.redis_nodes:
            return None  # refused by the config checks; never half-configured here
        return cls(
            mode=cache.redis_mode,
            nodes=tuple((node.host, node.port) for node in cache.redis_nodes),
            master=cache.redis_master,
            db=cache.redis_db,
            username=cache.redis_username,
            password=cache.redis_password,
            sentinel_password=cache.redis_sentinel_password,
            tls=cache.redis_tls,
        )

    @property
    def display(self) -> str:
        """A description without credentials (logs, /status)."""
        if self.mode == "standalone":
            return redact(self.url or "")
        hosts = ",".join(_hostport(host, port) for host, port in self.nodes)
        scheme = "rediss" if self.tls else "redis"
        if self.mode == "sentinel":
            return f"{scheme}+sentinel://{hosts}/{self.master}/{self.db}"
        return f"{scheme}+cluster://{hosts}"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _read_with(client: Redis, parser: type[_AsyncRESP2Parser]) -> Redis:
    """``client``, its replies read with ``parser``.  ``Redis()`` takes no parser argument;
    its pool's connection arguments do, read as each connection is made (none is yet)."""
    client.connection_pool.connection_kwargs["parser_class"] = parser
    return client


class RedisConnection:
    """A command client for a target, plus pub/sub connections on demand.

    ``timeout`` bounds every socket read (None: wait), ``connect_timeout`` every connect;
    ``pool_size`` caps the connections per server, ``max_string`` every string in a reply
    (``bounded_parser``).  Build it inside the event loop that uses it; ``aclose`` releases
    every connection (also the Sentinels').
    """

    def __init__(
        self,
        target: RedisTarget,
        *,
        timeout: float | None,
        connect_timeout: float | None,
        pool_size: int = 32,
        max_string: int = MAX_REPLY_STRING,
    ) -> None:
        self.target = target
        self._sentinel: Sentinel | None = None
        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": connect_timeout,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
        }
        # Every connection reads its replies with the bounded parser: one server's, the
        # Sentinels' and their chosen master's, a cluster's nodes' (below) and pub/sub's.
        parser = bounded_parser(max_string)
        bounded: dict[str, Any] = {"protocol": 2, "parser_class": parser}
        self._node_kwargs: dict[str, Any] = {
            **common,
            "username": target.username,
            "password": target.password,
            "ssl": target.tls,
        }
        # Instances start at different nodes, so their subscriptions spread over the cluster.
        self._rotation = itertools.count(random.randrange(1 << 16))
        self.client: RedisClient
        if target.mode == "standalone":
            assert target.url is not None
            self.client = Redis.from_url(target.url, max_connections=pool_size, **common, **bounded)
        elif target.mode == "sentinel":
            assert target.master is not None
            self._sentinel = Sentinel(
                list(target.nodes),
                sentinel_kwargs={
                    **common,
                    "password": target.sentinel_password,
                    "ssl": target.tls,
                    "protocol": 2,
                },
            )
            for sentinel in self._sentinel.sentinels:  # asked which server is the master
                _read_with(sentinel, parser)
            self.client = self._sentinel.master_for(
                target.master,
                redis_class=Redis,
                db=target.db,
                max_connections=pool_size,
                **self._node_kwargs,
                **bounded,
            )
        else:
            cluster = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                max_connections=pool_size,
                # A master down until its replica takes over uncovers its slots: the others
                # keep working meanwhile.
                require_full_coverage=False,
                protocol=2,  # RESP2, as one server's and Sentinel's: what the parser reads
                **self._node_kwargs,
            )
            # RedisCluster takes no parser argument.  Its nodes' connections are made from
            # its connection arguments (one dict, shared with its node manager: nodes found
            # later, redirections) or, for the seeds, from their own copies; none is open yet.
            cluster.connection_kwargs["parser_class"] = parser
            for seed in cluster.nodes_manager.startup_nodes.values():
                seed.connection_kwargs["parser_class"] = parser
            self.client = cluster
        self._parser = parser

    async def prepare(self) -> None:
        """Open the command connections now, rather than inside the first commands' deadlines:
        a cluster's slot map (tens of ms) and one connection to each master; Sentinel's master
        lookup and one connection to it; one connection to a single server."""
        if isinstance(self.client, RedisCluster):
            await self.client.initialize()
            await self.client.ping(target_nodes=RedisCluster.PRIMARIES)
        else:
            await self.client.ping()

    def pubsub(self) -> Subscription:
        """A new pub/sub connection that sees every ``PUBLISH`` of the deployment."""
        if isinstance(self.client, RedisCluster):
            host, port = self._next_node()
            node_client = _read_with(
                Redis(host=host, port=port, protocol=2, **self._node_kwargs), self._parser
            )
            return Subscription(node_client.pubsub(), node_client)
        return Subscription(self.client.pubsub(), None)

    def _next_node(self) -> tuple[str, int]:
        """The next cluster node in turn: the ones the client knows now, then the seeds."""
        known: list[tuple[str, int]] = []
        if isinstance(self.client, RedisCluster):
            with contextlib.suppress(Exception):  # not initialised yet: the seeds will do
                known = [(node.host, int(node.port)) for node in self.client.get_nodes()]
        candidates = list(dict.fromkeys([*known, *self.target.nodes]))
        return candidates[next(self._rotation) % len(candidates)]

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):  # closing a pool whose server died: nothing to say
            await self.client.aclose()
        if self._sentinel is not None:
            with contextlib.suppress(Exception):
                await self._sentinel.aclose()


class Subscription:
    """One pub/sub connection; ``aclose`` also closes the node client it was opened on."""

    def __init__(self, pubsub: PubSub, owner: Redis | None) -> None:
        self.pubsub = pubsub
        self._owner = owner

    async def subscribe(self, *channels: str | bytes) -> None:
        await self.pubsub.subscribe(*channels)

    async def get_message(self, wait: float) -> dict[str, Any] | None:
        """The next published message, None after ``wait`` seconds without one."""
        message: dict[str, Any] | None = await self.pubsub.get_message(
            ignore_subscribe_messages=True, timeout=wait
        )
        return message

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):  # the connection may already be gone
            await self.pubsub.aclose()
        if self._owner is not None:
            with contextlib.suppress(Exception):
                await self._owner.aclose()


__all__ = ["Mode", "RedisClient", "RedisConnection", "RedisTarget", "Subscription", "redact"]
