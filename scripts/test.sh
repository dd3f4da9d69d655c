#!/usr/bin/env bash
# The whole test suite: formatting, lints, tests (unit, integration, doc), docs.
# Installs what the tests need (redis-server) when it is missing and we can.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing redis-server (needed by the redis feature's tests)"
    # Not fatal here: the Redis tests themselves fail, saying how to install
    # it, if the server is still missing.
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; } \
      || echo "warning: could not install redis-server"
  fi
fi

# The fuzz targets' crate compiles libFuzzer (C++) in its build script.
if ! command -v c++ >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing g++ (libFuzzer's build, for checking the fuzz targets)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null; } \
    || echo "warning: could not install g++"
fi

cargo fmt --all --check
cargo clippy --all-targets --all-features -- -D warnings
# No feature, then each feature alone (read from Cargo.toml): with all of
# them on, code that one feature compiles but only another uses is not dead
# (`http` without `tower` warned). The library and the CLI (`cli` alone is
# how it is installed) only: the tests, examples and benches get most
# features from the crate's dev-dependency on itself, so only these build
# exactly the set asked for. The 28 pairs found nothing more and cost three
# times as much (75 s against 25 s warm); they stay out.
features=$(cargo metadata --no-deps --format-version 1 |
  python3 -c 'import json,sys; print(*(f for p in json.load(sys.stdin)["packages"] if p["name"] == "keygate" for f in p["features"] if f != "default"))')
for f in "" $features; do
  cargo clippy --lib --bins --no-default-features --features "$f" -- -D warnings
done
# The server tests start the example as a real process; `cargo test` builds
# examples only as test harnesses, so build the binaries first.
cargo build --all-features --examples
cargo test --all-features --all-targets
cargo test --all-features --doc
# The fuzz targets live in a crate of their own that only cargo-fuzz builds
# (with `--cfg fuzzing`): check they still compile against the library, and
# lint them (a rename once broke a target unnoticed).
(cd fuzz && RUSTFLAGS="--cfg fuzzing" cargo clippy --bins -- -D warnings)
# Without features too: a doc link to a feature-gated item breaks only there.
# The all-features build runs last, so target/doc documents everything.
RUSTDOCFLAGS="-D warnings" cargo doc --no-default-features --no-deps
RUSTDOCFLAGS="-D warnings" cargo doc --all-features --no-deps
