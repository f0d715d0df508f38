"""What a purge deletes from the POP's Redis (the L2 half of a purge; ``redis_broadcast`` is
the half that reaches the other instances).

* ``primary``: the resource's ``e:`` key, its ``v:`` Vary names, its ``s:`` set of variant
  keys and every variant it names;
* ``tag``: every key in the ``t:`` set of the surrogate key, and the set (SMEMBERS + DEL,
  O(tagged));
* ``url_prefix`` / ``path_prefix``: a SCAN of the whole keyspace (``SCAN MATCH
  e:{????????????????}G|<prefix>*``, on every master of a cluster): O(keys in Redis), a few
  hundred ms per million keys, in batches that do not block Redis;
* ``soft_*``: nothing: instances ignore copies received before it (``Purges.covers``) and the
  one refresh it causes overwrites them.

Every purge runs under ``admin_timeout`` rather than the per-request deadline, and deletes key
by key, pipelined: a cluster splits a multi-key DEL per slot and refuses it with TRYAGAIN while
the slot migrates; single-key DELs follow ASK instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, cast

from meridian.redis_conn import RedisClient

from .key import VARIANT_SEPARATOR
from .redis_codec import TAG_GLOB, glob_escape, redis_key
from .redis_guard import Guard, Skipped

_DELETE_BATCH: Final = 500


class RedisPurger:
    """Deletes what a purge covers from Redis (module docstring); every method returns the
    keys deleted, or ``SKIPPED`` when Redis was skipped or failed."""

    def __init__(
        self, client: RedisClient, namespace: bytes, guard: Guard, admin_timeout: float
    ) -> None:
        self._redis = client
        self._ns = namespace
        self._guard = guard
        self.admin_timeout = admin_timeout

    def _key(self, kind: bytes, raw: bytes) -> bytes:
        return redis_key(self._ns, kind, raw)

    async def purge(self, kind: str, value: bytes, force: bool = False) -> int | Skipped:
        if kind.startswith("soft_"):
            return 0
        if kind == "primary":
            return await self.primary(value, force)
        if kind == "tag":
            return await self.tag(value.decode("utf-8"), force)
        if kind == "url_prefix":
            return await self.url_prefix(value, force)
        if kind == "path_prefix":
            return await self.path_prefix(value, force)
        raise ValueError(f"unknown purge kind {kind!r}")

    async def primary(self, primary: bytes, force: bool = False) -> int | Skipped:
        """Every stored variant of a resource."""

        async def purge() -> int:
            variants = cast("set[bytes]", await self._redis.smembers(self._key(b"s:", primary)))
            keys = [self._key(b"e:", primary), self._key(b"v:", primary)]
            keys.append(self._key(b"s:", primary))
            keys.extend(self._key(b"e:", k) for k in variants)
            return await self._delete_batched(keys)

        return await self._guard.call("purge", purge, self.admin_timeout, force=force)

    async def tag(self, tag: str, force: bool = False) -> int | Skipped:
        async def purge() -> int:
            tag_key = self._key(b"t:", tag.encode())
            members = cast("set[bytes]", await self._redis.smembers(tag_key))
            return await self._delete_batched([self._key(b"e:", k) for k in members] + [tag_key])

        return await self._guard.call("purge", purge, self.admin_timeout, force=force)

    async def url_prefix(self, prefix: bytes, force: bool = False) -> int | Skipped:
        """Responses whose URL starts with ``prefix`` (``https://host/path``)."""
        pattern = self._ns + b"e:" + TAG_GLOB + b"G|" + glob_escape(prefix) + b"*"
        return await self._scan_delete(pattern, lambda url: url.startswith(prefix), force)

    async def path_prefix(self, prefix: bytes, force: bool = False) -> int | Skipped:
        """Responses whose path, on any host, starts with ``prefix``."""
        pattern = self._ns + b"e:" + TAG_GLOB + b"G|*://*" + glob_escape(prefix) + b"*"

        def matches(url: bytes) -> bool:
            start = url.find(b"/", url.find(b"://") + 3)
            return start != -1 and url.startswith(prefix, start)

        return await self._scan_delete(pattern, matches, force)

    async def _scan_delete(
        self, pattern: bytes, matches: Callable[[bytes], bool], force: bool
    ) -> int | Skipped:
        skip = len(self._ns) + len(b"e:") + len(TAG_GLOB) + len(b"G|")

        async def purge() -> int:
            doomed: list[bytes] = []
            async for key in self._redis.scan_iter(match=pattern, count=1000):
                url = bytes(key)[skip:].split(VARIANT_SEPARATOR, 1)[0]
                if matches(url):  # the glob's * may span "/" and over-match
                    doomed.append(key)
            return await self._delete_batched(doomed)

        return await self._guard.call("purge", purge, self.admin_timeout, force=force)

    async def _delete_batched(self, keys: Sequence[bytes]) -> int:
        """DEL per key, pipelined (see the module docstring)."""
        deleted = 0
        for start in range(0, len(keys), _DELETE_BATCH):
            pipe = self._redis.pipeline(transaction=False)
            for key in keys[start : start + _DELETE_BATCH]:
                pipe.delete(key)
            deleted += sum(int(n) for n in await pipe.execute())
        return deleted


__all__ = ["RedisPurger"]
