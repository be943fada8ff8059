#!/usr/bin/env bash
# The measurements behind two defaults (docs/BENCHMARKS.md, "Defaults"): AES-256-GCM from ring
# against the aes-gcm crate, and zstd levels on the scale-6 dump in blob-sized pieces.
# Needs benches/prepare.sh's inputs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-/tmp/kluis-bench/inputs}"
cargo run --quiet --release --manifest-path "$here/micro/Cargo.toml" -- "$OUT/dump6.sql" "${1:-128}"
