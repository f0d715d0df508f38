"""``python -m geodns --config F --pop P [--listen HOST:PORT] [--admin HOST:PORT]``."""

from __future__ import annotations

import argparse
import sys

from geodns.cli import add_dns_arguments, run_dns


def main() -> int:
    parser = argparse.ArgumentParser(prog="geodns", description="Meridian GeoDNS server")
    add_dns_arguments(parser)
    return run_dns(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
