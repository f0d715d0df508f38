"""Loopback ports for the servers that tests, benchmarks and the demo start: free for both TCP
and UDP, and never handed to two callers at once.

Binding port 0, reading the number and closing the socket leaves a window in which the kernel
gives the same number to the next ``bind(0)`` or outgoing ``connect()`` (its ephemeral range);
a test run makes thousands of those, and a server then told to bind that port fails with
EADDRINUSE.  So these ports come from outside the kernel's ephemeral range (which it never hands
out on its own), and each is leased through a lock file (``flock``) so that test processes
running at the same time never pick the same one.  A lease is held by this process until
``LEASES_HELD`` newer ones were taken (by then its server has long bound it) or until exit.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import socket
import tempfile
from collections import deque
from pathlib import Path
from typing import Final

#: Leases kept open at once (one descriptor each); the oldest is released first.
LEASES_HELD: Final = 256
#: The lowest port handed out (below: well-known and registered services).
LOWEST: Final = 10000
_LEASE_DIR: Final = Path(tempfile.gettempdir()) / "meridian-ports"
_leases: deque[int] = deque()


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The kernel's range for ``bind(0)`` and outgoing connections (Linux's default when the
    file cannot be read)."""
    try:
        with open(path) as file:
            low, high = (int(part) for part in file.read().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def band(ephemeral: tuple[int, int]) -> tuple[int, int]:
    """The ports to lease from: below the ephemeral range when that leaves room, else above."""
    low, high = ephemeral
    if low - LOWEST >= 2048:
        return LOWEST, low - 1
    if 65535 - high >= 2048:
        return high + 1, 65535
    raise RuntimeError(f"no room outside the ephemeral port range {low}-{high}")


def _bindable(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _lease(port: int) -> int | None:
    """A descriptor holding the lock of ``port``, or None when another process holds it."""
    fd = os.open(_LEASE_DIR / str(port), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def free_port() -> int:
    """A 127.0.0.1 port free for TCP and UDP now, leased to this process."""
    _LEASE_DIR.mkdir(mode=0o777, exist_ok=True)
    lowest, highest = band(ephemeral_range())
    span = highest - lowest + 1
    start = random.randrange(span)
    for step in range(span):
        port = lowest + (start + step) % span
        fd = _lease(port)
        if fd is None:
            continue
        if not _bindable(port):
            os.close(fd)
            continue
        _leases.append(fd)
        if len(_leases) > LEASES_HELD:
            os.close(_leases.popleft())
        return port
    raise RuntimeError(f"no free port in {lowest}-{highest}")


__all__ = ["LEASES_HELD", "band", "ephemeral_range", "free_port"]
