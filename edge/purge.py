"""The cache purge endpoint of the admin listener.

    POST /purge        body: {"url": "http://host/path?q"} | {"prefix": "/api/v1/"} |
                             {"prefix": "http://host/api/"} | {"tag": "ticker"}
                       (each key may also be a list; several keys may be combined)
    PURGE /purge?url=...&prefix=...&tag=...      the same from the query string
    {"soft": true} (or ?soft=1) with any of them   soft purge: mark stale, do not remove

``Authorization: Bearer <edge.cache.purge_token>`` is required: none or another scheme is
answered 401 (with ``WWW-Authenticate: Bearer``), a wrong token 403, and with no token
configured every purge is 403 (purging is off).  A purge clears this process's L1, the shared
Redis L2, and, through the cache's pub/sub channel, the L1 of the POP's other instances.
With ``--workers N`` the admin worker also has every other worker purge its own L1 (through
its private socket, ``meridian.workers``), with or without Redis, before it answers.
The answer is JSON: how many entries went locally (all workers together; per worker in
``workers``, with ``unreached`` the workers that did not answer) and in Redis, whether it
was broadcast, and ``queued``: true when Redis did not take it now (stalled or down).  A
queued purge is not lost: the cache retries its Redis half (delete from L2, broadcast) with
backoff until Redis takes it, and meanwhile never reads back from L2 what it covers.

A soft purge (Fastly's, Varnish Enterprise's) marks what it covers stale instead: it is served
within its stale-while-revalidate window while one refresh runs (or revalidated first, one
coalesced request), so purging a hot key does not stampede the origin.  ``local`` then counts
entries marked stale; Redis keeps its copies (``shared`` is 0) but every instance is told, and
none takes a copy from before the purge for fresh.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from edge.cache import HttpCache, PurgeResult
from meridian.log import get_logger
from meridian.workers import WorkerPeers

log = get_logger("edge")

_KINDS = ("url", "prefix", "tag")


def _json(status: int, document: dict[str, Any], **headers: str) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(document, separators=(",", ":")),
        content_type="application/json",
        headers=headers,
    )


class PurgeEndpoint:
    """``POST /purge`` and ``PURGE /purge`` on an aiohttp application; with ``peers`` (worker
    0 of ``--workers N``) every purge also reaches the other workers' L1."""

    def __init__(self, cache: Callable[[], HttpCache], peers: WorkerPeers | None = None) -> None:
        self._cache = cache
        self._peers = peers

    def install(self, app: web.Application) -> None:
        app.router.add_route("POST", "/purge", self.handle)
        app.router.add_route("PURGE", "/purge", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        cache = self._cache()
        denied = self._authorise(request, cache)
        if denied is not None:
            return denied
        try:
            targets, soft = await self._targets(request)
        except ValueError as exc:
            return _json(400, {"error": "bad_request", "reason": str(exc)})
        local = shared = 0
        propagated = True
        queued = False
        done: list[dict[str, str]] = []
        applied: list[tuple[str, bytes]] = []
        failure: web.Response | None = None
        for kind, value in targets:
            try:
                result = await self._purge(cache, kind, value, soft)
            except ValueError as exc:
                failure = _json(400, {"error": "bad_request", "reason": str(exc), "done": done})
                break
            local += result.local
            shared += result.shared
            propagated = propagated and result.propagated
            queued = queued or result.queued
            done.append({kind: value})
            applied.append((result.kind, result.value))
        document: dict[str, Any] = {
            "purged": done,
            "local": local,
            "shared": shared,
            "propagated": propagated and cache.l2 is not None,
            "queued": queued,
            "soft": soft,
        }
        if self._peers is not None and applied:
            # What this worker purged, the others purge too (before answering, also when a
            # later target was refused: the ones done stay done everywhere).
            removed, unreached = await self._peers.purge(applied)
            document["workers"] = {str(self._peers.slot): local} | {
                str(slot): count for slot, count in sorted(removed.items())
            }
            document["unreached"] = unreached
            document["local"] = local = local + sum(removed.values())
        if failure is not None:
            return failure
        log.info(
            "cache_purged", targets=len(done), local=local, shared=shared, queued=queued, soft=soft
        )
        return _json(200, document)

    @staticmethod
    def _authorise(request: web.Request, cache: HttpCache) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _json(
                401,
                {"error": "unauthorized", "reason": "Authorization: Bearer <purge token> needed"},
                **{"WWW-Authenticate": 'Bearer realm="meridian-purge"'},
            )
        if not cache.check_purge_token(token.strip()):
            reason = "purging is disabled" if not cache.config.purge_token else "wrong token"
            return _json(403, {"error": "forbidden", "reason": reason})
        return None

    @staticmethod
    async def _targets(request: web.Request) -> tuple[list[tuple[str, str]], bool]:
        found: list[tuple[str, str]] = []
        for kind in _KINDS:
            found.extend((kind, value) for value in request.query.getall(kind, []))
        soft_query = request.query.get("soft", "0").lower()
        if soft_query not in ("0", "1", "true", "false"):
            raise ValueError("soft must be 0, 1, true or false")
        soft = soft_query in ("1", "true")
        if request.method == "POST" and request.can_read_body:
            try:
                document = json.loads(await request.read() or b"{}")
            except ValueError:
                raise ValueError("body must be JSON") from None
            if not isinstance(document, dict):
                raise ValueError("body must be a JSON object")
            unknown = set(document) - set(_KINDS) - {"soft"}
            if unknown:
                raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
            if not isinstance(document.get("soft", False), bool):
                raise ValueError("soft must be true or false")
            soft = soft or document.get("soft", False) is True
            for kind in _KINDS:
                values = document.get(kind, [])
                values = [values] if isinstance(values, str) else values
                if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                    raise ValueError(f"{kind} must be a string or a list of strings")
                found.extend((kind, value) for value in values)
        if not found:
            raise ValueError("nothing to purge: give url, prefix or tag")
        for kind, value in found:
            if not value:
                raise ValueError(f"empty {kind}")
            if kind == "url" and "://" not in value:
                raise ValueError(f"url must be absolute (http://host/path): {value!r}")
        return found, soft

    @staticmethod
    async def _purge(cache: HttpCache, kind: str, value: str, soft: bool) -> PurgeResult:
        if kind == "url":
            return await cache.purges.purge_url(value, soft=soft)
        if kind == "prefix":
            return await cache.purges.purge_prefix(value, soft=soft)
        return await cache.purges.purge_tag(value, soft=soft)


__all__ = ["PurgeEndpoint"]
