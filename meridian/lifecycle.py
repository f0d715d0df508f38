"""Process lifecycle shared by GeoDNS and the edge: config reload on SIGHUP, drain on SIGTERM.

Signal handlers only set state and wake the loop (as uvicorn does); the work happens in the
service's own coroutine.  A reload validates the new file completely before anything is swapped,
so a bad file leaves the running snapshot untouched and logs one line.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from meridian.config import Config, ConfigError, load_config
from meridian.log import get_logger

log = get_logger("lifecycle")


@dataclass(slots=True)
class ConfigHolder:
    """The one immutable config snapshot in force, swapped whole on a good reload."""

    path: str
    current: Config
    generation: int = 1
    listeners: list[Callable[[Config, int], None]] = field(default_factory=list)

    @classmethod
    def from_file(cls, path: str) -> ConfigHolder:
        return cls(path=path, current=load_config(path))

    def reload(self) -> bool:
        """Load and validate the file again; swap only if it is good.  True when it swapped."""
        try:
            new = load_config(self.path)
        except ConfigError as exc:
            # One line: the first problem and how many more; the old config keeps serving.
            more = f" (+{len(exc.problems) - 1} more)" if len(exc.problems) > 1 else ""
            log.error(
                "config_reload_rejected", reason=exc.problems[0] + more, generation=self.generation
            )
            return False
        for check in self.listeners:
            try:
                check(new, self.generation + 1)
            except ConfigError as exc:
                log.error(
                    "config_reload_rejected", reason=exc.problems[0], generation=self.generation
                )
                return False
        self.current = new
        self.generation += 1
        log.info("config_reloaded", source=self.path, generation=self.generation)
        return True


class Lifecycle:
    """Turns SIGHUP into reload requests and SIGTERM/SIGINT into one stop event."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.stopping = asyncio.Event()
        self.reload_requested = asyncio.Event()

    def install(self) -> None:
        self.loop.add_signal_handler(signal.SIGHUP, self.reload_requested.set)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stopping.set)

    def uninstall(self) -> None:
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            self.loop.remove_signal_handler(sig)

    async def run_reloads(
        self, holder: ConfigHolder, on_reload: Callable[[Config, int], None]
    ) -> None:
        """Loop until stopped: each SIGHUP reloads ``holder`` and hands a good snapshot over."""
        while not self.stopping.is_set():
            waiter = asyncio.ensure_future(self.reload_requested.wait())
            stopper = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if self.reload_requested.is_set() and not self.stopping.is_set():
                self.reload_requested.clear()
                if holder.reload():
                    on_reload(holder.current, holder.generation)
