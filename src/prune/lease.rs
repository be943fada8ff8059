//! The prune lease: at most one prune changes a repository at a time.
//!
//! A prune puts `prune/leases/<id>` and then lists the leases: whoever sees another live lease
//! withdraws. Of two racing prunes at least one sees the other (read-after-write listings), so
//! at most one proceeds, without conditional writes (which Garage ignores).
//!
//! Three things make this hold between real hosts:
//! - **Time from the store.** A lease is live until the store time it was written plus its
//!   time to live ([`crate::clock`]); no host's wall clock is consulted, so a host whose clock
//!   is hours behind neither ends another's lease early nor keeps its own alive.
//! - **Renewal.** While a prune runs, [`LeaseGuard::hold`] writes a fresh lease (same run, new
//!   object) every quarter of the time to live and deletes the previous one, so a prune that
//!   runs for days keeps its claim. Before every step that deletes or marks, the prune calls
//!   [`LeaseGuard::check`]: a renewal that failed or came late (the process was stopped or
//!   suspended), or another run's live lease, stops it before it changes anything more.
//! - **Identity.** A lease names its run (a random id), host, machine id, boot id, pid
//!   namespace, user, pid and the pid's start time. A lease is taken over early only when it
//!   was written on this machine, in this boot and pid namespace, by a process that certainly
//!   no longer exists: two hosts (or containers) that share a name never delete each other's
//!   leases. A lease object that cannot be read (an older kluis's, or junk) counts as another
//!   run's for the longest time to live, then is removed.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::{get_json, list_records, put_json};
use crate::clock::{self, SLACK, Stopwatch};
use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::object::name;
use crate::repository::Repository;

/// How long a lease lives without renewal; a killed prune on another machine blocks others
/// for at most this long.
pub const LEASE_TTL: Duration = Duration::from_secs(3600);
/// A lease claiming to live longer than this is read as living this long.
const MAX_TTL: Duration = Duration::from_secs(6 * 3600);
/// How long a prune that found another's lease while starting may take to withdraw its own.
const WITHDRAWAL: Duration = Duration::from_secs(2);

/// A running prune's claim (`prune/leases/<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    /// This lease object's id; a renewal writes a new one.
    pub id: ObjectId,
    /// The prune run's id, the same in all its renewals.
    pub run: ObjectId,
    pub host: String,
    /// `/etc/machine-id` of the prune's machine (empty when unknown).
    pub machine: String,
    /// `/proc/sys/kernel/random/boot_id` at the time (empty when unknown).
    pub boot: String,
    /// The pid namespace (`readlink /proc/self/ns/pid`, e.g. `pid:[4026531836]`; empty when
    /// unknown): containers share the boot id and often the machine id.
    pub pid_ns: String,
    /// The effective uid of the prune.
    pub uid: u32,
    pub pid: u32,
    /// The process's start time in clock ticks after boot (`/proc/PID/stat`, field 22): a pid
    /// reused by another process does not pass for the prune.
    pub pid_start: u64,
    /// When the run began, by its host's clock: for people, not for the protocol.
    pub started: Timestamp,
    /// Live until the store time of this object plus this.
    pub ttl_seconds: u64,
}

impl Lease {
    fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_seconds).min(MAX_TTL)
    }

    /// Whether a lease the store timed `stored` is over at store time `now`.
    fn expired(&self, stored: Timestamp, now: Timestamp) -> bool {
        clock::add(stored, self.ttl() + SLACK) <= now
    }

    fn describe(&self) -> String {
        format!(
            "host {}, pid {}, since {}",
            self.host, self.pid, self.started
        )
    }
}

/// Who this process is, as leases record it.
struct Me {
    machine: String,
    boot: String,
    pid_ns: String,
    uid: u32,
    pid: u32,
    pid_start: u64,
}

impl Me {
    fn read() -> Me {
        let pid = std::process::id();
        Me {
            machine: first_line("/etc/machine-id")
                .or_else(|| first_line("/var/lib/dbus/machine-id"))
                .unwrap_or_default(),
            boot: first_line("/proc/sys/kernel/random/boot_id").unwrap_or_default(),
            pid_ns: std::fs::read_link("/proc/self/ns/pid")
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            uid: rustix::process::geteuid().as_raw(),
            pid,
            pid_start: match process_start(pid) {
                Process::Started(t) => t,
                _ => 0,
            },
        }
    }

