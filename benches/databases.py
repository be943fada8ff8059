#!/usr/bin/env python3
"""Database backups: kluis's PostgreSQL source against restic, borg and rustic on pg_dump.

Starts a throwaway PostgreSQL (as the postgres user when run as root) in a temporary directory
on loopback and measures, in one run:

  1. Nights. The shared SaaS workload at scale 1, then one business day of changes
     (saas-day.sql) before each of nights 2..4. The same rows are copied into a MariaDB each
     night (unless --no-mysql). Every night kluis backs up the live database
     (`kluis backup postgres://...`: per-table streams in primary-key order, one snapshot), and
     restic, borg and rustic back up a plain `pg_dump -Z0` of the same state on stdin (and
     kluis `mysql://` against `mariadb-dump` on stdin for the MariaDB copy). Also
     kluis on that same plain dump (stdin), to separate the source from the engine. Prints stored
     bytes after each night and the bytes added per night, as a share of the first night.
     Floor (issue 4): kluis adds on average <= 10 % of its first night.
     Each tool's newest snapshot must restore the newest state (checked).
  2. Speed. The workload at scale 6 (~370 MB dump): `pg_dump -Z0 > /dev/null` against
     `kluis backup postgres://` into a fresh repository, alternately, --rounds times; and the
     server's share alone: each table's `COPY ... ORDER BY <key>` to /dev/null.
     Floor (issue 4): kluis <= 1.15x pg_dump.

Usage: benches/databases.py [--rounds 3] [--only kluis,restic,borg,rustic] [--skip-speed]
The kluis binary is target/release/kluis (built by this script unless --no-build).
"""

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (the tool wrappers: init, backup from a file, restore)

ROOT = compare.ROOT
WORKLOADS = Path(os.environ.get("WORKLOADS", ROOT.parent / "shared" / "workloads"))


