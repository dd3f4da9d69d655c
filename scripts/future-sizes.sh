#!/usr/bin/env bash
# The sizes of the hot paths' futures, as the compiler lays them out
# (`-Z print-type-sizes`, which `RUSTC_BOOTSTRAP=1` allows on a stable
# toolchain), in examples/icount.rs's instantiation: in-memory stores,
# an axum route.
#
#   bash scripts/future-sizes.sh [--detail]
#
# A framework boxes the futures it is handed (the layer's, a handler's),
# so their size is an allocation per request: glibc serves blocks up to
# 1,032 bytes from a per-thread cache and takes its slow path above. With
# `--detail`, each future's variants (one per await) and the locals each
# keeps, which is where a local kept across an await shows. Builds in a
# target directory of its own (the flag changes every crate's build), so
# the first run compiles everything: minutes; later runs, under one.
set -euo pipefail
cd "$(dirname "$0")/.."
detail="${1:-}"
dir="$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/type-sizes"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
# keygate's own artifacts cleaned, so that it is compiled again and prints
# its types (the sources are left as they are).
CARGO_TARGET_DIR="$dir" cargo clean -q --release -p keygate
RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Zprint-type-sizes" CARGO_TARGET_DIR="$dir" \
  cargo build --release --example icount -q > "$out" 2>&1
python3 - "$out" "$detail" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
detail = sys.argv[2] == "--detail"
wanted = [
    ("tower layer, per request", r"\{async block@<keygate::tower::GateService<"),
    ("  its admission", r"\{async block@keygate::tower::Gate<.*>::admit_to"),
    ("authenticate (headers)", r"\{async block@keygate::auth::Authenticator<.*>::authenticate<"),
    ("authenticate_token", r"\{async fn body of keygate::auth::Authenticator<.*>::authenticate_token\(\)"),
    ("Portal::create_session", r"\{async fn body of keygate::portal::Portal<.*>::create_session\(\)"),
    ("Portal::redeem", r"\{async fn body of keygate::portal::Portal<.*>::redeem\(\)"),
]
seen = set()
for label, pattern in wanted:
    for i, line in enumerate(lines):
        m = re.match(r"print-type-size type: `(.*)`: (\d+) bytes", line)
        if not m or not re.match(pattern, m.group(1)) or (label, m.group(2)) in seen:
            continue
        seen.add((label, m.group(2)))
        print(f"{label:28} {int(m.group(2)):5} bytes")
        if detail:
            for l in lines[i + 1:]:
                if l.startswith("print-type-size type:"):
                    break
                if "padding" not in l and "coroutine_field" not in l:
                    print("    " + l.removeprefix("print-type-size").strip())
PY
