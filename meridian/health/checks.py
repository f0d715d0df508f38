"""Active checks, the I/O half: one HTTP GET or TCP connect, turned into (ok, reason, seconds).

Every check opens a fresh connection (as HAProxy does): a pooled keep-alive connection would
keep answering from a process that no longer accepts new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from meridian.config import HealthConfig
from meridian.health.book import TargetInfo

#: A body match looks at no more than this much of the body.
MAX_BODY_BYTES = 64 * 1024
USER_AGENT = "meridian-health-check"


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    ok: bool
    #: What the check saw: ``status 200``, ``timeout after 2s``, ``connect failed: ...``.
    reason: str
    seconds: float


def check_url(target: TargetInfo, config: HealthConfig) -> str:
    """A backend is checked at its URL plus ``health.path``; a POP at its ``health_url``."""
    if target.kind == "pop":
        return target.url
    return target.url.rstrip("/") + config.path


class Prober:
    """Runs checks over one shared aiohttp session; create inside the event loop."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                headers={"User-Agent": USER_AGENT},
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check(self, target: TargetInfo, config: HealthConfig) -> CheckOutcome:
        started = time.perf_counter()
        url = check_url(target, config)
        if config.kind == "tcp":
            ok, reason = await tcp_check(url, config.timeout)
        else:
            assert self._session is not None, "Prober.start() was not awaited"
            ok, reason = await http_check(self._session, url, config)
        return CheckOutcome(ok, reason, time.perf_counter() - started)


async def http_check(
    session: aiohttp.ClientSession, url: str, config: HealthConfig
) -> tuple[bool, str]:
    try:
        async with session.get(
            url, timeout=aiohttp.ClientTimeout(total=config.timeout), allow_redirects=False
        ) as response:
            status = response.status
            if not config.status_min <= status <= config.status_max:
                return False, f"status {status}"
            if config.body_match is not None:
                body = await _read_prefix(response, MAX_BODY_BYTES)
                if config.body_match.encode() not in body:
                    return False, f"status {status} but the body lacks {config.body_match!r}"
            return True, f"status {status}"
    except TimeoutError:  # aiohttp's connect and read timeouts are TimeoutErrors too
        return False, f"timeout after {config.timeout:g}s"
    except aiohttp.ClientConnectorError as exc:
        return False, f"connect failed: {_os_reason(exc.os_error)}"
    except aiohttp.ServerDisconnectedError:
        return False, "closed without answering"
    except (aiohttp.ClientError, OSError) as exc:
        return False, f"{type(exc).__name__}: {exc}"


async def tcp_check(url: str, seconds: float) -> tuple[bool, str]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        async with asyncio.timeout(seconds):
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    except TimeoutError:
        return False, f"timeout after {seconds:g}s"
    except OSError as exc:
        return False, f"connect failed: {_os_reason(exc)}"
    return True, "connected"


async def _read_prefix(response: aiohttp.ClientResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(16 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


def _os_reason(exc: OSError) -> str:
    # asyncio words refusals as "Connect call failed ('127.0.0.1', 9001)"; the errno says more.
    return os.strerror(exc.errno) if exc.errno else str(exc)
