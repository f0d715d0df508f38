"""Active checks, the I/O half: one HTTP GET or TCP connect, turned into (ok, reason, seconds).

Every check opens a fresh connection (as HAProxy does): a pooled keep-alive connection would
keep answering from a process that no longer accepts new ones.

A check that fails because of this machine (out of file descriptors, socket buffers, memory or
local ports: ``is_local_error``) says nothing about the target: its outcome is ``local`` and
the monitor leaves the target's state alone (and counts it), instead of marking every backend
down at once when the edge runs out of descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from meridian.config import HealthConfig
from meridian.health.book import TargetInfo
from meridian.origin_tls import verify_reason

#: A body match looks at no more than this much of the body.
MAX_BODY_BYTES = 64 * 1024
USER_AGENT = "meridian-health-check"


#: errno values that describe this machine, not the peer: out of descriptors (process,
#: system), of socket buffers or memory, of local ports.
LOCAL_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}
)


def is_local_error(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error it wraps, is a local resource error (``LOCAL_ERRNOS``)."""
    for _ in range(5):  # a wrapped error's chain, not an endless one
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS:
            return True
        exc = getattr(exc, "os_error", None) or exc.__cause__ or exc.__context__
    return False


class LocalResourceError(Exception):
    """A check could not run for want of a local resource (see ``is_local_error``)."""


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    ok: bool
    #: What the check saw: ``status 200``, ``timeout after 2s``, ``connect failed: ...``.
    reason: str
    seconds: float
    #: The check failed for a reason of this machine (``is_local_error``): no evidence.
    local: bool = False


def check_url(target: TargetInfo, config: HealthConfig) -> str:
    """A backend is checked at its URL plus ``health.path``; a POP at its ``health_url``."""
    if target.kind == "pop":
        return target.url
    return target.url.rstrip("/") + config.path


class Prober:
    """Runs checks over one shared aiohttp session; create inside the event loop."""

    def __init__(self, tls: Callable[[], ssl.SSLContext] | None = None) -> None:
        """``tls``: the context for ``https://`` targets (``meridian.origin_tls``, the one
        the edge's upstream client uses), made when the first is checked."""
        self._session: aiohttp.ClientSession | None = None
        self._tls_factory = tls
        self._tls: ssl.SSLContext | None = None

    def retarget(self, tls: Callable[[], ssl.SSLContext]) -> None:
        """New TLS settings (a reload): the next ``https://`` check makes its context anew."""
        self._tls_factory = tls
        self._tls = None

    def _context(self, url: str) -> ssl.SSLContext | bool:
        if not url.startswith("https:"):
            return True  # aiohttp's default; unused for http://
        if self._tls is None:
            self._tls = (self._tls_factory or ssl.create_default_context)()
        return self._tls

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
        try:
            if config.kind == "tcp":
                ok, reason = await tcp_check(url, config.timeout)
            else:
                assert self._session is not None, "Prober.start() was not awaited"
                ok, reason = await http_check(self._session, url, config, self._context(url))
        except LocalResourceError as exc:
            return CheckOutcome(False, str(exc), time.perf_counter() - started, local=True)
        return CheckOutcome(ok, reason, time.perf_counter() - started)


async def http_check(
    session: aiohttp.ClientSession,
    url: str,
    config: HealthConfig,
    tls: ssl.SSLContext | bool = True,
) -> tuple[bool, str]:
    try:
        async with session.get(
            url,
            timeout=aiohttp.ClientTimeout(total=config.timeout),
            allow_redirects=False,
            ssl=tls,
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
    except aiohttp.ClientConnectorCertificateError as exc:
        return False, verify_reason(exc.certificate_error)
    except aiohttp.ClientConnectorSSLError as exc:
        return False, verify_reason(exc.os_error)
    except aiohttp.ClientConnectorError as exc:
        _raise_if_local(exc)
        return False, f"connect failed: {_os_reason(exc.os_error)}"
    except aiohttp.ServerDisconnectedError:
        return False, "closed without answering"
    except (aiohttp.ClientError, OSError) as exc:
        _raise_if_local(exc)
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
        _raise_if_local(exc)
        return False, f"connect failed: {_os_reason(exc)}"
    return True, "connected"


def _raise_if_local(exc: BaseException) -> None:
    if is_local_error(exc):
        raise LocalResourceError(f"local error: {_os_reason(_os_error(exc))}") from exc


def _os_error(exc: BaseException) -> OSError:
    found = getattr(exc, "os_error", None)
    if isinstance(found, OSError):
        return found
    return exc if isinstance(exc, OSError) else OSError(str(exc))


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
