#!/usr/bin/env bash
# Load check: throughput and latency of an authenticated, rate-limited route
# vs unauthenticated routes of the same reference server, in the same run:
# `GET /healthz`, and `POST /load/ingest/load` -- the ingest route's handler
# with no layer (served with `--load-twin`), sent the same request, so the
# difference between it and the gated route is the layer alone. A third
# route adds the three X-RateLimit-* headers as constants to that twin: the
# wire cost of headers the gated route must send, apart from keygate's work.
#
#   bash scripts/load.sh [SECONDS] [CONNECTIONS] [ROUNDS]
#
# Each route runs SECONDS per round, ROUNDS rounds (default 3) in turn; the
# ratios come from each route's median. Beside throughput, the server's own
# CPU time per request served (from /proc): the layer's share of it is what
# the layer costs a server that has its core to itself, and it holds still
# when a neighbour takes the CPU (throughput does not).
#
# Needs `wrk` (apt-get install wrk). Loopback only. The key's plan admits far
# more than wrk can send, so every request passes the full keygate path
# (parse, hash, lookup, verify, rate-limit check, headers) and none is a 429.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
conns="${2:-32}"
rounds="${3:-3}"
. scripts/common.sh
need wrk wrk
server_bin="$(release_example server)"
tmp="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$tmp"' EXIT
cat > "$tmp/plans.json" <<'JSON'
{"plans": {"load": {"rate": [{"name": "default", "limit": 1000000000, "window_seconds": 1, "algorithm": "gcra"}]}}}
JSON
# With two or more CPUs, pin the server to one and wrk to another, so the
# figures are the server's cost per request, not a fight over cores.
pin_server=() pin_wrk=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  pin_server=(taskset -c 0) pin_wrk=(taskset -c 1)
fi
"${pin_server[@]}" "$server_bin" --bind 127.0.0.1:0 --plans "$tmp/plans.json" --load-twin > "$tmp/out" &
pid=$!
for _ in $(seq 50); do [ -s "$tmp/out" ] && break; sleep 0.1; done
read -r addr token < <(python3 -c 'import json,sys; d=json.loads(open(sys.argv[1]).readline()); print(d["listening"], d["management_token"])' "$tmp/out")
key=$(curl -sf -X POST "http://$addr/management/v1/workspaces/ws_demo/api-keys" \
  -H "Authorization: Bearer $token" -d '{"name":"load","format":"nhk","plan":"load"}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
cat > "$tmp/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer $key"
LUA

run() { "${pin_wrk[@]}" wrk -t1 -c"$conns" -d"${secs}s" --latency "$@"; }
# The server's CPU time so far (user + system, all its threads), in clock
# ticks: its cost per request does not count the time a neighbour held its
# CPU, so it wanders far less than throughput on a shared machine.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
# The routes, measured in turn, round after round: a drift of the machine
# (a neighbour's load, frequency) lands on every route alike, and the
# figures below are each route's median over the rounds.
names=(healthz twin headers gated)
labels=(
  "unauthenticated: GET /healthz"
  "unauthenticated twin: POST /load/ingest/load (same handler and request, no layer)"
  "twin + three constant X-RateLimit-* headers: POST /load/ingest-with-headers/load"
  "authenticated + rate-limited: POST /api/ingest/load (Bearer nhk_, plan 'load')"
)
urls=(
  "http://$addr/healthz"
  "-s $tmp/post.lua http://$addr/load/ingest/load"
  "-s $tmp/post.lua http://$addr/load/ingest-with-headers/load"
  "-s $tmp/post.lua http://$addr/api/ingest/load"
)
: > "$tmp/results"
for round in $(seq "$rounds"); do
  for i in "${!names[@]}"; do
    echo "== round $round: ${labels[$i]}"
    # shellcheck disable=SC2086 # the options and URL split on purpose
    before=$(cpu_ticks)
    out=$(run ${urls[$i]})
    after=$(cpu_ticks)
    echo "$out" | grep -E "Requests/sec|99%|Non-2xx" || true
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
    served=$(echo "$out" | awk '/requests in/ {print $1}')
    echo "${names[$i]} $rps $p99 $((after - before)) $served" >> "$tmp/results"
  done
done
python3 - "$tmp/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
rps = {n: [float(r[1]) for r in rows if r[0] == n] for n, *_ in rows}
def ms(v):
    return float(v[:-2]) / 1000 if v.endswith("us") else float(v[:-2]) if v.endswith("ms") else float(v[:-1]) * 1000
p99 = {n: [ms(r[2]) for r in rows if r[0] == n] for n, *_ in rows}
hz = int(__import__("os").sysconf("SC_CLK_TCK"))
# Server CPU microseconds per request served, per round.
cpu = {n: [1e6 * int(r[3]) / hz / int(r[4]) for r in rows if r[0] == n] for n, *_ in rows}
med = {n: statistics.median(v) for n, v in rps.items()}
print(f"medians over {len(rps['twin'])} round(s):")
for n in rps:
    print(f"  {n:8s} {med[n]:10.0f} req/s  p99 {statistics.median(p99[n]):.3f} ms  (rounds: {', '.join(f'{x:.0f}' for x in rps[n])})")
b, t, h, a = med["healthz"], med["twin"], med["headers"], med["gated"]
print(f"the headers alone (twin + constants vs twin): {100*(1-h/t):.1f}% of throughput")
print(f"layer cost (gated vs twin): ratio {a/t:.3f}, {100*(1-a/t):.1f}% of throughput, {1e6/a-1e6/t:.2f} us/request")
print(f"gated vs /healthz: ratio {a/b:.3f} ({100*(1-a/b):.1f}%)")
c = {n: statistics.median(v) for n, v in cpu.items()}
print("server CPU per request (median; rounds):")
for n in cpu:
    print(f"  {n:8s} {c[n]:7.2f} us  ({', '.join(f'{x:.2f}' for x in cpu[n])})")
ct, ca = c["twin"], c["gated"]
print(f"layer cost by server CPU (gated vs twin): {ca-ct:.2f} us/request, {100*(1-ct/ca):.1f}% of a dedicated core's throughput")
PY
