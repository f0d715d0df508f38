#!/usr/bin/env bash
# Instructions per cache miss and per forwarded POST in one process (benchmarks.misspath under
# callgrind): the run at 1,500 requests minus the run at 500, over 1,000, so start-up cancels
# out.  Deterministic to about 0.5% (the connection sweep runs on wall-clock time), unlike CPU
# time on a shared machine.  Needs valgrind; ~3 minutes.
#   bash benchmarks/misspath-instructions.sh [miss|post ...]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
count() {  # scenario, requests -> instructions of the whole run
  local out
  out=$(mktemp)
  valgrind --tool=callgrind --callgrind-out-file=/dev/null \
    "$python" -m benchmarks.misspath --only "$1" --requests "$2" --rounds 1 >/dev/null 2>"$out"
  grep -o 'Collected : [0-9]*' "$out" | awk '{print $3}'
  rm -f "$out"
}
for scenario in "${@:-miss post}"; do
  for name in $scenario; do
    small=$(count "$name" 500)
    large=$(count "$name" 1500)
    echo "$name: $(((large - small) / 1000)) instructions per request"
  done
done
