use super::child::count_newlines;
use super::*;
use std::process::{Command, Stdio};

#[test]
fn a_lost_snapshot_session_is_explained() {
    use std::os::unix::process::ExitStatusExt;
    let failed = std::process::ExitStatus::from_raw(1 << 8);
    let msg = check_exit(
        "psql (COPY of table t)",
        failed,
        b"ERROR:  invalid snapshot identifier: \"00000005-00000025-1\"\n",
        StderrPolicy::DatabaseTool,
    )
    .unwrap_err();
    assert!(
        msg.contains("exit code 1: ERROR:  invalid snapshot identifier"),
        "{msg}"
    );
    assert!(msg.contains("its connection was lost"), "{msg}");
    let other = check_exit("t", failed, b"ERROR: x\n", StderrPolicy::DatabaseTool);
    assert_eq!(other.unwrap_err(), "t failed with exit code 1: ERROR: x");
}

#[test]
fn newlines_are_counted_across_block_edges() {
    for len in [0, 1, 254, 255, 256, 511, 10_000] {
        // Every byte a newline: a block of 255 must not overflow its u8 count.
        assert_eq!(count_newlines(&vec![b'\n'; len]), len);
        let mixed: Vec<u8> = (0..len)
            .map(|i| if i % 3 == 0 { b'\n' } else { b'x' })
            .collect();
        assert_eq!(count_newlines(&mixed), len.div_ceil(3));
    }
}

fn run(script: &str, policy: StderrPolicy) -> io::Result<Vec<u8>> {
    let child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut r = ChildOutput::new("test tool", child, policy).unwrap();
    let mut out = Vec::new();
    r.read_to_end(&mut out)?;
    Ok(out)
}

#[test]
fn child_failures_become_errors() {
    assert_eq!(run("echo hello", StderrPolicy::Strict).unwrap(), b"hello\n");
    let e = run(
        "echo partial; echo 'boom happened' >&2; exit 3",
        StderrPolicy::Strict,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("exit code 3") && e.contains("boom happened"),
        "{e}"
    );
    let e = run("echo x; kill -9 $$", StderrPolicy::Strict)
        .unwrap_err()
        .to_string();
    assert!(e.contains("signal 9"), "{e}");
    let e = run(
        "echo x; echo 'pg_dump: error: query failed' >&2",
        StderrPolicy::DatabaseTool,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("reported an error") && e.contains("query failed"),
        "{e}"
    );
    // A warning is not an error.
    run(
        "echo x; echo 'pg_dump: warning: something' >&2",
        StderrPolicy::DatabaseTool,
    )
    .unwrap();
}

#[test]
fn truncated_output_is_detected() {
    let ok = |s: &str| {
        let child = Command::new("sh")
            .arg("-c")
            .arg(s)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut r = ChildOutput::new("dump", child, StderrPolicy::DatabaseTool)
            .unwrap()
            .with_trailer(b"-- dump complete\n");
        io::copy(&mut r, &mut io::sink()).map(|_| ())
    };
    ok("printf 'data\\n-- dump complete\\n\\n'").unwrap();
    ok("printf 'data\\n-- dump complete\\n\\n\\\\unrestrict abc\\n\\n'").unwrap();
    ok("printf 'data\\n-- dump compl\\n\\n\\\\unrestrict abc\\n'").unwrap_err();
    let e = ok("printf 'data\\n-- dump compl'").unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn a_silent_tool_is_killed_when_the_backup_is_cancelled() {
    let child = Command::new("sh")
        .arg("-c")
        .arg("sleep 30")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cancel = Cancel::new();
    let mut r = ChildOutput::new("quiet tool", child, StderrPolicy::Strict)
        .unwrap()
        .cancel_on(cancel.clone());
    let canceller = {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            cancel.cancel();
        })
    };
    let started = std::time::Instant::now();
    let e = r.read(&mut [0u8; 16]).unwrap_err();
    canceller.join().unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(matches!(read_error("s", e), Error::Interrupted));
}

#[test]
fn framed_reads_head_body_tail() {
    let mut r = Framed::new(b"<".to_vec(), &b"body"[..], b">".to_vec());
    let mut s = String::new();
    r.read_to_string(&mut s).unwrap();
    assert_eq!(s, "<body>");
}
