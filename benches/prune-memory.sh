#!/bin/sh
# Prune's memory on a repository of about 1 million chunks (issue: under 300 MB RSS).
# Generates the repository: 320 MiB of random data in 64..1024-byte chunks (about a million
# blobs), in two snapshots; forgets one, then times two prunes (mark, then sweep) under
# /usr/bin/time. Usage: benches/prune-memory.sh [WORKDIR]   (release build)
set -eu
work=${1:-/tmp/kluis-bench/prune}
here=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release --quiet --manifest-path "$here/Cargo.toml" --bin kluis
kluis="$here/target/release/kluis"
rm -rf "$work"; mkdir -p "$work"
export KLUIS_REPOSITORY="$work/repo" KLUIS_PASSWORD=bench
"$kluis" init --chunk-sizes 64,256,1024 --kdf-memory 1024 --kdf-iterations 1 >/dev/null
head -c 167772160 /dev/urandom > "$work/a"
head -c 167772160 /dev/urandom > "$work/b"
"$kluis" backup --stdin --name a --quiet < "$work/a"
"$kluis" backup --stdin --name b --quiet < "$work/b"
rm -f "$work/a" "$work/b"
"$kluis" check | tail -2
"$kluis" forget --name a --max-age 0s >/dev/null
for phase in mark sweep; do
  /usr/bin/time -f "prune ($phase): %e s, peak RSS %M KiB" "$kluis" prune --grace 0s --unsafe-short-grace --json \
    > "$work/$phase.json"
  grep -E '"(blobs_used|packs_deleted|packs_marked|bytes_reclaimed)"' "$work/$phase.json" | tr -d '\n '; echo
done
