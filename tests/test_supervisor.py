"""The one supervisor (``meridian.supervise``): its pure policy with a fake clock, then the
real thing: a toy group of forked workers (``python -m tests.test_supervisor``, short
timings), and the real ``dns --workers`` and ``meridian serve``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from meridian.supervise_policy import (
    TRANSITIONS,
    Event,
    Finish,
    Kill,
    Notify,
    Phase,
    Policy,
    Spawn,
    Timing,
    backoff,
)
from tests.edge_support import (
    LOCATIONS,
    ROOT,
    Proc,
    free_port,
    poll_until,
    processes,
    region,
    write_config,
)

T = Timing(
    heartbeat=1.0,
    hung_after=10.0,
    start_deadline=30.0,
    reload_deadline=5.0,
    stable_after=10.0,
    backoff_base=0.5,
    backoff_max=4.0,
    max_boot_failures=3,
    drain=15.0,
)


def ready_policy(names: tuple[str, ...] = ("w/0", "w/1"), *, now: float = 0.0) -> Policy:
    """A policy whose children are spawned (pids 100, 101, ...) and have beaten once."""
    policy = Policy(T, generation=1)
    for offset, name in enumerate(names):
        assert policy.add(name, True, now) == [Spawn(name, "start")]
        policy.spawned(name, 100 + offset, now)
        policy.beat(100 + offset, 1, now)
    return policy


def kills(actions: list[object]) -> list[tuple[int, signal.Signals]]:
    return [(a.pid, a.signal) for a in actions if isinstance(a, Kill)]


def spawns(actions: list[object]) -> list[str]:
    return [a.name for a in actions if isinstance(a, Spawn)]


# ---------------------------------------------------------------------------------- policy


def test_children_start_then_become_ready_on_their_first_heartbeat():
    policy = Policy(T, generation=1)
    assert policy.add("w/0", True, 0.0) == [Spawn("w/0", "start")]
    assert policy.children["w/0"].phase is Phase.WAITING
    policy.spawned("w/0", 100, 0.0)
    assert policy.children["w/0"].phase is Phase.STARTING
    assert policy.wakeup() == T.start_deadline
    policy.beat(100, 1, 0.5)
    assert policy.children["w/0"].phase is Phase.READY
    assert policy.wakeup() == 0.5 + T.hung_after
    with pytest.raises(ValueError):
        policy.add("w/0", True, 1.0)


def test_a_long_lived_child_that_dies_is_replaced_at_once():
    policy = ready_policy()
    actions = policy.exited(100, T.stable_after + 1)
    assert spawns(actions) == ["w/0"]
    assert policy.children["w/0"].phase is Phase.WAITING
    assert policy.children["w/0"].failures == 0


def test_a_crash_loop_backs_off_exponentially_up_to_the_cap():
    assert [backoff(n, T) for n in range(7)] == [0.0, 0.0, 0.5, 1.0, 2.0, 4.0, 4.0]
    policy = ready_policy(("w/0",))
    now = 0.0
    pid = 100
    delays = []
    for _ in range(5):
        now += 1.0  # each life is shorter than stable_after, after it was ready
        actions = policy.exited(pid, now)
        child = policy.children["w/0"]
        delays.append(child.restart_at - now)
        if child.restart_at > now:
            assert actions == []
            # Nothing before the pause is over; the spawn exactly when it is.
            assert policy.tick(child.restart_at - 0.01) == []
            assert policy.wakeup() == child.restart_at
            now = child.restart_at
            assert spawns(policy.tick(now)) == ["w/0"]
        else:
            assert spawns(actions) == ["w/0"]
        pid += 1
        policy.spawned("w/0", pid, now)
        policy.beat(pid, 1, now)
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0]
    # Stable for stable_after: the next crash is an accident again.
    policy.beat(pid, 1, now + T.stable_after)
    assert policy.tick(now + T.stable_after) == []
    assert policy.children["w/0"].failures == 0
    assert spawns(policy.exited(pid, now + T.stable_after + 1)) == ["w/0"]


def test_a_child_that_never_becomes_ready_makes_the_group_give_up():
    policy = Policy(T, generation=1)
    policy.add("w/0", True, 0.0)
    policy.add("w/1", True, 0.0)
    policy.spawned("w/0", 100, 0.0)
    policy.spawned("w/1", 200, 0.0)
    policy.beat(200, 1, 0.1)  # w/1 is fine
    now, pid = 0.0, 100
    for failure in range(1, T.max_boot_failures):
        now += 0.1
        policy.exited(pid, now)
        assert not policy.stopping
        now = max(now, policy.children["w/0"].restart_at)
        assert spawns(policy.tick(now)) == ["w/0"] or failure == 1
        pid += 1
        policy.spawned("w/0", pid, now)
    actions = policy.exited(pid, now + 0.1)
    assert policy.stopping and policy.code == 1
    assert "before it was ready" in policy.reason
    assert kills(actions) == [(200, signal.SIGTERM)]  # the healthy sibling drains
    assert policy.exited(200, now + 1) == [Finish(1, policy.reason)]
    assert policy.finished


def test_a_hung_child_is_killed_and_replaced():
    policy = ready_policy()
    policy.beat(101, 1, 9.0)
    # w/0 last beat at 0: silent for hung_after at 10.0; w/1 is fine until 19.0.
    assert policy.wakeup() == 10.0
    assert policy.tick(9.99) == []
    actions = policy.tick(10.0)
    assert kills(actions) == [(100, signal.SIGKILL)]
    assert "hung" in actions[0].reason  # type: ignore[union-attr]
    assert policy.children["w/0"].phase is Phase.KILLED
    assert policy.tick(11.0) == []  # killed once, not on every tick
    assert policy.beat(100, 1, 11.0) == []  # too late: it is being killed
    assert policy.children["w/0"].phase is Phase.KILLED
    actions = policy.exited(100, 11.0)
    assert spawns(actions) == ["w/0"]  # a first failure: at once


def test_a_child_silent_since_its_start_is_killed_at_the_start_deadline():
    policy = Policy(T, generation=1)
    policy.add("w/0", True, 0.0)
    policy.spawned("w/0", 100, 0.0)
    assert policy.tick(T.start_deadline - 0.1) == []
    assert kills(policy.tick(T.start_deadline)) == [(100, signal.SIGKILL)]
    policy.exited(100, T.start_deadline + 0.1)
    assert policy.children["w/0"].boot_failures == 1


def test_a_reload_reaches_every_child_and_a_respawn_gets_the_new_generation():
    policy = ready_policy()
    actions = policy.reloaded(2, 1.0)
    assert actions == [Notify("w/0", 100, 2), Notify("w/1", 101, 2)]
    policy.beat(100, 2, 1.1)
    policy.beat(101, 2, 1.1)
    # A child dies later (the file on disk may be broken by then): its replacement is
    # forked from the supervisor's memory, with the accepted generation.
    policy.beat(100, 2, 19.0)
    policy.exited(101, 20.0)
    policy.spawned("w/1", 102, 20.0)
    assert policy.children["w/1"].generation == 2
    policy.beat(102, 2, 21.0)
    assert policy.tick(25.0) == []  # nobody stale


def test_a_child_still_on_an_old_generation_is_replaced_after_the_reload_deadline():
    policy = ready_policy()
    policy.reloaded(2, 1.0)
    policy.beat(100, 2, 1.2)
    policy.beat(101, 1, 1.2)  # w/1 did not adopt generation 2
    assert policy.wakeup() == 1.0 + T.reload_deadline
    assert policy.tick(5.9) == []
    actions = policy.tick(6.0)
    assert kills(actions) == [(101, signal.SIGTERM)]  # drains, beside its replacement
    assert spawns(actions) == ["w/1"]
    assert policy.retiring[101].kill_at == 6.0 + T.drain
    policy.spawned("w/1", 102, 6.0)
    assert policy.children["w/1"].generation == 2
    assert sorted(policy.pids()) == [100, 101, 102]
    assert policy.beat(101, 1, 6.5) == []  # a retiring process's beats do not count
    policy.beat(100, 2, 20.0)
    policy.beat(102, 2, 20.0)
    # It overstays its drain: killed, once.
    assert kills(policy.tick(6.0 + T.drain)) == [(101, signal.SIGKILL)]
    assert policy.tick(6.0 + T.drain + 1) == []
    assert policy.exited(101, 22.0) == []
    assert sorted(policy.pids()) == [100, 102]


def test_an_exec_child_gets_sighup_and_becomes_ready_by_uptime():
    policy = Policy(T)
    policy.add("origin", False, 0.0)
    policy.spawned("origin", 300, 0.0)
    assert policy.reloaded(0, 1.0) == [Kill("origin", 300, signal.SIGHUP, "reload")]
    assert policy.tick(T.stable_after) == []
    assert policy.children["origin"].phase is Phase.READY
    assert policy.tick(1000.0) == []  # no heartbeat channel: never "hung"


def test_stop_drains_every_child_then_kills_what_is_left_by_pid():
    policy = ready_policy(("w/0", "w/1", "w/2"))
    policy.exited(102, 20.0)
    policy.children["w/2"] = policy.children["w/2"].__class__(
        "w/2", True, Phase.WAITING, restart_at=25.0
    )
    actions = policy.stop(21.0)
    assert kills(actions) == [(100, signal.SIGTERM), (101, signal.SIGTERM)]
    assert policy.children["w/2"].phase is Phase.DONE  # never respawned
    assert policy.stop(21.5) == []  # a second SIGTERM changes nothing
    assert policy.tick(25.0) == []  # no spawn while stopping
    assert policy.exited(100, 22.0) == []
    assert policy.wakeup() == 21.0 + T.drain
    assert kills(policy.tick(21.0 + T.drain)) == [(101, signal.SIGKILL)]
    assert policy.tick(40.0) == []
    assert policy.exited(101, 40.0) == [Finish(0, "stop requested")]
    assert policy.exited(101, 40.0) == []
    assert policy.pids() == []


def test_a_stop_that_races_a_spawn_still_drains_the_new_child():
    policy = ready_policy(("w/0",))
    policy.exited(100, 20.0)  # Spawn w/0 handed to the shell...
    policy.stop(20.0)  # ...which saw SIGTERM before it forked
    assert policy.children["w/0"].phase is Phase.DONE
    policy = ready_policy(("w/0",))
    policy.exited(100, 20.0)
    policy.stopping = True
    actions = policy.spawned("w/0", 101, 20.0)
    assert kills(actions) == [(101, signal.SIGTERM)]


def test_the_transition_table_only_names_real_moves():
    # Every pair absent from the table leaves the phase unchanged (DONE is final).
    assert not any(phase is Phase.DONE for phase, _ in TRANSITIONS)
    assert {event for _, event in TRANSITIONS} == set(Event)
    policy = ready_policy(("w/0",))
    policy.stop(1.0)
    policy.exited(100, 2.0)
    assert policy.children["w/0"].phase is Phase.DONE
    assert policy.beat(100, 1, 3.0) == [] and policy.exited(100, 3.0) == []
    assert policy.children["w/0"].phase is Phase.DONE


def test_unknown_pids_and_spawn_failures():
    policy = ready_policy(("w/0",))
    assert policy.beat(999, 5, 1.0) == [] and policy.exited(999, 1.0) == []
    policy.exited(100, 20.0)
    assert policy.spawn_failed("w/0", 20.0) == []
    policy.spawn_failed("w/0", 20.0)
    child = policy.children["w/0"]
    assert child.phase is Phase.WAITING and child.restart_at == 20.0 + backoff(2, T)
    assert spawns(policy.tick(child.restart_at)) == ["w/0"]


# --------------------------------------------------------------------- the toy group, for real

TOY_TIMING = {
    "heartbeat": 0.1,
    "hung_after": 1.0,
    "start_deadline": 5.0,
    "reload_deadline": 1.0,
    "stable_after": 1.0,
    "backoff_base": 0.1,
    "backoff_max": 0.4,
    "max_boot_failures": 3,
    "drain": 1.5,
}


def toy_main(mode: str, config: str, directory: str, workers: int) -> int:
    """The supervisor process of the toy tests: ``workers`` forked toys, each recording
    ``<dir>/<slot>-<pid>`` = the generation it runs (rewritten on every adoption)."""
    from meridian import log
    from meridian.config import Config
    from meridian.lifecycle import ConfigHolder
    from meridian.supervise import Group, Supervisor, WorkerContext

    log.configure("info")
    holder = ConfigHolder.from_file(config)

    async def toy(context: WorkerContext) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if mode == "deaf":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            loop.add_signal_handler(signal.SIGTERM, stop.set)
        generation = context.generation
        record = Path(directory) / f"{context.slot}-{os.getpid()}"

        def adopt(new: Config, offered: int) -> None:
            nonlocal generation
            if mode != "stubborn":
                generation = offered
                record.write_text(str(generation))

        # Attach (its first heartbeat is sent at once) before the record says "live": a test
        # that stops a live toy must stop one its supervisor saw ready, or it is never "hung"
        # but "not ready after start_deadline" (seen under load, with pytest-xdist).
        context.link.attach(generation=lambda: generation, adopt=adopt, parent_gone=stop.set)
        record.write_text(str(generation))
        await stop.wait()
        context.link.detach()
        return 0

    def run_one(context: WorkerContext) -> int:
        if mode == "crash":
            return 3
        return asyncio.run(toy(context))

    supervisor = Supervisor(holder, timing=Timing(**TOY_TIMING), drain_margin=1.5)
    supervisor.add_group(Group("toy", workers, run_one, drain=lambda config: 0.0))
    return supervisor.run()


class Toy(Proc):
    def __init__(self, tmp: Path, mode: str, workers: int = 2) -> None:
        self.config = _plain_config(tmp / "toy.yaml")
        self.directory = tmp / "records"
        self.directory.mkdir()
        argv = [
            sys.executable,
            "-m",
            "tests.test_supervisor",
            mode,
            str(self.config),
            str(self.directory),
            str(workers),
        ]
        super().__init__(argv, tmp / "toy.log", f"toy {mode}")

    def records(self) -> dict[int, tuple[int, int]]:
        """pid -> (slot, generation) of every toy that has lived."""
        out = {}
        for path in self.directory.iterdir():
            slot, pid = path.name.split("-")
            with contextlib.suppress(ValueError):
                out[int(pid)] = (int(slot), int(path.read_text() or 0))
        return out

    def live(self) -> dict[int, int]:
        """slot -> pid of the toys alive now."""
        return {slot: pid for pid, (slot, _) in self.records().items() if alive(pid)}


def _plain_config(path: Path) -> Path:
    return write_config(path, {"eu-central": region(*LOCATIONS["eu-central"], ["http://x:1"])})


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper that is not us counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


@pytest.fixture
def toy_procs() -> Iterator[list[Proc]]:
    with processes() as procs:
        yield procs


def _start_toy(procs: list[Proc], tmp: Path, mode: str, workers: int = 2) -> Toy:
    toy = Toy(tmp, mode, workers)
    procs.append(toy)
    return toy


def _two_live(toy: Toy) -> dict[int, int]:
    def two() -> dict[int, int] | None:
        live = toy.live()
        return live if len(live) == 2 else None

    return poll_until(two)


def test_a_hung_worker_is_killed_and_replaced_then_sigterm_stops_all(tmp_path, toy_procs):
    toy = _start_toy(toy_procs, tmp_path, "serve")
    before = _two_live(toy)
    os.kill(before[1], signal.SIGSTOP)  # its loop no longer beats
    started = time.monotonic()
    hung = rf'event=worker_signalled child=toy/1 pid={before[1]} signal=SIGKILL reason="hung'
    toy.wait_for_log(hung)
    after = poll_until(lambda: (live := toy.live()).get(1) not in (None, before[1]) and live)
    # hung_after 1 s (+ up to a heartbeat and a scheduling hiccup) after the stop.
    assert time.monotonic() - started < 5.0
    assert after[0] == before[0]  # the sibling was left alone
    assert not alive(before[1])
    toy.signal(signal.SIGTERM)
    assert toy.wait(within=10) == 0
    assert not any(alive(pid) for pid in after.values())
    assert re.search(r"event=supervisor_finished code=0", toy.log_text())


def test_workers_that_cannot_boot_make_the_supervisor_exit_1(tmp_path, toy_procs):
    toy = _start_toy(toy_procs, tmp_path, "crash", workers=1)
    assert toy.wait(within=15) == 1
    log = toy.log_text()
    assert len(re.findall(r"event=worker_exited child=toy/0 .*status=3", log)) == 3
    assert re.search(r'event=supervisor_finished code=1 reason="toy/0 exited 3 times', log)


def test_workers_leave_when_their_supervisor_is_killed(tmp_path, toy_procs):
    toy = _start_toy(toy_procs, tmp_path, "serve")
    pids = _two_live(toy)
    toy.signal(signal.SIGKILL)
    toy.wait(within=5)
    # No supervisor to stop them by PID: each sees its channel close and drains itself.
    poll_until(lambda: not any(alive(pid) for pid in pids.values()), within=5)


def test_a_worker_that_ignores_sigterm_is_killed_at_the_drain_deadline(tmp_path, toy_procs):
    toy = _start_toy(toy_procs, tmp_path, "deaf")
    pids = _two_live(toy)
    started = time.monotonic()
    toy.signal(signal.SIGTERM)
    assert toy.wait(within=10) == 0
    elapsed = time.monotonic() - started
    assert 1.2 < elapsed < 6.0, elapsed  # drain 0 + margin 1.5 s, then SIGKILL
    assert len(re.findall(r'signal=SIGKILL reason="drain deadline"', toy.log_text())) == 2
    assert not any(alive(pid) for pid in pids.values())


def test_reloads_reach_every_worker_and_a_bad_file_changes_nothing(tmp_path, toy_procs):
    toy = _start_toy(toy_procs, tmp_path, "serve")
    pids = _two_live(toy)
    data = yaml.safe_load(toy.config.read_text())
    data["edge"]["drain_timeout"] = "3s"
    toy.config.write_text(yaml.safe_dump(data))
    toy.signal(signal.SIGHUP)
    poll_until(lambda: all(toy.records()[pid][1] == 2 for pid in pids.values()))
    data["edge"]["routes"][0]["service"] = "nope"
    toy.config.write_text(yaml.safe_dump(data))
    toy.signal(signal.SIGHUP)
    rejected = toy.wait_for_log(r"event=config_reload_rejected .*")
    # One line, naming the field and the reason.
    assert "edge.routes[0].service" in rejected.group(0) and "nope" in rejected.group(0)
    assert len(re.findall("config_reload_rejected", toy.log_text())) == 1
    # A worker respawned now (the file is broken) runs generation 2, like its sibling.
    os.kill(pids[1], signal.SIGKILL)
    after = poll_until(lambda: (live := toy.live()).get(1) not in (None, pids[1]) and live)
    assert toy.records()[after[1]] == (1, 2)
    assert toy.records()[pids[0]] == (0, 2)


def test_a_worker_that_does_not_adopt_a_reload_is_replaced(tmp_path, toy_procs):
    toy = _start_toy(toy_procs, tmp_path, "stubborn")
    pids = _two_live(toy)
    data = yaml.safe_load(toy.config.read_text())
    data["edge"]["drain_timeout"] = "3s"
    toy.config.write_text(yaml.safe_dump(data))
    toy.signal(signal.SIGHUP)
    # Both still on generation 1 after reload_deadline (1 s): retired (SIGTERM), replaced by
    # workers forked with generation 2.
    replaced = poll_until(
        lambda: (
            (live := toy.live())
            and len(live) == 2
            and not set(live.values()) & set(pids.values())
            and live
        ),
        within=10,
    )
    assert {toy.records()[pid][1] for pid in replaced.values()} == {2}
    assert (
        len(re.findall(r"signal=SIGTERM reason=\"runs generation 1, not 2\"", toy.log_text())) == 2
    )


# ------------------------------------------------------------------- dns --workers, serve


def _dns_config(path: Path, dns_port: int, admin_port: int, edge_port: int = 0) -> Path:
    write_config(path, {"eu-central": region(*LOCATIONS["eu-central"], ["http://127.0.0.1:9"])})
    data = yaml.safe_load(path.read_text())
    data["listeners"] = {
        "dns": f"127.0.0.1:{dns_port}",
        "dns_admin": f"127.0.0.1:{admin_port}",
        "edge": f"127.0.0.1:{edge_port or free_port()}",
        "edge_admin": f"127.0.0.1:{free_port()}",
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _ask(port: int, tcp: bool = False) -> list[str]:
    import dns.message
    import dns.query

    query = dns.message.make_query("api.meridian.test", "A")
    send = dns.query.tcp if tcp else dns.query.udp
    reply = send(query, "127.0.0.1", port=port, timeout=2)
    return [r.to_text() for rrset in reply.answer for r in rrset]


def _pids(pattern: str, text: str) -> list[int]:
    return [int(pid) for pid in re.findall(pattern, text)]


def test_dns_workers_share_the_parents_sockets_and_a_dead_one_is_replaced(tmp_path):
    port = free_port()
    config = _dns_config(tmp_path / "dns.yaml", port, free_port())
    with processes() as procs:
        argv = [sys.executable, "-m", "geodns", "--config", str(config), "--pop", "fra"]
        server = Proc([*argv, "--workers", "2"], tmp_path / "dns.log", "dns")
        procs.append(server)
        pids = poll_until(lambda: _pids(r"event=dns_listening .*pid=(\d+)", server.log_text())[1:])
        assert _ask(port) and _ask(port, tcp=True)
        victim = _pids(r"event=dns_listening .*pid=(\d+)", server.log_text())[0]
        os.kill(victim, signal.SIGKILL)
        # Answered throughout: the socket stays bound in the parent and the sibling.
        for _ in range(20):
            assert _ask(port)
        server.wait_for_log(rf"event=worker_exited child=dns/\d pid={victim}")
        poll_until(lambda: len(_pids(r"event=dns_listening .*pid=(\d+)", server.log_text())) == 3)
        assert _ask(port, tcp=True)
        server.signal(signal.SIGTERM)
        assert server.wait(within=15) == 0
        assert len(re.findall("event=dns_stopped", server.log_text())) == 2
        assert pids


def test_serve_runs_edge_and_dns_under_one_supervisor(tmp_path):
    from tests.edge_support import Origin, http_request

    with processes() as procs:
        origin = Origin("eu-central", tmp_path, echo=True)
        procs.append(origin)
        origin.ready()
        dns_port, edge_port = free_port(), free_port()
        config = tmp_path / "pop.yaml"
        write_config(config, {"eu-central": region(*LOCATIONS["eu-central"], [origin.url])})
        data = yaml.safe_load(config.read_text())
        data["listeners"] = {
            "dns": f"127.0.0.1:{dns_port}",
            "dns_admin": f"127.0.0.1:{free_port()}",
            "edge": f"127.0.0.1:{edge_port}",
            "edge_admin": f"127.0.0.1:{free_port()}",
        }
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        argv = [sys.executable, "-m", "meridian.cli", "serve", "--config", str(config)]
        serve = Proc([*argv, "--pop", "fra", "--workers", "2"], tmp_path / "serve.log", "serve")
        procs.append(serve)
        serve.wait_for_log(r"event=dns_listening")
        poll_until(lambda: len(re.findall("event=edge_listening", serve.log_text())) == 2)
        assert http_request(edge_port, "GET", "/echo")[0] == 200
        assert _ask(dns_port)
        # One SIGHUP, one validation in the parent, adopted by all three workers.
        data["edge"]["routes"] = [{"name": "g2", "service": "market", "path_prefix": "/g2/"}]
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        serve.signal(signal.SIGHUP)
        poll_until(lambda: len(re.findall(r"config_adopted .*generation=2", serve.log_text())) == 3)
        assert len(re.findall(r"event=config_reloaded", serve.log_text())) == 1
        assert http_request(edge_port, "GET", "/g2/x")[0] == 200
        assert http_request(edge_port, "GET", "/echo")[0] == 404
        workers = _pids(r"event=worker_started .*pid=(\d+)", serve.log_text())
        assert len(workers) == 3
        serve.signal(signal.SIGTERM)
        assert serve.wait(within=20) == 0
        assert not any(alive(pid) for pid in workers)


def _main() -> int:
    mode, config, directory, workers = sys.argv[1:5]
    return toy_main(mode, config, directory, int(workers))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(_main())
