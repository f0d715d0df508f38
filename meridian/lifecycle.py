"""Process lifecycle shared by GeoDNS and the edge: config reload on SIGHUP, drain on SIGTERM.

Signal handlers only set state and wake the loop (as uvicorn does); the work happens in the
service's own coroutine.  A reload validates the new file completely before anything is swapped,
so a bad file leaves the running snapshot untouched and logs one line.

``--watch-config INTERVAL`` (``configure_watch``) also reloads when the file changes, for
configs that are replaced under a running process with nobody to send SIGHUP: a Kubernetes
ConfigMap volume swaps its ``..data`` symlink to a new directory.  The path is stat'ed through
its symlinks every INTERVAL (``FileWatch`` decides), by the process's own loop or by the
supervisor's, and a change is handled exactly as a SIGHUP.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from meridian.config import Config, ConfigError, load_config
from meridian.log import get_logger
from meridian.units import parse_duration

log = get_logger("lifecycle")

#: What identifies the file behind a path: device, inode, size, modification time (ns).
FileIdentity = tuple[int, int, int, int]


@functools.cache
def _libc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc (musl, macOS): nothing to ask
        return None
    return trim


def trim_heap() -> bool:
    """Give the memory freed after a large build back to the system (glibc's
    ``malloc_trim``); False where the C library has no such call.

    Building GeoDNS's address map walks every network of the database into temporaries that
    are freed once it is compiled, but glibc keeps what was freed in its heap: measured on the
    shipped database, RSS 220 MiB after the build and 139 MiB after the trim.
    """
    trim = _libc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def file_identity(path: str) -> FileIdentity | None:
    """The identity of the file ``path`` resolves to (symlinks followed); None if unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(slots=True)
class FileWatch:
    """When to look at a config file again, and whether what was seen calls for a reload.

    Pure: the caller stats the file (``file_identity``) when ``due`` and reports it.  A file
    replaced by a symlink swap has a new inode; one rewritten in place a new size or mtime.  A
    file that cannot be read is remembered but not reloaded (a reload could only fail); when it
    is back, it reloads.  One reload per change: a file that fails validation is not retried
    until it changes again."""

    path: str
    interval: float
    seen: FileIdentity | None
    #: Monotonic time of the next look (0: at once).
    due: float = 0.0

    def observe(self, identity: FileIdentity | None, now: float) -> bool:
        self.due = now + self.interval
        if identity == self.seen:
            return False
        self.seen = identity
        return identity is not None


@dataclass(frozen=True, slots=True)
class WatchSpec:
    path: str
    interval: float
    #: The file as it was before the process first loaded it.
    identity: FileIdentity | None

    def watch(self) -> FileWatch:
        return FileWatch(self.path, self.interval, self.identity)


_watch_spec: WatchSpec | None = None


def configure_watch(path: str, interval: float) -> None:
    """``--watch-config``: the config file this process loads (next) is watched every
    ``interval`` seconds (0: not watched) by its ``Lifecycle`` or its ``Supervisor``.  Called
    before the file is loaded, so a change in between is seen at the first look."""
    global _watch_spec
    _watch_spec = WatchSpec(path, interval, file_identity(path)) if interval > 0 else None


def configured_watch() -> WatchSpec | None:
    return _watch_spec


def _interval_argument(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_watch_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--watch-config",
        type=_interval_argument,
        default=0.0,
        metavar="INTERVAL",
        help="look at the config file every INTERVAL (e.g. 5s) and reload it when it changed, "
        "as on SIGHUP; symlinks are followed, so a Kubernetes ConfigMap volume's update is "
        "seen (default: 0, off)",
    )


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
        self._watcher: asyncio.Task[None] | None = None

    def install(self, *, reload: bool = True, watch: WatchSpec | None = None) -> None:
        """``reload=False`` for a supervised worker: its configs come from the supervisor, and
        SIGHUP is the supervisor's (the worker ignores it).  With ``reload``, the config file
        is also watched as ``watch`` (default: ``configure_watch``'s) says."""
        self._signals = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGHUP] if reload else [])
        if reload:
            self.loop.add_signal_handler(signal.SIGHUP, self.reload_requested.set)
            spec = watch or configured_watch()
            if spec is not None:
                self._watcher = self.loop.create_task(self._watch(spec.watch()))
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stopping.set)

    def uninstall(self) -> None:
        for sig in self._signals:
            self.loop.remove_signal_handler(sig)
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def _watch(self, watch: FileWatch) -> None:
        """A changed file is a SIGHUP.  (A stat of the local file: no thread needed.)"""
        while not self.stopping.is_set():
            await asyncio.sleep(max(0.0, watch.due - self.loop.time()))
            if watch.observe(file_identity(watch.path), self.loop.time()):
                log.info("config_file_changed", path=watch.path, pid=os.getpid())
                self.reload_requested.set()

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
