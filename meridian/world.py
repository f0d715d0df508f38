"""``meridian world``: a whole world on this machine from one file, and what its clients see.

Regions (one origin each), POPs (an edge and a GeoDNS each, on the POP's own loopback
address), and the WAN between them (``meridian.world_relay``) are processes of the one
supervisor (``meridian.supervise``), started and stopped by PID; the plan of who listens where
is ``meridian.world_plan``.  Then each client asks every GeoDNS where to go (with its
resolver's ECS subnet), fetches through the POP it was given and directly from its nearest
origin, and says where it landed.  ``--report`` adds the latency table and the scripted
faults (``meridian.world_faults``).  The test harness (``tests/test_world.py``) drives the same
:class:`World`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from meridian.config import ConfigError, GeoConfig, HostPort, IPNetwork, Location
from meridian.geo import GeoLocator
from meridian.log import get_logger
from meridian.supervise import Supervisor
from meridian.world_plan import (
    Place,
    WorldPlan,
    build_plan,
    client_tag,
    link_spec,
    parse_world,
)
from meridian.world_probe import DnsAnswer, Fetch, fetch, resolve

log = get_logger("world")

#: How often the supervisor is given a turn while the world runs.
POLL_EVERY = 0.1


def packaged_world() -> Path:
    return Path(str(resources.files("meridian") / "data" / "world.yaml"))


def load_plan(
    path: Path | None,
    *,
    pops: Sequence[str] = (),
    health: Mapping[str, Any] | None = None,
    ttl: float | None = None,
    with_tls: bool = True,
) -> WorldPlan:
    """Read a world file (default: the embedded one) and plan it; ConfigError when bad.
    ``with_tls``: every POP's edge also listens with TLS (a certificate made now)."""
    from meridian.ports import free_port

    source = path or packaged_world()
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"{source}: cannot read: {exc}"]) from None
    section, topology_path = parse_world(data, str(source))
    topology_file = source.parent / topology_path
    try:
        topology = yaml.safe_load(topology_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"{source}: topology: cannot read {topology_file}: {exc}"]) from None
    tls = _certificate(topology) if with_tls else None
    geo = (topology.get("geo") or {}) if isinstance(topology, dict) else {}
    locator = GeoLocator(GeoConfig(database=str(geo.get("database", "builtin"))), Location(0, 0))
    try:

        def locate(subnet: IPNetwork) -> Place:
            found = locator.locate(subnet.network_address)
            return Place(found.lat, found.lon, found.country, found.continent)

        return build_plan(
            section,
            topology,
            source=str(topology_file),
            pops=pops,
            locate=locate,
            port=free_port,
            health=health,
            ttl=ttl,
            tls=tls,
        )
    except BaseException:
        if tls is not None:
            shutil.rmtree(Path(tls[2]).parent, ignore_errors=True)
        raise
    finally:
        locator.close()


def _certificate(topology: object) -> tuple[str, str, str]:
    """A throwaway CA and a certificate for the zone's names, in a directory of its own
    (removed with the world)."""
    from meridian.certs import issue_demo_certificate

    dns = topology.get("dns") if isinstance(topology, dict) else None
    zone = str((dns or {}).get("zone", "meridian.test")).rstrip(".")
    directory = Path(tempfile.mkdtemp(prefix="meridian-world-tls-"))
    made = issue_demo_certificate(directory, [f"*.{zone}", zone], ["127.0.0.1"])
    return str(made.cert), str(made.key), str(made.ca)


