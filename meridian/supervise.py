"""The one supervisor: ``edge --workers N``, ``dns --workers N``, ``meridian serve`` and the demo.

The decisions are ``meridian.supervise_policy``'s (pure, tested with a fake clock); this
module does the I/O around them:

* The parent binds every listening socket once (each ``Group`` brings its own), then forks
  the workers, which inherit them: a respawned worker accepts on the same socket, so nothing
  is refused while it starts.  Programs that are not ours (the demo's origins) are exec'd.
* Each forked worker has a socket pair to the parent.  The worker beats on it from its event
  loop (``ParentLink``): a loop that is stuck stops beating and is killed and replaced.  The
  parent tells the worker on it to adopt a new config generation.
* Config: the parent is the only reader of the file.  On SIGHUP (or, with ``--watch-config``,
  when the file changes: ``meridian.lifecycle.FileWatch``) it validates the file in full
  (with every group's own checks); a bad file is rejected in one log line and nothing
  changes anywhere.  A good one becomes the accepted snapshot: written (pickled) to the
  parent's private directory for the running workers, and inherited by every worker forked
  from then on, so a worker respawned while the file on disk is broken still runs the
  accepted generation, never the start-up one.  The workers ignore SIGHUP themselves.
* SIGTERM / SIGINT: every worker drains (SIGTERM), SIGKILL at the drain deadline, each by PID;
  the parent exits when all are reaped.  A worker whose parent dies sees its channel close
  and drains too.

Signal handlers only record the signal and wake the loop (``signal.set_wakeup_fd``).  The
parent has no threads and no event loop, so forking from it is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import pickle
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meridian.config import Config
from meridian.lifecycle import ConfigHolder, FileWatch, WatchSpec, configured_watch, file_identity
from meridian.log import get_logger
from meridian.supervise_policy import Action, Finish, Kill, Notify, Phase, Policy, Spawn, Timing

log = get_logger("supervise")

#: Signals the parent handles; blocked around a fork so a child never runs the parent's handler.
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
#: Seconds added to the children's drain timeout before they are killed.
DRAIN_MARGIN = 5.0
SNAPSHOT = "config.pickle"


# ------------------------------------------------------------------------------ the worker side


class ParentLink:
    """A worker's end of its channel to the supervisor: heartbeats out, config generations in."""

    def __init__(self, sock: socket.socket, snapshot: str, interval: float) -> None:
        self.sock = sock
        self.snapshot = snapshot
        self.interval = interval
        self._buffer = b""
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._generation: Callable[[], int] = lambda: 0
        self._adopt: Callable[[Config, int], object] = lambda config, generation: None
        self._parent_gone: Callable[[], None] = lambda: None

    def attach(
        self,
        *,
        generation: Callable[[], int],
        adopt: Callable[[Config, int], object],
        parent_gone: Callable[[], None],
    ) -> None:
        """Start beating (the first beat says: serving) and listening, on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._generation = generation
        self._adopt = adopt
        self._parent_gone = parent_gone
        self.sock.setblocking(False)
        self._loop.add_reader(self.sock.fileno(), self._readable)
        self._tick()

    def detach(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self.sock.fileno())
            self._loop = None

    def beat(self) -> None:
        with contextlib.suppress(OSError):  # full (the parent reads soon) or gone (EOF says)
            self.sock.send(b"beat %d\n" % self._generation())

    def _tick(self) -> None:
        self.beat()
        if self._loop is not None:
            self._timer = self._loop.call_later(self.interval, self._tick)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.detach()
            log.warning("supervisor_gone", pid=os.getpid())
            self._parent_gone()
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if any(line.startswith(b"config ") for line in lines):
            self._load()

    def _load(self) -> None:
        try:
            with open(self.snapshot, "rb") as file:
                generation, config = pickle.load(file)  # written by our own parent, mode 0600
        except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
            log.error("config_snapshot_unreadable", path=self.snapshot, error=str(exc))
            return
        if isinstance(config, Config) and generation > self._generation():
            self._adopt(config, generation)
        self.beat()  # the parent learns the generation now, not a heartbeat later


@dataclass(frozen=True, slots=True)
class WorkerContext:
    """What a forked worker is given: its slot, the accepted config, its channel."""

    name: str
    slot: int
    config: Config
    generation: int
    link: ParentLink


@dataclass
class Group:
    """``workers`` forked processes running ``run``, sharing ``sockets`` (bound by the parent)."""

    name: str
    workers: int
    run: Callable[[WorkerContext], int]
    #: Extra validation of a reloaded config (raises ConfigError); runs in the parent.
    check: Callable[[Config], None] = lambda config: None
    #: The workers' drain timeout under a config.
    drain: Callable[[Config], float] = lambda config: config.edge.drain_timeout
    #: Closed by the parent when it exits, and by the workers of the other groups.
    sockets: Sequence[socket.socket] = ()


# ------------------------------------------------------------------------------ the parent side


@dataclass
class _Slot:
    group: Group | None
    index: int
    argv: list[str] = field(default_factory=list)


class Supervisor:
    """Runs groups of forked workers (and exec'd programs) until stopped; see the module doc."""

    def __init__(
        self,
        holder: ConfigHolder | None = None,
        *,
        timing: Timing | None = None,
        drain_margin: float = DRAIN_MARGIN,
        clock: Callable[[], float] = time.monotonic,
        watch: WatchSpec | None = None,
    ) -> None:
        self.holder = holder
        #: The config file, looked at when due (``--watch-config``; the holder's file only).
        spec = watch or configured_watch()
        self.watch: FileWatch | None = (
            spec.watch() if spec is not None and holder is not None else None
        )
        self.clock = clock
        self.drain_margin = drain_margin
        self.policy = Policy(timing or Timing(), holder.generation if holder else 0)
        #: Private directory (0700): the config snapshot, the edge workers' admin sockets.
        self.run_dir = tempfile.mkdtemp(prefix="meridian-")
        self._slots: dict[str, _Slot] = {}
        self._groups: list[Group] = []
        self._channels: dict[int, socket.socket] = {}
        self._buffers: dict[int, bytes] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, self._drain_wakeups)
        self._signals: list[int] = []
        self._installed = False
        self._previous: dict[int, Any] = {}
        self._closed = False
        if holder is not None:
            self._write_snapshot()

    @property
    def children(self) -> list[str]:
        return list(self._slots)

    @property
    def snapshot_path(self) -> str:
        return os.path.join(self.run_dir, SNAPSHOT)

    # ------------------------------------------------------------------------- set-up

    def install_signal_handlers(self) -> None:
        if self._installed:
            return
        self._installed = True
        signal.set_wakeup_fd(self._wake_write.fileno(), warn_on_full_buffer=False)
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def add_group(self, group: Group) -> None:
        """Fork ``group``'s workers now (they inherit the accepted config)."""
        if self.holder is None:
            raise ValueError("a group of workers needs the config holder")
        self.install_signal_handlers()
        self._groups.append(group)
        self.holder.listeners.append(lambda config, generation: group.check(config))
        self._update_drain()
        for index in range(group.workers):
            name = f"{group.name}/{index}"
            self._slots[name] = _Slot(group, index)
            self._perform(self.policy.add(name, True, self.clock()))

    def start(self, name: str, argv: list[str]) -> None:
        """Exec ``argv`` as a child (restarted like a worker; SIGHUP forwarded on reload)."""
        self.install_signal_handlers()
        self._slots[name] = _Slot(None, 0, argv)
        self._perform(self.policy.add(name, False, self.clock()))

    def _update_drain(self) -> None:
        if self.holder is None or not self._groups:
            return
        drain = max(group.drain(self.holder.current) for group in self._groups)
        drain += self.drain_margin
        self.policy.timing = dataclasses.replace(self.policy.timing, drain=drain)

    def _write_snapshot(self) -> None:
        assert self.holder is not None
        temporary = self.snapshot_path + ".new"
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            pickle.dump((self.holder.generation, self.holder.current), f)
        os.replace(temporary, self.snapshot_path)

    # --------------------------------------------------------------------------- loop

    def run(self, until: float | None = None) -> int:
        """Supervise until stopped (a signal, ``until`` on the monotonic clock, or giving up
        on a crash loop) and every child is reaped.  Returns the exit code."""
        try:
            self._loop(until)
        except BaseException:
            self._kill_all()
            self.close()
            raise
        self.close()
        return self.policy.code

    def stop(self, timeout: float | None = None) -> None:
        """Drain every child now (SIGKILL after ``timeout`` or the drain deadline) and wait."""
        if self._closed:
            return
        try:
            if timeout is not None:
                self.policy.timing = dataclasses.replace(self.policy.timing, drain=timeout)
            self._perform(self.policy.stop(self.clock()))
            self._loop(None)
        finally:
            self._kill_all()
            self.close()

    def _loop(self, until: float | None) -> None:
        while not self.policy.finished:
            self._turn(until, 1.0)

    def _turn(self, until: float | None, longest: float) -> None:
        """One pass: wait for an event (at most ``longest`` seconds), then signals, config,
        exits and deadlines."""
        now = self.clock()
        if until is not None and not self.policy.stopping and now >= until:
            self._perform(self.policy.stop(now, 0, "run time over"))
            return
        wake = self.policy.wakeup()
        if until is not None and not self.policy.stopping:
            wake = min(wake, until)
        if self.watch is not None and not self.policy.stopping:
            wake = min(wake, self.watch.due)
        # At most ``longest`` (a second in run()): a safety net should a SIGCHLD go unseen.
        timeout = longest if math.isinf(wake) else min(max(0.0, wake - now), longest)
        for key, _ in self._selector.select(timeout):
            key.data()
        self._handle_signals()
        self._look_at_config()
        self._reap()
        self._perform(self.policy.tick(self.clock()))

    def poll(self) -> bool:
        """One pass that does not block, for a caller that runs its own loop (``meridian
        world`` calls it a few times a second).  False once stopping (a signal) or finished."""
        if not self.policy.finished:
            self._turn(None, 0.0)
        return not self.policy.stopping and not self.policy.finished

    def retire(self, name: str, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop child ``name`` for good (not replaced), by PID; see ``Policy.retire``."""
        self._perform(self.policy.retire(name, self.clock(), sig))
        self._reap()

    def pid_of(self, name: str) -> int | None:
        child = self.policy.children.get(name)
        return child.pid if child is not None else None

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_read.recv(512):
                pass

    def _handle_signals(self) -> None:
        signals, self._signals = self._signals, []
        for signum in signals:
            now = self.clock()
            if signum in (signal.SIGTERM, signal.SIGINT):
                if not self.policy.stopping:
                    name = signal.Signals(signum).name
                    log.info("supervisor_stopping", signal=name, drain=self.policy.timing.drain)
                self._perform(self.policy.stop(now, 0, signal.Signals(signum).name))
            elif signum == signal.SIGHUP and not self.policy.stopping:
                self._reload(now)

    def _look_at_config(self) -> None:
        watch = self.watch
        now = self.clock()
        if watch is None or self.policy.stopping or now < watch.due:
            return
        if watch.observe(file_identity(watch.path), now):
            log.info("config_file_changed", path=watch.path, pid=os.getpid())
            self._reload(now)

    def _reload(self, now: float) -> None:
        if self.holder is None:
            self._perform(self.policy.reloaded(self.policy.generation, now))
            return
        if not self.holder.reload():  # logged one line; the old config keeps serving
            return
        self._write_snapshot()
        self._update_drain()
        self._perform(self.policy.reloaded(self.holder.generation, now))

    def _reap(self) -> None:
        for pid in self.policy.pids():
            try:
                reaped, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                reaped, status = pid, 0
            if reaped == 0:
                continue
            name, phase = self.policy.describe(pid)
            code = os.waitstatus_to_exitcode(status)
            self._close_channel(pid)
            now = self.clock()
            actions = self.policy.exited(pid, now)
            child = self.policy.children.get(name)
            quiet = self.policy.stopping or phase == "retiring"
            fields: dict[str, Any] = {"child": name, "pid": pid, "status": code, "phase": phase}
            if not quiet and child is not None and child.phase is Phase.WAITING:
                fields["restart_in"] = round(max(0.0, child.restart_at - now), 3)
            (log.info if quiet else log.error)("worker_exited", **fields)
            self._perform(actions)

    def _readable(self, pid: int) -> None:
        channel = self._channels.get(pid)
        if channel is None:
            return
        try:
            data = channel.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the worker is exiting; its exit is seen by waitpid
            self._close_channel(pid)
            return
        buffer = self._buffers.get(pid, b"") + data
        *lines, rest = buffer.split(b"\n")
        self._buffers[pid] = rest[-256:]
        now = self.clock()
        for line in lines:
            kind, _, value = line.partition(b" ")
            if kind == b"beat" and value.isdigit():
                self._perform(self.policy.beat(pid, int(value), now))

    def _close_channel(self, pid: int) -> None:
        channel = self._channels.pop(pid, None)
        self._buffers.pop(pid, None)
        if channel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(channel)
            channel.close()

    # -------------------------------------------------------------------------- actions

    def _perform(self, actions: list[Action]) -> None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, Spawn):
                queue.extend(self._spawn(action.name, action.reason))
            elif isinstance(action, Kill):
                level = log.info if action.signal != signal.SIGKILL else log.error
                level(
                    "worker_signalled",
                    child=action.name,
                    pid=action.pid,
                    signal=action.signal.name,
                    reason=action.reason,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(action.pid, action.signal)
            elif isinstance(action, Notify):
                channel = self._channels.get(action.pid)
                if channel is not None:
                    # Never blocks: a worker that does not read is replaced by the policy.
                    with contextlib.suppress(OSError):
                        channel.send(b"config %d\n" % action.generation)
            elif isinstance(action, Finish):
                (log.info if action.code == 0 else log.error)(
                    "supervisor_finished", code=action.code, reason=action.reason
                )

    def _spawn(self, name: str, reason: str) -> list[Action]:
        slot = self._slots[name]
        now = self.clock()
        if slot.group is None:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            try:
                pid = os.posix_spawnp(
                    slot.argv[0], slot.argv, env, setsigmask=(), setsigdef=HANDLED
                )
            except OSError as exc:
                log.error("worker_spawn_failed", child=name, error=str(exc))
                return self.policy.spawn_failed(name, now)
            log.info("worker_started", child=name, pid=pid, reason=reason)
            return self.policy.spawned(name, pid, now)
        parent_end, child_end = socket.socketpair()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            parent_end.close()
            child_end.close()
            log.error("worker_spawn_failed", child=name, error=str(exc))
            return self.policy.spawn_failed(name, now)
        if pid == 0:
            self._child(slot, name, child_end, parent_end, mask)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        child_end.close()
        parent_end.setblocking(False)
        self._channels[pid] = parent_end
        self._selector.register(parent_end, selectors.EVENT_READ, lambda: self._readable(pid))
        log.info(
            "worker_started", child=name, pid=pid, generation=self.policy.generation, reason=reason
        )
        return self.policy.spawned(name, pid, now)

    def _child(
        self,
        slot: _Slot,
        name: str,
        channel: socket.socket,
        parent_end: socket.socket,
        mask: set[int | signal.Signals],
    ) -> None:
        """In the forked child: drop the parent's state, run the worker, exit."""
        code = 1
        try:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the config comes from the parent
            signal.set_wakeup_fd(-1)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            parent_end.close()
            for other in self._channels.values():
                other.close()
            self._selector.close()
            self._wake_read.close()
            self._wake_write.close()
            group = slot.group
            assert group is not None and self.holder is not None
            for other_group in self._groups:
                if other_group is not group:
                    for sock in other_group.sockets:
                        sock.close()
            link = ParentLink(channel, self.snapshot_path, self.policy.timing.heartbeat)
            context = WorkerContext(
                name, slot.index, self.holder.current, self.holder.generation, link
            )
            code = group.run(context)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log.error("worker_failed", child=name, error=traceback.format_exc())
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)

    def _kill_all(self) -> None:
        """Last resort (the parent is failing): SIGKILL every child by PID and reap it."""
        for pid in self.policy.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self.policy.exited(pid, self.clock())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for pid in list(self._channels):
            self._close_channel(pid)
        self._selector.close()
        if self._installed:
            signal.set_wakeup_fd(-1)
            for sig, previous in self._previous.items():
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._wake_read.close()
        self._wake_write.close()
        for group in self._groups:
            for sock in group.sockets:
                sock.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._closed:
            self.stop()


def wait_for_port(host: str, port: int, deadline: float, udp: bool = False) -> bool:
    """Poll a TCP port until it accepts a connection or the deadline passes."""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


__all__ = ["Group", "ParentLink", "Supervisor", "Timing", "WorkerContext", "wait_for_port"]
