//! `kluisd`: runs the configured backup jobs, each repository's maintenance (forget, then
//! prune) and the copy rules on their schedules.
//!
//! ```text
//! kluisd                         # the embedded default (config/kluis.toml)
//! kluisd --config /etc/kluis/kluisd.toml
//! kluisd --config FILE --once    # every job once, now, then copies, drills, maintenance; exit 0 if all succeeded
//! ```
//!
//! Scheduling: each job's next run comes from its schedule in the configured time zone, plus a
//! random jitter. A job runs once at a time: a run that comes due while the previous one still
//! runs is skipped and logged. At most `max_concurrent_jobs` run at once; the others wait for
//! a turn. A job whose last snapshot (read from its repository, so it survives restarts) is
//! older than its last due run, by at most `catch_up`, runs at start-up; so does a job that
//! never succeeded. A run past its `timeout` is cancelled: nothing partial is committed.
//!
//! SIGTERM or SIGINT: no new runs; running ones get `shutdown_grace`, then are cancelled. Exit
//! code 0 when nothing was cut short, 1 when a run was cancelled, 2 when the configuration
//! does not load or its address cannot be listened on.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

mod systemd;

use kluis::config::Loaded;
use kluis::metrics::{self, Metrics};
use kluis::scheduler::{Control, DaemonRunner, Scheduler, log};
use kluis::status::Board;

struct Args {
    config: Option<PathBuf>,
    once: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        config: None,
        once: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" | "-c" => {
                args.config = Some(it.next().ok_or("--config needs a file")?.into());
            }
            "--once" => args.once = true,
            "--version" | "-V" => {
                println!("kluisd {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            "--help" | "-h" => {
                println!(
                    "kluisd: runs kluis backup jobs on their schedules\n\n\
                     usage: kluisd [--config FILE] [--once]\n\n\
                     --config FILE  the configuration (default: the embedded config/kluis.toml)\n\
                     --once         every job once, now, then copies, drills, maintenance;\n               exit 0 if all succeeded"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    kluis::private_files();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kluisd: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match &args.config {
        Some(p) => Loaded::from_file(p),
        None => Loaded::embedded(),
    };
    let config = match config {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("kluisd: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kluisd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        if let Err(e) = std::fs::create_dir_all(&config.state_dir) {
            log(format!(
                "cannot create the state directory {}: {e}",
                config.state_dir.display()
            ));
            return 1;
        }
        log(format!(
            "configuration {}: {} job(s), state in {}, time zone {}",
            config.origin,
            config.jobs.len(),
            config.state_dir.display(),
            config.time_zone.iana_name().unwrap_or("(system)")
        ));
        let runner = Arc::new(DaemonRunner {
            metrics: Arc::new(Metrics::new()),
            board: Arc::new(Board::default()),
        });
        if args.once {
            return kluis::scheduler::once(config, runner).await;
        }
        let listener = match tokio::net::TcpListener::bind(&config.http.listen).await {
            Ok(l) => l,
            Err(e) => {
                log(format!(
                    "cannot listen on {} for /metrics: {e}",
                    config.http.listen
                ));
                return 2;
            }
        };
        log(format!(
            "serving /metrics and /healthz on http://{}",
            listener
                .local_addr()
                .map_or(config.http.listen.clone(), |a| a.to_string())
        ));
        let server = tokio::spawn(metrics::serve(
            listener,
            runner.metrics.clone(),
            runner.board.clone(),
        ));
        let Some(control) = controls(args.config.as_deref()) else {
            return 1;
        };
        let notifier = systemd::Notifier::from_env();
        let code = Scheduler::new(config, args.config.clone(), runner)
            .notifying(move |state| notifier.send(state))
            .serve(control)
            .await;
        server.abort();
        code
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    ExitCode::from(code)
}

/// The scheduler's controls: SIGTERM and SIGINT stop it, SIGHUP and a change of the
/// configuration file reload it, systemd's watchdog interval pings. `None` if the signal
/// handlers cannot be installed.
fn controls(config_path: Option<&std::path::Path>) -> Option<mpsc::Receiver<Control>> {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        log("cannot install signal handlers");
        return None;
    };
    let (tx, rx) = mpsc::channel(4);
    // The configuration file is watched: a change is a reload, as SIGHUP is.
    let (changed_tx, mut changed) = mpsc::channel::<()>(1);
    let watcher = config_path.and_then(|p| watch(p, changed_tx));
    let watchdog_every = systemd::Notifier::watchdog_interval();
    tokio::spawn(async move {
        let _watcher = watcher;
        let mut watchdog =
            tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
        loop {
            let control = tokio::select! {
                _ = watchdog.tick(), if watchdog_every.is_some() => Control::Watchdog,
                _ = hup.recv() => Control::Reload { why: "SIGHUP: reloading the configuration".into() },
                Some(()) = changed.recv() => {
                    // Editors write in several steps: let them finish.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    while changed.try_recv().is_ok() {}
                    Control::Reload { why: "the configuration file changed".into() }
                }
                _ = term.recv() => Control::Stop,
                _ = int.recv() => Control::Stop,
            };
            if tx.send(control).await.is_err() {
                return;
            }
        }
    });
    Some(rx)
}

/// Watches the directory of the configuration file (editors replace files by renaming) and
/// signals changes to that file. `None` if watching is not possible: SIGHUP still works.
fn watch(
    path: &std::path::Path,
    tx: tokio::sync::mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let path = std::path::absolute(path).ok()?;
    let name = path.file_name()?.to_os_string();
    let dir = path.parent()?.to_path_buf();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let ours = event
            .paths
            .iter()
            .any(|p| p.file_name() == Some(name.as_os_str()));
        if ours && (event.kind.is_modify() || event.kind.is_create() || event.kind.is_remove()) {
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| {
        log(format!(
            "cannot watch the configuration file ({e}); SIGHUP reloads it"
        ))
    })
    .ok()?;
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .map_err(|e| {
            log(format!(
                "cannot watch {} ({e}); SIGHUP reloads the configuration",
                dir.display()
            ))
        })
        .ok()?;
    Some(watcher)
}
