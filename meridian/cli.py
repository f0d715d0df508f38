"""The ``meridian`` command: one entry point, one subcommand per job.

Each service module provides ``add_*_arguments(parser)`` and ``run_*(args) -> int``; they are
imported only when their subcommand runs, so ``meridian check`` stays fast and works alone.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from meridian import log
from meridian.config import Config, ConfigError, load_config
from meridian.units import format_duration, format_size

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _summary(config: Config) -> str:
    lines = [f"{config.source}: OK"]
    lines.append(f"regions ({len(config.regions)}):")
    for r in config.regions:
        zone = f" residency={r.residency}" if r.residency else ""
        lines.append(
            f"  {r.name:<16} ({r.location.lat:7.2f}, {r.location.lon:8.2f})"
            f"  {len(r.backends)} backend(s){zone}"
        )
    lines.append(f"pops ({len(config.pops)}):")
    for p in config.pops:
        order = ",".join(p.regions) if p.regions else "nearest"
        addrs = ",".join(map(str, p.addresses))
        lines.append(
            f"  {p.name:<6} ({p.location.lat:7.2f}, {p.location.lon:8.2f})  {addrs:<24}"
            f" regions={order}"
        )
    dns = config.dns
    lines.append(
        f"dns: zone {dns.zone} ttl {format_duration(dns.ttl)} (min {format_duration(dns.min_ttl)}),"
        f" all-down policy {dns.all_down}"
    )
    for n in dns.names:
        fqdn = dns.zone if n.name == "@" else f"{n.name}.{dns.zone}"
        ready = f" ready for service {n.service}" if n.service else ""
        lines.append(f"  {fqdn:<28} -> nearest {n.answers} healthy {n.targets}{ready}")
    for rule in config.residency:
        who = ",".join(rule.countries[:6]) + ("..." if len(rule.countries) > 6 else "")
        if rule.continents:
            who = (who + " " if who else "") + "continents " + ",".join(rule.continents)
        lines.append(
            f"residency {rule.name}: {who} -> zone {rule.zone} (on failure: {rule.on_failure})"
        )
    h = config.health
    lines.append(
        f"health: {h.kind} {h.path} every {format_duration(h.interval)}, timeout "
        f"{format_duration(h.timeout)}, fall {h.fall}, rise {h.rise}"
    )
    edge = config.edge
    lines.append(
        f"edge: {len(edge.routes)} route(s), {len(edge.services)} service(s), cache "
        f"{format_size(edge.cache.memory)} in memory"
        + (
            f", redis ({edge.cache.redis_mode})"
            if edge.cache.redis_url or edge.cache.redis_nodes
            else ""
        )
        + f", {len(edge.cache.rules)} cache rule(s), compression "
        + ("on" if edge.compression.enabled else "off")
    )
    if edge.tls is not None:
        from meridian.certs import read_certificates

        loaded, _ = read_certificates(edge.tls, config.source)  # valid: the load checked them
        names = ", ".join(n for c in loaded for n in c.names)
        expiry = min((c.not_after for c in loaded), default=None)
        lines.append(
            f"edge tls: {edge.tls.listen}, {len(loaded)} certificate(s) ({names})"
            + (f", first expiry {expiry:%Y-%m-%d}" if expiry else "")
            + f", {edge.tls.min_version}+, ALPN "
            + ("h2, http/1.1" if edge.http2.enabled else "http/1.1")
        )
    for limit in edge.rate_limits:
        scope = ", ".join([*limit.routes, *(f"service {s}" for s in limit.services)])
        lines.append(
            f"edge rate limit {limit.name}: {limit.rate:g}/s, burst "
            + str(limit.burst if limit.burst is not None else max(1, math.ceil(limit.rate)))
            + f", per {limit.key}"
            + (f" ({limit.header})" if limit.header else "")
            + f", {scope or 'every route'}"
            + (", shared in Redis" if limit.shared else "")
            + (", dry run" if limit.dry_run else "")
        )
    conns = edge.connection_limits
    if conns.per_client or conns.total:
        lines.append(
            f"edge connection limits: {conns.per_client or 'unlimited'} per client network, "
            f"{conns.total or 'descriptor budget'} in total"
        )
    ls = config.listeners
    lines.append(
        f"listeners: edge {ls.edge}, edge admin {ls.edge_admin}, dns {ls.dns},"
        f" dns admin {ls.dns_admin}"
    )
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    print(_summary(config))
    return EXIT_OK


def _delegate(
    module: str, adder: str, runner: str, issue: int
) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    """Subcommands provided by a service package, imported when used."""

    def add(parser: argparse.ArgumentParser) -> None:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            parser.set_defaults(_missing=f"not implemented yet (issue {issue})")
            return
        getattr(mod, adder)(parser)

    def run(args: argparse.Namespace) -> int:
        missing = getattr(args, "_missing", None)
        if missing:
            print(f"meridian {args.command}: {missing}", file=sys.stderr)
            return EXIT_USAGE
        result: int = getattr(importlib.import_module(module), runner)(args)
        return result

    return add, run


def _origin_add(parser: argparse.ArgumentParser) -> None:
    """``meridian origin`` is dispatched before parsing (see ``main``); nothing to add."""


def _origin_run(args: argparse.Namespace) -> int:  # pragma: no cover - dispatched in main()
    from meridian import origin

    return origin.main([])


def _demo_add(parser: argparse.ArgumentParser) -> None:
    from meridian import demo

    demo.add_arguments(parser)


def _demo_run(args: argparse.Namespace) -> int:
    from meridian import demo

    return demo.run(args)


def _check_add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the topology YAML file to validate")


SUBCOMMANDS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[Any], int]]
] = {
    "check": ("validate a config file and print a summary", _check_add, cmd_check),
    "origin": ("run the sample market-data origin", _origin_add, _origin_run),
    "dns": (
        "run the GeoDNS server of a POP",
        *_delegate("geodns.cli", "add_dns_arguments", "run_dns", 4),
    ),
    "edge": (
        "run the edge proxy of a POP",
        *_delegate("edge.cli", "add_edge_arguments", "run_edge", 5),
    ),
    "serve": (
        "run the edge and GeoDNS of a POP together",
        *_delegate("meridian.serve", "add_arguments", "run", 5),
    ),
    "demo": ("start sample origins, the edge and GeoDNS on loopback", _demo_add, _demo_run),
    "world": (
        "run many POPs, regions and clients on loopback and measure what the clients see",
        *_delegate("meridian.world", "add_arguments", "run", 16),
    ),
    "explain": (
        "show how GeoDNS answers one client, step by step",
        *_delegate("geodns.cli", "add_explain_arguments", "run_explain", 4),
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; only ``command``'s own arguments are loaded (its module imported)."""
    parser = argparse.ArgumentParser(
        prog="meridian", description="Meridian: GeoDNS and a caching edge proxy for market data."
    )
    parser.add_argument("--log-format", choices=("logfmt", "json"), default="logfmt")
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info"
    )
    # The logging flags are accepted after the subcommand too (meridian edge --log-format json).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-format", choices=("logfmt", "json"), default=argparse.SUPPRESS)
    common.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default=argparse.SUPPRESS
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add, run) in SUBCOMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        if name == command:
            add(child)
        child.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in SUBCOMMANDS), None)
    if command == "origin":  # the sample origin owns its whole command line
        from meridian import origin

        return origin.main(argv[argv.index("origin") + 1 :])
    parser = build_parser(command)
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "_missing", None):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    log.configure(args.log_level, args.log_format)
    try:
        code: int = args._run(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
