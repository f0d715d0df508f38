"""Command line of the edge: ``meridian edge ...`` and ``python -m edge ...``."""

from __future__ import annotations

import argparse

from meridian.config import hostport_argument as _hostport
from meridian.lifecycle import add_watch_argument, configure_watch


def add_edge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the topology YAML file")
    parser.add_argument("--pop", required=True, help="the POP this edge runs in")
    parser.add_argument(
        "--listen",
        type=_hostport,
        default=None,
        help="HOST:PORT for clients (default: listeners.edge)",
    )
    parser.add_argument(
        "--admin",
        type=_hostport,
        default=None,
        help="HOST:PORT for /metrics, /healthz, /readyz, /status (default: listeners.edge_admin)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the listener (default 1); the admin listener's "
        "/metrics and /purge cover them all",
    )
    add_watch_argument(parser)


def run_edge(args: argparse.Namespace) -> int:
    from edge.server import EdgeOptions, run

    if args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    configure_watch(args.config, args.watch_config)
    return run(
        EdgeOptions(
            config_path=args.config,
            pop=args.pop,
            listen=args.listen,
            admin=args.admin,
            workers=args.workers,
        )
    )
