"""``meridian serve``: the edge and GeoDNS of one POP, supervised together."""

from __future__ import annotations

import argparse
import sys

from meridian.config import ConfigError, load_config
from meridian.supervise import Supervisor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="topology YAML file")
    parser.add_argument("--pop", required=True, help="which POP this host serves")
    parser.add_argument("--workers", type=int, default=None, help="edge worker processes")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        config.pop(args.pop)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    except KeyError:
        print(f"{args.config}: --pop {args.pop!r} is not a POP of this config", file=sys.stderr)
        return 2
    base = [sys.executable, "-m", "meridian.cli"]
    common = ["--config", args.config, "--pop", args.pop]
    supervisor = Supervisor()
    supervisor.install_signal_handlers()
    try:
        edge_args = ["edge", *common]
        if args.workers:
            edge_args += ["--workers", str(args.workers)]
        supervisor.start("edge", base + edge_args)
        supervisor.start("dns", [*base, "dns", *common])
        return supervisor.run()
    finally:
        supervisor.stop(timeout=config.edge.drain_timeout + 5)
