"""``meridian serve``: the edge and GeoDNS of one POP under one supervisor.

One parent binds every socket of both services (edge and its admin listener, DNS UDP + TCP and
its admin listener), forks their workers (``--workers`` edge workers, ``dns.workers`` DNS
workers) and supervises them as one service (``meridian.supervise``): SIGHUP reloads the one
config for both, SIGTERM drains both, a dead or hung worker of either is replaced.
"""

from __future__ import annotations

import argparse
import sys

from meridian.config import ConfigError
from meridian.lifecycle import ConfigHolder, add_watch_argument, configure_watch
from meridian.log import get_logger
from meridian.supervise import Supervisor

log = get_logger("serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="topology YAML file")
    parser.add_argument("--pop", required=True, help="which POP this host serves")
    parser.add_argument("--workers", type=int, default=None, help="edge worker processes")
    add_watch_argument(parser)


def run(args: argparse.Namespace) -> int:
    # The services are imported here: each pulls in aiohttp, uvloop and the health engine.
    from edge.server import EdgeOptions, edge_group
    from geodns.server import build_serving, dns_group

    configure_watch(args.config, args.watch_config)
    try:
        holder = ConfigHolder.from_file(args.config)
        holder.current.pop(args.pop)
        build_serving(holder.current, holder.generation, args.pop).locator.close()
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    except KeyError:
        print(f"{args.config}: --pop {args.pop!r} is not a POP of this config", file=sys.stderr)
        return 2
    if args.workers is not None and args.workers < 1:
        print("meridian serve: --workers must be at least 1", file=sys.stderr)
        return 2
    config = holder.current
    options = EdgeOptions(args.config, args.pop, None, None, workers=args.workers or 1)
    supervisor = Supervisor(holder)
    try:
        supervisor.add_group(edge_group(options, config, supervisor.run_dir))
        supervisor.add_group(
            dns_group(
                config,
                args.pop,
                listen=None,
                admin=None,
                workers=config.dns.workers,
                run_dir=supervisor.run_dir,
            )
        )
    except OSError as exc:
        log.error("serve_listen_failed", error=str(exc))
        supervisor.stop()
        return 1
    return supervisor.run()
