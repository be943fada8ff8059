//! The reliability suite's cluster test (issue 18): a three-node Garage cluster (replication
//! factor 3, one node per zone); a node is killed in the middle of a backup and another in the
//! middle of a restore, then brought back. Every committed snapshot restores bit-exact.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::cluster::Cluster;
use common::*;

#[test]
fn a_node_killed_mid_backup_and_mid_restore_loses_nothing() {
    let mut cluster = Cluster::start(3);
    // kluis talks to node 0; nodes 1 and 2 die in turn.
    let repo = cluster.repo("main", 0);
    repo.ok(&[
        "init",
        "--pack-size",
        "262144",
        "--chunk-sizes",
        "16384,65536,262144",
    ]);
    let a = random_bytes(1, 6 << 20);
    let a_id = repo.backup_stdin("a", &a);

    // Node 2 dies while b is being backed up.
    let b = random_bytes(2, 12 << 20);
    let mut child = repo.spawn(&["backup", "--stdin", "--name", "b", "--json"]);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&b[..6 << 20]).unwrap();
    cluster.kill_node(2);
    stdin.write_all(&b[6 << 20..]).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_success(&out, &["backup while a node dies"]);
    let b_id = snapshot_id(&out.stdout);
    assert!(repo.restore_stdout(&b_id) == b, "b with node 2 down");

    // Node 2 back; node 1 dies in the middle of a restore.
    cluster.restart_node(2);
    let mut child = repo
        .command(&["restore", &b_id, "--stdout", "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = vec![0u8; 1 << 20];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    cluster.kill_node(1);
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut stdout, &mut rest).unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "restore while a node dies: {err}");
    first.extend_from_slice(&rest);
    assert_eq!(sha256(&first), sha256(&b), "restore while node 1 died");

    // Everyone back: the whole repository reads back clean, every snapshot bit-exact.
    cluster.restart_node(1);
    repo.ok(&["check", "--read-data"]);
    assert!(repo.restore_stdout(&a_id) == a);
    assert!(repo.restore_stdout(&b_id) == b);
    let c = random_bytes(3, 1 << 20);
    let c_id = repo.backup_stdin("c", &c);
    assert!(repo.restore_stdout(&c_id) == c);
}
