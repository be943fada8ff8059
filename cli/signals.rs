//! Interruption: the first signal cancels (nothing partial is committed), a second or the grace running out exits; children are killed on the way out.

use super::*;

/// SIGINT or SIGTERM cancel the operation cleanly; a second one exits at once.
/// How long an interrupted command may take to stop by itself before kluis exits anyway.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Exits [`STOP_GRACE`] after a signal, child processes killed first, unless the command has
/// stopped by then: a command blocked where cancellation cannot reach (a write to a pipe nobody
/// reads, with the thread that drives it waiting on that writer) must not keep an interrupted
/// kluis running. A thread of its own, so nothing the command blocks can hold it up. Nothing
/// partial is committed either way: the snapshot manifest is written last.
fn exit_after_grace() {
    std::thread::spawn(|| {
        std::thread::sleep(STOP_GRACE);
        eprintln!(
            "kluis: the interrupted command did not stop within {} s; exiting",
            STOP_GRACE.as_secs()
        );
        kill_children();
        std::process::exit(exit::INTERRUPTED);
    });
}

/// Kills kluis's child processes (dump tools, database clients), with what they started, and
/// reaps them, before kluis exits without the code that would have stopped them: exiting
/// closes their pipes, and a database client that sees its input end runs the statement it
/// was cut in and commits it.
fn kill_children() {
    use rustix::process::{Pid, Signal, WaitOptions, kill_process, kill_process_group, waitpid};
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    let mut killed = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (command) state ppid ...": the command may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(me) {
            continue;
        }
        if let Some(child) = Pid::from_raw(pid) {
            // Tools that lead their own process group take their children with them.
            let _ = kill_process_group(child, Signal::KILL);
            let _ = kill_process(child, Signal::KILL);
            killed.push(child);
        }
    }
    // Reaped, but not waited for long: a child stuck in uninterruptible I/O (a hung network
    // mount) must not keep kluis from exiting.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while !killed.is_empty() && std::time::Instant::now() < deadline {
        killed.retain(|&child| matches!(waitpid(Some(child), WaitOptions::NOHANG), Ok(None)));
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

pub(crate) async fn watch_signals(cancel: Cancel, signalled: Cancel) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    for round in 0.. {
        tokio::select! {
            _ = int.recv() => {},
            _ = term.recv() => {},
        }
        if round > 0 {
            kill_children();
            std::process::exit(exit::INTERRUPTED);
        }
        eprintln!(
            "\ninterrupted: stopping; nothing partial will be committed (again to exit at once)"
        );
        signalled.cancel();
        cancel.cancel();
        exit_after_grace();
    }
}
