"""One admin view of ``--workers N`` (the edge's and GeoDNS's): every worker's metrics on
``/metrics``, every worker's status in ``/status``, and, for the edge, purges in every L1.

Each worker process has its own registry (and, in the edge, its own L1 cache); the public admin
listener is served by worker 0 only.  So that it speaks for the whole process group, every
worker also serves a private admin API on a Unix socket in a directory only its user can enter
(``WorkerSockets``: ``<dir>/worker-<slot>.sock``, made by the supervisor, mode 0700):

    GET  /metrics        the worker's own registry, Prometheus text
    GET  /status         a short JSON status (the edge: pid, connections, requests in flight,
                         cache; GeoDNS: pid and answers)
    POST /purge/local    {"targets": [[kind, value], ...]}: purge this worker's L1 (edge only)

and worker 0 (``WorkerPeers``) asks the others:

* ``/metrics``: worker 0 scrapes its siblings concurrently (``SCRAPE_TIMEOUT`` each), parses
  every worker's text with prometheus_client's parser, and renders one exposition in which
  each family appears once and each sample carries ``worker="<slot>"``, plus
  ``meridian_edge_worker_up{worker}`` (``meridian_dns_worker_up`` for GeoDNS; 0 for a sibling
  that did not answer: restarting, or stuck).  ``sum without (worker) (...)`` gives the
  process group's figures.
* purges: after its own purge (L1, and Redis with the broadcast when configured), worker 0
  sends the normalised targets to every sibling's ``/purge/local``; the answer counts what
  each worker removed and names the workers that could not be reached (a worker that is
  restarting has an empty L1; a stuck one is logged).

Why not prometheus_client's multiprocess mode: it aggregates only the values of its own
metric classes (kept in mmap'd files), and the request path's metrics are plain integers in
custom collectors (a labelled Counter costs microseconds per request; see ``edge.admin``), as
are the cache's and the compressor's.  Scraping the workers keeps every collector as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from meridian.log import get_logger

log = get_logger("meridian.workers")
#: The gauge saying which workers answered a scrape (``WorkerPeers``' default: the edge's).
EDGE_WORKER_UP = "meridian_edge_worker_up"

#: Seconds worker 0 waits for a sibling's answer (metrics, purge, status).
SCRAPE_TIMEOUT = 2.0
#: Purge kinds a sibling accepts (``Purges.purge_local``), each also soft (``soft_tag``:
#: mark stale, ``edge.cache.SOFT_PURGE``).
_HARD_PURGE_KINDS = frozenset({"primary", "url_prefix", "path_prefix", "tag"})
PURGE_KINDS = _HARD_PURGE_KINDS | {"soft_" + kind for kind in _HARD_PURGE_KINDS}


class WorkerSockets:
    """Where each worker's private admin socket lives."""

    def __init__(self, directory: str, workers: int) -> None:
        self.directory = directory
        self.workers = workers

    def path(self, slot: int) -> str:
        return os.path.join(self.directory, f"worker-{slot}.sock")

    def siblings(self, slot: int) -> list[int]:
        return [other for other in range(self.workers) if other != slot]

    def bind(self, slot: int) -> socket.socket:
        """The worker's listening socket (a stale one from a dead predecessor is replaced)."""
        path = self.path(slot)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
        return sock


# --------------------------------------------------------------------------------------------
# The private API every worker serves


class WorkerApi:
    """A worker's private admin API, on its Unix socket."""

    def __init__(
        self,
        *,
        metrics: Callable[[], bytes],
        status: Callable[[], dict[str, Any]],
        purge_local: Callable[[str, bytes], int] | None = None,
    ) -> None:
        self._metrics = metrics
        self._status = status
        self._purge_local = purge_local
        self.app = web.Application()
        self.app.router.add_get("/metrics", self._metrics_handler)
        self.app.router.add_get("/status", self._status_handler)
        if purge_local is not None:
            self.app.router.add_post("/purge/local", self._purge_handler)
        self._runner: web.AppRunner | None = None

    async def start(self, sock: socket.socket) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self._status(), dumps=_dumps)

    async def _purge_handler(self, request: web.Request) -> web.Response:
        try:
            targets = decode_targets(await request.read())
        except ValueError as exc:
            return web.json_response({"error": "bad_request", "reason": str(exc)}, status=400)
        assert self._purge_local is not None  # the route exists only with it
        removed = sum(self._purge_local(kind, value) for kind, value in targets)
        return web.json_response({"local": removed})


def encode_targets(targets: Sequence[tuple[str, bytes]]) -> bytes:
    """Normalised purge targets as JSON (values as latin-1 text: every byte round-trips)."""
    document = {"targets": [[kind, value.decode("latin-1")] for kind, value in targets]}
    return json.dumps(document).encode()


