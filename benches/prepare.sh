#!/usr/bin/env bash
# Builds the benchmark inputs from ../shared/workloads (deterministic for a given scale):
#   $OUT/dump6.sql            plain pg_dump of saas.sql at scale 6 (~370 MB)
#   $OUT/night{1..4}.sql      plain pg_dump of saas.sql at scale 1, then after saas-day.sql day 1..3
# Starts a throwaway PostgreSQL as the postgres user in a temporary directory on loopback.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
workloads="${WORKLOADS:-$here/../../shared/workloads}"
OUT="${OUT:-/tmp/kluis-bench/inputs}"
mkdir -p "$OUT"
source "$here/pg.sh"
dump() { "$pgbin/pg_dump" -h 127.0.0.1 -p "$port" -U postgres -Z0 "$1"; }

if [[ ! -s "$OUT/dump6.sql" ]]; then
    echo "scale 6 database and dump (a few minutes)"
    psql -c 'CREATE DATABASE s6' >/dev/null
    psql -d s6 -v scale=6 -f "$workloads/saas.sql" >/dev/null
    dump s6 > "$OUT/dump6.sql"
fi
if [[ ! -s "$OUT/night4.sql" ]]; then
    echo "scale 1 database and four nightly dumps"
    psql -c 'CREATE DATABASE s1' >/dev/null
    psql -d s1 -v scale=1 -f "$workloads/saas.sql" >/dev/null
    dump s1 > "$OUT/night1.sql"
    for day in 1 2 3; do
        psql -d s1 -v scale=1 -v day=$day -f "$workloads/saas-day.sql" >/dev/null
        psql -d s1 -c 'VACUUM' >/dev/null
        dump s1 > "$OUT/night$((day + 1)).sql"
    done
fi
ls -la "$OUT"
