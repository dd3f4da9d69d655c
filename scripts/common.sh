# Sourced by the scripts here (not run on its own).

# Builds example $1 in release mode and prints the path of its binary:
# where cargo put it, CARGO_TARGET_DIR or a configured target dir if set.
release_example() {
  cargo build --release --example "$1" -q
  local dir
  dir="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
  echo "$dir/release/examples/$1"
}

# Exits with a hint when command $1 is missing (Debian package $2).
need() {
  command -v "$1" >/dev/null || { echo "$1 is missing: apt-get install -y $2" >&2; exit 1; }
}