def decode_targets(body: bytes) -> list[tuple[str, bytes]]:
    try:
        document = json.loads(body)
    except ValueError:
        raise ValueError("body must be JSON") from None
    raw = document.get("targets") if isinstance(document, dict) else None
    if not isinstance(raw, list):
        raise ValueError('body must be {"targets": [[kind, value], ...]}')
    targets: list[tuple[str, bytes]] = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or item[0] not in PURGE_KINDS
            or not isinstance(item[1], str)
        ):
            raise ValueError(f"not a purge target: {item!r}")
        targets.append((item[0], item[1].encode("latin-1")))
    return targets


def _dumps(document: object) -> str:
    return json.dumps(document, default=str)


# --------------------------------------------------------------------------------------------
# Worker 0's side


class _Families(Collector):
    """Already merged metric families, for ``generate_latest``."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_expositions(
    texts: Mapping[str, str], up: Mapping[str, bool], up_metric: str = EDGE_WORKER_UP
) -> bytes:
    """One Prometheus exposition from several workers' (``worker`` label -> text): each
    family once, each sample labelled with its worker, plus ``up_metric`` per worker."""
    families: dict[str, Metric] = {}
    for worker, text in texts.items():
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type
                )
            for sample in family.samples:
                merged.add_sample(
                    sample.name, {**sample.labels, "worker": worker}, sample.value, sample.timestamp
                )
    worker_up = Metric(
        up_metric,
        "Whether the worker answered this scrape (1) or not (0: restarting or stuck).",
        "gauge",
    )
    for worker, answered in sorted(up.items(), key=lambda item: int(item[0])):
        worker_up.add_sample(up_metric, {"worker": worker}, 1.0 if answered else 0)
    return generate_latest(_Families([*families.values(), worker_up]))


class WorkerPeers:
    """Worker 0's client for its siblings' private APIs."""

    def __init__(self, sockets: WorkerSockets, slot: int, up_metric: str = EDGE_WORKER_UP) -> None:
        self.sockets = sockets
        self.slot = slot
        self._up_metric = up_metric
        self._sessions: dict[int, aiohttp.ClientSession] = {}
        self._timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)

    def _session(self, slot: int) -> aiohttp.ClientSession:
        session = self._sessions.get(slot)
        if session is None or session.closed:
            session = self._sessions[slot] = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.sockets.path(slot)),
                timeout=self._timeout,
            )
        return session

    async def close(self) -> None:
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()

    async def _call(self, slot: int, method: str, path: str, body: bytes | None = None) -> bytes:
        async with self._session(slot).request(
            method,
            f"http://worker-{slot}{path}",
            data=body,
            headers={"Content-Type": "application/json"} if body is not None else None,
        ) as response:
            data = await response.read()
            if response.status != 200:
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status, message=data[:200].decode()
                )
            return data

    async def _each(
        self, method: str, path: str, body: bytes | None = None
    ) -> dict[int, bytes | BaseException]:
        slots = self.sockets.siblings(self.slot)
        answers = await asyncio.gather(
            *(self._call(slot, method, path, body) for slot in slots), return_exceptions=True
        )
        return dict(zip(slots, answers, strict=True))

    async def metrics(self, own: bytes) -> bytes:
        """The process group's exposition: ``own`` (this worker's text) and the siblings'."""
        texts = {str(self.slot): own.decode()}
        up = {str(self.slot): True}
        for slot, answer in (await self._each("GET", "/metrics")).items():
            if isinstance(answer, BaseException):
                log.warning("worker_scrape_failed", worker=slot, error=_describe(answer))
                up[str(slot)] = False
                continue
            texts[str(slot)] = answer.decode()
            up[str(slot)] = True
        return merge_expositions(texts, up, self._up_metric)

    async def purge(self, targets: Sequence[tuple[str, bytes]]) -> tuple[dict[int, int], list[int]]:
        """Purge ``targets`` from every sibling's L1: (removed per worker, unreached workers)."""
        removed: dict[int, int] = {}
        unreached: list[int] = []
        body = encode_targets(targets)
        for slot, answer in (await self._each("POST", "/purge/local", body)).items():
            if isinstance(answer, BaseException):
                log.warning("worker_purge_failed", worker=slot, error=_describe(answer))
                unreached.append(slot)
                continue
            removed[slot] = int(json.loads(answer)["local"])
        return removed, unreached

    async def statuses(self) -> dict[int, dict[str, Any]]:
        """Each sibling's short status (``{"up": false, "error": ...}`` when it did not answer)."""
        out: dict[int, dict[str, Any]] = {}
        for slot, answer in (await self._each("GET", "/status")).items():
            if isinstance(answer, BaseException):
                out[slot] = {"up": False, "error": _describe(answer)}
            else:
                out[slot] = {"up": True, **json.loads(answer)}
        return out


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".rstrip(": ")


__all__ = [
    "EDGE_WORKER_UP",
    "SCRAPE_TIMEOUT",
    "WorkerApi",
    "WorkerPeers",
    "WorkerSockets",
    "decode_targets",
    "encode_targets",
    "merge_expositions",
]
