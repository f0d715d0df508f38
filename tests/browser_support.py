"""Headless Chromium for the status page tests, driven over the DevTools protocol.

A small client (aiohttp's websocket) rather than a browser-automation library: Debian's
``chromium`` is the only dependency.  The browser is started on a free debugging port with a
throwaway profile and stopped by PID; console errors, uncaught exceptions and failed loads are
collected so a test can assert there were none.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from meridian.ports import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


class Page:
    """One tab: ``send`` a command, ``evaluate`` an expression; ``errors`` collects problems."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._loaded = asyncio.Event()
        #: Console errors, uncaught exceptions and error log entries, as text.
        self.errors: list[str] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for message in self._ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Page.loadEventFired":
                self._loaded.set()
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                self.errors.append(f"exception: {details.get('exception', details)}")
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                self.errors.append(f"console.{params['type']}: {params['args']}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                self.errors.append(f"log: {params['entry'].get('text')}")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("DevTools connection closed"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        await self._ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        async with asyncio.timeout(15):
            reply = await future
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def navigate(self, url: str) -> None:
        self._loaded.clear()
        await self.send("Page.navigate", url=url)
        async with asyncio.timeout(15):
            await self._loaded.wait()

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self, path: Path) -> Path:
        result = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        await asyncio.to_thread(path.write_bytes, base64.b64decode(result["data"]))
        return path

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._ws.close()


@contextlib.asynccontextmanager
async def browser_page(tmp: Path, *, width: int = 1100, height: int = 900) -> AsyncIterator[Page]:
    """A headless Chromium with one blank tab, listening for the page's problems."""
    assert CHROMIUM is not None
    port = free_port()
    profile = tmp / "chromium-profile"
    log = await asyncio.to_thread((tmp / "chromium.log").open, "wb")
    process = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *FLAGS,
        f"--user-data-dir={profile}",
        f"--remote-debugging-port={port}",
        f"--window-size={width},{height}",
        "about:blank",
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    session = aiohttp.ClientSession()
    page: Page | None = None
    try:
        target = await _page_target(session, port, process)
        ws = await session.ws_connect(target, max_msg_size=64 * 1024 * 1024)
        page = Page(ws)
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            await page.send(domain)
        yield page
    finally:
        if page is not None:
            await page.close()
        await session.close()
        if process.returncode is None:
            os.kill(process.pid, signal.SIGTERM)  # by PID, the one we started
            try:
                async with asyncio.timeout(5):
                    await process.wait()
            except TimeoutError:
                os.kill(process.pid, signal.SIGKILL)
                await process.wait()
        log.close()


async def _page_target(
    session: aiohttp.ClientSession, port: int, process: asyncio.subprocess.Process
) -> str:
    """The websocket URL of the browser's first tab, once the debugging port answers."""
    async with asyncio.timeout(30):
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"chromium exited with {process.returncode}")
            try:
                async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                    targets = await response.json()
            except aiohttp.ClientError:
                targets = []
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                url: str = pages[0]["webSocketDebuggerUrl"]
                return url
            await asyncio.sleep(0.1)