    /// A lease written on this machine, in this boot and pid namespace, whose process is
    /// certainly gone (no such pid, or a pid reused by a process started at another time):
    /// its prune was killed. A process this one may not see (another user's, under
    /// `hidepid`) counts as alive.
    fn outlived(&self, lease: &Lease) -> bool {
        let here = !self.machine.is_empty()
            && !self.boot.is_empty()
            && !self.pid_ns.is_empty()
            && lease.machine == self.machine
            && lease.boot == self.boot
            && lease.pid_ns == self.pid_ns;
        let visible = lease.uid == self.uid || self.uid == 0;
        here && visible
            && match process_start(lease.pid) {
                Process::Gone => true,
                Process::Started(t) => t != lease.pid_start,
                Process::Unknown => false,
            }
    }
}

fn first_line(path: &str) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let line = s.lines().next()?.trim();
    (!line.is_empty()).then(|| line.to_string())
}

enum Process {
    /// Running, started at this many clock ticks after boot.
    Started(u64),
    /// No such process.
    Gone,
    /// Could not tell.
    Unknown,
}

/// Process `pid`'s start time (field 22 of `/proc/PID/stat`).
fn process_start(pid: u32) -> Process {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Process::Gone,
        Err(_) => return Process::Unknown,
    };
    // The command name (field 2) is in parentheses and may hold spaces and parentheses.
    let start = stat
        .rfind(')')
        .and_then(|at| stat[at + 1..].split_whitespace().nth(19)?.parse().ok());
    start.map_or(Process::Unknown, Process::Started)
}

/// Another run's claim on the repository.
enum Holder {
    Lease(Lease),
    /// A lease object that does not parse: an older kluis's, or junk.
    Unreadable {
        object: String,
        until: Timestamp,
    },
}

impl Holder {
    fn describe(&self) -> String {
        match self {
            Holder::Lease(l) => l.describe(),
            Holder::Unreadable { object, until } => format!(
                "{object} cannot be read (an older kluis's lease, or junk); it counts as a \
                 lease until {until}"
            ),
        }
    }
}

struct State {
    /// The lease object in force.
    current: ObjectId,
    /// When `current` was written (this host's boot-time clock).
    renewed: Stopwatch,
    /// Why the last renewal failed.
    failed: Option<String>,
}

/// A held lease. Release it with [`LeaseGuard::release`]; a dropped guard leaves its lease to
/// expire (or to be taken over by the next prune on this machine).
pub struct LeaseGuard<'a> {
    repo: &'a Repository,
    template: Lease,
    ttl: Duration,
    /// The store's time when the lease was taken: prune's "now".
    pub acquired: Timestamp,
    state: Mutex<State>,
}

impl<'a> LeaseGuard<'a> {
    /// Takes the lease, or fails with [`Error::Conflict`] naming the prune that holds it.
    pub async fn acquire(repo: &'a Repository, host: &str, ttl: Duration) -> Result<Self> {
        let me = Me::read();
        let template = Lease {
            id: ObjectId::random(),
            run: ObjectId::random(),
            host: host.to_string(),
            machine: me.machine.clone(),
            boot: me.boot.clone(),
            pid_ns: me.pid_ns.clone(),
            uid: me.uid,
            pid: me.pid,
            pid_start: me.pid_start,
            started: Timestamp::now(),
            ttl_seconds: ttl.min(MAX_TTL).as_secs().max(1),
        };
        let watch = Stopwatch::start();
        let own = name::prune_object(name::PRUNE_LEASES, &template.id);
        put_json(repo, &own, &template).await?;
        let guard = LeaseGuard {
            repo,
            ttl: Duration::from_secs(template.ttl_seconds),
            acquired: Timestamp::UNIX_EPOCH,
            state: Mutex::new(State {
                current: template.id,
                renewed: watch,
                failed: None,
            }),
            template,
        };
        match guard.others(&me, true).await {
            Ok((now, None)) => Ok(LeaseGuard {
                acquired: now,
                ..guard
            }),
            Ok((_, Some(holder))) => {
                repo.store().delete(&own).await?;
                Err(Error::Conflict(format!(
                    "another prune holds the repository ({}); try again later",
                    holder.describe()
                )))
            }
            Err(e) => {
                repo.store().delete(&own).await?;
                Err(e)
            }
        }
    }

