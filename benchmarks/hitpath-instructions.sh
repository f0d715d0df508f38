#!/usr/bin/env bash
# Instructions per cache hit in one process (benchmarks.hitpath under callgrind, its three
# scenarios -- identity, varied, spread over 1,000 keys -- one round each): the run at 6,000
# requests a scenario minus the run at 2,000, over 3 x 4,000, so start-up and the fill cancel
# out.  Deterministic to about 0.5%, unlike CPU time on a shared machine: the guard that work on
# the miss path does not cost the hit path.  Needs valgrind; ~3 minutes.
#   bash benchmarks/hitpath-instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
count() {  # requests -> instructions of the whole run
  local out
  out=$(mktemp)
  valgrind --tool=callgrind --callgrind-out-file=/dev/null \
    "$python" -m benchmarks.hitpath --keys 1000 --requests "$1" --rounds 1 >/dev/null 2>"$out"
  grep -o 'Collected : [0-9]*' "$out" | awk '{print $3}'
  rm -f "$out"
}
small=$(count 2000)
large=$(count 6000)
echo "hit (identity, varied, spread): $(((large - small) / 12000)) instructions per request"
