//! The scheduler's loop on tokio's paused clock, with a runner that only takes time: what
//! starts when, what is skipped, what waits for a turn, what the stop cancels, what a reload
//! adds. Minutes of schedule run in milliseconds.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use jiff::Timestamp;
use tokio::sync::mpsc;

use super::*;

/// 30 s past a minute, so `every 1m` is due at +30 s, +90 s, ...
const BASE: &str = "2026-12-03T10:00:30Z";

struct Fake {
    clock: Clock,
    /// How long a run of each task takes (by name; default 1 s).
    takes: BTreeMap<String, Duration>,
    /// Whether runs stop when cancelled (else they run their whole time).
    obeys: bool,
    /// Scripted outcomes by name, in order (then Ok).
    outcomes: Arc<Mutex<BTreeMap<String, VecDeque<Outcome>>>>,
    history: History,
    /// (seconds since BASE, "start a" / "end a Ok" / "skip a").
    events: Arc<Mutex<Vec<(i64, String)>>>,
}

impl Fake {
    fn new() -> Fake {
        Fake {
            clock: Clock::following_tokio(BASE.parse().unwrap()),
            takes: BTreeMap::new(),
            obeys: true,
            outcomes: Arc::default(),
            history: History::default(),
            events: Arc::default(),
        }
    }

    fn takes(mut self, name: &str, secs: u64) -> Fake {
        self.takes.insert(name.into(), Duration::from_secs(secs));
        self
    }

    fn note(&self, what: String) {
        note(&self.events, self.clock, what);
    }

    fn events(&self) -> Vec<(i64, String)> {
        self.events.lock().unwrap().clone()
    }
}

impl Runner for Fake {
    fn run(&self, _: Arc<Loaded>, work: Work, cancel: Cancel) -> BoxFuture<'static, Outcome> {
        let (events, outcomes, clock, obeys) = (
            self.events.clone(),
            self.outcomes.clone(),
            self.clock,
            self.obeys,
        );
        let name = work.name().to_string();
        let takes = self
            .takes
            .get(&name)
            .copied()
            .unwrap_or(Duration::from_secs(1));
        // The run begins when the scheduler polls it, after its turn came.
        async move {
            note(&events, clock, format!("start {name}"));
            let outcome = tokio::select! {
                _ = tokio::time::sleep(takes) => outcomes
                    .lock()
                    .unwrap()
                    .get_mut(&name)
                    .and_then(VecDeque::pop_front)
                    .unwrap_or(Outcome::Ok),
                _ = cancel.cancelled(), if obeys => Outcome::Failed,
            };
            note(&events, clock, format!("end {name} {outcome:?}"));
            outcome
        }
        .boxed()
    }

    fn observe(&self, _: Arc<Loaded>) -> BoxFuture<'static, History> {
        let history = self.history.clone();
        async move { history }.boxed()
    }

    fn skipped(&self, work: &Work) {
        self.note(format!("skip {}", work.name()));
    }
}

fn note(events: &Mutex<Vec<(i64, String)>>, clock: Clock, what: String) {
    let base: Timestamp = BASE.parse().unwrap();
    let at = clock.now().duration_since(base).as_secs();
    events.lock().unwrap().push((at, what));
}

/// A fake shared by the scheduler and the test.
fn live(fake: Fake) -> Arc<Fake> {
    Arc::new(fake)
}

fn config(dir: &std::path::Path, daemon: &str, tasks: &str) -> Loaded {
    let text = format!(
        r#"
        [daemon]
        time_zone = "UTC"
        state_dir = "{dir}/state"
        {daemon}
        [repositories.r]
        url = "{dir}/repo"
        key_file = "{dir}/key"
        {tasks}
        "#,
        dir = dir.display()
    );
    Loaded::parse(&text, "test").unwrap()
}

fn job(name: &str, schedule: &str) -> String {
    format!("[jobs.{name}]\nrepository = \"r\"\npaths = [\"/etc\"]\nschedule = \"{schedule}\"\n")
}

/// Serves `config` with `fake` until `stop_after`, then stops it; the exit code.
async fn serve_for(config: Loaded, fake: &Arc<Fake>, stop_after: u64) -> u8 {
    let (tx, rx) = mpsc::channel(4);
    let scheduler =
        Scheduler::new(Arc::new(config), None, fake.clone()).with_clock(fake.clock, |_| 0);
    let served = tokio::spawn(scheduler.serve(rx));
    tokio::time::sleep(Duration::from_secs(stop_after)).await;
    tx.send(Control::Stop).await.unwrap();
    served.await.unwrap()
}

fn at(events: &[(i64, String)], what: &str) -> Vec<i64> {
    events
        .iter()
        .filter(|(_, w)| w == what)
        .map(|(t, _)| *t)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_job_that_never_ran_starts_at_once_then_on_its_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let fake = live(Fake::new());
    let code = serve_for(config(dir.path(), "", &job("a", "every 1m")), &fake, 200).await;
    assert_eq!(code, 0);
    assert_eq!(at(&fake.events(), "start a"), vec![0, 30, 90, 150]);
}

#[tokio::test(start_paused = true)]
async fn a_missed_run_is_made_up_and_a_done_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut fake = Fake::new();
    // 02:30 today was missed by a (last: yesterday) and done by b.
    let t = |s: &str| s.parse::<Timestamp>().unwrap();
    fake.history
        .job_last
        .insert("a".into(), t("2026-12-02T02:31:00Z"));
    fake.history
        .job_last
        .insert("b".into(), t("2026-12-03T02:31:00Z"));
    let fake = live(fake);
    let tasks = job("a", "daily at 02:30") + &job("b", "daily at 02:30");
    serve_for(config(dir.path(), "", &tasks), &fake, 600).await;
    assert_eq!(at(&fake.events(), "start a"), vec![0]);
    assert_eq!(at(&fake.events(), "start b"), Vec::<i64>::new());
}

