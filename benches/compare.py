#!/usr/bin/env python3
"""Compares kluis with restic, borg and rustic on the same inputs, in one run.

Each round runs every tool in turn (the order rotates per round, so a noisy neighbour hurts all
tools alike) on fresh repositories in a temporary directory:
  1. first backup of the big dump (default: inputs/dump6.sql, a plain pg_dump at scale 6)
  2. restore of that snapshot to a file (checked against the input)
  3. four nightly dumps at scale 1 into one repository (inputs/night1..4.sql): stored bytes
It prints medians, and ratios against the best of the other tools.

Usage: benches/prepare.sh && benches/compare.py [--rounds 3] [--inputs DIR] [--only kluis,restic]
The kluis binary is target/release/kluis (built by this script). rustic is optional: install it
with `cargo install rustic-rs --locked`. `--baseline BIN` adds an older kluis build as the tool
`kluis-base`, run in turn with the others: a change shown not slower in the same run.
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

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench-password-not-secret"


def run(cmd, env, stdin=None, stdout=None):
    """Runs cmd under /usr/bin/time; returns (seconds, peak RSS in bytes).

    Flushes dirty pages first, so one tool's pending writeback (kluis fsyncs its writes, the
    others do not) does not land in the next measurement.
    """
    os.sync()
    timing = tempfile.NamedTemporaryFile(delete=False)
    timing.close()
    full = ["/usr/bin/time", "-o", timing.name, "-f", "%e %M"] + cmd
    started = time.monotonic()
    proc = subprocess.run(full, env=env, stdin=stdin, stdout=stdout or subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    wall = time.monotonic() - started
    text = Path(timing.name).read_text().split()
    os.unlink(timing.name)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.decode()[-2000:]}")
    return wall, int(text[-1]) * 1024


def du(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:
                pass
    return total


class Tool:
    name = ""

    def __init__(self, work):
        self.work = Path(work)
        self.repo = self.work / f"repo-{self.name}"
        self.env = dict(os.environ)

    def fresh(self):
        shutil.rmtree(self.repo, ignore_errors=True)
        for p in self.work.glob(f"cache-{self.name}*"):
            shutil.rmtree(p, ignore_errors=True)
        self.init()

    def stored(self):
        return du(self.repo)


class Kluis(Tool):
    name = "kluis"
    bin = str(ROOT / "target/release/kluis")

    def init(self):
        key = self.work / "kluis.key"
        if not key.exists():
            subprocess.run([self.bin, "key", "generate", str(key)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.env.update(KLUIS_REPOSITORY=str(self.repo), KLUIS_KEY_FILE=str(key))
        subprocess.run([self.bin, "init"], env=self.env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    def backup(self, path, name):
        with open(path, "rb") as f:
            return run([self.bin, "backup", "--quiet", "--stdin", "--name", name], self.env, stdin=f)

    def restore(self, name, out):
        with open(out, "wb") as f:
            return run([self.bin, "restore", "--quiet", "latest", "--name", name, "--stdout"],
                       self.env, stdout=f)


class Restic(Tool):
    name = "restic"

    def init(self):
        self.env.update(RESTIC_REPOSITORY=str(self.repo), RESTIC_PASSWORD=PASSWORD,
                        RESTIC_CACHE_DIR=str(self.work / "cache-restic"))
        subprocess.run(["restic", "init", "--quiet"], env=self.env, check=True,
                       stdout=subprocess.DEVNULL)

    def backup(self, path, name):
        with open(path, "rb") as f:
            return run(["restic", "backup", "--quiet", "--stdin", "--stdin-filename", name],
                       self.env, stdin=f)

    def restore(self, name, out):
        with open(out, "wb") as f:
            return run(["restic", "dump", "--quiet", "latest", "/" + name], self.env, stdout=f)


class Borg(Tool):
    name = "borg"

    def init(self):
        self.env.update(BORG_PASSPHRASE=PASSWORD, BORG_BASE_DIR=str(self.work / "cache-borg"),
                        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")
        self.n = 0
        subprocess.run(["borg", "init", "--encryption", "repokey-blake2", str(self.repo)],
                       env=self.env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    def backup(self, path, name):
        self.n += 1
        self.last = f"{name}-{self.n}"
        with open(path, "rb") as f:
            return run(["borg", "create", "--stdin-name", name, f"{self.repo}::{self.last}", "-"],
                       self.env, stdin=f)

    def restore(self, name, out):
        with open(out, "wb") as f:
            return run(["borg", "extract", "--stdout", f"{self.repo}::{self.last}"], self.env,
                       stdout=f)


class Rustic(Tool):
    name = "rustic"

    def init(self):
        self.env.update(RUSTIC_REPOSITORY=str(self.repo), RUSTIC_PASSWORD=PASSWORD,
                        RUSTIC_CACHE_DIR=str(self.work / "cache-rustic"))
        subprocess.run(["rustic", "init"], env=self.env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    def backup(self, path, name):
        with open(path, "rb") as f:
            return run(["rustic", "backup", "--stdin-filename", name, "-"], self.env, stdin=f)

    def restore(self, name, out):
        with open(out, "wb") as f:
            return run(["rustic", "dump", f"latest:{name}"], self.env, stdout=f)


TOOLS = {t.name: t for t in (Kluis, Restic, Borg, Rustic)}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--inputs", default=os.environ.get("OUT", "/tmp/kluis-bench/inputs"))
    ap.add_argument("--work", default="/tmp/kluis-bench/work")
    ap.add_argument("--only", default="kluis,restic,borg,rustic")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--baseline", help="an older kluis binary, run as the tool kluis-base")
    args = ap.parse_args()
    if args.baseline:
        TOOLS["kluis-base"] = type("KluisBase", (Kluis,), {"name": "kluis-base",
                                                          "bin": args.baseline})
        if "kluis-base" not in args.only:
            args.only += ",kluis-base"

    inputs = Path(args.inputs)
    big = inputs / "dump6.sql"
    nights = [inputs / f"night{i}.sql" for i in range(1, 5)]
    for p in [big] + nights:
        if not p.exists():
            sys.exit(f"{p} is missing: run benches/prepare.sh first")
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "kluis"], cwd=ROOT,
                       check=True)
    names = [n for n in args.only.split(",") if n]
    for n in names:
        exe = TOOLS[n].bin if n.startswith("kluis") else shutil.which(n)
        if not exe or not os.path.exists(exe):
            print(f"note: {n} not installed, skipped", file=sys.stderr)
    names = [n for n in names if (TOOLS[n].bin if n.startswith("kluis") else shutil.which(n))]

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    want = sha256(big)
    size = big.stat().st_size
    res = {n: {"backup": [], "brss": [], "restore": [], "rrss": [], "stored": 0,
               "nights": [], "nights_time": [], "nights_ok": True} for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            tool = TOOLS[n](work)
            tool.fresh()
            t, rss = tool.backup(big, "dump.sql")
            res[n]["backup"].append(t)
            res[n]["brss"].append(rss)
            res[n]["stored"] = tool.stored()
            out = work / "restored.sql"
            t, rss = tool.restore("dump.sql", out)
            if sha256(out) != want:
                sys.exit(f"{n}: restored dump differs from the input")
            out.unlink()
            res[n]["restore"].append(t)
            res[n]["rrss"].append(rss)
            # Nightly dumps into a fresh repository: stored bytes after each night.
            tool.fresh()
            stored, spent = [], 0.0
            for night in nights:
                t, _ = tool.backup(night, "saas.sql")
                spent += t
                stored.append(tool.stored())
            res[n]["nights"] = stored
            res[n]["nights_time"].append(spent)
            # The newest nightly snapshot must restore the newest dump (rustic 0.11 records a
            # changed stdin stream as unchanged when it has a parent snapshot: design.md).
            out = work / "restored.sql"
            tool.restore("saas.sql", out)
            res[n]["nights_ok"] = sha256(out) == sha256(nights[-1])
            out.unlink()
            shutil.rmtree(tool.repo, ignore_errors=True)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {res[n]['backup'][-1]:.2f}/{res[n]['restore'][-1]:.2f} s" for n in names),
            file=sys.stderr)

    mb = 1e6
    med = {n: {k: statistics.median(v) for k, v in res[n].items()
               if k in ("backup", "restore", "brss", "rrss", "nights_time")} for n in names}
    others = [n for n in names if not n.startswith("kluis")]

    def best(key, lower=True):
        vals = [med[n][key] if key in med[n] else res[n][key] for n in others]
        return (min(vals) if lower else max(vals)) if vals else None

    print(f"\nInput: {big.name}, {size / mb:.1f} MB; {args.rounds} rounds, medians; "
          f"{os.cpu_count()} cores\n")
    print("| tool | backup s | MB/s | stored MB | backup peak RSS MB | restore s | MB/s | restore peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in names:
        m = med[n]
        print(f"| {n} | {m['backup']:.2f} | {size / mb / m['backup']:.0f} | "
              f"{res[n]['stored'] / mb:.1f} | {m['brss'] / mb:.0f} | {m['restore']:.2f} | "
              f"{size / mb / m['restore']:.0f} | {m['rrss'] / mb:.0f} |")
    print("\n| nights (scale 1) | " + " | ".join(f"after night {i}" for i in range(1, 5))
          + " | added per night (avg of 2-4) | 4 backups s |")
    print("|---|" + "---:|" * 6)
    for n in names:
        s = res[n]["nights"]
        added = (s[3] - s[0]) / 3
        wrong = "" if res[n]["nights_ok"] else " (night 4 restores WRONG data)"
        print(f"| {n} | " + " | ".join(f"{x / mb:.1f} MB" for x in s)
              + f" | {added / mb:.2f} MB{wrong} | {med[n]['nights_time']:.2f} |")
    if "kluis-base" in names:
        k, b = med["kluis"], med["kluis-base"]
        print(f"\nkluis against kluis-base ({args.baseline}): backup {k['backup'] / b['backup']:.3f}x "
              f"the time, restore {k['restore'] / b['restore']:.3f}x, nights "
              f"{k['nights_time'] / b['nights_time']:.3f}x, stored "
              f"{res['kluis']['stored'] / res['kluis-base']['stored']:.3f}x")
    if "kluis" in names and others:
        k = med["kluis"]
        print("\nkluis against the best of " + ", ".join(others) + ":")
        print(f"  backup throughput  {best('backup') / k['backup']:.2f}x  (floor 2.0x)")
        print(f"  stored bytes       {res['kluis']['stored'] / min(res[n]['stored'] for n in others):.3f}x"
              "  (ceiling 1.05x)")
        print(f"  restore throughput {best('restore') / k['restore']:.2f}x  (floor 1.5x)")
        print(f"  peak RSS           backup {k['brss'] / mb:.0f} MB, restore {k['rrss'] / mb:.0f} MB"
              "  (ceiling 100 MB)")
        nk = res["kluis"]["nights"]
        honest = [n for n in others if res[n]["nights_ok"]]
        if honest:
            print(f"  nightly added      {(nk[3] - nk[0]) / 3 / mb:.2f} MB vs best "
                  f"{min((res[n]['nights'][3] - res[n]['nights'][0]) / 3 for n in honest) / mb:.2f}"
                  f" MB (of the tools whose newest snapshot restores correctly)")


if __name__ == "__main__":
    main()