class World:
    """The processes of one plan, and the client's view of them (see the module docstring)."""

    def __init__(self, plan: WorldPlan, *, child_log_level: str = "error") -> None:
        self.plan = plan
        self.child_log_level = child_log_level
        self.workdir = Path(tempfile.mkdtemp(prefix="meridian-world-"))
        self.supervisor = Supervisor()
        self._poller: asyncio.Task[None] | None = None
        self.stopped_by_signal = False
        self._tls: ssl.SSLContext | None = None

    # ------------------------------------------------------------------------- processes

    def _python(self, *args: str) -> list[str]:
        return [sys.executable, "-m", *args]

    def _pop_argv(self, pop: str, part: str) -> list[str]:
        return self._python(
            "meridian.cli",
            part,
            "--config",
            str(self.workdir / f"pop-{pop}.yaml"),
            "--pop",
            pop,
            "--log-level",
            self.child_log_level,
        )

    def start_region(self, name: str) -> None:
        origin = self.plan.region(name).origin
        self.supervisor.start(
            f"origin {name}",
            self._python(
                "meridian.cli",
                "origin",
                "--region",
                name,
                "--host",
                origin.host,
                "--port",
                str(origin.port),
                "--log-level",
                self.child_log_level,
            ),
        )

    def start_pop(self, name: str) -> None:
        for part in ("edge", "dns"):
            self.supervisor.start(f"{part} {name}", self._pop_argv(name, part))

    async def start(self, within: float = 60.0) -> None:
        """Every process of the plan, then wait until each listens."""
        import json

        plan = self.plan
        for pop in plan.pops:
            path = self.workdir / f"pop-{pop.name}.yaml"
            path.write_text(yaml.safe_dump(pop.config, sort_keys=False), encoding="utf-8")
        spec = self.workdir / "links.json"
        spec.write_text(json.dumps(link_spec(plan)), encoding="utf-8")
        self.supervisor.install_signal_handlers()
        self._poller = asyncio.create_task(self._poll())
        self.supervisor.start(
            "relay",
            self._python(
                "meridian.world_relay",
                "--spec",
                str(spec),
                "--control",
                str(plan.relay_control),
                "--log-level",
                self.child_log_level,
            ),
        )
        for region in plan.regions:
            self.start_region(region.name)
        for pop in plan.pops:
            self.start_pop(pop.name)
        ports = [plan.relay_control, *(r.origin for r in plan.regions)]
        for pop in plan.pops:
            ports.extend((pop.edge, pop.edge_admin, pop.dns))
        await self.wait_for(ports, within)

    async def wait_for(self, ports: Sequence[HostPort], within: float) -> None:
        deadline = time.monotonic() + within
        for port in ports:
            while True:
                try:
                    _, writer = await asyncio.open_connection(port.host, port.port)
                    writer.close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{port} did not listen within {within:g}s") from None
                    await asyncio.sleep(0.1)

    async def _poll(self) -> None:
        # The supervisor has nothing to await (it is select()-driven): it is given turns.
        while self.supervisor.poll():  # noqa: ASYNC110
            await asyncio.sleep(POLL_EVERY)
        self.stopped_by_signal = True
        log.warning("world_interrupted")
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()

    def stop(self) -> None:
        """Every process, by PID (SIGTERM, SIGKILL after 5 s), and the files."""
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        self.supervisor.stop(timeout=5.0)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self.plan.ca is not None:
            shutil.rmtree(Path(self.plan.ca).parent, ignore_errors=True)

    # ---------------------------------------------------------------------------- faults

    async def relay(self, command: str) -> str:
        """A command to the WAN relay (``down dst=us-east``); returns its reply."""
        control = self.plan.relay_control
        reader, writer = await asyncio.open_connection(control.host, control.port)
        try:
            writer.write(command.encode() + b"\n")
            await writer.drain()
            reply = (await asyncio.wait_for(reader.readline(), 5.0)).decode().strip()
        finally:
            writer.close()
        if not reply.startswith("ok"):
            raise RuntimeError(f"relay: {command!r}: {reply}")
        return reply

    async def kill_region(self, name: str) -> None:
        """The origin dies (SIGKILL) and its host refuses connections."""
        self.supervisor.retire(f"origin {name}", signal.SIGKILL)
        await self.relay(f"down dst={name}")

    async def restore_region(self, name: str) -> None:
        if self.supervisor.pid_of(f"origin {name}") is None:
            self.start_region(name)
            await self.wait_for([self.plan.region(name).origin], 30.0)
        await self.relay(f"up dst={name}")

    async def kill_pop(self, name: str) -> None:
        """The POP's edge and GeoDNS die (SIGKILL) and its address refuses connections."""
        for part in ("edge", "dns"):
            self.supervisor.retire(f"{part} {name}", signal.SIGKILL)
        await self.relay(f"down dst={name}")

    async def restore_pop(self, name: str) -> None:
        pop = self.plan.pop(name)
        if self.supervisor.pid_of(f"edge {name}") is None:
            self.start_pop(name)
            await self.wait_for([pop.edge, pop.edge_admin, pop.dns], 30.0)
        await self.relay(f"up dst={name}")

    def live_pops(self) -> list[str]:
        return [p.name for p in self.plan.pops if self.supervisor.pid_of(f"dns {p.name}")]

    # --------------------------------------------------------------------------- clients

    async def ask(self, client: str, pop: str) -> tuple[str | None, DnsAnswer]:
        """``client`` asks ``pop``'s GeoDNS: (the POP it was sent to, the answer)."""
        plan = self.plan
        answer = await resolve(plan.pop(pop).dns, plan.fqdn, plan.client(client).subnet)
        landed = plan.pop_of_address(answer.addresses[0]) if answer.addresses else None
        return landed, answer

    async def ask_everywhere(self, client: str) -> dict[str, str | None]:
        """``client``'s answer from every live GeoDNS, by the POP that answered."""
        pops = self.live_pops()
        found = await asyncio.gather(*(self.ask(client, pop) for pop in pops))
        return {pop: landed for pop, (landed, _) in zip(pops, found, strict=True)}

    async def fetch_via_pop(self, client: str, pop: str, path: str | None = None) -> Fetch:
        link = self.plan.link(client_tag(client), pop)
        return await fetch(link.listen, self.plan.fqdn, path or self.plan.section.path)

    async def fetch_via_pop_tls(self, client: str, pop: str) -> Fetch:
        """Over TLS (a full handshake: a new connection, no session resumption)."""
        assert self.plan.ca is not None, "the world was planned without TLS"
        if self._tls is None:
            self._tls = ssl.create_default_context(cafile=self.plan.ca)
        link = self.plan.link(client_tag(client), pop, tls=True)
        return await fetch(link.listen, self.plan.fqdn, self.plan.section.path, tls=self._tls)

    async def fetch_direct(self, client: str, region: str) -> Fetch:
        link = self.plan.link(client_tag(client), region)
        return await fetch(link.listen, self.plan.fqdn, self.plan.section.path)

    async def converge(self, within: float = 30.0) -> dict[str, dict[str, str | None]]:
        """Wait until every GeoDNS sends every client to its nearest POP; the last answers."""
        deadline = time.monotonic() + within
        while True:
            answers = {c.name: await self.ask_everywhere(c.name) for c in self.plan.clients}
            if all(set(answers[c.name].values()) == {c.nearest_pop} for c in self.plan.clients):
                return answers
            if time.monotonic() > deadline:
                log.warning("world_not_converged", answers=answers)
                return answers
            await asyncio.sleep(0.2)