#[tokio::test(start_paused = true)]
async fn a_run_due_while_the_previous_one_goes_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let fake = live(Fake::new().takes("a", 80));
    serve_for(config(dir.path(), "", &job("a", "every 1m")), &fake, 100).await;
    let events = fake.events();
    assert_eq!(at(&events, "start a"), vec![0, 90]);
    assert_eq!(at(&events, "skip a"), vec![30]);
    assert_eq!(at(&events, "end a Ok"), vec![80]);
}

#[tokio::test(start_paused = true)]
async fn runs_wait_for_a_turn_within_max_concurrent_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = job("a", "hourly at :00") + &job("b", "hourly at :00");
    let fake = live(Fake::new().takes("a", 20).takes("b", 20));
    let one = config(dir.path(), "max_concurrent_jobs = 1", &tasks);
    serve_for(one, &fake, 60).await;
    let events = fake.events();
    assert_eq!(at(&events, "start a"), vec![0]);
    assert_eq!(at(&events, "start b"), vec![20]);

    let fake = live(Fake::new().takes("a", 20).takes("b", 20));
    let two = config(dir.path(), "max_concurrent_jobs = 2", &tasks);
    serve_for(two, &fake, 60).await;
    assert_eq!(at(&fake.events(), "start b"), vec![0]);
}

#[tokio::test(start_paused = true)]
async fn the_stop_waits_for_the_grace_then_cancels_and_a_waiting_run_never_starts() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = job("a", "hourly at :00") + &job("b", "hourly at :00");
    let fake = live(Fake::new().takes("a", 600).takes("b", 600));
    let daemon = "max_concurrent_jobs = 1\nshutdown_grace = \"30s\"";
    let code = serve_for(config(dir.path(), daemon, &tasks), &fake, 5).await;
    assert_eq!(code, 1, "a run was cut short");
    let events = fake.events();
    assert_eq!(at(&events, "end a Failed"), vec![35]);
    assert_eq!(at(&events, "start b"), Vec::<i64>::new());
}

#[tokio::test(start_paused = true)]
async fn a_run_that_ends_within_the_grace_is_not_cut_short() {
    let dir = tempfile::tempdir().unwrap();
    let fake = live(Fake::new().takes("a", 20));
    let daemon = "shutdown_grace = \"30s\"";
    let code = serve_for(
        config(dir.path(), daemon, &job("a", "hourly at :00")),
        &fake,
        5,
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(at(&fake.events(), "end a Ok"), vec![20]);
}

#[tokio::test(start_paused = true)]
async fn a_drill_with_nothing_to_drill_yet_tries_again_in_a_minute() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new().takes("a", 5);
    fake.outcomes
        .lock()
        .unwrap()
        .insert("d".into(), VecDeque::from([Outcome::NotYet]));
    let fake = live(fake);
    let tasks =
        job("a", "daily at 02:30") + "[drills.d]\njob = \"a\"\nschedule = \"hourly at :00\"\n";
    serve_for(config(dir.path(), "", &tasks), &fake, 300).await;
    let events = fake.events();
    // Its turn after the job's first run (one run at a time); again a minute after it
    // found nothing, not at its next hour.
    assert_eq!(at(&events, "start d"), vec![5, 66]);
    assert_eq!(at(&events, "end d NotYet"), vec![6]);
}

#[tokio::test(start_paused = true)]
async fn a_reload_plans_the_new_configuration_and_keeps_running_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kluisd.toml");
    let write = |tasks: &str| {
        let c = config(dir.path(), "max_concurrent_jobs = 2", tasks);
        let text = format!(
            "[daemon]\ntime_zone = \"UTC\"\nstate_dir = \"{d}/state\"\nmax_concurrent_jobs = 2\n\
             [repositories.r]\nurl = \"{d}/repo\"\nkey_file = \"{d}/key\"\n{tasks}",
            d = dir.path().display()
        );
        std::fs::write(&path, text).unwrap();
        c
    };
    let first = write(&job("a", "hourly at :00"));
    let fake = live(Fake::new().takes("a", 50));
    let (tx, rx) = mpsc::channel(4);
    let scheduler = Scheduler::new(Arc::new(first), Some(path.clone()), fake.clone())
        .with_clock(fake.clock, |_| 0);
    let served = tokio::spawn(scheduler.serve(rx));
    tokio::time::sleep(Duration::from_secs(10)).await;
    write(&(job("a", "hourly at :00") + &job("b", "hourly at :00")));
    let why = "test".to_string();
    tx.send(Control::Reload { why }).await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    // A file that does not load leaves the schedule as it was.
    std::fs::write(&path, "[jobs.x]\nnonsense = 1\n").unwrap();
    tx.send(Control::Reload { why: "test".into() })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    tx.send(Control::Stop).await.unwrap();
    assert_eq!(served.await.unwrap(), 0);
    let events = fake.events();
    // a's run went on through the reload, and was not started again beside itself.
    assert_eq!(at(&events, "start a"), vec![0]);
    assert_eq!(at(&events, "end a Ok"), vec![50]);
    assert_eq!(at(&events, "start b"), vec![10]);
}
