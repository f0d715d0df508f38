#!/usr/bin/env bash
# Install Meridian into .venv and start the demo stack (sample origins + edge + GeoDNS on loopback).
# Arguments go to `meridian demo` (for example --pop fra, --port-offset 100).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh ""
exec meridian demo "$@"
