#!/usr/bin/env bash
# The whole kluis test suite on a fresh machine: installs what is missing first (PostgreSQL,
# MariaDB server and client, promtool, faketime, Garage), then checks formatting and lints, runs every
# test, and runs the demo.
# Every server a test needs is started by the test itself, in a temporary directory on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '\n== %s\n' "$*"; }

missing=()
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
command -v mariadbd >/dev/null || [[ -x /usr/sbin/mariadbd ]] || missing+=(mariadb-server)
command -v mariadb-dump >/dev/null || missing+=(mariadb-client)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v faketime >/dev/null || missing+=(faketime)
command -v promtool >/dev/null || missing+=(prometheus)
command -v systemd-analyze >/dev/null || missing+=(systemd)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Tests start their own servers; keep the packages' own services from starting.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
fi

GARAGE_VERSION=2.5.0
if ! garage --version 2>/dev/null | grep -q "$GARAGE_VERSION"; then
    log "installing Garage $GARAGE_VERSION (takes about 10 minutes)"
    cargo install garage --locked --version "$GARAGE_VERSION" --quiet
fi

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --quiet --all-targets -- -D warnings
log "cargo test"
cargo test --quiet
log "demo (the README's main command)"
tests/demo.sh >/dev/null
log "all tests passed"
