"""Command-line entry points called by ``meridian/cli.py`` (and ``python -m geodns``)."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request

import dns.name

from geodns.explain import StaticHealth, describe_range, explain, parse_client
from geodns.responder import Responder
from geodns.zone import GeoName, Zone, name_key
from meridian.config import ConfigError, load_config
from meridian.config import hostport_argument as _hostport
from meridian.geo import GeoError, GeoLocator
from meridian.lifecycle import add_watch_argument, configure_watch


def add_dns_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="topology config file (YAML)")
    parser.add_argument("--pop", required=True, help="the POP this server runs in")
    parser.add_argument(
        "--listen",
        type=_hostport,
        default=None,
        help="UDP and TCP address (default: listeners.dns of the config)",
    )
    parser.add_argument(
        "--admin",
        type=_hostport,
        default=None,
        help="admin HTTP address for /metrics and /status (default: listeners.dns_admin)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes sharing the UDP port (default: dns.workers)",
    )
    add_watch_argument(parser)


def run_dns(args: argparse.Namespace) -> int:
    from geodns.server import run  # the server pulls in aiohttp and the health engine

    if args.workers is not None and args.workers < 1:
        print("meridian dns: --workers must be at least 1", file=sys.stderr)
        return 2
    configure_watch(args.config, args.watch_config)
    return run(args.config, args.pop, listen=args.listen, admin=args.admin, workers=args.workers)


def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="topology config file (YAML)")
    parser.add_argument(
        "--client", required=True, help="client address or subnet (as a resolver would send in ECS)"
    )
    parser.add_argument(
        "--name",
        action="append",
        default=[],
        help="name to explain (repeatable; default: every configured name)",
    )
    parser.add_argument(
        "--pop",
        default=None,
        help="POP whose location stands in for unplaceable clients (default: the first POP)",
    )
    parser.add_argument(
        "--down",
        action="append",
        default=[],
        metavar="NAME",
        help="treat this POP or region as down (what-if; repeatable)",
    )
    parser.add_argument(
        "--status",
        type=_hostport,
        default=None,
        metavar="HOST:PORT",
        help="take health from a running GeoDNS admin listener's /status",
    )


def run_explain(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    try:
        pop = config.pop(args.pop) if args.pop else config.pops[0]
    except KeyError:
        print(f"meridian explain: no POP named {args.pop!r}", file=sys.stderr)
        return 2
    try:
        client = parse_client(args.client)
    except ValueError as exc:
        print(f"meridian explain: --client: {exc}", file=sys.stderr)
        return 2
    pops: dict[str, bool] = {}
    regions: dict[str, bool] = {}
    source = "every target assumed up (no --status given)"
    if args.status is not None:
        url = f"http://{args.status}/status"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                status = json.load(response)
        except (OSError, ValueError) as exc:
            print(f"meridian explain: cannot read {url}: {exc}", file=sys.stderr)
            return 1
        health = status.get("health", {})
        for pop_name, pop_state in health.get("pops", {}).items():
            pops[pop_name] = bool(pop_state.get("up"))
            for service, ready in (pop_state.get("services") or {}).items():
                pops[f"{pop_name}/{service}"] = bool(ready)
        regions = {n: bool(v.get("up")) for n, v in health.get("regions", {}).items()}
        source = f"from {url} (health generation {status.get('health_generation')})"
    for name in args.down:
        if any(p.name == name for p in config.pops):
            pops[name] = False
        elif any(r.name == name for r in config.regions):
            regions[name] = False
        else:
            print(f"meridian explain: --down: no POP or region named {name!r}", file=sys.stderr)
            return 2
    if args.down:
        source += f"; treated as down: {', '.join(args.down)}"
    try:
        locator = GeoLocator(config.geo, pop.location)
    except GeoError as exc:
        print(f"meridian explain: {exc}", file=sys.stderr)
        return 1
    health = StaticHealth(pops, regions)
    responder = Responder(Zone.build(config), locator)

    def ranges(geo: GeoName, family: int) -> str:
        key = name_key(dns.name.from_text(geo.fqdn))
        address, version = int(client), client.version
        ecs_family = 1 if version == 4 else 2
        table = responder.answer_table(key, family, health)
        _, first, following = table.find(ecs_family, address)
        top = 1 << (32 if version == 4 else 128)

        def said(number: int) -> str:
            selection = table.selections[number]
            found = ", ".join(str(a) for a in selection.addresses(family))
            return found or selection.outcome

        before = said(table.find(ecs_family, first - 1)[0]) if first else None
        after = said(table.find(ecs_family, following)[0]) if following < top else None
        return describe_range(address, version, first, following - 1, before, after)

    try:
        text = explain(
            config,
            args.client,
            locator.locate(client),
            health,
            args.name,
            source,
            ranges,
        )
    except KeyError as exc:
        print(
            f"meridian explain: --name: {exc.args[0]!r} is not a configured name", file=sys.stderr
        )
        return 2
    finally:
        locator.close()
    print(text)
    return 0