class Postgres:
    def __init__(self, work):
        self.bin = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                          key=lambda p: int(p.parent.name))[-1]
        self.dir = Path(tempfile.mkdtemp(prefix="kluis-bench-pg.", dir=work))
        self.port = 20000 + os.getpid() % 20000
        self.root = os.geteuid() == 0
        if self.root:
            shutil.chown(self.dir, "postgres")
        self.as_pg([self.bin / "initdb", "-D", self.dir / "data", "-A", "trust", "-U", "postgres"])
        self.as_pg([self.bin / "pg_ctl", "-D", self.dir / "data", "-l", self.dir / "log", "-w",
                    "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                          "-c fsync=off -c shared_buffers=256MB", "start"])

    def as_pg(self, cmd):
        cmd = [str(c) for c in cmd]
        if self.root:
            cmd = ["runuser", "-u", "postgres", "--"] + cmd
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

    def stop(self):
        self.as_pg([self.bin / "pg_ctl", "-D", self.dir / "data", "-m", "immediate", "stop"])
        shutil.rmtree(self.dir, ignore_errors=True)

    def psql(self, db, *args):
        subprocess.run([self.bin / "psql", "-q", "-X", "-h", "127.0.0.1", "-p", str(self.port),
                        "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-d", db, *args],
                       check=True, stdout=subprocess.DEVNULL)

    def url(self, db):
        return f"postgres://postgres@127.0.0.1:{self.port}/{db}"

    def dump_cmd(self, db):
        return [str(self.bin / "pg_dump"), "-h", "127.0.0.1", "-p", str(self.port),
                "-U", "postgres", "-Z0", db]

    def dump(self, db, out):
        with open(out, "wb") as f:
            subprocess.run(self.dump_cmd(db), check=True, stdout=f)

    def load(self, db, scale):
        self.psql("postgres", "-c", f"DROP DATABASE IF EXISTS {db}")
        self.psql("postgres", "-c", f"CREATE DATABASE {db}")
        self.psql(db, "-v", f"scale={scale}", "-f", str(WORKLOADS / "saas.sql"))


class Mariadb:
    """A throwaway MariaDB holding a copy of the PostgreSQL workload, refreshed every night.

    The workload's SQL is PostgreSQL's; MariaDB gets the same rows (CSV, id order), so its dump
    changes from night to night exactly as the data does.
    """
    SCHEMA = """
CREATE TABLE customers(id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL,
  phone text, street text, city text, created_at datetime(6) NOT NULL, newsletter bool NOT NULL);
CREATE TABLE appointments(id bigint PRIMARY KEY, customer_id bigint NOT NULL,
  starts_at datetime(6) NOT NULL, duration_min int NOT NULL, status text NOT NULL, note text,
  KEY (customer_id), KEY (starts_at));
CREATE TABLE invoices(id bigint PRIMARY KEY, customer_id bigint NOT NULL,
  amount_cents bigint NOT NULL, vat_cents bigint NOT NULL, iban text, issued_at date NOT NULL,
  `lines` json, KEY (customer_id));
"""
    COLUMNS = {
        "customers": "id, name, email, phone, street, city, "
                     "to_char(created_at, 'YYYY-MM-DD HH24:MI:SS.US'), newsletter::int",
        "appointments": "id, customer_id, to_char(starts_at, 'YYYY-MM-DD HH24:MI:SS.US'), "
                        "duration_min, status, note",
        "invoices": "id, customer_id, amount_cents, vat_cents, iban, issued_at, lines",
    }

    def __init__(self, work):
        self.dir = Path(tempfile.mkdtemp(prefix="kluis-bench-my.", dir=work))
        self.port = 40000 + os.getpid() % 20000
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={self.dir}/data",
                        "--auth-root-authentication-method=normal", "--user=root",
                        "--skip-test-db"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        self.proc = subprocess.Popen(
            ["/usr/sbin/mariadbd", "--no-defaults", f"--datadir={self.dir}/data",
             f"--socket={self.dir}/sock", f"--port={self.port}", "--bind-address=127.0.0.1",
             "--user=root", "--skip-log-bin", "--innodb-buffer-pool-size=512M",
             "--innodb-flush-log-at-trx-commit=0", "--character-set-server=utf8mb4",
             "--local-infile=1"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "log", "wb"))
        for _ in range(600):
            if self.sql("", "SELECT 1", check=False).returncode == 0:
                break
            time.sleep(0.1)
        self.sql("", "CREATE DATABASE s1")
        self.sql("s1", self.SCHEMA)

    def client(self, db):
        cmd = ["mariadb", "--no-defaults", f"--socket={self.dir}/sock", "-uroot",
               "--local-infile=1", "--default-character-set=utf8mb4"]
        return cmd + ([f"--database={db}"] if db else [])

    def sql(self, db, script, check=True):
        return subprocess.run(self.client(db), input=script.encode(), check=check,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def url(self, db):
        return f"mysql://root@localhost/{db}?socket={self.dir}/sock"

    def sync_from(self, pg, db):
        """Replaces every table's rows with PostgreSQL's, in id order."""
        for table, cols in self.COLUMNS.items():
            csv = self.dir / f"{table}.csv"
            with open(csv, "wb") as f:
                subprocess.run([pg.bin / "psql", "-X", "-q", "-h", "127.0.0.1", "-p",
                                str(pg.port), "-U", "postgres", "-d", db, "-c",
                                f"COPY (SELECT {cols} FROM {table} ORDER BY id) TO STDOUT "
                                "(FORMAT csv, NULL '\\N')"], check=True, stdout=f)
            self.sql("s1", f"TRUNCATE {table}; LOAD DATA LOCAL INFILE '{csv}' INTO TABLE {table} "
                           "FIELDS TERMINATED BY ',' OPTIONALLY ENCLOSED BY '\"';")
            csv.unlink()

    def dump(self, out):
        with open(out, "wb") as f:
            subprocess.run(["mariadb-dump", "--no-defaults", f"--socket={self.dir}/sock", "-uroot",
                            "--single-transaction", "--order-by-primary", "--skip-dump-date",
                            "s1"], check=True, stdout=f)

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class KluisDb(compare.Kluis):
    """kluis backing up the live database."""
    name = "kluis"

    def backup_db(self, url, name):
        env = dict(self.env, KLUIS_PG_BIN_DIR=str(PG.bin))
        return compare.run([self.bin, "backup", "--quiet", "--name", name, url], env)


def sha256(path):
    return compare.sha256(path)


def fingerprint(pg, db):
    """Every table's rows in key order, hashed: what a correct restore must reproduce."""
    out = subprocess.run(
        [str(pg.bin / "psql"), "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(pg.port), "-U",
         "postgres", "-d", db, "-c",
         "SELECT md5(string_agg(x, ',')) FROM ("
         "SELECT md5(string_agg(c::text, '' ORDER BY c.id)) x FROM customers c UNION ALL "
         "SELECT md5(string_agg(a::text, '' ORDER BY a.id)) FROM appointments a UNION ALL "
         "SELECT md5(string_agg(i::text, '' ORDER BY i.id)) FROM invoices i) t"],
        check=True, capture_output=True, text=True)
    return out.stdout.strip()


PG = None


def nights(args, work, names):
    mb = 1e6
    PG.load("s1", 1)
    tools = {n: compare.TOOLS[n](work) for n in names if n != "kluis"}
    kluis_db = KluisDb(work)
    kluis_db.repo = work / "repo-kluis-db"
    kluis_stdin = compare.Kluis(work) if "kluis" in names else None
    for t in tools.values():
        t.fresh()
    if kluis_stdin:
        kluis_db.fresh()
        kluis_stdin.repo = work / "repo-kluis-stdin"
        kluis_stdin.fresh()
    my = Mariadb(work) if (args.mysql and shutil.which("mariadb-dump")) else None
    my_tools = {}
    if my:
        kluis_my = KluisDb(work)
        kluis_my.repo = work / "repo-kluis-mysql"
        if kluis_stdin:
            kluis_my.fresh()
        for n in names:
            if n != "kluis":
                t = compare.TOOLS[n](work)
                t.repo = work / f"repo-{n}-mysql"
                t.fresh()
                my_tools[n] = t
    rows = {}
    dump = work / "night.sql"
    my_dump = work / "night-mysql.sql"
    for night in range(1, 5):
        if night > 1:
            PG.psql("s1", "-v", "scale=1", "-v", f"day={night - 1}", "-f",
                    str(WORKLOADS / "saas-day.sql"))
            PG.psql("s1", "-c", "VACUUM")
        PG.dump("s1", dump)
        if kluis_stdin:
            kluis_db.backup_db(PG.url("s1"), "s1")
            rows.setdefault("kluis (postgres:// source)", []).append(compare.du(kluis_db.repo))
            kluis_stdin.backup(dump, "s1.sql")
            rows.setdefault("kluis (plain pg_dump, stdin)", []).append(
                compare.du(kluis_stdin.repo))
        for n, t in tools.items():
            t.backup(dump, "s1.sql")
            rows.setdefault(n, []).append(t.stored())
        if my:
            my.sync_from(PG, "s1")
            my.dump(my_dump)
            if kluis_stdin:
                kluis_my.backup_db(my.url("s1"), "s1")
                rows.setdefault("MariaDB: kluis (mysql:// source)", []).append(
                    compare.du(kluis_my.repo))
            for n, t in my_tools.items():
                t.backup(my_dump, "s1.sql")
                rows.setdefault(f"MariaDB: {n} (mariadb-dump)", []).append(t.stored())
        print(f"night {night}: dump {dump.stat().st_size / mb:.1f} MB", file=sys.stderr)

    # The newest snapshot of each must restore the newest state.
    ok = {}
    want_dump = sha256(dump)
    for n, t in tools.items():
        out = work / "restored.sql"
        t.restore("s1.sql", out)
        ok[n] = sha256(out) == want_dump
    if kluis_stdin:
        out = work / "restored.sql"
        kluis_stdin.restore("s1.sql", out)
        ok["kluis (plain pg_dump, stdin)"] = sha256(out) == want_dump
        env = dict(kluis_db.env, KLUIS_PG_BIN_DIR=str(PG.bin))
        PG.psql("postgres", "-c", "DROP DATABASE IF EXISTS restored")
        subprocess.run([kluis_db.bin, "restore", "--quiet", "latest", "--name", "s1", "--to",
                        PG.url("restored")], env=env, check=True)
        ok["kluis (postgres:// source)"] = fingerprint(PG, "restored") == fingerprint(PG, "s1")

    if my:
        want_my = sha256(my_dump)
        for n, t in my_tools.items():
            out = work / "restored.sql"
            t.restore("s1.sql", out)
            ok[f"MariaDB: {n} (mariadb-dump)"] = sha256(out) == want_my
        my.stop()
    print("\n| nights (scale 1) | after night 1 | 2 | 3 | 4 | added per night (avg of 2-4) "
          "| share of night 1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n, s in rows.items():
        added = (s[3] - s[0]) / 3
        wrong = "" if ok.get(n, True) else " (newest snapshot restores WRONG data)"
        print(f"| {n} | " + " | ".join(f"{x / mb:.2f} MB" for x in s)
              + f" | {added / mb:.2f} MB{wrong} | {100 * added / s[0]:.1f} % |")
    if kluis_stdin:
        s = rows["kluis (postgres:// source)"]
        share = (s[3] - s[0]) / 3 / s[0]
        print(f"\nkluis postgres:// source adds {100 * share:.1f} % of its first night per night "
              f"(floor: <= 10 %): {'PASS' if share <= 0.10 else 'FAIL'}")
        if "MariaDB: kluis (mysql:// source)" in rows:
            s = rows["MariaDB: kluis (mysql:// source)"]
            share = (s[3] - s[0]) / 3 / s[0]
            print(f"kluis mysql:// source adds {100 * share:.1f} % of its first night per night")


def ordered_copies(db):
    """Every table's rows in primary-key order, one table after the other, to /dev/null: the
    server's share of kluis's work, without kluis."""
    psql = [str(PG.bin / "psql"), "-X", "-q", "-A", "-t", "-h", "127.0.0.1", "-p", str(PG.port),
            "-U", "postgres", "-d", db]
    tables = subprocess.run(psql + ["-c", "SELECT format('%I.%I', schemaname, tablename) FROM "
                                          "pg_tables WHERE schemaname = 'public'"],
                            check=True, capture_output=True, text=True).stdout.split()
    with open(os.devnull, "wb") as null:
        for t in tables:
            subprocess.run(psql + ["-c", f"COPY (SELECT * FROM ONLY {t} ORDER BY id) TO STDOUT"],
                           check=True, stdout=null)


def speed(args, work):
    PG.load("s6", 6)
    size = 0
    t_dump, t_kluis, t_ordered, rss = [], [], [], []
    kluis = KluisDb(work)
    kluis.repo = work / "repo-kluis-speed"
    for r in range(args.rounds):
        order = ["dump", "ordered", "kluis"] if r % 2 == 0 else ["kluis", "ordered", "dump"]
        for what in order:
            if what == "ordered":
                os.sync()
                started = time.monotonic()
                ordered_copies("s6")
                t_ordered.append(time.monotonic() - started)
            elif what == "dump":
                os.sync()
                started = time.monotonic()
                with open(os.devnull, "wb") as null:
                    subprocess.run(PG.dump_cmd("s6"), check=True, stdout=null)
                t_dump.append(time.monotonic() - started)
            else:
                kluis.fresh()
                t, peak = kluis.backup_db(PG.url("s6"), "s6")
                t_kluis.append(t)
                rss.append(peak)
        print(f"round {r + 1}/{args.rounds}: pg_dump {t_dump[-1]:.2f} s, "
              f"kluis {t_kluis[-1]:.2f} s", file=sys.stderr)
    PG.dump("s6", work / "s6.sql")
    size = (work / "s6.sql").stat().st_size
    (work / "s6.sql").unlink()
    d, k = statistics.median(t_dump), statistics.median(t_kluis)
    print(f"\nscale 6 ({size / 1e6:.0f} MB plain dump), {args.rounds} rounds, medians, "
          f"{os.cpu_count()} cores:")
    print("| | seconds | MB/s | peak RSS MB |")
    print("|---|---:|---:|---:|")
    print(f"| pg_dump -Z0 > /dev/null | {d:.2f} | {size / 1e6 / d:.0f} | |")
    o = statistics.median(t_ordered)
    print(f"| COPY ... ORDER BY <key> of each table > /dev/null (psql, one after the other) "
          f"| {o:.2f} | {size / 1e6 / o:.0f} | |")
    print(f"| kluis backup postgres:// | {k:.2f} | {size / 1e6 / k:.0f} | "
          f"{statistics.median(rss) / 1e6:.0f} |")
    print(f"\nkluis / pg_dump = {k / d:.2f}x (ceiling 1.15x): {'PASS' if k / d <= 1.15 else 'FAIL'}"
          f"; ordered COPY alone / pg_dump = {o / d:.2f}x")


def main():
    global PG
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/kluis-bench/db-work")
    ap.add_argument("--only", default="kluis,restic,borg,rustic")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--skip-nights", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--no-mysql", dest="mysql", action="store_false",
                    help="skip the MariaDB copy of the nightly workload")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "kluis"], cwd=ROOT,
                       check=True)
    names = [n for n in args.only.split(",") if n]
    missing = [n for n in names if n != "kluis" and not shutil.which(n)]
    for n in missing:
        print(f"note: {n} not installed, skipped", file=sys.stderr)
    names = [n for n in names if n not in missing]
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.chmod(work, 0o755)
    PG = Postgres(work)
    try:
        if not args.skip_nights:
            nights(args, work, names)
        if not args.skip_speed and "kluis" in names:
            speed(args, work)
    finally:
        PG.stop()


if __name__ == "__main__":
    main()
