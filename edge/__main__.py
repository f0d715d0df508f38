"""``python -m edge --config F --pop P [--listen H:P] [--admin H:P] [--workers N]``."""

from __future__ import annotations

import argparse
import sys

from edge.cli import add_edge_arguments, run_edge
from meridian import log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge", description="Run the edge proxy.")
    parser.add_argument("--log-format", choices=("logfmt", "json"), default="logfmt")
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info"
    )
    add_edge_arguments(parser)
    args = parser.parse_args(argv)
    log.configure(args.log_level, args.log_format)
    return run_edge(args)


if __name__ == "__main__":
    sys.exit(main())
