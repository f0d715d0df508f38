"""Process lifecycle shared by GeoDNS and the edge: config reload on SIGHUP, drain on SIGTERM.

Signal handlers only set state and wake the loop (as uvicorn does); the work happens in the
service's own coroutine.  A reload validates the new file completely before anything is swapped,
so a bad file leaves the running snapshot untouched and logs one line.
"""

from __future__ import annotations

import asyncio
import os
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
            self._reject(exc)
            return False
        return self._offer(new, self.generation + 1, "config_reloaded")

    def adopt(self, new: Config, generation: int) -> bool:
        """Take a snapshot someone else validated (a worker, from its supervisor), under the
        supervisor's generation number.  The listeners may still refuse it."""
        return self._offer(new, generation, "config_adopted")

    def _offer(self, new: Config, generation: int, event: str) -> bool:
        for check in self.listeners:
            try:
                check(new, generation)
            except ConfigError as exc:
                self._reject(exc)
                return False
        self.current = new
        self.generation = generation
        log.info(event, source=self.path, generation=self.generation, pid=os.getpid())
        return True

    def _reject(self, exc: ConfigError) -> None:
        # One line: the first problem (it names the file and the field) and how many more;
        # the old config keeps serving.
        more = f" (+{len(exc.problems) - 1} more)" if len(exc.problems) > 1 else ""
        log.error(
            "config_reload_rejected", reason=exc.problems[0] + more, generation=self.generation
        )


class Lifecycle:
    """Turns SIGHUP into reload requests and SIGTERM/SIGINT into one stop event."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.stopping = asyncio.Event()
        self.reload_requested = asyncio.Event()
        self._signals: list[signal.Signals] = []

    def install(self, *, reload: bool = True) -> None:
        """``reload=False`` for a supervised worker: its configs come from the supervisor, and
        SIGHUP is the supervisor's (the worker ignores it)."""
        self._signals = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGHUP] if reload else [])
        if reload:
            self.loop.add_signal_handler(signal.SIGHUP, self.reload_requested.set)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stopping.set)

    def uninstall(self) -> None:
        for sig in self._signals:
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
