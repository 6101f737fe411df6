#!/usr/bin/env bash
# Runs every Cube check and test, the way CI does: provisions the test environment (PostgreSQL, MariaDB, Redis,
# OpenLDAP, etcd + kube-apiserver/controller-manager/scheduler), then format, lints, proto lint and the suite.
# Safe to run again: what is already installed or running is reused.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BUF_VERSION=1.75.0
say() { printf '\n== %s\n' "$*" >&2; }

need_apt() { # command package...
  local cmd=$1; shift
  if ! command -v "$cmd" >/dev/null 2>&1; then
    say "installing $* (for $cmd)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "$@" >/dev/null
  fi
}

say "toolchain"
command -v cargo >/dev/null || { echo "cargo is missing: install Rust with rustup first" >&2; exit 1; }
need_apt node nodejs npm
# The grpc-web clients need Node 20+; Debian bookworm ships 18, so take Node 20 from the npm registry when needed.
if (( $(node -p 'process.versions.node.split(".")[0]') < 20 )); then
  node_dir="${CUBE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cube}/node-20"
  if [[ ! -x "$node_dir/node_modules/.bin/node" ]]; then
    say "installing Node 20 from the npm registry into $node_dir"
    npm install --prefix "$node_dir" --no-save node@20 >/dev/null
  fi
  export PATH="$node_dir/node_modules/.bin:$PATH"
fi
need_apt cc gcc libc6-dev
if ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest from crates.io"
  cargo install --locked cargo-nextest
fi

say "test environment"
scripts/test-env.sh up

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

say "buf lint"
npx --yes "@bufbuild/buf@${BUF_VERSION}" lint proto

say "cargo nextest"
cargo nextest run --workspace --locked --profile ci "$@"
