"""An origin for the cache reliability tests, run as its own process:

    python -m tests.reliability_cache_support --port N [--bomb-mib 1024]

* ``GET /obj/<anything>?size=N``: a cacheable (``public, max-age=3600``) JSON-ish body of
  N bytes naming the URL and the origin's version; answered from a raw asyncio protocol, so
  a fill runs at the edge's miss rate, not an aiohttp origin's.
* ``GET /bomb/gzip|br?cc=...&stream=1``: ``--bomb-mib`` MiB of zeros, gzip- or
  Brotli-encoded (built once at start, never held decoded); with ``stream=1`` sent chunked in
  64 KiB pieces, else whole with a Content-Length.
* ``POST /sink``: reads the body, answers its length and SHA-256 (what the edge forwarded).
* ``POST /_version``: the body becomes the version every ``/obj/`` body carries from now on.
* anything else (``/healthz``): 200 ``ok``.

Prints ``event=listening`` once it accepts.  Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, cast
from urllib.parse import parse_qs, urlsplit

import brotli
import redis as redis_client

from tests.edge_support import (
    LOCATIONS,
    Edge,
    Proc,
    free_port,
    http_request,
    poll_until,
    processes,
    raw_exchange,
    region,
    write_config,
)

MiB: Final = 1 << 20


def build_bombs(mib: int) -> dict[str, bytes]:
    zeros = bytes(1 << 20)
    gz = zlib.compressobj(9, zlib.DEFLATED, 31)
    gzip_bomb = b"".join(gz.compress(zeros) for _ in range(mib)) + gz.flush()
    br = brotli.Compressor(quality=1)
    br_bomb = b"".join(bytes(br.process(zeros)) for _ in range(mib)) + bytes(br.finish())
    return {"gzip": gzip_bomb, "br": br_bomb}


def _response(status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers)]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class OriginProtocol(asyncio.Protocol):
    bombs: dict[str, bytes] = {}
    version = "1"

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.busy = False
        self.streaming: asyncio.Future[None] | None = None
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._next()

    def _next(self) -> None:
        while not self.busy and b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self.close_after = headers.get("connection", "").lower() == "close"
            if method == "POST":
                length = int(headers.get("content-length", "0"))
                if len(rest) < length:
                    return  # wait for the whole body
                body, self.buffer = rest[:length], rest[length:]
                if target == "/_version":
                    OriginProtocol.version = body.decode()
                    self._write(_response("204 No Content", [], b""))
                    continue
                self._write(
                    _response(
                        "200 OK",
                        [("content-type", "application/json"), ("cache-control", "no-store")],
                        json.dumps(
                            {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
                        ).encode(),
                    )
                )
                continue
            self.buffer = rest
            url = urlsplit(target)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path.startswith("/obj/"):
                self._write(self._object(target, query))
            elif url.path.startswith("/bomb/"):
                coding = url.path.rsplit("/", 1)[1]
                headers_out = [
                    ("content-type", "application/json"),
                    ("content-encoding", coding),
                    ("cache-control", query.get("cc", "no-store")),
                ]
                if query.get("stream") == "1":
                    self.busy = True
                    self.streaming = asyncio.ensure_future(
                        self._stream(self.bombs[coding], headers_out)
                    )
                    return
                self._write(_response("200 OK", headers_out, self.bombs[coding]))
            else:
                self._write(_response("200 OK", [("content-type", "text/plain")], b"ok"))

    @staticmethod
    def _object(target: str, query: dict[str, str]) -> bytes:
        size = int(query.get("size", "1000"))
        stamp = f'{{"url": "{target}", "v": "{OriginProtocol.version}", "pad": "'.encode()
        body = (stamp + b"0123456789abcdef" * (size // 16 + 1))[: max(size - 2, 0)] + b'"}'
        return _response(
            "200 OK",
            [
                ("content-type", "application/json"),
                ("cache-control", "public, max-age=3600"),
                ("etag", '"' + hashlib.md5(body).hexdigest() + '"'),
            ],
            body,
        )

    async def _stream(self, body: bytes, headers: list[tuple[str, str]]) -> None:
        assert self.transport is not None
        lines = ["HTTP/1.1 200 OK", *(f"{k}: {v}" for k, v in headers)]
        lines.append("transfer-encoding: chunked")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        for start in range(0, len(body), 65536):
            if self.transport.is_closing():
                return
            piece = body[start : start + 65536]
            self.transport.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await asyncio.sleep(0)
        self.transport.write(b"0\r\n\r\n")
        if self.close_after:
            self.transport.close()
        self.busy = False
        self._next()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            if self.close_after:
                self.transport.close()


async def serve(port: int, bomb_mib: int) -> None:
    OriginProtocol.bombs = build_bombs(bomb_mib)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(OriginProtocol, "127.0.0.1", port, backlog=1024)
    print(f"event=listening addr=127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


# --------------------------------------------------------------------------------------------
# Scenarios (the reliability tests assert on their figures; benchmarks.chaos.cache prints them)


class ReliabilityOrigin(Proc):
    def __init__(self, tmp: Path, bomb_mib: int = 1024) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "tests.reliability_cache_support", "--port", str(self.port)]
        argv += ["--bomb-mib", str(bomb_mib)]
        super().__init__(argv, tmp / f"origin-{self.port}.log", "reliability origin")

    def ready(self) -> ReliabilityOrigin:
        self.wait_for_log(r"event=listening", within=60)
        return self

    def set_version(self, version: str) -> None:
        status, _, _ = http_request(self.port, "POST", "/_version", body=version.encode())
        assert status == 204


def vm(pid: int, field: str = "VmRSS") -> int:
    """A /proc/PID/status memory field, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class PeakRss:
    """The peak RSS growth of a process over a block: its high-water mark reset first
    (``/proc/PID/clear_refs`` 5), and VmRSS sampled every 2 ms as well (a kernel that refuses
    the reset still gets the sampled peak)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._hwm_reset = False

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            with contextlib.suppress(OSError, KeyError):
                self.peak = max(self.peak, vm(self.pid))

    def __enter__(self) -> PeakRss:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as refs:
                refs.write("5")
            self._hwm_reset = True
        except OSError:
            pass
        self.before = self.peak = vm(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, vm(self.pid))
        if self._hwm_reset:
            self.peak = max(self.peak, vm(self.pid, "VmHWM"))

    @property
    def growth(self) -> int:
        return self.peak - self.before


def edge_config(path: Path, origin: ReliabilityOrigin, cache: dict[str, Any], **edge: Any) -> Path:
    return write_config(
        path,
        {"us-east": region(*LOCATIONS["us-east"], [origin.url])},
        edge={"cache": cache, **edge},
    )


async def _get_many(
    port: int, targets: Sequence[str], *, connections: int = 16, encoding: str | None = None
) -> list[tuple[int, bytes]]:
    """GET each target on ``connections`` keep-alive connections; (status, X-Cache) each."""
    results: list[tuple[int, bytes]] = []

    async def worker(mine: Sequence[str]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for target in mine:
                head = f"GET {target} HTTP/1.1\r\nHost: rel.test\r\n"
                if encoding is not None:
                    head += f"Accept-Encoding: {encoding}\r\n"
                writer.write((head + "\r\n").encode())
                raw = await reader.readuntil(b"\r\n\r\n")
                lines = raw.split(b"\r\n")
                length, x_cache = 0, b""
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                    elif name.lower() == b"x-cache":
                        x_cache = value.strip()
                await reader.readexactly(length)
                results.append((int(lines[0].split()[1]), x_cache))
        finally:
            writer.close()

    await asyncio.gather(*(worker(targets[n::connections]) for n in range(connections)))
    return results


def dechunk_prefix(data: bytes) -> bytes:
    """The body of a chunked message, as far as it arrived (a cut-off stream included)."""
    out: list[bytes] = []
    while True:
        line, found, data = data.partition(b"\r\n")
        if not found:
            break
        size = int(line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(data[:size])
        data = data[size + 2 :]
    return b"".join(out)


#: Body sizes the fill cycles through (a ticker, an order book, a trade list, a chart).
FILL_SIZES: Final = (300, 1500, 4000, 12000)


def cache_rss(tmp: Path, memory_mib: int = 32, multiple: float = 5.0) -> dict[str, float]:
    """An edge whose cache holds ``memory_mib`` MiB, filled through the origin with
    ``multiple`` times more distinct keys than fit (every third also hit with gzip: a
    compressed variant and a cached response more); its RSS before and after."""
    memory = memory_mib << 20
    mean_entry = sum(FILL_SIZES) / len(FILL_SIZES) + 1500  # + headers and objects, roughly
    keys = int(multiple * memory / mean_entry)
    with processes() as procs:
        origin = ReliabilityOrigin(tmp, bomb_mib=1)
        procs.append(origin)
        origin.ready()
        edge = Edge(edge_config(tmp / "edge-rss.yaml", origin, {"memory": memory}), "iad", tmp)
        procs.append(edge)
        edge.ready()
        # Warm every path (miss, hit, gzip variant) before the baseline.
        warm = [f"/obj/warm{n}?size={FILL_SIZES[n % 4]}" for n in range(400)]
        asyncio.run(_get_many(edge.port, warm))
        asyncio.run(_get_many(edge.port, warm, encoding="gzip"))
        before = vm(edge.pid)
        started = time.monotonic()
        statuses: dict[int, int] = {}
        for batch in range(0, keys, 3000):
            targets = [
                f"/obj/k{n}?size={FILL_SIZES[n % 4]}" for n in range(batch, min(keys, batch + 3000))
            ]
            for status, _ in asyncio.run(_get_many(edge.port, targets)):
                statuses[status] = statuses.get(status, 0) + 1
            hits = asyncio.run(_get_many(edge.port, targets[::3], encoding="gzip"))
            for status, _ in hits:
                statuses[status] = statuses.get(status, 0) + 1
        seconds = time.monotonic() - started
        after = vm(edge.pid)
        entries = edge.metric("meridian_cache_entries")
        counted = edge.metric("meridian_cache_bytes")
        evictions = edge.metric("meridian_cache_evictions_total")
    return {
        "memory_mib": memory_mib,
        "keys": keys,
        "requests": sum(statuses.values()),
        "ok": statuses.get(200, 0),
        "seconds": round(seconds, 1),
        "rss_before_mib": round(before / MiB, 1),
        "rss_growth_mib": round((after - before) / MiB, 1),
        "entries": entries,
        "evictions": evictions,
        "counted_mib": round(counted / MiB, 1),
        "counted_per_entry": round(counted / max(entries, 1)),
        "rss_growth_per_entry": round((after - before) / max(entries, 1)),
    }


def bombs(tmp: Path, bomb_mib: int = 1024) -> list[dict[str, Any]]:
    """1 GiB (by default) of zeros gzip- and Brotli-encoded, to a client that accepts neither:
    sent whole and streamed, cacheable and not; and a gzip bomb as a request body.  The peak
    RSS growth of the edge for each."""
    results: list[dict[str, Any]] = []
    with processes() as procs:
        origin = ReliabilityOrigin(tmp, bomb_mib=bomb_mib)
        procs.append(origin)
        origin.ready()
        edge = Edge(edge_config(tmp / "edge-bombs.yaml", origin, {}), "iad", tmp)
        procs.append(edge)
        edge.ready()
        http_request(edge.port, "GET", "/obj/warm")
        for coding in ("gzip", "br"):
            for stream in ("0", "1"):
                for cc in ("no-store", "public,max-age=60"):
                    path = f"/bomb/{coding}?stream={stream}&cc={cc}"
                    with PeakRss(edge.pid) as peak:
                        raw = raw_exchange(
                            edge.port,
                            f"GET {path} HTTP/1.1\r\nHost: rel.test\r\n"
                            "Accept-Encoding: identity\r\nConnection: close\r\n\r\n".encode(),
                            timeout=60,
                        )
                    head, _, body = raw.partition(b"\r\n\r\n")
                    status = int(head.split(b" ", 2)[1]) if head else 0  # 0: closed
                    if b"transfer-encoding: chunked" in head.lower():
                        body = dechunk_prefix(body)
                    results.append(
                        {
                            "bomb": f"{coding} {'streamed' if stream == '1' else 'whole'} {cc}",
                            "status": status,
                            "client_bytes": len(body),
                            "peak_growth_mib": round(peak.growth / MiB, 1),
                        }
                    )
        gz = zlib.compressobj(9, zlib.DEFLATED, 31)
        body = b"".join(gz.compress(bytes(MiB)) for _ in range(bomb_mib)) + gz.flush()
        with PeakRss(edge.pid) as peak:
            status, _, answer = http_request(
                edge.port,
                "POST",
                "/sink",
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
                body=body,
                timeout=60,
            )
        forwarded = json.loads(answer) if status == 200 else {}
        results.append(
            {
                "bomb": "gzip request body",
                "status": status,
                "sent_bytes": len(body),
                "origin_received_bytes": forwarded.get("length"),
                "forwarded_as_sent": forwarded.get("sha256") == hashlib.sha256(body).hexdigest(),
                "peak_growth_mib": round(peak.growth / MiB, 1),
            }
        )
    return results


def purge_during_stall(tmp: Path, stall: float = 3.0) -> dict[str, Any]:
    """Two edges of one POP sharing a redis-server; an object cached in both; Redis stopped
    (SIGSTOP), the object purged at edge A and changed at the origin; Redis resumed after
    ``stall`` seconds.  The timeline: what each edge served, when B stopped serving the purged
    copy, what Redis holds."""
    from edge.cache.redis_l2 import decode
    from edge.cache.testing import RedisServer

    timeline: list[tuple[float, str]] = []
    zero = time.monotonic()

    def note(event: str) -> None:
        timeline.append((round(time.monotonic() - zero, 3), event))

    def version(edge: Edge) -> str:
        status, headers, body = http_request(edge.port, "GET", "/obj/p?size=500", timeout=5)
        assert status == 200, (status, body[:200])
        return f"v{json.loads(body)['v']} {headers.get('x-cache')}"

    with RedisServer() as redis, processes() as procs:
        origin = ReliabilityOrigin(tmp, bomb_mib=1)
        procs.append(origin)
        origin.ready()
        cache = {"redis_url": redis.url, "purge_token": "purge-secret"}
        config = edge_config(tmp / "edge-purge.yaml", origin, cache)
        a, b = Edge(config, "iad", tmp), Edge(config, "iad", tmp)
        procs.extend([a, b])
        a.ready()
        b.ready()
        a.wait_for_log(r"event=edge_listening")
        note(f"A {version(a)}")
        poll_until(lambda: version(b) == "v1 HIT", within=5)  # from Redis
        note(f"B {version(b)} (its L1 now)")
        origin.set_version("2")
        redis.pause()
        note("redis SIGSTOP")
        status, answer = a.purge({"url": "http://127.0.0.1/obj/p?size=500"}, token="purge-secret")
        note(f"A /purge -> {status} {json.dumps(answer, sort_keys=True)}")
        during: dict[str, set[str]] = {"A": set(), "B": set()}
        deadline = time.monotonic() + stall
        while time.monotonic() < deadline:
            during["A"].add(version(a).split()[0])
            during["B"].add(version(b).split()[0])
            time.sleep(0.1)
        note(f"during the stall A served {sorted(during['A'])}, B served {sorted(during['B'])}")
        redis.resume()
        resumed = time.monotonic()
        note("redis SIGCONT")
        converged: float | None = None
        while time.monotonic() - resumed < 10:
            if version(b).startswith("v2"):
                converged = time.monotonic() - resumed
                break
            time.sleep(0.02)
        note(f"B serves v2 after {converged} s" if converged is not None else "B still v1")
        later: dict[str, set[str]] = {"A": set(), "B": set()}
        for _ in range(20):
            later["A"].add(version(a).split()[0])
            later["B"].add(version(b).split()[0])
            time.sleep(0.05)
        note(f"afterwards A served {sorted(later['A'])}, B served {sorted(later['B'])}")
        stored = []
        client = redis_client.Redis.from_url(redis.url)
        for key in client.scan_iter(match=b"meridian:cache:e:*"):
            value = cast("bytes | None", client.get(key))
            if value is not None:
                stored.append(json.loads(decode(value).body)["v"])
        client.close()
        note(f"redis holds versions {stored}")
        pending = a.metric("meridian_cache_purges_pending")
        retries = a.metric("meridian_cache_purge_retries_total")
    return {
        "purge_status": status,
        "purge_answer": answer,
        "during_a": sorted(during["A"]),
        "during_b": sorted(during["B"]),
        "converged_after_s": converged,
        "after_a": sorted(later["A"]),
        "after_b": sorted(later["B"]),
        "redis_versions": stored,
        "pending_after": pending,
        "retries": retries,
        "timeline": timeline,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bomb-mib", type=int, default=1024)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.bomb_mib))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