    /// Lists the leases: returns the store time of this run's newest lease and another run's
    /// live claim, if any. With `clean`, claims that are over (expired, or outlived by their
    /// process on this machine) are deleted.
    async fn others(&self, me: &Me, clean: bool) -> Result<(Timestamp, Option<Holder>)> {
        let current = self.state.lock().expect("not poisoned").current;
        let mut ours = None;
        let mut theirs = Vec::new();
        for (id, stored) in list_records(self.repo, name::PRUNE_LEASES, &mut Vec::new()).await? {
            let object = name::prune_object(name::PRUNE_LEASES, &id);
            let lease = if id == current {
                None
            } else {
                match get_json::<Lease>(self.repo, &object).await {
                    Ok(l) => Some(l),
                    Err(Error::MissingObject { .. }) => continue,
                    Err(Error::Corrupt { .. }) => {
                        theirs.push((object, stored, None));
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            };
            match lease {
                // This run's (the current lease, or the one a renewal is replacing).
                None => ours = ours.max(Some(stored)),
                Some(l) if l.run == self.template.run => ours = ours.max(Some(stored)),
                Some(l) => theirs.push((object, stored, Some(l))),
            }
        }
        let now = ours.ok_or_else(|| {
            Error::Conflict(format!(
                "this prune's lease {} is gone from the repository (another prune found it \
                 stale, or the store lost it); stopped",
                name::prune_object(name::PRUNE_LEASES, &current)
            ))
        })?;
        let mut holder = None;
        for (object, stored, lease) in theirs {
            let over = match &lease {
                Some(l) => l.expired(stored, now) || me.outlived(l),
                None => clock::add(stored, MAX_TTL + SLACK) <= now,
            };
            if over {
                if clean {
                    self.repo.store().delete(&object).await?;
                }
                continue;
            }
            holder = Some(match lease {
                Some(l) => Holder::Lease(l),
                None => Holder::Unreadable {
                    object,
                    until: clock::add(stored, MAX_TTL + SLACK),
                },
            });
        }
        Ok((now, holder))
    }

    /// Writes a fresh lease of this run and deletes the previous one. A failure is recorded;
    /// the next [`LeaseGuard::check`] reports it.
    async fn renew(&self) {
        let watch = Stopwatch::start();
        let lease = Lease {
            id: ObjectId::random(),
            ..self.template.clone()
        };
        let object = name::prune_object(name::PRUNE_LEASES, &lease.id);
        let result = put_json(self.repo, &object, &lease).await;
        let previous = {
            let mut state = self.state.lock().expect("not poisoned");
            match result {
                Ok(()) => {
                    let previous = state.current;
                    state.current = lease.id;
                    state.renewed = watch;
                    state.failed = None;
                    Some(previous)
                }
                Err(e) => {
                    state.failed = Some(e.to_string());
                    None
                }
            }
        };
        if let Some(previous) = previous {
            // Left behind, it would expire: no harm beyond a lease that lives on a little.
            let _ = self
                .repo
                .store()
                .delete(&name::prune_object(name::PRUNE_LEASES, &previous))
                .await;
        }
    }

    /// Runs `work`, renewing the lease every quarter of its time to live.
    pub async fn hold<T>(&self, work: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                result = &mut work => return result,
                _ = tokio::time::sleep(self.ttl / 4) => self.renew().await,
            }
        }
    }

    /// Fails unless this run still holds the lease: renewed in time, and no other run's live
    /// lease in the repository. Call it before each step that changes the repository.
    pub async fn check(&self) -> Result<()> {
        let (failed, age) = {
            let state = self.state.lock().expect("not poisoned");
            (state.failed.clone(), state.renewed.elapsed())
        };
        if let Some(e) = failed {
            return Err(Error::Conflict(format!(
                "the prune lease could not be renewed ({e}); prune stopped before changing more"
            )));
        }
        if age > self.ttl / 2 {
            return Err(Error::Conflict(format!(
                "the prune lease was last renewed {} ago (this process was stopped or \
                 suspended?), another prune may have taken over; prune stopped before changing more",
                crate::retention::show(age)
            )));
        }
        let me = Me::read();
        if let (_, Some(_)) = self.others(&me, false).await? {
            // A prune that is only trying to start withdraws within moments; one that holds
            // the repository stays.
            tokio::time::sleep(WITHDRAWAL).await;
            if let (_, Some(other)) = self.others(&me, false).await? {
                return Err(Error::Conflict(format!(
                    "another prune holds the repository too ({}); this one stopped before \
                     changing more",
                    other.describe()
                )));
            }
        }
        Ok(())
    }

    /// Deletes the lease.
    pub async fn release(self) -> Result<()> {
        let current = self.state.lock().expect("not poisoned").current;
        self.repo
            .store()
            .delete(&name::prune_object(name::PRUNE_LEASES, &current))
            .await
    }
}

#[cfg(test)]
mod tests;
