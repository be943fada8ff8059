#!/usr/bin/env bash
# The main job end to end, with nothing left running: back up data that exists on any machine
# (/etc and /usr/share/doc, plus a stream) into a local-directory repository, back it up again
# to show deduplication, restore it, compare every byte, verify the repository; then run
# kluisd once on its embedded default (config/kluis.toml) with a state directory of its own:
# a backup of /etc and a restore drill of it.
#
#   tests/demo.sh            # uses a fresh temporary directory, removed afterwards
#   KLUIS_DEMO_DIR=/x tests/demo.sh   # keeps everything under /x
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --quiet --bin kluis --bin kluisd
kluis="$PWD/target/debug/kluis"
kluisd="$PWD/target/debug/kluisd"

if [[ -n "${KLUIS_DEMO_DIR:-}" ]]; then
    work="$KLUIS_DEMO_DIR"
    mkdir -p "$work"
else
    work="$(mktemp -d /tmp/kluis-demo.XXXXXX)"
    trap 'rm -rf "$work"' EXIT
fi
export KLUIS_REPOSITORY="$work/repo" KLUIS_KEY_FILE="$work/key"
rm -rf "$work/repo" "$work/restore" "$work/key" "$work/state"

step() { printf '\n== %s\n' "$*"; }

step "a key file and a repository at $KLUIS_REPOSITORY"
"$kluis" key generate "$KLUIS_KEY_FILE"
"$kluis" init

sources=(/etc /usr/share/doc)
backup() {
    # Exit code 3: committed, but some files were unreadable (as a non-root user in /etc).
    local rc=0
    "$kluis" backup "$@" || rc=$?
    if [[ $rc -ne 0 && $rc -ne 3 ]]; then
        echo "backup failed with exit code $rc" >&2
        exit "$rc"
    fi
}

step "backup of ${sources[*]}"
backup --name system "${sources[@]}"
step "the same again: deduplicated, almost nothing new is stored"
backup --name system "${sources[@]}"

step "a stream backup (what a database dump is)"
tar -cf - -C / etc 2>/dev/null | "$kluis" backup --stdin --name etc.tar

step "snapshots"
"$kluis" snapshots

step "restore the latest 'system' snapshot and compare it with the source"
"$kluis" restore latest --name system --target "$work/restore"
for s in "${sources[@]}"; do
    # Unreadable entries were reported at backup time and are not in the snapshot.
    diff -r --no-dereference "$s" "$work/restore/$(basename "$s")" 2>&1 \
        | grep -v -e 'Permission denied' -e '^Only in /' || true
done | tee "$work/diff.txt"
if [[ -s "$work/diff.txt" ]]; then
    echo "restored files differ from the source (see above)" >&2
    exit 1
fi
echo "restored tree matches the source"

step "restore the stream and compare its SHA-256"
"$kluis" restore latest --name etc.tar --stdout | sha256sum

step "verify every byte in the repository"
"$kluis" check --read-data

step "kluisd --once on its embedded default, state in $work/state"
STATE_DIRECTORY="$work/state" "$kluisd" --once
KLUIS_REPOSITORY="$work/state/repository" KLUIS_KEY_FILE="$work/state/repository.key" \
    "$kluis" snapshots
step "the restore drill it ran: /etc restored into a scratch directory, checked, removed"
STATE_DIRECTORY="$work/state" "$kluis" drill history

step "done: repository at $KLUIS_REPOSITORY ($(du -sh "$KLUIS_REPOSITORY" | cut -f1))"
