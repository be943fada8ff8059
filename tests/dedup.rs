//! Deduplication: the same 200 MB twice adds under 1 %; an insertion near the start of a
//! stream (content-defined chunking) and a directory holding the same bytes add little too.

mod common;

use std::fs;

use common::*;

#[test]
fn the_same_200_mb_twice_adds_under_one_percent() {
    let repo = Repo::init_file(&[]);
    let mut input = dump_like(31, 60 << 20);
    input.extend_from_slice(&random_bytes(32, 140 << 20));
    assert_eq!(input.len(), 200 << 20);

    repo.backup_stdin("db", &input);
    let after_first = repo.stored_bytes();
    repo.backup_stdin("db", &input);
    let after_second = repo.stored_bytes();
    let added = after_second - after_first;
    eprintln!("first backup stored {after_first} bytes; the same input again added {added}");
    assert!(
        (added as f64) < 0.01 * after_first as f64,
        "second backup of the same 200 MB added {added} bytes to {after_first}"
    );

    // Ten bytes inserted near the start shift everything after them: content-defined chunk
    // boundaries resynchronise, so only the chunks around the insertion are new.
    let mut shifted = input[..1000].to_vec();
    shifted.extend_from_slice(b"0123456789");
    shifted.extend_from_slice(&input[1000..]);
    let shifted_id = repo.backup_stdin("db", &shifted);
    let added = repo.stored_bytes() - after_second;
    eprintln!("an insertion near the start added {added} bytes");
    assert!(
        added < 20 << 20,
        "an insertion of 10 bytes added {added} bytes"
    );

    // The same bytes as a file in a directory backup share the stream's chunks.
    let before = repo.stored_bytes();
    let dir = repo.path().join("files");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("dump.sql"), &input).unwrap();
    repo.backup_paths(&[], &[&dir]);
    let added = repo.stored_bytes() - before;
    eprintln!("the same bytes as a file added {added} bytes");
    assert!(
        (added as f64) < 0.01 * after_first as f64,
        "file backup added {added} bytes"
    );
    let out = repo.restore_stdout(&shifted_id);
    assert!(
        out == shifted,
        "the shifted stream does not restore bit-exact"
    );
}
