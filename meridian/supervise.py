"""Run a few child processes as one service: forward SIGHUP, stop all on SIGTERM/SIGINT, by PID.

Used by ``meridian serve`` (edge + GeoDNS of a POP) and ``meridian demo`` (plus sample origins).
A child that dies ends the whole group with an error, so a supervisor above us (systemd,
Kubernetes) sees the failure instead of a half-working POP.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

from meridian.log import get_logger

log = get_logger("supervise")


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None


@dataclass
class Supervisor:
    children: list[Child] = field(default_factory=list)
    stop_requested: bool = False
    reload_requested: bool = False

    def start(self, name: str, argv: list[str]) -> Child:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        child = Child(name, argv, subprocess.Popen(argv, env=env))
        self.children.append(child)
        return child

    def install_signal_handlers(self) -> None:
        def on_stop(signum: int, frame: object) -> None:
            self.stop_requested = True

        def on_reload(signum: int, frame: object) -> None:
            self.reload_requested = True

        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGHUP, on_reload)

    def run(self, until: float | None = None) -> int:
        """Supervise until a stop signal, ``until`` (monotonic) or a child's death."""
        while not self.stop_requested and (until is None or time.monotonic() < until):
            if self.reload_requested:
                self.reload_requested = False
                for child in self.children:
                    if child.process is not None and child.process.poll() is None:
                        child.process.send_signal(signal.SIGHUP)
            for child in self.children:
                if child.process is not None and child.process.poll() is not None:
                    log.error("child_exited", child=child.name, code=child.process.returncode)
                    return 1
            time.sleep(0.1)
        return 0

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every child (they drain), then SIGKILL what is left at the deadline."""
        live = [c.process for c in self.children if c.process is not None]
        for process in live:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in live:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for_port(host: str, port: int, deadline: float, udp: bool = False) -> bool:
    """Poll a TCP port until it accepts a connection or the deadline passes."""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False
