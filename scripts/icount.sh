#!/usr/bin/env bash
# Exact instructions per operation, counted by Valgrind's callgrind inside
# examples/icount.rs's `one` (see its header): a machine's load moves
# timings, not these counts, so a change's effect on a hot path is the
# difference of two numbers.
#
#   bash scripts/icount.sh [OP...]    (default: mint redeem bare noop gated)
#
# Each OP runs twice, N and 6N times; the difference of the two counts,
# divided by 5N, leaves out start-up and first-time work. The layer's cost
# per request is `gated` minus `noop`.
#
# Needs `valgrind` (apt-get install -y valgrind). Build without feature
# `vdso`: Valgrind cannot run the vDSO's generator (the example does not
# enable it).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
need valgrind valgrind
bin="$(release_example icount)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
n=2000
ops=("$@")
[ ${#ops[@]} -gt 0 ] || ops=(mint redeem bare noop gated)
for op in "${ops[@]}"; do
  for runs in "$n" "$((6 * n))"; do
    valgrind --tool=callgrind --toggle-collect='icount::one' --callgrind-out-file=/dev/null \
      "$bin" "$op" "$runs" 2> "$tmp/$op.$runs" > /dev/null
  done
  count() { grep -o 'Collected : [0-9]*' "$tmp/$op.$1" | awk '{print $3}'; }
  printf '%-15s %7d instructions per operation\n' "$op" $(( ($(count $((6 * n))) - $(count "$n")) / (5 * n) ))
done