async def ttfb_median(world: World, client: str, where: str, how: str, n: int) -> Fetch:
    """The median time to first byte of ``n`` fetches over fresh connections (after one to
    warm the cache), as a Fetch; not ok when any failed.  ``how``: pop, tls or direct."""
    get = {
        "pop": world.fetch_via_pop,
        "tls": world.fetch_via_pop_tls,
        "direct": world.fetch_direct,
    }[how]
    await get(client, where)
    results = [await get(client, where) for _ in range(n)]
    good = [r.ttfb for r in results if r.ok and r.ttfb is not None]
    last = results[-1]
    if len(good) < n:
        failed = next(r for r in results if not r.ok)
        return Fetch(False, failed.status, None, 0.0, error=failed.error)
    return Fetch(True, last.status, statistics.median(good), 0.0, last.region, last.cache)


def format_landing(world: World, answers: Mapping[str, Mapping[str, str | None]]) -> str:
    plan = world.plan
    lines = [
        f"{'client':<7}{'ECS subnet':<18}{'nearest POP':<13}{'answered (by every GeoDNS)':<30}"
    ]
    for client in plan.clients:
        got = sorted({str(v) for v in answers[client.name].values()})
        verdict = "ok" if got == [client.nearest_pop] else "MISMATCH"
        zone = f"  (residency {client.zone})" if client.zone else ""
        lines.append(
            f"{client.name:<7}{client.subnet!s:<18}{client.nearest_pop:<13}"
            f"{','.join(got) + ' ' + verdict:<30}{zone}"
        )
    return "\n".join(lines)


async def latency_table(world: World, samples: int = 5) -> str:
    plan = world.plan
    tls = plan.ca is not None
    header = (
        f"{'client':<7}{'via POP':<9}{'TTFB':>9}{'TLS' if tls else '':>10}   {'direct to':<14}"
        f"{'TTFB':>9}   {'faster':>7}"
    )
    lines = [header]
    for client in plan.clients:
        (landed, _) = await world.ask(client.name, client.nearest_pop)
        pop = landed or client.nearest_pop
        via = await ttfb_median(world, client.name, pop, "pop", samples)
        secure = await ttfb_median(world, client.name, pop, "tls", samples) if tls else None
        direct = await ttfb_median(world, client.name, client.nearest_region, "direct", samples)
        lines.append(
            f"{client.name:<7}{pop:<9}{_ms(via):>9}{_ms(secure) if secure else '':>10}   "
            f"{client.nearest_region:<14}{_ms(direct):>9}   "
            + (f"{direct.ttfb / via.ttfb:6.1f}x" if via.ttfb and direct.ttfb else f"{'-':>7}")
        )
    lines.append(
        f"(median of {samples} GETs of {plan.section.path}, each over a new TCP connection"
        + (" (TLS: a full handshake each)" if tls else "")
        + ", after one that warms the POP's cache; the origin (plain HTTP) caches nothing;"
        " faster: direct / via POP)"
    )
    return "\n".join(lines)


