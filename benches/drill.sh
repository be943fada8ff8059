#!/usr/bin/env bash
# What a restore drill costs: the SaaS workload at SCALE (default 1; 6 is the ~370 MB dump) in a
# throwaway PostgreSQL, backed up with kluis, then drilled (`kluis drill run`: restore into a
# scratch database, hashes, row counts, an assertion, drop) beside the baseline a person would
# script by hand: `pg_dump | psql` into a new database. Prints both times and the drill's checks.
#
#   benches/drill.sh            # scale 1
#   SCALE=6 benches/drill.sh    # the large dump (a few minutes to generate)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
workloads="${WORKLOADS:-$here/../../shared/workloads}"
scale="${SCALE:-1}"
cd "$here/.."
cargo build --release --quiet --bin kluis
kluis="$PWD/target/release/kluis"

source "$here/pg.sh"
work="$pgdir"   # removed with the server on exit

echo "scale $scale database"
psql -c 'CREATE DATABASE saas' >/dev/null
psql -d saas -v scale="$scale" -f "$workloads/saas.sql" >/dev/null

"$kluis" key generate "$work/key" >/dev/null
cat > "$work/kluisd.toml" <<EOF
[daemon]
state_dir = "$work/state"
[repositories.main]
url = "$work/repo"
key_file = "$work/key"
init = true
[jobs.saas]
repository = "main"
database = "postgres://postgres@127.0.0.1:$port/saas"
schedule = "daily at 02:00"
[drills.saas]
schedule = "weekly on monday at 06:00"
scratch = "postgres://postgres@127.0.0.1:$port/"
budget = "30m"
[[drills.saas.assert]]
name = "appointments up to the snapshot"
sql = "SELECT max(starts_at) IS NOT NULL FROM appointments"
EOF
export PATH="$pgbin:$PATH"
"$kluis" backup --job saas --config "$work/kluisd.toml" --quiet

echo "baseline: pg_dump | psql into a new database"
psql -c 'CREATE DATABASE by_hand' >/dev/null
start=$(date +%s.%N)
"$pgbin/pg_dump" -h 127.0.0.1 -p "$port" -U postgres saas | psql -d by_hand >/dev/null
end=$(date +%s.%N)
baseline=$(echo "$end - $start" | bc)
psql -c 'DROP DATABASE by_hand' >/dev/null

echo "kluis drill run saas"
/usr/bin/time -f "drill peak RSS %M KB" "$kluis" drill run saas --config "$work/kluisd.toml" --json > "$work/report.json"
python3 - "$work/report.json" "$baseline" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))[0]
baseline = float(sys.argv[2])
for c in r["checks"]:
    print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}")
print(f"drill {'passed' if r['passed'] else 'FAILED'}: restore {r['restore_seconds']:.2f} s "
      f"(pg_dump | psql by hand: {baseline:.2f} s, ratio {r['restore_seconds'] / baseline:.2f}x)")
PY
left=$(psql -At -d postgres -c "SELECT count(*) FROM pg_database WHERE datname LIKE 'kluis\_drill%'")
echo "drill databases left behind: $left"
