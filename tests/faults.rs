//! The reliability suite's network part (issue 18): every command against Garage through a
//! proxy that fails a share of the requests (503s, cut connections after the server acted,
//! stalls past the client's timeout, slow and truncated answers, cut uploads). Everything a
//! command reports as done must be there, read back without the proxy.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::faults::FaultProxy;
use common::*;
use tempfile::TempDir;

/// `kluis args` on `repo`'s key and state, at another URL (the server without the proxy).
fn at(repo: &Repo, url: &str, args: &[&str]) -> Command {
    let mut c = repo.command(args);
    c.env("KLUIS_REPOSITORY", url);
    c
}

fn ok(mut c: Command, what: &str) -> Vec<u8> {
    let out = c.output().unwrap();
    assert_success(&out, &[what]);
    out.stdout
}

/// Snapshot id -> SHA-256 of its stream, as listed at `url`.
fn listed(repo: &Repo, url: &str) -> BTreeMap<String, String> {
    let out = ok(at(repo, url, &["snapshots", "--json"]), "snapshots");
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                hex::encode(hex::decode(s["streams"][0]["sha256"].as_str().unwrap_or("")).unwrap()),
            )
        })
        .collect()
}

#[test]
fn with_a_tenth_of_requests_failing_every_command_succeeds_and_nothing_done_is_missing() {
    // benches/reliability.sh runs this with other seeds and rates.
    let env = |k: &str, default: f64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (seed, rate) = (
        env("KLUIS_FAULT_SEED", 18.0) as u64,
        env("KLUIS_FAULT_RATE", 0.10),
    );
    let garage = Garage::start();
    let proxy = FaultProxy::start(garage.addr(), 0.0, seed);
    let options = "&timeout=2s";
    let faulty = garage.url_through("main", &proxy.endpoint(), options);
    let direct = garage.url_through("main", &garage.endpoint, "");
    let repo = Repo::at(
        TempDir::new().unwrap(),
        faulty.clone(),
        garage.credentials(),
    );
    repo.init_small();
    proxy.set_rate(rate);

    // Backups: streams sharing some data, and a tree.
    let base = dump_like(40, 400 << 10);
    let mut committed = BTreeMap::new();
    for i in 0..5u64 {
        let mut data = base.clone();
        data.extend_from_slice(&random_bytes(41 + i, 200 << 10));
        let out = repo.run_stdin(
            &[
                "backup",
                "--stdin",
                "--name",
                &format!("db{}", i % 2),
                "--json",
            ],
            &data,
        );
        assert_success(&out, &["backup through faults"]);
        committed.insert(snapshot_id(&out.stdout), sha256(&data));
    }
    let src = repo.path().join("tree");
    sample_tree(&src, 42);
    let tree_id = repo.backup_paths(&[], &[&src]);

    // Restores, through the faults.
    for (id, sha) in &committed {
        assert_eq!(&sha256(&repo.restore_stdout(id)), sha, "{id}");
    }
    let target = repo.path().join("restored");
    repo.ok(&[
        "restore",
        &tree_id,
        "--target",
        target.to_str().unwrap(),
        "--quiet",
    ]);
    assert_same_tree(&src, &target.join("tree"));

    // A copy to a second prefix, both ends through the faults.
    let key2 = repo.path().join("key2");
    repo.ok(&["key", "generate", key2.to_str().unwrap()]);
    let foreign = garage.url_through("foreign", &proxy.endpoint(), options);
    let foreign_direct = garage.url_through("foreign", &garage.endpoint, "");
    let mut init2 = at(&repo, &foreign, &["init"]);
    init2.env("KLUIS_KEY_FILE", &key2);
    ok(init2, "init foreign");
    repo.ok(&[
        "copy",
        "--to",
        &foreign,
        "--to-key-file",
        key2.to_str().unwrap(),
        "--name",
        "db0",
    ]);

    // Forget and prune (mark, then sweep), through the faults.
    repo.ok(&["forget", "--name", "db1", "--keep-last", "1"]);
    let prune = || -> serde_json::Value {
        serde_json::from_slice(&repo.ok(&[
            "prune",
            "--grace",
            "0s",
            "--unsafe-short-grace",
            "--json",
        ]))
        .unwrap()
    };
    prune();
    let swept = prune();
    assert!(swept["packs_deleted"].as_u64().unwrap() > 0, "{swept}");
    let stats = proxy.stats.report();
    proxy.set_rate(0.0);

    // Read back without the proxy: what was reported done is there, whole.
    let now = listed(&repo, &direct);
    let kept: Vec<_> = committed
        .iter()
        .filter(|(id, _)| now.contains_key(*id))
        .collect();
    assert_eq!(kept.len(), 4, "three db0 and the newest db1: {now:?}");
    for (id, sha) in kept {
        let out = ok(
            at(&repo, &direct, &["restore", id, "--stdout", "--quiet"]),
            "restore",
        );
        assert_eq!(&sha256(&out), sha, "{id}");
    }
    ok(
        at(&repo, &direct, &["check", "--read-data"]),
        "check --read-data",
    );
    let mut copies = at(&repo, &foreign_direct, &["snapshots", "--json"]);
    copies.env("KLUIS_KEY_FILE", &key2);
    let copies: serde_json::Value = serde_json::from_slice(&ok(copies, "snapshots")).unwrap();
    assert_eq!(copies.as_array().unwrap().len(), 3, "{copies}");
    let mut check2 = at(&repo, &foreign_direct, &["check", "--read-data"]);
    check2.env("KLUIS_KEY_FILE", &key2);
    ok(check2, "check the copy");
    eprintln!("faults (seed {seed}, rate {rate}): {stats}");
    assert!(
        proxy.stats.faults() >= 20,
        "too few faults to mean anything: {stats}"
    );
}