def _ms(result: Fetch) -> str:
    if not result.ok or result.ttfb is None:
        return f"ERR {result.error or result.status}"[:9]
    return f"{result.ttfb * 1000:.1f} ms"


# ------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="world file (default: the embedded one)")
    parser.add_argument(
        "--pops", default="", help="run only these POPs, comma-separated (gru,fra,...)"
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="measure the latency table and run the scripted faults (a few minutes)",
    )
    parser.add_argument("--interval", default=None, help="health check interval (10s)")
    parser.add_argument("--fall", type=int, default=None, help="failed checks to go down (3)")
    parser.add_argument("--ttl", default=None, help="DNS TTL of the names (30s)")
    parser.add_argument(
        "--faults",
        default="",
        help="with --report, only these faults (comma-separated; default: all)",
    )
    parser.add_argument("--stay", action="store_true", help="keep the world running until Ctrl-C")


def health_overrides(interval: str | None, fall: int | None) -> dict[str, Any]:
    """``--interval``: checks that often, fast checks and timeouts no longer than it."""
    from meridian.units import parse_duration

    out: dict[str, Any] = {}
    if interval is not None:
        seconds = parse_duration(interval)
        out["interval"] = f"{seconds:g}s"
        out["fast_interval"] = f"{min(2.0, seconds):g}s"
        out["timeout"] = f"{min(2.0, seconds):g}s"
    if fall is not None:
        out["fall"] = fall
    return out


def run(args: argparse.Namespace) -> int:
    from meridian.units import parse_duration
    from meridian.world_faults import FAULTS

    pops = [p.strip() for p in args.pops.split(",") if p.strip()]
    args.fault_names = [f.strip() for f in args.faults.split(",") if f.strip()] or list(FAULTS)
    unknown = [f for f in args.fault_names if f not in FAULTS]
    if unknown:
        print(
            f"meridian world: --faults: unknown fault {unknown[0]!r} (known: {', '.join(FAULTS)})",
            file=sys.stderr,
        )
        return 2
    try:
        plan = load_plan(
            Path(args.config) if args.config else None,
            pops=pops,
            health=health_overrides(args.interval, args.fall),
            ttl=parse_duration(args.ttl) if args.ttl else None,
        )
    except (ConfigError, ValueError) as exc:
        problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
        for problem in problems:
            print(problem, file=sys.stderr)
        return 2
    world = World(plan)
    try:
        return asyncio.run(_main(world, args))
    except KeyboardInterrupt:
        return 130
    finally:
        world.stop()


async def _main(world: World, args: argparse.Namespace) -> int:
    from meridian.world_faults import budgets, format_timeline, run_faults

    plan = world.plan
    started = time.monotonic()
    with _interrupted(world):
        await world.start()
        print(
            f"world up in {time.monotonic() - started:.1f}s: {len(plan.regions)} region(s), "
            f"{len(plan.pops)} POP(s) ({', '.join(p.name for p in plan.pops)}),"
            f" {len(plan.clients)} client(s); health every"
            f" {plan.topology.health.interval:g}s, fall {plan.topology.health.fall},"
            f" TTL {plan.topology.dns.ttl:g}s",
            flush=True,
        )
        answers = await world.converge()
        print("\nwhere each client lands (" + plan.fqdn + "):")
        print(format_landing(world, answers), flush=True)
        print("\ntime to first byte, fresh TCP connections:")
        print(await latency_table(world, 5 if args.report else 3), flush=True)
        if args.report:
            timeline = await run_faults(world, args.fault_names, print_progress=True)
            print("\nfailover timeline (seconds after the fault):")
            print(format_timeline(timeline, budgets(world)))
            ttl = plan.topology.dns.ttl
            print(
                f"(budget: worst-case detection at these settings, until new answers avoid"
                f" the POP; a resolver may keep an answer it cached before for up to the"
                f" TTL, {ttl:g}s, more)"
            )
        if args.stay:
            print("\nThe world runs; Ctrl-C stops every process.", flush=True)
            await asyncio.Event().wait()
    return 130 if world.stopped_by_signal else 0


@contextlib.contextmanager
def _interrupted(world: World) -> Iterator[None]:
    try:
        yield
    except asyncio.CancelledError:
        if not world.stopped_by_signal:
            raise


__all__ = ["World", "add_arguments", "latency_table", "load_plan", "run"]
