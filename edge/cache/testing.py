"""Test support for the cache (and whoever tests the edge around it): an injectable clock and a
throwaway ``redis-server`` process.

Not imported by the cache itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from types import TracebackType

from meridian.ports import free_port as free_port


class FakeClock:
    """A wall clock the test moves by hand: ``HttpCache(..., clock=clock)``."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RedisServer:
    """``redis-server`` on a free loopback port, no persistence; killed by PID on exit.

    ``kill()`` is SIGKILL (Redis gone, connections reset); ``pause()``/``resume()`` are
    SIGSTOP/SIGCONT (Redis accepts nothing and answers nothing: the slow-Redis case).
    """

    def __init__(self, executable: str | None = None) -> None:
        self.executable = executable or shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0, port: int | None = None) -> RedisServer:
        """Start on ``port`` (e.g. a restart of a killed server), else on a free port."""
        for _attempt in range(1 if port else 3):  # a free port can be taken before the bind
            self.port = port or free_port()
            self.process = subprocess.Popen(
                [
                    self.executable,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--loglevel",
                    "warning",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_ready(timeout):
                return self
            self.kill()
        raise RuntimeError("redis-server did not start")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.01)
        return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)  # a paused process must wake to die
        self.kill()


class HugeReplier:
    """What answers on a Redis address may be hostile (``huge_replier``): ``sent`` counts the
    bytes of the string it streamed."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.port = 0
        self.sent = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(65536):
                writer.write(self.prefix + b"$4000000000\r\n")
                chunk = b"x" * 65536
                for _ in range(2000):  # up to 128 MiB, while the client keeps reading
                    writer.write(chunk)
                    await writer.drain()
                    self.sent += len(chunk)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def huge_replier(prefix: bytes = b"") -> AsyncIterator[HugeReplier]:
    """A server on loopback that answers every command with ``prefix`` and a string announced
    as 4 GB, sent for as long as the client reads (a bounded client stops after the length)."""
    replier = HugeReplier(prefix)
    server = await asyncio.start_server(replier.serve, "127.0.0.1", 0)
    replier.port = server.sockets[0].getsockname()[1]
    try:
        yield replier
    finally:
        server.close()


__all__ = ["FakeClock", "HugeReplier", "RedisServer", "free_port", "huge_replier"]
