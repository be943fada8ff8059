# Sourced by the bench scripts: a throwaway PostgreSQL (the newest installed) started as the
# postgres user in a temporary directory on a loopback port, stopped and removed on exit.
# Sets: pgbin, pgdir, port; defines as_pg and psql (as superuser on that server).
pgbin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
pgdir="$(mktemp -d /tmp/kluis-bench-pg.XXXXXX)"
chown postgres "$pgdir"
port=$((20000 + RANDOM % 20000))
as_pg() { if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
as_pg "$pgbin/initdb" -D "$pgdir/data" -A trust -U postgres >/dev/null
as_pg "$pgbin/pg_ctl" -D "$pgdir/data" -o "-p $port -k $pgdir -c listen_addresses=127.0.0.1 -c fsync=off" -l "$pgdir/log" -w start >/dev/null
trap 'as_pg "$pgbin/pg_ctl" -D "$pgdir/data" -m immediate stop >/dev/null; rm -rf "$pgdir"' EXIT
psql() { "$pgbin/psql" -q -h 127.0.0.1 -p "$port" -U postgres -v ON_ERROR_STOP=1 "$@"; }
