"""GeoDNS A/B: two source trees (or environments) served side by side, dnsperf interleaved.

    python -m benchmarks.dns_ab --variant base:PYTHONPATH=/tmp/base --variant new:
        [--rounds 3] [--scenarios no-ecs,ecs-varied,ecs-unique] [--duration 5]

On a machine shared with other work, rates and CPU per query move 10-20% from one minute to
the next, so two runs of ``benchmarks.compare dns`` made minutes apart cannot show a change of
a few percent.  Here both variants run at once (each a ``meridian dns`` pinned like the
compare runner's, started with its own environment: ``PYTHONPATH=<tree>`` serves another
checkout, e.g. ``git archive <commit> | tar -x -C /tmp/base``) and take turns, scenario by
scenario, so each pair of figures shares the machine's state.  Prints per run the rate and
the server's user, system and total CPU µs per query (from /proc/<pid>/stat: the split
between user and system is tick-sampled, the total is what to compare).  Each dnsperf run
holds ``/tmp/meridian-bench.lock``, as the compare runner's do.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks import compare


def _variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition(":")
    env = dict(item.split("=", 1) for item in assignments.split(",") if item)
    return name, env


def _cpu(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) / compare._CLOCK_TICKS, int(fields[12]) / compare._CLOCK_TICKS


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variant",
        action="append",
        required=True,
        help="NAME:VAR=VALUE,... (the environment meridian dns starts with)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--scenarios", default="no-ecs,ecs-varied,ecs-unique")
    args = parser.parse_args(argv)
    variants = [_variant(text) for text in args.variant]
    scenarios = [
        s for name in args.scenarios.split(",") for s in compare.DNS_SCENARIOS if s.name == name
    ]
    workdir = Path(tempfile.mkdtemp(prefix="dns-ab-"))
    cpus = compare.Cpus.detect()
    installer = compare.Installer()
    processes = compare.Processes(workdir)
    try:
        dnsperf = installer.require("dnsperf")
        topology = compare.Topology.from_demo()
        origin = compare.start_origin(processes, cpus)
        peers: list[tuple[str, compare.MeridianDns]] = []
        for name, env in variants:
            (workdir / name).mkdir()
            saved = dict(os.environ)
            os.environ.update(env)
            try:
                peer = compare.MeridianDns(workdir / name, topology)
                peer.health_backend = origin.addr
                peer.proc = peer.start(processes, cpus, installer)
            finally:
                os.environ.clear()
                os.environ.update(saved)
            peers.append((name, peer))
        repeating = {
            s.name: compare.build_query_file(workdir, s, 0, args.duration)[0]
            for s in compare.DNS_SCENARIOS
            if not s.once
        }
        for _, peer in peers:  # warm-up, as the compare runner's
            compare.run_dnsperf(
                dnsperf, peer.port, repeating["ecs-varied"], compare.WARMUP_SECONDS, False, cpus
            )
        start = compare.UNIQUE_START
        for round_number in range(1, args.rounds + 1):
            for scenario in scenarios:
                for name, peer in peers:
                    if scenario.once:  # fresh subnets for every run
                        query_file, start = compare.build_query_file(
                            workdir, scenario, start, args.duration
                        )
                    else:
                        query_file = repeating[scenario.name]
                    assert peer.proc is not None
                    pid = peer.proc.process.pid
                    user, system = _cpu(pid)
                    values = compare.run_dnsperf(
                        dnsperf, peer.port, query_file, args.duration, scenario.once, cpus
                    )
                    user_after, system_after = _cpu(pid)
                    done = max(values.get("completed", 0.0), 1.0)
                    spent_user = (user_after - user) / done * 1e6
                    spent_system = (system_after - system) / done * 1e6
                    print(
                        f"round {round_number} {scenario.name:10} {name:12} "
                        f"{values['qps']:9.0f} q/s  user {spent_user:5.2f}  "
                        f"system {spent_system:5.2f}  total {spent_user + spent_system:5.2f} "
                        f"µs/query  lost {values['lost']:.0f}",
                        flush=True,
                    )
    finally:
        processes.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
