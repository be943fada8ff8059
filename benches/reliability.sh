#!/usr/bin/env bash
# The reliability suite's long variants (docs/RELIABILITY.md records their figures):
#   - every decoder fuzzed for FUZZ_SECONDS (default 300);
#   - the fault-injecting proxy with each seed of SEEDS at RATE (default 5 seeds, 10 %) and once
#     at 25 %;
#   - the skewed-clock concurrency test for ROUNDS rounds (default 20);
#   - the SIGKILL matrix and the cluster test once more.
# Run from the repository root: benches/reliability.sh [log file]. Needs what tests/run-all.sh
# installs. Takes about FUZZ_SECONDS + 15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
log=${1:-/tmp/kluis-reliability.log}
: > "$log"
FUZZ_SECONDS=${FUZZ_SECONDS:-300}
SEEDS=${SEEDS:-"1 2 3 4 5"}
RATE=${RATE:-0.10}
ROUNDS=${ROUNDS:-20}
run() {
    echo "== $*" | tee -a "$log"
    "$@" 2>&1 | grep -oE '(decoders: .*|faults \(.*|(copy|forget|restore): [0-9]+ killed.*|[0-9]+ (rounds|backups killed|prunes killed).*|test result: .*)' | tee -a "$log"
}
cargo build --tests --quiet
run env KLUIS_FUZZ_SECONDS="$FUZZ_SECONDS" cargo test --quiet --test decoders -- --nocapture
for seed in $SEEDS; do
    run env KLUIS_FAULT_SEED="$seed" KLUIS_FAULT_RATE="$RATE" cargo test --quiet --test faults -- --nocapture
done
run env KLUIS_FAULT_SEED=99 KLUIS_FAULT_RATE=0.25 cargo test --quiet --test faults -- --nocapture
run env KLUIS_ROUNDS="$ROUNDS" cargo test --quiet --test prune skewed_hosts -- --nocapture
run cargo test --quiet --test kill_matrix -- --nocapture
run cargo test --quiet --test crash sigkill -- --nocapture
run cargo test --quiet --test prune sigkill -- --nocapture
run cargo test --quiet --test cluster -- --nocapture
echo "figures in $log"
